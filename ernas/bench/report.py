"""The protocol's report: ``arms.csv`` (one row per network), ``comparisons.csv`` (every paired
comparison with its interval and verdict), ``test_per_image.csv`` (the test units' scores per
network and training seed), ``tuning.csv`` (the λ tuning searches, when the protocol tunes λ),
``pareto.png`` (test score vs measured latency with bootstrap intervals) and ``report.md``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ernas.bench import stats
from ernas.io import atomic_write_text


def _summary(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))


def _test_columns(plan: dict, name: str) -> dict:
    """Mean over seeds and images of every metric on every evaluation set."""
    frames = [pd.read_csv(Path(j["run_dir"]) / "per_image.csv") for j in plan["jobs"].values()
              if j["command"] == "evaluate" and j["overrides"]["name"] == name]
    rows = pd.concat(frames)
    metrics = [c for c in rows.columns if c not in ("model", "set", "name")
               and pd.api.types.is_numeric_dtype(rows[c])]
    out = {}
    for set_name, g in rows.groupby("set"):
        for m in metrics:
            out[f"test_{m}_{set_name}"] = float(g[m].mean())
    return out


def per_image_table(plan: dict) -> pd.DataFrame:
    """Every test evaluation's per-unit rows (``set``, ``name`` and the metrics), with the
    network, its arm and its training seed: the units every interval of the report resamples."""
    frames = []
    for job in plan["jobs"].values():
        if job["command"] != "evaluate":
            continue
        name = job["overrides"]["name"]
        rows = pd.read_csv(Path(job["run_dir"]) / "per_image.csv").drop(columns="model")
        rows.insert(0, "train_seed", int(plan["jobs"][job["after"]]["overrides"]["seed"]))
        rows.insert(0, "arm", plan["networks"][name]["arm"])
        rows.insert(0, "network", name)
        frames.append(rows)
    return pd.concat(frames, ignore_index=True)


def _costs(plan: dict, name: str, rec: dict) -> dict:
    trains = [j for j in plan["jobs"].values() if j["command"] == "retrain"
              and j["overrides"]["arch"] == rec["arch"]]
    train_s = sum(_summary(j["run_dir"]).get("seconds") or 0.0 for j in trains)
    search_s = None
    if rec["arm"] == "searched":
        search_s = _summary(str(Path(rec["arch"]).parent)).get("search_seconds")
    return {"train_seconds": round(train_s, 1),
            "search_seconds": None if search_s is None else round(search_s, 1)}


def _predicted_ms(rec: dict) -> float | None:
    """The planned prediction; for a searched network, its search's prediction of the derived
    network (same table)."""
    if rec.get("predicted_ms") is None and rec["arm"] == "searched":
        return _summary(str(Path(rec["arch"]).parent)).get("predicted_latency_ms")
    return rec.get("predicted_ms")


def arms_table(plan: dict, sel: dict, scores: dict, measured: dict, passes: dict,
               front_pts, boot, input_shape, memory: dict | None = None) -> pd.DataFrame:
    """One row per network; ``memory``: {network: peak MiB} of the latency stage (None: not
    measured)."""
    from ernas.complexity import count_macs, count_params
    from ernas.space import load_arch
    from ernas import build_model

    front_names = {n for n, _ in front_pts}
    selected = {**{v: "searched" for v in sel["searched"].values()},
                **{v: "random (best of N)" for v in sel["random"].values()}}
    rows = []
    for name, rec in plan["networks"].items():
        s = scores[name]
        iv = stats.paired_interval(s, {k: np.zeros_like(v) for k, v in s.items()}, boot.alpha,
                                   boot.samples)
        t = rec.get("target")
        rows.append({
            "network": name, "arm": rec["arm"],
            "target": None if t is None else plan["targets"][t]["fraction"],
            "search_seed": rec.get("search_seed"), "geometry": rec.get("geometry"),
            "draw": rec.get("draw"),
            "selected": ("headline, " if name == sel["headline"] else "")
            + selected.get(name, "front" if name in front_names else ""),
            "train_seeds": len(s), "val": sel["validation"][name],
            "test": iv.estimate, "test_ci_low": iv.low, "test_ci_high": iv.high,
            "test_seed_sd": float(np.std([v.mean() for v in s.values()])),
            **_test_columns(plan, name),
            **_size(build_model(load_arch(rec["arch"])), input_shape, count_params, count_macs),
            "predicted_ms": _predicted_ms(rec), "measured_ms": measured[name],
            "measured_ms_passes": " ".join(f"{v:.3f}" for v in passes[name]),
            "peak_mem_mib": (memory or {}).get(name),
            "speedup_vs_reference": measured["reference"] / measured[name],
            **_costs(plan, name, rec)})
    return pd.DataFrame(rows)


def _size(model, input_shape, count_params, count_macs) -> dict:
    return {"params": count_params(model), "macs": count_macs(model, list(input_shape))}


def plot(arms: pd.DataFrame, metric_label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"reference": ("k", "*"), "scaled": ("tab:gray", "s"), "random": ("tab:orange", "."),
              "searched": ("tab:blue", "o")}
    for arm, (color, marker) in styles.items():
        a = arms[arms["arm"] == arm]
        if a.empty:
            continue
        err = np.abs(np.stack([a["test"] - a["test_ci_low"], a["test_ci_high"] - a["test"]]))
        ax.errorbar(a["measured_ms"], a["test"], yerr=err, fmt=marker, color=color, label=arm,
                    capsize=2, alpha=0.85)
    sel = arms[arms["selected"].str.contains("searched|headline")]
    ax.scatter(sel["measured_ms"], sel["test"], s=140, facecolors="none", edgecolors="tab:blue",
               label="validation-selected searched")
    ax.set_xlabel("measured latency (ms, median over passes)")
    ax.set_ylabel(f"test {metric_label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


def md_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of ``df``."""
    head = "| " + " | ".join(df.columns) + " |"
    rows = ["| " + " | ".join(_cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, "|" + "---|" * len(df.columns), *rows])


def markdown(cfg_text: str, plan: dict, arms: pd.DataFrame, comps: pd.DataFrame,
             verdicts: list[str], meta: dict) -> str:
    cols = ["network", "arm", "target", "selected", "train_seeds", "val", "test", "test_ci_low",
            "test_ci_high", "params", "macs", "predicted_ms", "measured_ms", "peak_mem_mib",
            "speedup_vs_reference", "search_seconds", "train_seconds"]
    if arms["geometry"].notna().any():  # a space with geometry alternatives
        cols.insert(3, "geometry")
    lines = [f"# Protocol {plan['protocol']}", "",
             f"Set {meta['set']}, metric {meta['metric']}; {len(plan['networks'])} networks, "
             f"{len(plan['jobs'])} jobs; reference predicted {plan['reference_ms']:.2f} ms; "
             f"latency {meta['passes']} passes with new sessions, all networks interleaved; "
             f"peak_mem_mib: resident-set high-water mark above the runtime's empty session, "
             f"median of fresh processes (`ernas.memory`); "
             f"intervals: bootstrap over test images and training seeds, family-wise "
             f"alpha {meta['alpha']} split over {len(comps)} comparisons (Bonferroni); "
             f"units_ci: the same interval with each network's training seeds averaged first "
             f"(test units alone; it judges nothing: where it is much narrower than ci, the "
             f"training seeds set the width).", "",
             "## Verdicts", "", *[f"- {v}" for v in verdicts], "",
             f"Selection (validation only): {meta['headline_rule']}.", "",
             *_tuning_lines(meta.get("tuning"), arms, plan),
             "## Arms", "", md_table(arms[cols]), "",
             "## Comparisons", "", md_table(comps), "",
             "## Protocol (as stated before it ran)", "", "```yaml", cfg_text.rstrip(), "```", ""]
    return "\n".join(lines)


def _tuning_lines(tuning: dict | None, arms: pd.DataFrame, plan: dict) -> list[str]:
    """The λ tuning section: every tuning search, its figures, the choice, and per target the
    searched arm's search cost with its tuning searches."""
    if not tuning:
        return []
    rows = pd.DataFrame(tuning["rows"])
    costs = []
    for i, t in enumerate(plan["targets"]):
        tune_s = rows.loc[rows["target"] == i, "search_seconds"].fillna(0).sum()
        own = arms.loc[(arms["arm"] == "searched") & (arms["target"] == t["fraction"]),
                       "search_seconds"].fillna(0)
        costs.append(f"target {t['fraction']}: {len(own)} searches {own.sum():.0f} s + "
                     f"{int((rows['target'] == i).sum())} tuning searches {tune_s:.0f} s")
    return ["## λ tuning (validation only)", "",
            f"Rule: {tuning['rule']}. Search cost of the searched arm, tuning included: "
            + "; ".join(costs) + ".", "",
            md_table(rows[["target", "lam", "argmax_ms", "ratio", "derived_ms", "val",
                           "search_seconds", "chosen"]]), ""]


def write(out: Path, cfg_text: str, plan: dict, arms: pd.DataFrame, comps: list[dict],
          verdicts: list[str], meta: dict) -> None:
    comps_df = pd.DataFrame(comps)
    atomic_write_text(out / "arms.csv", arms.to_csv(index=False))
    atomic_write_text(out / "comparisons.csv", comps_df.to_csv(index=False))
    atomic_write_text(out / "test_per_image.csv", per_image_table(plan).to_csv(index=False))
    if meta.get("tuning"):
        atomic_write_text(out / "tuning.csv", pd.DataFrame(meta["tuning"]["rows"]).to_csv(
            index=False))
    plot(arms, meta["metric"], out / "pareto.png")
    atomic_write_text(out / "report.md", markdown(cfg_text, plan, arms, comps_df, verdicts, meta))
