"""``benchmarks/nonfinite.py``: whole image, centre crop and BatchNorm on batch statistics, per
validation photo. A tiny NAFNet whose BatchNorm running statistics are far off (variance ~0,
mean −1000) overflows in eval mode and stays finite on batch statistics."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from ernas import build_model
from ernas.families.nafnet import official_arch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "nonfinite.py"
TINY = dict(width=8, enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1])


def _run_dir(folder: Path, norm: str) -> Path:
    """arch.yaml + best.pt of a randomised tiny NAFNet with ``norm`` in every block; BatchNorm
    layers get running mean −1000 and variance 0."""
    arch = official_arch(**TINY, name=norm)
    for v in arch.values.values():
        v["norm"] = norm
    model = build_model(arch)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(-1000.0)
                m.running_var.zero_()
    folder.mkdir()
    arch.save(folder / "arch.yaml")
    torch.save({"model": model.state_dict()}, folder / "best.pt")
    return folder


def _probe(run: Path, out: Path, *more: Path) -> pd.DataFrame:
    r = subprocess.run([sys.executable, str(SCRIPT), str(run), *map(str, more), "--split", "val",
                        "--crop", "16", "--max-side", "48", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "whole:" in r.stdout and "batch_stats:" in r.stdout
    return pd.read_csv(out)


def test_running_statistics_overflow_and_batch_statistics_do_not(tmp_path):
    """Fails if the script runs the batch-statistics pass in eval mode, lets it update the
    running statistics the other passes use, or reports a non-finite output as finite."""
    rows = _probe(_run_dir(tmp_path / "bn", "batchnorm"), tmp_path / "bn.csv")
    assert sorted(set(rows["way"])) == ["batch_stats", "crop", "whole"]
    assert len(rows) == 3 * rows["image"].nunique() and rows["image"].nunique() >= 3
    by_way = rows.groupby("way")["finite"].all()
    assert not rows[rows["way"] == "whole"]["finite"].any()
    assert by_way["batch_stats"]
    assert "max_encoders.0" in rows.columns


def test_a_layernorm_network_is_finite_every_way(tmp_path):
    rows = _probe(_run_dir(tmp_path / "ln", "layernorm"), tmp_path / "ln.csv")
    assert rows["finite"].all() and (rows["output_max"] < 1e6).all()


def test_the_batch_statistics_pass_leaves_running_statistics_alone():
    """The batch-statistics twin normalises with the input's statistics and changes neither its
    own running statistics nor the eval model's (the whole and crop passes read those)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nonfinite", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).eval()
    twin = mod._on_batch_stats(model)
    with torch.no_grad():
        y = twin(torch.randn(1, 3, 8, 8) * 5 + 3)
    for bn in (model[1], twin[1]):
        assert torch.equal(bn.running_mean, torch.zeros(4))
        assert torch.equal(bn.running_var, torch.ones(4))
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-5   # normalised with the batch's own mean


def test_several_runs_share_one_table_named_by_network(tmp_path):
    """Fails if rows of one run are dropped or mislabelled when several runs are probed, if the
    BatchNorm count is wrong, or if ``largest_activation`` is not the row's largest module
    figure (NaN, where the output overflowed, counting as the largest)."""
    rows = _probe(_run_dir(tmp_path / "ln", "layernorm"), tmp_path / "both.csv",
                  _run_dir(tmp_path / "bn", "batchnorm"))
    assert list(rows["network"].unique()) == ["layernorm", "batchnorm"]
    assert list(rows["run"].unique()) == ["ln", "bn"]
    per_net = rows.groupby("network").size()
    assert per_net["layernorm"] == per_net["batchnorm"] == 3 * rows["image"].nunique()
    bn_layers = rows.groupby("network")["batchnorm_layers"].first()
    assert bn_layers["layernorm"] == 0 and bn_layers["batchnorm"] > 0
    modules = [c for c in rows.columns if c.startswith("max_")]
    ln = rows[rows["network"] == "layernorm"]
    assert (ln["largest_activation"] == ln[modules].max(axis=1)).all()
    at = ln.apply(lambda r: r["max_" + r["largest_at"]], axis=1)
    assert (at == ln["largest_activation"]).all()
    bad = rows[(rows["network"] == "batchnorm") & (rows["way"] == "whole")]
    assert not bad["finite"].any()
    assert (bad["largest_activation"].isna() | (bad["largest_activation"] > 1e6)).all()
    assert bad["largest_at"].isin([m[4:] for m in modules]).all()
