"""Hostile input: every bad file, value or run directory ends with one `error:` paragraph naming
the file or field, exit status 2, and no output of an earlier run changed."""
import csv
import hashlib
import io
import json
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


def _run(module, tmp_path, *args):
    return subprocess.run([sys.executable, "-m", f"ernas.cli.{module}", *args],
                          capture_output=True, text=True, cwd=tmp_path)


def _user_error(r, *fragments):
    """Exit 2, one `error:` paragraph, no traceback, and every fragment named."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    text = " ".join(r.stderr.split())  # the paragraph is wrapped to the terminal width
    for f in fragments:
        assert f in text, (f, r.stderr[-2000:])


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
    shipped = sorted(LATENCY_TABLES.glob("nafnet_tiny_*.csv"))[0]
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
