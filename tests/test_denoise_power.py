"""``benchmarks/denoise_power.py``: the smallest paired PSNR difference the test split resolves."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "denoise_power.py"
sys.path.insert(0, str(SCRIPT.parent))

from denoise_power import min_detectable_difference  # noqa: E402


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT)


def _mdd(stdout: str) -> float:
    return float(re.search(r"smallest resolvable paired PSNR difference: ([\d.]+) dB",
                           stdout).group(1))


def test_formula_by_hand():
    """Normal quantiles, no seed spread: (z.975 + z.8) * s_image / sqrt(n)."""
    assert min_detectable_difference(0.3, 9, s_seed=0.0, dist="normal") == pytest.approx(
        (1.959964 + 0.841621) * 0.1, rel=1e-5)
    # seeds only: SE = s_seed * sqrt(1/3 + 1/3)
    assert min_detectable_difference(0.0, 9, s_seed=0.06, dist="normal") == pytest.approx(
        2.801585 * 0.06 * (2 / 3) ** 0.5, rel=1e-5)
    # t with n - 1 df is wider than normal, and a Bonferroni split wider still
    t = min_detectable_difference(0.3, 7)
    assert t > min_detectable_difference(0.3, 7, dist="normal")
    assert min_detectable_difference(0.3, 7, comparisons=3) > t


def test_more_spread_or_fewer_seeds_or_scenes_needs_a_larger_difference():
    base = min_detectable_difference(0.2, 7, s_seed=0.065)
    assert min_detectable_difference(0.2, 7, s_seed=0.13) > base
    assert min_detectable_difference(0.2, 7, s_seed=0.065, seeds_a=1) > base
    assert min_detectable_difference(0.2, 14, s_seed=0.065) < base
    assert min_detectable_difference(0.3, 7, s_seed=0.065) > base


def test_script_runs_the_proxy_and_its_number_grows_with_the_seed_spread():
    small = _run("--max-side", "48")
    assert small.returncode == 0, small.stderr[-2000:]
    assert "7 independent scenes" in small.stdout and "proxy" in small.stdout
    s_image = float(re.search(r"s_image ([\d.]+) dB \(the largest", small.stdout).group(1))
    assert s_image > 0
    wider = _run("--s-image", f"{s_image}", "--s-seed", "0.2")
    assert wider.returncode == 0, wider.stderr[-2000:]
    assert _mdd(wider.stdout) > _mdd(small.stdout) + 0.05


def test_script_refuses_bad_values():
    r = _run("--seeds-a", "0", "--s-image", "0.1")
    assert r.returncode == 2 and "error:" in r.stderr and "seeds-a" in r.stderr
