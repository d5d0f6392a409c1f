"""λ chosen on validation, per target, before the protocol's searches (``tune.lams``).

For target T_i, one search per λ_j of the grid runs with seed ``tune.seed`` (a seed no arm uses).
A λ qualifies when the argmax of its α is predicted within ±``tune.tolerance`` of the target,
|L̂(argmax)/T_i − 1| ≤ tol, i.e. the search optimised the network at that latency rather than
leaving the fit to the derivation. Among the qualifying λ the one whose derived network scores
best on validation with its inherited weights is chosen (the validation batches the α steps
also read: optimistic, equally for every λ); when none qualifies, the λ whose argmax is nearest
the target in log ratio, |log(L̂/T_i)|. Ties go to the smaller λ; a search without a finite
figure is never chosen while another has one. Only predicted latency and validation figures are
read. Every ``search.seeds`` search then runs at the chosen λ; the tuning searches are the
searched arm's extra cost, reported with it.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ernas.bench.jobs import PLAN, load_plan
from ernas.bench.plan import add_tuned_searches
from ernas.io import atomic_write_json

log = logging.getLogger(__name__)
TUNING = "tuning.json"


def choose(rows: list[dict], tolerance: float) -> int:
    """Index of the chosen λ among ``rows`` ({lam, ratio, val}: argmax prediction / target and
    the derived network's inherited validation figure, higher better), by the module's rule."""
    finite = [j for j, r in enumerate(rows) if math.isfinite(r["val"]) and r["ratio"] > 0]
    pool = finite or [j for j, r in enumerate(rows) if r["ratio"] > 0] or list(range(len(rows)))
    ok = [j for j in pool if abs(rows[j]["ratio"] - 1) <= tolerance]
    if ok:
        return max(ok, key=lambda j: (rows[j]["val"], -rows[j]["lam"]))
    return min(pool, key=lambda j: (abs(math.log(rows[j]["ratio"])), rows[j]["lam"]))


def _rows(plan: dict, target: int, lams) -> list[dict]:
    rows = []
    for j, lam in enumerate(lams):
        run_dir = Path(plan["jobs"][f"tune_t{target}_l{j}"]["run_dir"])
        s = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        val = s.get(f"inherited_val_{s['metric']}")
        rows.append({"target": target, "lam": float(lam),
                     "argmax_ms": s["argmax_predicted_ms"],
                     "ratio": s["argmax_predicted_ms"] / s["target_ms"],
                     "derived_ms": s["predicted_latency_ms"], "metric": s["metric"],
                     "val": float("nan") if val is None else float(val),
                     "search_seconds": s.get("search_seconds"), "job": run_dir.name})
    return rows


def tuning(cfg, out: Path) -> dict | None:
    """The tuning stage's choice (``tuning.json``), made once; the searches at the chosen λ are
    added to the plan. ``None`` when the protocol states no λ grid."""
    if not cfg.tune.lams:
        return None
    path = out / TUNING
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    plan = load_plan(out)
    rows, chosen = [], {}
    for i, _ in enumerate(plan["targets"]):
        target_rows = _rows(plan, i, cfg.tune.lams)
        chosen[i] = choose(target_rows, cfg.tune.tolerance)
        for j, r in enumerate(target_rows):
            r["chosen"] = j == chosen[i]
        rows += target_rows
    add_tuned_searches(plan, out, cfg, chosen)
    atomic_write_json(out / PLAN, plan)
    rec = {"rule": f"argmax within ±{cfg.tune.tolerance:.0%} of the target, then best inherited "
                   f"validation; else nearest in log ratio",
           "chosen_lam": {str(i): float(cfg.tune.lams[j]) for i, j in chosen.items()},
           "rows": rows}
    atomic_write_json(path, rec)
    log.info("λ chosen on validation: %s", {int(i): v for i, v in rec["chosen_lam"].items()})
    return rec
