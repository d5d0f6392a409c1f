"""Fronts and the printed report of ``benchmarks/pareto.py``: non-dominated sets, interpolation
of the scaled front in (log latency, PSNR), the goals of issue 14, the plot and the summary."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ernas.latency.anchor import anchor_problem, anchored_fit
from ernas.pareto import pareto_front

DROP = 0.005          # allowed relative PSNR drop vs the reference
GOAL_SPEEDUP = 2.0    # measured speed-up of the best searched network at <= DROP
GOAL_GAP_DB = 0.2     # searched above scaled at equal latency ...
GOAL_FASTER = 1.3     # ... or this much faster at equal PSNR
GOAL_AGREE = 0.10     # |predicted/measured speed-up - 1|


def front(latency, quality) -> tuple[np.ndarray, np.ndarray]:
    """The non-dominated points (lower latency, higher quality), sorted by latency; along it
    both latency and quality increase strictly."""
    lat, q = np.asarray(latency, float), np.asarray(quality, float)
    if not len(lat):
        return lat, q
    on = pareto_front(lat, q)
    pts = sorted(set(zip(lat[on], q[on])))
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def quality_at(fr, ms: float) -> float:
    """The front's quality at latency ``ms`` (linear in log latency); NaN outside its range."""
    lat, q = fr
    if not len(lat) or not lat[0] <= ms <= lat[-1]:
        return math.nan
    return float(np.interp(math.log(ms), np.log(lat), q))


def latency_at(fr, quality: float) -> float:
    """The front's latency at ``quality`` (the same curve, inverted); NaN outside its range."""
    lat, q = fr
    if not len(q) or not q[0] <= quality <= q[-1]:
        return math.nan
    return float(math.exp(np.interp(quality, q, np.log(lat))))


def faster_than(fr, ms: float, quality: float) -> float:
    """How much faster a network (``ms``, ``quality``) is than the front at its quality: the
    front's latency there over ``ms``. When the front never reaches that quality and ends at or
    above ``ms``: its last (best) point's latency over ``ms``, a lower bound (the front would
    need at least that long), so a network a hair above the front's best is not counted as
    arbitrarily faster. NaN when the front has no point of that quality (below its range)."""
    lat, q = fr
    if len(q) and quality > q[-1] and ms <= lat[-1]:
        return float(lat[-1] / ms)
    return latency_at(fr, quality) / ms


def fastest_within(rows: pd.DataFrame, threshold: float) -> dict | None:
    """The row of lowest measured latency whose mean PSNR is at least ``threshold``."""
    ok = rows[rows["psnr"] >= threshold]
    return None if ok.empty else ok.loc[ok["measured_ms"].idxmin()].to_dict()


def split_finite(df: pd.DataFrame, column: str = "psnr_sigma25") -> tuple[pd.DataFrame, dict]:
    """The runs of the networks whose ``column`` is finite in every seed, and
    ``{network: seeds with a non-finite value}`` of the others (a model whose output overflows
    on some test tiles has no PSNR to put on a front)."""
    bad = df[~np.isfinite(df[column].astype(float))]
    excluded = {n: sorted(int(s) for s in g["seed"]) for n, g in bad.groupby("network")}
    return df[~df["network"].isin(list(excluded))], excluded


def analyse(agg: pd.DataFrame, drop: float = DROP) -> dict:
    """Everything the summary states, from one row per network (``network``, ``series``
    (scaled | searched | searched_supernet), ``reference``, ``measured_ms``, ``predicted_ms``,
    ``psnr`` = mean PSNR σ25 over seeds). Returns ``{"table", "reference_psnr", "threshold",
    "fastest", "goals"}``; the table gains speed-ups, their agreement, ``on_front``, ``gap_db``
    (PSNR minus the scaled front's at the same latency) and ``faster_x`` (``faster_than`` the
    scaled front)."""
    t = agg.copy()
    ref = t[t["reference"]].iloc[0]
    t["speedup_statistic"] = ref["measured_ms"] / t["measured_ms"]
    # the measured speed-up: paired per round (median over rounds of reference/network, which
    # drift between rounds does not move) when the rounds were recorded
    paired = "speedup_paired" in t and bool(t["speedup_paired"].notna().all())
    t["speedup_measured"] = t["speedup_paired"] if paired else t["speedup_statistic"]
    t["speedup_predicted"] = ref["predicted_ms"] / t["predicted_ms"]
    t["agreement"] = t["speedup_predicted"] / t["speedup_measured"]
    t["agreement_statistic"] = t["speedup_predicted"] / t["speedup_statistic"]
    t["speedup_anchored"], anchored = anchored_speedups(t, ref.name)
    t["agreement_anchored"] = t["speedup_anchored"] / t["speedup_measured"]
    if anchored:
        # scored on the networks other than the anchors and their twins (same architecture,
        # other weights: the same timing)
        anchors = [ref.name, anchored.pop("index")]
        twins = (t.index[t["digest"].isin(t.loc[anchors, "digest"])] if "digest" in t
                 else anchors)
        rest = t.drop(index=sorted(set(anchors) | set(twins)))
        anchored.update(n=len(rest), within=int((abs(rest["agreement_anchored"] - 1)
                                                 <= GOAL_AGREE).sum()))
    t["on_front"] = False
    for _, rows in t.groupby("series"):
        t.loc[rows.index, "on_front"] = pareto_front(rows["measured_ms"], rows["psnr"])
    sc = t[t["series"] == "scaled"]
    scaled = front(sc["measured_ms"], sc["psnr"])
    t["gap_db"] = [p - quality_at(scaled, ms) for ms, p in zip(t["measured_ms"], t["psnr"])]
    t["faster_x"] = [faster_than(scaled, ms, p) for ms, p in zip(t["measured_ms"], t["psnr"])]
    threshold = float(ref["psnr"]) * (1 - drop)
    fastest = {s: fastest_within(rows, threshold) for s, rows in t.groupby("series")}
    goals = {"agreement": bool((abs(t["agreement"] - 1) <= GOAL_AGREE).all())}
    for s in sorted(set(t["series"]) - {"scaled"}):
        best = fastest[s]
        goals[f"{s}_speedup"] = bool(best and best["speedup_measured"] >= GOAL_SPEEDUP)
        goals[f"{s}_above_scaled"], goals[f"{s}_above_scaled_count"] = ahead_of_scaled(
            t[(t["series"] == s) & t["on_front"]])
    searched = t[t["series"] != "scaled"]
    if searched["series"].nunique() > 1:
        # merged attempts: the front of every searched network together, as the issue asks
        joint = searched[pareto_front(searched["measured_ms"], searched["psnr"])]
        goals["all_searched_above_scaled"], goals["all_searched_above_scaled_count"] = \
            ahead_of_scaled(joint)
        goals["all_searched_front"] = sorted(joint["network"], key=list(t["network"]).index)
    return {"table": t, "reference_psnr": float(ref["psnr"]), "threshold": threshold,
            "fastest": fastest, "goals": goals, "anchored": anchored}


def ahead_of_scaled(fr: pd.DataFrame) -> tuple[bool, list[int]]:
    """Whether the front ``fr`` is above the scaled front: more than half of its networks that
    the scaled front reaches (a gap or a speed-up defined) are ≥ GOAL_GAP_DB better at equal
    latency or ≥ GOAL_FASTER faster at equal PSNR; with [ahead, comparable, on the front]."""
    comparable = fr[fr["gap_db"].notna() | fr["faster_x"].notna()]
    ahead = (comparable["gap_db"] >= GOAL_GAP_DB) | (comparable["faster_x"] >= GOAL_FASTER)
    return (bool(len(comparable) and ahead.sum() > len(comparable) / 2),
            [int(ahead.sum()), len(comparable), len(fr)])


def anchored_speedups(t: pd.DataFrame, ref) -> tuple[pd.Series, dict | None]:
    """Predicted speed-ups after ``latency.anchor``'s calibration in its two-point form
    (``latency.anchor_samples=0``, ``ernas.latency.anchor``; the run times no sampled networks):
    the line ``m ≈ a·p + b`` through the measured latencies of the reference (row ``ref``) and
    of the network predicted fastest, so ``speedup_i = m_ref / (a·p_i + b)``; with the anchor's
    name, row, a and b (None, and NaN speed-ups, when ``anchor_problem`` draws no line)."""
    small = t.drop(index=ref)["predicted_ms"].idxmin() if len(t) > 1 else None
    rows = [ref, small]
    if small is None or anchor_problem(t.loc[rows, "predicted_ms"], t.loc[rows, "measured_ms"]):
        return pd.Series(float("nan"), index=t.index), None
    a, b = anchored_fit(t.loc[rows, "predicted_ms"], t.loc[rows, "measured_ms"], 0, 1)
    return (t.loc[ref, "measured_ms"] / (a * t["predicted_ms"] + b),
            {"anchor": t.loc[small, "network"], "index": small, "scale": a, "offset_ms": b})


# --------------------------------------------------------------------------- networks and data


def plot(t: pd.DataFrame, threshold: float, path: Path, title: str) -> None:
    """``ernas.pareto.plot_fronts`` (the figure of ``ernas-evaluate runs=[...]``) of the
    networks' measured latency and mean ± std PSNR σ25 over seeds, both fronts."""
    from ernas.pareto import plot_fronts

    net = t.rename(columns={"network": "name", "measured_ms": "latency_ms", "psnr": "quality",
                            "psnr_std": "quality_std"}).assign(latency_kind="measured")
    net["name"] = [n.removeprefix("search_").removeprefix("nafnet_") for n in net["name"]]
    plot_fronts(net, path, title, "PSNR σ25 (dB), mean ± std over seeds",
                (threshold, f"reference PSNR − {100 * DROP:g}%"))


def _range(v) -> str:
    """`` [lo–hi]`` of a list of per-pass figures; empty without them."""
    return "" if not isinstance(v, list) or not v else f" [{min(v):.2f}–{max(v):.2f}]"


def _f(v, fmt=".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def print_summary(c: dict, lat: dict, res: dict, n_rows: str, passes: dict | None = None
                  ) -> None:
    """The printed summary; ``passes`` (``pareto_phases.per_pass``): how many of several measure
    passes, each judged alone, met each goal, and each network's per-pass speed-ups."""
    t, g = res["table"], res["goals"]

    def status(key: str) -> str:
        done = "met" if g[key] else "NOT met"
        return done if not passes else f"{done}; each pass alone: {passes['goals'][key]} of " \
            f"{passes['n']}"

    print(f"train:   {c['command']}\nmeasure: {lat['command']}\nmachine: {lat['machine']}; "
          f"{lat['backend'].get('backend')} {lat['backend'].get('provider')}, threads "
          f"{lat['backend'].get('threads')}, spinning {lat['backend'].get('spinning')}, input "
          f"{lat['input_shape']}, all networks interleaved ({lat['protocol']})")
    print(f"space {c['space']}; retrain {c['steps']} steps, batch {c['batch']}, crop {c['crop']}, "
          f"seeds {c['seeds']}; search {c['search_steps']} steps; {n_rows} trained models; "
          f"PSNR σ25 on the held-out tiles (std over seeds: median "
          f"{t['psnr_std'].median():.3f} dB, max {t['psnr_std'].max():.3f} dB)")
    print("| network | series | params | GMACs | measured ms (spread) | predicted ms | speed-up "
          "meas / pred (agree) | PSNR σ15 | PSNR σ25 | PSNR σ50 | SSIM σ25 | colour σ25 | gap dB "
          "| faster x |")
    print("|---" * 14 + "|")
    for _, r in t.sort_values("measured_ms").iterrows():
        print(f"| {r['network']}{' *' if r['on_front'] else ''} | {r['series']} | "
              f"{r['params']:,} | {r['macs'] / 1e9:.3f} | {r['measured_ms']:.2f} "
              f"({100 * r['measured_spread']:.1f}%) | {r['predicted_ms']:.2f} | "
              f"{r['speedup_measured']:.2f}{_range(r.get('speedup_per_pass'))} / "
              f"{r['speedup_predicted']:.2f} "
              f"({r['agreement']:.3f}) | {r['psnr15']:.3f} | {r['psnr']:.3f} ± "
              f"{r['psnr_std']:.3f} | {r['psnr50']:.3f} | {r['ssim']:.4f} | "
              f"{r['colour']:.3f} | {_f(r['gap_db'], '+.3f')} | {_f(r['faster_x'])} |")
    print("(* on its series' front; spread: the measurement's pass-to-pass noise floor; colour: "
          "PSNR σ25 on the colour-photo tiles only; gap: PSNR minus the scaled front's at the same "
          "measured latency; faster: the scaled front's latency at the same PSNR / the "
          "network's, or, above the scaled front's best PSNR, that network's latency / the network's "
          "(a lower bound); –: outside the scaled front's range)" + ("" if not passes else
                      f"; {passes['n']} measure passes, each with its own table: ms and predicted "
                      f"ms are medians over passes, the speed-up the median over all their "
                      f"rounds, [the range of the passes' own speed-ups]"))
    print(f"at the reference's PSNR − {100 * DROP:g}% (≥ {res['threshold']:.3f} dB):")
    for s, best in res["fastest"].items():
        print(f"  {s}: " + ("none" if best is None else
                            f"{best['network']}, {best['measured_ms']:.2f} ms, "
                            f"{best['speedup_measured']:.2f}x measured / "
                            f"{best['speedup_predicted']:.2f}x predicted, PSNR "
                            f"{best['psnr']:.3f} ± {best['psnr_std']:.3f} dB "
                            f"({100 * (best['psnr'] / res['reference_psnr'] - 1):+.2f}%)"))
    bad = t[abs(t["agreement"] - 1) > GOAL_AGREE]
    print("goals:")
    for s in sorted(set(t["series"]) - {"scaled"}):
        k, n, m = g[f"{s}_above_scaled_count"]
        print(f"  [{status(f'{s}_speedup')}] {s}: ≥{GOAL_SPEEDUP:g}x measured "
              f"speed-up at ≤{100 * DROP:g}% PSNR drop")
        print(f"  [{status(f'{s}_above_scaled')}] {s} front above the scaled "
              f"front (≥{GOAL_GAP_DB:g} dB or ≥{GOAL_FASTER:g}x): {k} of {n} comparable front "
              f"networks ({m} on the front)")
    if "all_searched_above_scaled" in g:
        k, n, m = g["all_searched_above_scaled_count"]
        print(f"  [{status('all_searched_above_scaled')}] all searched series "
              f"together, front above the scaled front: {k} of {n} comparable front networks "
              f"({m} on the joint front: {', '.join(g['all_searched_front'])})")
    noise = ("" if "speedup_spread" not in t or t["speedup_spread"].isna().all() else
             f"; the paired speed-ups' pass-to-pass noise floor: median "
             f"{100 * t.loc[~t['reference'], 'speedup_spread'].median():.1f}%")
    print(f"  [{status('agreement')}] predicted vs measured speed-up within "
          f"{100 * GOAL_AGREE:g}% for every network" + (
              "" if bad.empty else " (outside: " + ", ".join(
                  f"{r['network']} {r['agreement']:.3f}" for _, r in bad.iterrows()) + ")")
          + noise)
    if not (t["agreement_statistic"] == t["agreement"]).all():
        out = t[abs(t["agreement_statistic"] - 1) > GOAL_AGREE]
        print(f"  (measured speed-ups are paired per round; as ratios of the overall statistics "
              f"instead, {len(t) - len(out)} of {len(t)} would be within {100 * GOAL_AGREE:g}%)")
    an = res.get("anchored")
    if an:
        print(f"  calibrated on the day (latency.anchor, two-point form: the line through the "
              f"measured latencies "
              f"of the reference and {an['anchor']}, ms ≈ {an['scale']:.3f}·predicted "
              f"{an['offset_ms']:+.2f}): {an['within']} of {an['n']} other networks' predicted "
              f"speed-ups within {100 * GOAL_AGREE:g}%")
