"""``benchmarks/search_step_cost.py``: a search step against a training step of the largest
network, on the tiny space at a 16x16 crop (one round, one memory step; nothing is judged on
the timings themselves)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "search_step_cost.py"


@pytest.mark.slow
def test_every_variant_is_timed_and_its_memory_measured(tmp_path):
    """One row per variant with a positive step time and a memory figure from its own
    subprocess, and the ratio line of the search step to the discrete step. Fails if the script
    no longer runs against the search loop's API, or drops a variant."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--spaces", "nafnet_tiny", "--variants",
                        "discrete,shared", "--crop", "16", "--batch", "1", "--rounds", "1",
                        "--warmup", "0", "--mem-steps", "1", "--threads", "1", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "shared/discrete: step time" in r.stdout
    result = json.loads((tmp_path / "nafnet_tiny.json").read_text())
    assert set(result["rows"]) == {"discrete", "shared"}
    for row in result["rows"].values():
        assert row["step_s"] > 0 and row["params"] > 0 and len(row["peak_mib_all"]) == 1
    assert result["rows"]["shared"]["alpha_s"] > 0   # the α step ran
