"""``benchmarks/specialisation.py``: the 2x2 table (every network timed on both runtimes, the
specialisation ratio per runtime with its bootstrap CI) and the per-family ratio of two tables.
Two real U-Net demo networks at a 16x16 input, one pass of two rounds."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ernas import load_space
from ernas.extras import EXECUTORCH
from ernas.latency.table import LatencyTable

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "specialisation.py"
SHAPE = (1, 1, 16, 16)


def _table(keys, path: Path, factor: dict) -> Path:
    """A table pricing every key 1 ms, times ``factor[word]`` for keys holding ``word``."""
    t = LatencyTable(metadata={"backend": "x"})
    for k in keys:
        ms = 1.0
        for word, f in factor.items():
            ms *= f if word in k else 1.0
        t.add(k, [ms, ms, ms])
    t.save(path)
    return path


@pytest.mark.skipif(not EXECUTORCH.available(),
                    reason='optional extra: pip install "ernas[executorch]"')
def test_two_by_two_table_and_family_ratios(tmp_path):
    """Fails if a network is missing on a runtime, the ratio is not others/own, its CI does not
    hold it, or the family ratios are not ET/ORT grouped by op and block kind."""
    space = load_space("unet_demo")
    small, ref = space.smallest(), space.reference()
    small.save(tmp_path / "small.yaml")
    ref.save(tmp_path / "ref.yaml")
    keys = sorted(set(small.op_keys(SHAPE, "block")) | set(ref.op_keys(SHAPE, "block")))
    ort = _table(keys, tmp_path / "ort.csv", {})
    et = _table(keys, tmp_path / "et.csv", {"conv=standard": 2.0, "unet_pool": 0.5})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--input", ",".join(map(str, SHAPE)),
                        "--net", f"onnxruntime={tmp_path / 'small.yaml'}",
                        "--net", f"executorch_xnnpack={tmp_path / 'ref.yaml'}",
                        "--passes", "1", "--rounds", "2", "--per-round", "1",
                        "--min-seconds", "0", "--bootstrap", "50", "--tables", str(ort), str(et),
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "specialisation.json").read_text())
    nets = {(n["runtime"], n["searched_for"]) for n in s["networks"]}
    assert nets == {(a, b) for a in ("onnxruntime", "executorch_xnnpack")
                    for b in ("onnxruntime", "executorch_xnnpack")}
    ms = {(n["runtime"], n["searched_for"]): n["ms"] for n in s["networks"]}
    assert all(v > 0 for v in ms.values())
    spec = {x["runtime"]: x for x in s["specialisation"]}
    assert set(spec) == {"onnxruntime", "executorch_xnnpack"}
    for x in spec.values():
        assert x["rounds"] == 2 and x["ci_low"] <= x["ratio"] <= x["ci_high"]
    rounds = {(n["runtime"], n["searched_for"]): np.array(n["round_ms"]) for n in s["networks"]}
    for own, other in (("onnxruntime", "executorch_xnnpack"),
                       ("executorch_xnnpack", "onnxruntime")):  # others' / own, paired per round
        assert spec[own]["ratio"] == pytest.approx(
            float(np.median(rounds[(own, other)] / rounds[(own, own)])))
    fam = {f["family"]: f for f in s["op_family_ratios"]}
    std = [f for name, f in fam.items() if "conv=standard" in name]
    assert std and all(f["median_ratio"] == pytest.approx(2.0) for f in std)
    assert fam["unet_pool"]["median_ratio"] == pytest.approx(0.5)
    assert all(f["median_ratio"] == pytest.approx(1.0) for name, f in fam.items()
               if "conv=standard" not in name and name != "unet_pool")
    assert (out / "specialisation.csv").is_file() and (out / "op_family_ratios.csv").is_file()


def test_fp32_against_int8_deployment_times_the_qdq_model(tmp_path):
    """``--deployments onnxruntime onnxruntime:int8``: every network on both, the int8 side
    timing the QDQ model. Fails if the dtype is dropped (the int8 rows would time the fp32 file
    and carry no quantised-conv count) or a network is missing on a deployment."""
    space = load_space("unet_demo")
    space.smallest().save(tmp_path / "small.yaml")
    space.reference().save(tmp_path / "ref.yaml")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--input", ",".join(map(str, SHAPE)),
                        "--deployments", "onnxruntime", "onnxruntime:int8",
                        "--net", f"onnxruntime={tmp_path / 'small.yaml'}",
                        "--net", f"onnxruntime:int8={tmp_path / 'ref.yaml'}",
                        "--passes", "1", "--rounds", "2", "--per-round", "1",
                        "--min-seconds", "0", "--bootstrap", "50", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "specialisation.json").read_text())
    rows = {(n["runtime"], n["searched_for"]): n for n in s["networks"]}
    assert set(rows) == {(a, b) for a in ("onnxruntime", "onnxruntime:int8")
                         for b in ("onnxruntime", "onnxruntime:int8")}
    assert all(rows[("onnxruntime", b)]["notes"] is None for b in ("onnxruntime",
                                                                    "onnxruntime:int8"))
    quantised = rows[("onnxruntime:int8", "onnxruntime:int8")]["notes"]["int8"]
    assert int(quantised.split(" of ")[0]) > 0, quantised
    assert {x["runtime"] for x in s["specialisation"]} == {"onnxruntime", "onnxruntime:int8"}


def _evaluated(tmp_path, name: str, arch, task) -> Path:
    """An ``ernas-evaluate`` run of ``arch`` (untrained) beside the space's reference."""
    from ernas.evaluate import ModelEntry, evaluate

    ref = arch.as_space().reference()
    ref.name = "reference"
    evaluate([ModelEntry(name, arch), ModelEntry("reference", ref)], tmp_path / name, task,
             predict=False, measure=False, progress=False)
    return tmp_path / name


def test_quality_difference_pairs_the_two_sides_over_images(tmp_path):
    """``--quality``: each side's networks scored from their ``ernas-evaluate`` runs, the
    difference B − A paired over images. Fails if the sides are swapped, the baseline's rows of
    ``per_image.csv`` are mixed into a network's score, or a plain arch file is accepted."""
    import skimage.io

    from ernas.data import load_bundled
    from ernas.task import make_task

    (tmp_path / "clean").mkdir()
    for i, name in enumerate(("coffee", "chelsea", "astronaut")):
        img = load_bundled(name, max_side=64)[:48, :48]
        skimage.io.imsave(tmp_path / "clean" / f"im{i}.png", (img * 255).round().astype(np.uint8),
                          check_contrast=False)
    task = make_task({"name": "denoise", "test_dir": str(tmp_path / "clean"),
                      "eval_sigmas": [25]})
    space = load_space("nafnet_tiny")
    torch.manual_seed(0)
    runs = {"a0": _evaluated(tmp_path, "a0", space.smallest(), task),
            "a1": _evaluated(tmp_path, "a1", space.sample(1), task),
            "b0": _evaluated(tmp_path, "b0", space.sample(2), task)}
    out = tmp_path / "out"
    args = [sys.executable, str(SCRIPT), "--input", "1,3,32,32",
            "--deployments", "onnxruntime", "onnxruntime:int8",
            "--passes", "1", "--rounds", "2", "--per-round", "1", "--min-seconds", "0",
            "--bootstrap", "200", "--quality", "psnr", "--set", "sigma25", "--out", str(out)]
    nets = ["--net", f"onnxruntime={runs['a0']}", "--net", f"onnxruntime={runs['a1']}",
            "--net", f"onnxruntime:int8={runs['b0']}"]
    r = subprocess.run(args + nets, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    q = json.loads((out / "specialisation.json").read_text())["quality"]

    def psnr(run):
        rows = pd.read_csv(runs[run] / "per_image.csv")
        return rows[rows["model"] == run]["psnr"].mean()

    assert q["units"] == 3 and q["difference"] == "onnxruntime:int8 - onnxruntime"
    assert q["estimate"] == pytest.approx(psnr("b0") - (psnr("a0") + psnr("a1")) / 2)
    assert q["ci_low"] <= q["estimate"] <= q["ci_high"]
    rows = pd.read_csv(out / "specialisation.csv")
    assert rows.loc[rows["network"] == "onnxruntime_0", "quality"].iloc[0] == \
        pytest.approx(psnr("a0"))
    space.smallest().save(tmp_path / "plain.yaml")
    bad = subprocess.run(args + ["--net", f"onnxruntime={tmp_path / 'plain.yaml'}",
                                 "--net", f"onnxruntime:int8={runs['b0']}"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "not an ernas-evaluate run directory" in bad.stderr
