"""Hostile input: every bad file, value or run directory ends with one `error:` paragraph naming
the file or field, exit status 2, and no output of an earlier run changed."""
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ernas.families.nafnet import official_arch
from ernas.paths import LATENCY_TABLES, SEARCH_SPACES

TINY = dict(width=8, enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1])
SEARCH = ["input_shape=[1,3,32,32]", "latency.backend.threads=1", "latency.measure.rounds=2",
          "latency.measure.per_round=1", "latency.measure.min_seconds=0", "search.crop=16",
          "task.max_side=128", "search.batch_size=2", "search.warmup_steps=1",
          "search.checkpoint_every=2", "search.device=cpu", "progress=false"]
RETRAIN = ["steps=4", "batch_size=2", "crop=32", "val_every=2", "log_every=2", "val_crop=64",
           "task.max_side=256", "threads=1", "progress=false"]


def _run(module, tmp_path, *args, env=None):
    return subprocess.run([sys.executable, "-m", f"ernas.cli.{module}", *args],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, **(env or {})})


def _user_error(r, *fragments):
    """Exit 2, one `error:` paragraph, no traceback, and every fragment named."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    text = " ".join(r.stderr.split())  # the paragraph is wrapped to the terminal width
    for f in fragments:
        assert f in text, (f, r.stderr[-2000:])


def _every_file(folder: Path) -> dict:
    """SHA-1 of every file under ``folder``, Hydra's record and logs included."""
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _outputs(folder: Path) -> list[str]:
    """The outputs in a run directory (not its lock, Hydra's record or the job log)."""
    return sorted(p.name for p in folder.glob("*") if p.suffix != ".log"
                  and not p.name.startswith(".")) if folder.exists() else []


def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".ernas.lock"))
    return to


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".log"
            and ".hydra" not in p.parts and p.name != ".ernas.lock"}


# --------------------------------------------------------------------------- files
def test_space_files_that_are_not_yaml_text(tmp_path):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("family: nafnet\nname: caf\xe9\n".encode("latin-1"))
    _user_error(_run("search", tmp_path, f"space={latin}"), "latin1.yaml", "UTF-8")
    dup = tmp_path / "dup.yaml"
    dup.write_text("family: nafnet\nblocks:\n  all: {kernel: [3, 5]}\n  all: {kernel: 7}\n")
    _user_error(_run("search", tmp_path, f"space={dup}"), "dup.yaml", "'all' twice",
                "lines 3 and 4")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    _user_error(_run("search", tmp_path, f"space={folder}"), "a_folder", "is a folder")


def test_a_space_given_as_arch_is_refused_everywhere(tmp_path):
    space = SEARCH_SPACES / "nafnet_tiny.yaml"
    for module, extra in (("retrain", RETRAIN), ("evaluate", ["measure_latency=false"]),
                          ("export", [])):
        r = _run(module, tmp_path, f"arch={space}", f"hydra.run.dir={tmp_path / module}", *extra)
        _user_error(r, "nafnet_tiny.yaml", "single value")


def test_latency_tables_with_impossible_rows(tmp_path):
    shipped = sorted(LATENCY_TABLES.glob("nafnet_tiny_onnxruntime_*.csv"))[0]
    header, body = shipped.read_text().split("\n", 1)
    rows = list(csv.reader(io.StringIO(body)))
    cols, key = rows[0], rows[1][0]
    for bad in ("-97.11", "inf", "nan"):
        first = list(rows[1])
        for c in ("median_ms", "ms"):
            if c in cols:
                first[cols.index(c)] = bad
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([cols, first, *rows[2:]])
        table = tmp_path / f"table_{bad}.csv"
        table.write_text(header + "\n" + out.getvalue())
        r = _run("search", tmp_path, f"latency.table={table}", "latency.trust_table=true",
                 f"hydra.run.dir={tmp_path / ('s' + bad)}", *SEARCH)
        _user_error(r, table.name, key)


def test_zero_input_shape_leaves_no_table_behind(tmp_path):
    cache = tmp_path / "cache"
    r = _run("search", tmp_path, *SEARCH, "input_shape=[1,3,0,0]", f"latency.cache_dir={cache}",
             f"hydra.run.dir={tmp_path / 'z'}")
    _user_error(r, "input_shape")
    assert not list(cache.rglob("*.csv"))


# --------------------------------------------------------------------------- run directories
@pytest.fixture(scope="module")
def finished_retrain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rt")
    r = _run("retrain", tmp, *RETRAIN, f"hydra.run.dir={tmp / 'run'}")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run"


def test_a_second_run_into_the_same_directory_is_refused(tmp_path, finished_retrain):
    before = _digest(finished_retrain)
    r = _run("retrain", tmp_path, *RETRAIN, f"hydra.run.dir={finished_retrain}")
    _user_error(r, str(finished_retrain), "earlier run", "resume=")
    assert _digest(finished_retrain) == before


def test_corrupt_checkpoints_on_resume(tmp_path, finished_retrain):
    run = tmp_path / "copy"
    run.mkdir()
    for f in finished_retrain.iterdir():
        if f.is_file():
            (run / f.name).write_bytes(f.read_bytes())
    for content in (b"", b"PK\x03\x04truncated"):
        (run / "last.pt").write_bytes(content)
        r = _run("retrain", tmp_path, f"resume={run}", f"hydra.run.dir={tmp_path / 'again'}",
                 "progress=false")
        _user_error(r, "last.pt", "start")


def test_resume_refuses_changed_settings_and_needs_a_checkpoint(tmp_path, finished_retrain):
    r = _run("retrain", tmp_path, f"resume={finished_retrain}", "steps=99", "lr=0.5",
             f"hydra.run.dir={tmp_path / 'r1'}")
    _user_error(r, "steps (run: 4, now: 99)", "lr (run: 0.001, now: 0.5)")
    empty = tmp_path / "killed_early"
    empty.mkdir()
    r = _run("retrain", tmp_path, f"resume={empty}", f"hydra.run.dir={tmp_path / 'r2'}")
    _user_error(r, "killed_early", "before its first checkpoint")


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize("override, field", [
    ("lr=-1", "lr"), ("betas=[0.9]", "betas"), ("threads=abc", "threads"),
    ("grad_clip=-1", "grad_clip"), ("steps=0", "steps"), ("val_crop=0", "val_crop")])
def test_bad_retrain_values(tmp_path, override, field):
    _user_error(_run("retrain", tmp_path, *RETRAIN, override, f"hydra.run.dir={tmp_path / 'x'}"),
                field)


@pytest.mark.parametrize("override, field", [
    ("search.steps=abc", "search.steps"), ("search.checkpoint_every=0", "checkpoint_every"),
    ("search.steps=0", "steps"), ("search.warmup_steps=50", "warmup_steps"),
    ("search.grad_clip=-1", "grad_clip"), ("search.lr_alpha=0", "lr_alpha"),
    ("search.weight_keep_rate=0", "weight_keep_rate"),
    ("search.weight_keep_rate=1.5", "weight_keep_rate"),
    ("latency.anchor_samples=-1", "anchor_samples"),
    ("latency.max_inconsistency=0.5", "max_inconsistency")])
def test_bad_search_values(tmp_path, override, field):
    r = _run("search", tmp_path, *SEARCH, "search.steps=10", override,
             f"hydra.run.dir={tmp_path / 'x'}", f"latency.cache_dir={tmp_path / 'c'}")
    _user_error(r, field)
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


@pytest.mark.parametrize("module", ["search", "evaluate", "export", "profile"])
def test_a_bad_latency_value_is_refused_by_every_command(tmp_path, module):
    """Every command that reads the latency group types it (export has no schema of its own:
    it used to accept latency.anchor=maybe); nothing is written."""
    r = _run(module, tmp_path, "latency.anchor=maybe", f"hydra.run.dir={tmp_path / 'x'}",
             f"latency.cache_dir={tmp_path / 'c'}")
    _user_error(r, "latency.anchor", "maybe")
    assert not (tmp_path / "x" / "summary.json").exists()


def test_unknown_fields_and_tasks(tmp_path):
    _user_error(_run("retrain", tmp_path, *RETRAIN, "+stepz=3", f"hydra.run.dir={tmp_path / 'a'}"),
                "stepz")
    _user_error(_run("retrain", tmp_path, *RETRAIN, "task.sigmaa=3",
                     f"hydra.run.dir={tmp_path / 'b'}"), "sigmaa")


def test_teacher_checkpoint_of_another_arch(tmp_path):
    arch = official_arch(**TINY)
    torch.save(torch.nn.Conv2d(1, 1, 1).state_dict(), tmp_path / "teacher.pt")
    arch.save(tmp_path / "arch.yaml")
    r = _run("retrain", tmp_path, *RETRAIN, f"teacher.arch={tmp_path / 'arch.yaml'}",
             f"teacher.checkpoint={tmp_path / 'teacher.pt'}", f"hydra.run.dir={tmp_path / 't'}")
    _user_error(r, "teacher.pt", "does not match")


def test_evaluate_pareto_runs_given_as_a_glob(tmp_path):
    for name, lat, q in (("a,b=1", 1.0, 28.0), ("c=2", 2.0, 30.0)):
        d = tmp_path / "sweep" / name
        d.mkdir(parents=True)
        official_arch(**TINY).save(d / "arch.yaml")
        (d / "summary.json").write_text(json.dumps({"name": name, "metric": "psnr",
                                                     "measured_ms": lat, "psnr": q}))
    r = _run("evaluate", tmp_path, f"runs='{tmp_path}/sweep/*'", f"hydra.run.dir={tmp_path / 'p'}")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert sorted(row["name"] for row in s["runs"]) == ["a,b=1", "c=2"]
    r = _run("evaluate", tmp_path, f"runs='{tmp_path}/nothing/*'",
             f"hydra.run.dir={tmp_path / 'q'}")
    _user_error(r, "nothing/*")


# --------------------------------------------------------------------------- resumes (issue 37)
@pytest.fixture(scope="module")
def stopped_retrain(tmp_path_factory):
    """A retrain run stopped at step 2 of 4 (resumable), made with log_every=2 and threads=1."""
    tmp = tmp_path_factory.mktemp("stopped")
    r = _run("retrain", tmp, *RETRAIN, "stop_at=2", f"hydra.run.dir={tmp / 'run'}")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    """A finished 4-step search with a checkpoint at step 2, logged every step, on one thread."""
    tmp = tmp_path_factory.mktemp("search")
    r = _run("search", tmp, *SEARCH, "search.steps=4", "search.log_every=1", "threads=1",
             f"latency.cache_dir={tmp / 'cache'}", f"hydra.run.dir={tmp / 'run'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp / "run" / "checkpoint.pt").is_file()
    return tmp / "run"


def test_resume_into_its_own_folder_refuses_changes_and_leaves_it_untouched(tmp_path,
                                                                           stopped_retrain):
    """Hydra used to rewrite D/.hydra/config.yaml with the new values before the comparison, so
    the changes were dropped silently, the record lied, and a plain resume= was refused after."""
    run = _copy_run(stopped_retrain, tmp_path / "run")
    before = _every_file(run)
    r = _run("retrain", tmp_path, f"resume={run}", "lr=0.5", "steps=80", f"hydra.run.dir={run}")
    _user_error(r, "lr (run: 0.001, now: 0.5)", "steps (run: 4, now: 80)")
    assert _every_file(run) == before
    r = _run("retrain", tmp_path, f"resume={run}", f"hydra.run.dir={run}", "progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_free_settings_keep_the_runs_values_on_resume(tmp_path, stopped_retrain, finished_search):
    """log_every/threads/search.log_every not given on resume used to take today's defaults:
    a retrain's summary recorded log_every 10, a search's log.csv lost its per-step rows."""
    run = _copy_run(stopped_retrain, tmp_path / "rt")
    r = _run("retrain", tmp_path, f"resume={run}", f"hydra.run.dir={tmp_path / 'h1'}",
             "progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["config"]["log_every"] == 2
    search = _copy_run(finished_search, tmp_path / "s")
    r = _run("search", tmp_path, f"resume={search}", f"hydra.run.dir={tmp_path / 'h2'}",
             f"latency.cache_dir={tmp_path / 'c'}", "progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("log.csv", "alphas.csv", "arch.yaml"):
        assert (search / f).read_text() == (finished_search / f).read_text(), f


def test_a_refused_search_leaves_a_running_runs_files_byte_identical(tmp_path, finished_search):
    """A second search on a directory whose lock is held (as a running command holds it) used to
    overwrite the first run's .hydra/config.yaml and overrides.yaml before being refused."""
    import fcntl

    run = _copy_run(finished_search, tmp_path / "run")
    before = _every_file(run)
    with open(run / ".ernas.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = _run("search", tmp_path, *SEARCH, "search.steps=4", "search.lam=9.0",
                 f"latency.cache_dir={finished_search.parent / 'cache'}", f"hydra.run.dir={run}")
    _user_error(r, str(run), "another ernas command")
    assert {k: v for k, v in _every_file(run).items() if k != ".ernas.lock"} == before


def test_resume_of_another_commands_run_or_before_its_first_checkpoint(tmp_path, stopped_retrain):
    before = _every_file(stopped_retrain)
    r = _run("search", tmp_path, f"resume={stopped_retrain}", f"hydra.run.dir={tmp_path / 'x'}")
    _user_error(r, "run of ernas-retrain", f"ernas-retrain resume={stopped_retrain}")
    assert _every_file(stopped_retrain) == before
    early = tmp_path / "early"  # killed before its first checkpoint: only its record exists
    (early / ".hydra").mkdir(parents=True)
    saved = (stopped_retrain / ".hydra" / "config.yaml").read_text()
    assert "val_every: 2\n" in saved
    (early / ".hydra" / "config.yaml").write_text(saved.replace("val_every: 2\n",
                                                                "val_every: 7\n"))
    r = _run("retrain", tmp_path, f"resume={early}", f"hydra.run.dir={tmp_path / 'y'}")
    _user_error(r, "before its first checkpoint", "val_every=7")


# --------------------------------------------------------------------------- geometry (issue 37)
def test_a_geometry_without_block_positions_but_with_blocks(tmp_path):
    f = tmp_path / "zero.yaml"
    f.write_text("family: nafnet\ngeometry: {enc_blk_nums: [0, 0], middle_blk_num: 0, "
                 "dec_blk_nums: [0, 0]}\nblocks:\n  all: {kernel: 3}\n")
    _user_error(_run("check", tmp_path, str(f)), "zero.yaml", "'all'", "no block positions")


def _geometry_file(folder: Path, width: int) -> Path:
    f = folder / f"w{width}.yaml"
    f.write_text(f"family: nafnet\ngeometry: {{width: {width}, enc_blk_nums: [1, 1], "
                 f"middle_blk_num: 1, dec_blk_nums: [1, 1]}}\n")
    return f


@pytest.mark.parametrize("module, args", [
    ("check", []), ("search", SEARCH), ("retrain", RETRAIN),
    ("evaluate", ["measure_latency=false"]), ("export", [])])
def test_huge_widths_are_refused_from_an_estimate_before_building(tmp_path, module, args):
    """Width 100000 used to crash allocating 80 GB; every command loads through one check."""
    f = _geometry_file(tmp_path, 100000)
    ref = [str(f)] if module == "check" else \
        [f"space={f}" if module == "search" else f"arch={f}", f"hydra.run.dir={tmp_path / 'x'}"]
    r = _run(module, tmp_path, *ref, *args)
    _user_error(r, "w100000.yaml", "too large", "parameters", "GiB of activations",
                "ERNAS_MAX_PARAMS")
    assert not _outputs(tmp_path / "x")


def test_the_size_limit_is_an_estimate_and_configurable(tmp_path):
    """Width 20000 used to climb past 4 GB before anything was said; the limit can be lowered
    (or raised) with the environment, and the estimate is in the message."""
    _user_error(_run("check", tmp_path, str(_geometry_file(tmp_path, 20000))), "too large")
    tiny = _geometry_file(tmp_path, 8)
    assert _run("check", tmp_path, str(tiny)).returncode == 0
    r = _run("check", tmp_path, str(tiny), env={"ERNAS_MAX_PARAMS": "1000"})
    _user_error(r, "w8.yaml", "too large", "above the limits of 1,000 parameters")


def test_defaults_taken_silently_are_said(tmp_path):
    """A file holding only `family: nafnet` builds the default 29M-parameter geometry, and an
    arch missing a decision takes the reference's value: both used to pass without a word."""
    bare = tmp_path / "bare.yaml"
    bare.write_text("family: nafnet\n")
    r = _run("check", tmp_path, str(bare))
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stderr.split())
    assert "gives no 'geometry'" in text and "default geometry" in text and "parameters" in text
    partial = tmp_path / "partial.yaml"
    official_arch(**TINY).save(partial)
    lines = partial.read_text().splitlines(True)
    partial.write_text("".join(ln for ln in lines if "norm:" not in ln))
    r = _run("retrain", tmp_path, f"arch={partial}", *RETRAIN, "steps=1", "val_every=1",
             f"hydra.run.dir={tmp_path / 'r'}")
    assert r.returncode == 0, r.stderr[-2000:]
    text = " ".join(r.stderr.split())
    assert "does not set every decision" in text and "norm=layernorm at every position (5)" \
        in text, text


# --------------------------------------------------------------------------- values (issue 37)
@pytest.mark.parametrize("module, args, fragments", [
    ("retrain", [*RETRAIN, "crop=100000"], ["crop"]),
    ("retrain", [*RETRAIN, "task.train_dir={empty}"], ["empty"]),
    ("retrain", [*RETRAIN, "lr=inf"], ["lr=inf", "finite"]),
    ("retrain", [*RETRAIN, "betas=[0.9,nan]"], ["betas[1]=nan", "finite"]),
    ("search", [*SEARCH, "search.steps=4", "search.lam=nan"], ["search.lam=nan", "finite"]),
    ("search", [*SEARCH, "search.steps=4", "search.crop=100000"], ["crop"])])
def test_data_and_non_finite_values_are_refused_before_the_first_file(tmp_path, module, args,
                                                                      fragments, finished_search):
    """These used to be found after arch.yaml and init_report.json were written (or, for
    search.lam=nan, at step 2 as "lower the learning rate")."""
    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")) for a in args]
    cache = finished_search.parent / "cache"  # the table is cached: nothing is profiled here
    r = _run(module, tmp_path, *args, f"latency.cache_dir={cache}" if module == "search"
             else "seed=0", f"hydra.run.dir={tmp_path / 'x'}")
    _user_error(r, *fragments)
    assert not _outputs(tmp_path / "x")
