"""Hostile input against the latency side (issue 37, cases 1, 2, 6, 9, 11): cache tables keyed
by the space's content and never replaced in place, device commands that print impossible
latencies or outlive their timeout, templates filled in one pass, tables that are not text.
Each test names the bug it catches."""
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import ernas
from ernas.errors import ErnasError
from ernas.latency.backends import Backend
from ernas.latency.cache import default_table_path, space_digest
from ernas.latency.command import CommandBackend
from ernas.latency.factory import make_backend
from ernas.latency.fingerprint import fingerprint, host_hardware
from ernas.latency.measure import MeasureProtocol
from ernas.latency.resolve import profile_table, resolve_table
from ernas.latency.settings import LatencySettings
from ernas.paths import ROOT

SMALL = {"family": "nafnet", "name": "hostile_small",
         "geometry": {"img_channel": 3, "width": 8, "enc_blk_nums": [1], "middle_blk_num": 1,
                      "dec_blk_nums": [1]},
         "blocks": {"all": {"norm": "layernorm", "attention": "sca", "kernel": [3, 5],
                            "dw_expand": 2, "ffn_expand": 2, "keep": True}}}
SHAPE = (1, 3, 16, 16)
QUICK = MeasureProtocol(rounds=2, per_round=1, warmup=0, min_seconds=0)
MEASURE = ["input_shape=[1,3,16,16]", "latency.measure.rounds=2", "latency.measure.per_round=1",
           "latency.measure.warmup=0", "latency.measure.min_seconds=0", "latency.recheck_rounds=1",
           "progress=false"]
PROFILE = [*MEASURE, "latency.backend.threads=1"]


def _run(module, cwd, *args):
    return subprocess.run([sys.executable, "-m", f"ernas.cli.{module}", *args],
                          capture_output=True, text=True, cwd=cwd)


def _user_error(r, *fragments):
    """Exit 2, one `error:` paragraph, no traceback, and every fragment named."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    text = " ".join(r.stderr.split())
    for f in fragments:
        assert f in text, (f, r.stderr[-2000:])


def _space_file(folder: Path, name: str, **geometry) -> Path:
    data = {**SMALL, "geometry": {**SMALL["geometry"], **geometry}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Cost(Backend):
    """A deterministic device: 1e-3 ms per parameter, times ``load`` (a busy machine) — the
    fingerprint does not see the load, as a real one would not."""
    name = "cost"

    def __init__(self, load: float = 1.0):
        self.load = load

    def runner(self, module, example_input):
        ms = self.load * 1e-3 * sum(p.numel() for p in module.parameters())
        return lambda: ms

    def fingerprint(self):
        return fingerprint(host_hardware(), {"runtime": "cost", "threads": 1})

    def metadata(self):
        return {**super().metadata(), "provider": "cost", "threads": 1}


# --------------------------------------------------------------------------- case 1
def test_spaces_sharing_a_name_never_share_a_cache_table(tmp_path):
    """Bug: the cache file was named by the space's `name`, so a copy with another width merged
    its rows into the original's table and replaced its probe baseline. A re-profile of the
    same space (case 6) used to rewrite the finished table in place."""
    cache = tmp_path / "cache"
    original = _space_file(tmp_path, "original")
    copy = _space_file(tmp_path, "copy", width=12)  # same name: hostile_small
    common = [*PROFILE, f"latency.cache_dir={cache}"]
    r = _run("profile", tmp_path, f"space={original}", *common, f"hydra.run.dir={tmp_path}/a")
    assert r.returncode == 0, r.stderr[-2000:]
    (first,) = cache.glob("*.csv")
    before = first.read_bytes()
    r = _run("profile", tmp_path, f"space={copy}", *common, f"hydra.run.dir={tmp_path}/b")
    assert r.returncode == 0, r.stderr[-2000:]
    assert first.read_bytes() == before
    tables = sorted(cache.glob("*.csv"))
    assert len(tables) == 2 and all(p.name.startswith("hostile_small_") for p in tables)
    # the same space again: a new table beside the finished one, never a rewrite (case 6)
    r = _run("profile", tmp_path, f"space={original}", *common, f"hydra.run.dir={tmp_path}/c")
    assert r.returncode == 0, r.stderr[-2000:]
    assert first.read_bytes() == before and len(list(cache.glob("*.csv"))) == 3
    # an explicit output holding another space's table is refused, the table untouched
    r = _run("profile", tmp_path, f"space={copy}", *common, f"output={first}",
             f"hydra.run.dir={tmp_path}/d")
    _user_error(r, str(first), "another space")
    assert first.read_bytes() == before


def test_cache_key_is_the_content_not_the_name(tmp_path):
    """Bug: `default_table_path` used only the name; any change of geometry or choices must
    change the key, and renaming alone must keep the space's digest."""
    base = ernas.load_space(_space_file(tmp_path, "a"))
    wider = ernas.load_space(_space_file(tmp_path, "b", width=12))
    data = {**SMALL, "blocks": {"all": {**SMALL["blocks"]["all"], "kernel": [3, 7]}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    other_choices = ernas.load_space(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({**SMALL, "name": "renamed"}))
    renamed = ernas.load_space(tmp_path / "d.yaml")
    b = Cost()
    paths = {default_table_path(s, b, SHAPE, "block", tmp_path)
             for s in (base, wider, other_choices)}
    assert len(paths) == 3
    assert space_digest(renamed) == space_digest(base) != space_digest(wider)
    assert default_table_path(base, b, SHAPE, "block", tmp_path) != \
        default_table_path(base, b, (1, 3, 32, 32), "block", tmp_path)


# --------------------------------------------------------------------------- case 6
def test_a_refused_cache_table_is_kept_and_the_probe_chooses(tmp_path):
    """Bug: a re-profile after a refused probe deleted the cached table and wrote the new one
    (measured on a loaded machine) at its path. Now the old file stays byte-identical, the new
    one goes beside it, and on a quiet machine the probe picks the old one again."""
    space = ernas.load_space(_space_file(tmp_path, "s"))
    cache = tmp_path / "cache"
    quiet = LatencySettings(backend=Cost(), cache_dir=cache, measure=QUICK, probe_cache_s=0,
                            recheck_rounds=1)
    t, old = resolve_table(space, SHAPE, quiet, False, shipped_dir=tmp_path / "none")
    assert t.probe["action"] == "profiled"
    before = old.read_bytes()
    busy = quiet.replace(backend=Cost(load=3.0))
    t, new = resolve_table(space, SHAPE, busy, False, shipped_dir=tmp_path / "none")
    assert t.probe["action"] == "profiled" and t.probe["refused"][0]["table"] == str(old)
    assert new != old and new.parent == old.parent and old.read_bytes() == before
    t, chosen = resolve_table(space, SHAPE, quiet, False, shipped_dir=tmp_path / "none")
    assert chosen == old and t.probe["action"] == "used"
    assert any(r["table"] == str(new) for r in t.probe["refused"])


def test_profile_table_refuses_a_file_of_another_space(tmp_path):
    """Bug: `profile_table` resumed any compatible file, so another space's table received
    rows and a new probe baseline."""
    a = ernas.load_space(_space_file(tmp_path, "a"))
    b = ernas.load_space(_space_file(tmp_path, "b", width=12))
    path = tmp_path / "t.csv"
    profile_table(a, SHAPE, Cost(), "block", path, QUICK, progress=False, recheck_rounds=1)
    before = path.read_bytes()
    with pytest.raises(ErnasError, match="another space"):
        profile_table(b, SHAPE, Cost(), "block", path, QUICK, progress=False)
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- case 2
def _device(tmp_path: Path, printed: str) -> Path:
    script = tmp_path / "device.py"
    script.write_text(f"print('latency_ms: {printed}')\n")
    return script


@pytest.mark.parametrize("printed", ["-5", "0", "nan", "inf"])
def test_command_local_refuses_impossible_latencies(tmp_path, printed):
    """Bug: a device command printing `latency_ms: -5` (or 0) gave a table of -5 ms rows; nan
    and inf failed later without naming the command. Also exercises the README's
    `latency.backend.template=...` override without `+` (case 11)."""
    arch = ernas.load_space(_space_file(tmp_path, "s")).smallest()
    arch.save(tmp_path / "arch.yaml")
    out = tmp_path / "t.csv"
    script = _device(tmp_path, printed)
    r = _run("profile", tmp_path, "latency=command_local", f"arch={tmp_path / 'arch.yaml'}",
             f"latency.backend.template='{{python}} {script} {{model}}'",
             "latency.backend.pattern='latency_ms: ([-0-9.a-z]+)'", f"output={out}", *MEASURE,
             f"hydra.run.dir={tmp_path / 'run'}")
    _user_error(r, str(script), f"latency_ms: {printed}", "finite number > 0")
    assert not out.exists() and not Path(str(out) + ".samples.json").exists()


@pytest.mark.parametrize("printed", ["-5", "0", "nan", "inf", "-0.0"])
def test_command_backend_parses_only_positive_latencies(tmp_path, printed):
    b = CommandBackend(f"{{python}} {_device(tmp_path, printed)}", r"latency_ms: (\S+)")
    with pytest.raises(ErnasError, match="finite number > 0"):
        b.run_command(tmp_path / "m.onnx")
    ok = CommandBackend(f"{{python}} {_device(tmp_path, '1.5')}", r"latency_ms: (\S+)")
    assert ok.run_command(tmp_path / "m.onnx") == [1.5]


# --------------------------------------------------------------------------- case 9
def test_a_table_that_is_not_utf8_is_one_paragraph(tmp_path):
    """Bug: `latency.table=<latin-1 file>` raised UnicodeDecodeError (every reader of a table:
    an explicit table, ernas-profile's output, and the cache walk of `auto`)."""
    bad = tmp_path / "latin1.csv"
    bad.write_bytes('# ernas-latency-table v1 {"device": "caf\xe9"}\nkey,ms\n'.encode("latin-1"))
    space = _space_file(tmp_path, "s")
    r = _run("search", tmp_path, f"space={space}", f"latency.table={bad}",
             "search.device=cpu", "progress=false", f"hydra.run.dir={tmp_path / 'x'}")
    _user_error(r, "latin1.csv", "UTF-8")
    r = _run("profile", tmp_path, f"space={space}", f"output={bad}", *PROFILE,
             f"hydra.run.dir={tmp_path / 'y'}")
    _user_error(r, "latin1.csv", "UTF-8")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "junk.csv").write_bytes(bad.read_bytes())
    lat = LatencySettings(backend=Cost(), cache_dir=cache, measure=QUICK, recheck_rounds=1)
    t, path = resolve_table(ernas.load_space(space), SHAPE, lat, False,
                            shipped_dir=tmp_path / "none")
    assert path != cache / "junk.csv" and t.probe["action"] == "profiled"


# --------------------------------------------------------------------------- case 11
def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def test_a_timeout_kills_the_whole_process_group(tmp_path):
    """Bug: in shell mode the timeout killed `bash` and left its child running."""
    pidfile = tmp_path / "child.pid"
    b = CommandBackend(f"sleep 30 & echo $! > {pidfile}; wait", r"x=(\d+)", shell=True,
                       timeout_s=1)
    with pytest.raises(ErnasError, match="timeout_s=1"):
        b.run_command(tmp_path / "m.onnx")
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = not _gone(pid)
    if alive:
        os.kill(pid, 9)
    assert not alive, "the command's child outlived the timeout"


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf, "10"])
def test_timeout_must_be_positive(timeout):
    """Bug: `timeout_s=-1` was accepted (every call then failed as a timeout)."""
    with pytest.raises(ErnasError, match="timeout_s"):
        make_backend({"name": "command", "preset": "local_onnx", "timeout_s": timeout})


def test_timeout_is_refused_from_the_command_line(tmp_path):
    r = _run("profile", tmp_path, "latency=command_local", "latency.backend.timeout_s=-1",
             *MEASURE, f"output={tmp_path / 't.csv'}", f"hydra.run.dir={tmp_path / 'r'}")
    _user_error(r, "timeout_s=-1")
    assert not (tmp_path / "t.csv").exists()


def test_template_is_filled_in_one_pass(tmp_path):
    """Bug: chained `str.replace` substituted `{python}` inside the substituted model path."""
    b = CommandBackend("{python} -m tool {model} --n {repeats}", r"x=(\d+)", runs_per_call=3)
    model = "/data/a{python}b/{repeats}.onnx"
    argv = b.command(model)
    assert argv == [sys.executable, "-m", "tool", model, "--n", "3"]
    shell = CommandBackend("true && echo ${HOME} {model}", r"x=(\d+)")
    assert shell.command("m.onnx")[-1] == "true && echo ${HOME} m.onnx"
    with pytest.raises(ErnasError, match=r"\{modle\}"):
        CommandBackend("bench {modle}", r"x=(\d+)")


def test_readme_template_override_needs_no_plus(tmp_path):
    """Bug: the README's `latency.backend.template=...` was refused by Hydra (the key was not
    in command_local.yaml); null fields now take the preset's values."""
    arch = ernas.load_space(_space_file(tmp_path, "s")).smallest()
    arch.save(tmp_path / "arch.yaml")
    script = tmp_path / "device.py"
    script.write_text("import sys\nfor _ in range(int(sys.argv[1])):\n"
                      "    print('latency: 2.5')\n")
    out = tmp_path / "t.csv"
    r = _run("profile", tmp_path, "latency=command_local", f"arch={tmp_path / 'arch.yaml'}",
             f"latency.backend.template='{{python}} {script} {{repeats}} {{model}}'",
             "latency.backend.pattern='latency: ([0-9.]+)'", "latency.backend.runs_per_call=3",
             f"output={out}", *MEASURE, f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    from ernas.latency.table import LatencyTable

    frame = LatencyTable.load(out).to_frame()
    assert len(frame) > 0 and (frame["ms"] == 2.5).all()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "+latency.backend.template" not in readme


# --------------------------------------------------------------------------- settings
def test_latency_settings_defaults_are_the_shipped_config():
    """The dataclass holds the defaults; the default config group must say the same."""
    cfg = yaml.safe_load((ROOT / "experiments/latency/onnxruntime_cpu.yaml").read_text())
    assert LatencySettings.from_config(cfg) == LatencySettings()


@pytest.mark.parametrize("field, value", [
    ("probe_tolerance", math.nan), ("probe_tolerance", -1), ("probe_cache_s", math.inf),
    ("max_inconsistency", math.nan), ("max_inconsistency", 0.5), ("profile_group", 0),
    ("recheck_rounds", 2.5), ("anchor_samples", True), ("trust_table", "yes"),
    ("on_mismatch", "retry"), ("granularity", "layer"), ("consistency_tolerance", "x")])
def test_latency_settings_name_the_bad_field(field, value):
    with pytest.raises(ErnasError) as e:
        LatencySettings.from_config({field: value})
    assert f"latency.{field}=" in str(e.value) and "\n" not in str(e.value)


def test_latency_settings_accept_an_unlimited_inconsistency_and_refuse_unknown_fields():
    assert LatencySettings(max_inconsistency=math.inf).max_inconsistency == math.inf
    with pytest.raises(ErnasError, match="probe_tolerence"):
        LatencySettings.from_config({"probe_tolerence": 0.1})
    with pytest.raises(ErnasError, match="min_seconds"):
        LatencySettings(measure={"min_seconds": math.inf})


def test_profile_refuses_an_arch_of_another_family_before_writing(tmp_path):
    """Bug caught: ``arch=`` of a U-Net with the default (NAFNet) space labelled and cached the
    U-Net's keys as a ``nafnet_tiny`` table."""
    ernas.load_space("unet_demo").reference().save(tmp_path / "unet.yaml")
    r = _run("profile", tmp_path, f"arch={tmp_path / 'unet.yaml'}", *PROFILE,
             f"output={tmp_path / 't.csv'}", f"hydra.run.dir={tmp_path / 'p'}")
    _user_error(r, "unet network", "space=nafnet_tiny", "space=NAME")
    assert not (tmp_path / "t.csv").exists()
    assert not [f for f in (tmp_path / "p").rglob("*") if f.is_file()]
