"""The ``measure``, ``report`` and ``merge`` phases of ``benchmarks/pareto.py`` (see its
docstring), and the config helpers its phases share."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ernas.latency.measure import paired_ratio, paired_spread, pass_spread
from ernas.pareto import arch_digest
from pareto_analysis import analyse, plot, print_summary, split_finite


def compose_cfg(overrides: list[str]):
    """The ``ernas-search`` config with ``overrides`` (importing the CLI registers its schema)."""
    from hydra import compose, initialize_config_dir

    import ernas.cli.search  # noqa: F401
    from ernas.paths import EXPERIMENTS

    with initialize_config_dir(str(EXPERIMENTS), version_base="1.3"):
        return compose("search", overrides)


def base_overrides(c: dict) -> list[str]:
    return [f"space={c['space']}", f"latency.backend.threads={c['threads']}",
            f"search.steps={c['search_steps']}", f"search.warmup_steps={c['search_steps'] // 4}",
            f"search.crop={c['crop']}", "search.device=cpu", "seed=0", "progress=false",
            *c["overrides"]]

def measure_phase(a) -> None:
    from omegaconf import OmegaConf

    from ernas.evaluate import ModelEntry, measure_latencies
    from ernas.io import atomic_write_json
    from ernas.latency.backends import machine_description
    from ernas.latency.predict import predict_ms
    from ernas.space import find_space, load_arch

    out = Path(a.out)
    c = json.loads((out / "config.json").read_text())
    nets = json.loads((out / "networks.json").read_text())["networks"]
    c["threads"] = a.threads or c["threads"]
    cfg = compose_cfg(base_overrides(c) + a.overrides)
    lat_cfg = OmegaConf.to_container(cfg.latency, resolve=True)
    space, shape = find_space(cfg.space), [int(s) for s in cfg.input_shape]
    seed = c["seeds"][0]
    archs = {}  # digest -> (arch, trained run of the first seed)
    for n in nets:
        arch = load_arch(n["arch"])
        archs.setdefault(arch_digest(arch), (arch, out / "runs" / n["name"] / f"seed{seed}"))
    # per pass, one table for every network on the plot, profiled in one interleaved session on
    # this machine right before the end-to-end timing, so predictions are comparable
    from ernas.latency.factory import make_backend
    from ernas.latency.resolve import profile_table

    gran = lat_cfg["granularity"]
    keys = list(dict.fromkeys(k for arch, _ in archs.values() for k in arch.op_keys(shape, gran)))
    models = {d: ModelEntry(d, arch, str(run)).model() for d, (arch, run) in archs.items()}
    t0, passes, backend = time.perf_counter(), [], None
    for i in range(a.passes):
        table_path = out / ("plot_table.csv" if a.passes == 1 else f"plot_table_pass{i + 1}.csv")
        # in memory, then saved: a table left by an earlier measure must not be resumed, or
        # the predictions would come from that earlier machine state
        table = profile_table(space, shape, make_backend(lat_cfg["backend"]), gran, None,
                              lat_cfg.get("measure"), progress=False, keys=keys)
        table.save(table_path)
        predicted = {d: predict_ms(table, arch, shape, gran) for d, (arch, _) in archs.items()}
        stats, backend = measure_latencies(models, shape, lat_cfg)
        passes.append({n["name"]: {
            "predicted_ms": predicted[d], "table": str(table_path),
            "measured_ms": stats[d]["ms"], "measured_spread": stats[d]["spread"],
            "samples": stats[d]["n"], "round_ms": stats[d]["round_ms"]}
            for n in nets for d in [arch_digest(load_arch(n["arch"]))]})
        print(f"measure pass {i + 1} of {a.passes} done, {time.perf_counter() - t0:.0f} s",
              flush=True)
    atomic_write_json(out / "latency.json", {
        "command": shlex.join([sys.executable, *sys.argv]), "machine": machine_description(),
        "backend": backend, "input_shape": shape, "protocol": lat_cfg.get("measure"),
        "seconds": time.perf_counter() - t0, "networks": combine_passes(passes),
        **({"passes": passes} if len(passes) > 1 else {})})
    report_phase(a)


def combine_passes(passes: list[dict]) -> dict:
    """One latency record per network from ``measure`` passes (each profiled its own table, then
    timed every network interleaved): ``measured_ms`` and ``predicted_ms`` are the medians over
    passes; ``round_ms`` holds every pass's rounds in order, so the paired speed-up is the
    median reference/network ratio over the rounds of all passes (a period in which some
    networks alone run slow moves it only if it covers half the rounds); ``measured_spread``
    is the pass-to-pass spread of those rounds; ``pass_ms`` and ``tables`` the per-pass parts."""
    if len(passes) == 1:
        return passes[0]
    combined = {}
    for name in passes[0]:
        recs = [p[name] for p in passes]
        rounds = [v for r in recs for v in r["round_ms"]]
        combined[name] = {
            "predicted_ms": float(np.median([r["predicted_ms"] for r in recs])),
            "tables": [r["table"] for r in recs],
            "measured_ms": float(np.median([r["measured_ms"] for r in recs])),
            "measured_spread": pass_spread(rounds), "samples": sum(r["samples"] for r in recs),
            "round_ms": rounds, "pass_ms": [r["measured_ms"] for r in recs]}
    return combined


def latencies_by_arch(nets: list[dict], measured: dict) -> dict:
    """Each network's latency record: its own from ``measured`` (latency.json's networks), else
    that of a measured network with the same architecture (the supernet-init series of a search:
    same arch, other weights), marked ``measured_as``; networks with neither are left out."""
    from ernas.space import load_arch

    digest = {n["name"]: arch_digest(load_arch(n["arch"])) for n in nets}
    by_digest: dict = {}
    for name, rec in measured.items():
        if name in digest:
            by_digest.setdefault(digest[name], (name, rec))
    out = {}
    for n in nets:
        if n["name"] in measured:
            out[n["name"]] = measured[n["name"]]
        elif digest[n["name"]] in by_digest:
            other, rec = by_digest[digest[n["name"]]]
            out[n["name"]] = {**rec, "measured_as": other}
    return out


LATENCY_COLUMNS = ("measured_ms", "measured_spread", "predicted_ms", "speedup_paired",
                   "speedup_spread")


def latency_fields(nets: list[dict], measured: dict) -> dict:
    """``{network: its latency record}`` (``latencies_by_arch``) with the paired speed-up over
    the reference (the median over rounds of reference/network in that round) and its noise
    floor, without the per-round figures; exits naming the networks never timed."""
    timed = latencies_by_arch(nets, measured)
    missing = [n["name"] for n in nets if n["name"] not in timed]
    if missing:
        sys.exit(f"no latency for {', '.join(missing)}: run measure again.")
    ref_rounds = next(timed[n["name"]].get("round_ms") for n in nets if n["reference"])
    fields = {}
    for n in nets:
        rec = dict(timed[n["name"]])
        rounds = rec.pop("round_ms", None)
        ok = bool(ref_rounds and rounds)
        fields[n["name"]] = {
            **rec, "speedup_paired": paired_ratio(ref_rounds, rounds) if ok else float("nan"),
            "speedup_spread": paired_spread(ref_rounds, rounds) if ok else float("nan")}
    return fields


def per_pass(agg: pd.DataFrame, nets: list[dict], passes: list[dict]) -> dict:
    """Each pass judged alone: ``{"n", "goals": {goal: passes meeting it}, "speedups":
    {network: [paired speed-up of each pass]}}`` (counts only for the boolean goals)."""
    met: dict = {}
    speedups: dict = {n: [] for n in agg["network"]}
    for p in passes:
        fields = latency_fields(nets, p)
        one = agg.copy()
        for col in LATENCY_COLUMNS:
            one[col] = [fields[n][col] for n in one["network"]]
        res = analyse(one)
        for k, v in res["goals"].items():
            if isinstance(v, bool):
                met[k] = met.get(k, 0) + v
        for n, x in zip(res["table"]["network"], res["table"]["speedup_measured"]):
            speedups[n].append(float(x))
    return {"n": len(passes), "goals": met, "speedups": speedups}


def report_phase(a) -> None:
    from ernas.io import atomic_write_json, atomic_write_text
    from ernas.space import load_arch

    out = Path(a.out)
    c = json.loads((out / "config.json").read_text())
    nets = json.loads((out / "networks.json").read_text())["networks"]
    lat = json.loads((out / "latency.json").read_text())
    fields = latency_fields(nets, lat["networks"])
    rows = []
    for n in nets:
        for seed in c["seeds"]:
            run = out / "runs" / n["name"] / f"seed{seed}"
            if not (run / "eval" / "summary.json").is_file():
                continue
            q = json.loads((run / "eval" / "summary.json").read_text())
            m = q["models"][0]
            train = json.loads((run / "summary.json").read_text())
            per = pd.read_csv(run / "eval" / "per_image.csv")
            colour = per[(per["set"] == "sigma25") & per["name"].str.startswith("color-")]
            rows.append({"network": n["name"], "series": n["series"], "init": n["init"],
                         "reference": n["reference"], "seed": seed, "params": m["params"],
                         "macs": m["macs"], **fields[n["name"]],
                         **{k: m[k] for k in q["columns"]},
                         "psnr_sigma25_colour": colour["psnr"].mean(),
                         "best_val_psnr": train["best_val_psnr"],
                         "train_seconds": train["seconds"], "arch": n["arch"]})
    df, excluded = split_finite(pd.DataFrame(rows))
    for name, seeds in excluded.items():
        print(f"excluded {name}: PSNR σ25 not finite for seed(s) {seeds} (its output overflows on "
              f"some test tiles; see {out / 'runs' / name}/seed*/eval/per_image.csv)")
    if df.empty or not df["reference"].any():
        sys.exit("the reference network has no evaluated run yet: finish the train phase.")
    atomic_write_text(out / "pareto.csv", df.to_csv(index=False))
    agg = df.groupby("network", sort=False).agg(
        series=("series", "first"), reference=("reference", "first"),
        measured_ms=("measured_ms", "first"), measured_spread=("measured_spread", "first"),
        predicted_ms=("predicted_ms", "first"), speedup_paired=("speedup_paired", "first"),
        speedup_spread=("speedup_spread", "first"),
        params=("params", "first"), macs=("macs", "first"), psnr=("psnr_sigma25", "mean"),
        psnr_std=("psnr_sigma25", "std"),
        psnr15=("psnr_sigma15", "mean"), psnr50=("psnr_sigma50", "mean"),
        ssim=("ssim_sigma25", "mean"), colour=("psnr_sigma25_colour", "mean"),
        arch=("arch", "first")).reset_index()
    agg["digest"] = [arch_digest(load_arch(a)) for a in agg["arch"]]
    agg["psnr_std"] = agg["psnr_std"].fillna(0.0)
    res = analyse(agg)
    passes = per_pass(agg, nets, lat["passes"]) if lat.get("passes") else None
    t = res["table"]
    if passes:
        t["speedup_per_pass"] = [passes["speedups"][n] for n in t["network"]]
    b = lat["backend"]
    plot(t, res["threshold"], out / "pareto.png", f"{lat['machine']}; {b.get('backend')} "
         f"{b.get('threads')} threads, input {lat['input_shape']}")
    print_summary(c, lat, res, f"{len(df)} of {len(nets) * len(c['seeds'])}", passes)
    atomic_write_json(out / "summary.json", {
        "train_command": c["command"], "measure_command": lat["command"],
        "machine": lat["machine"], "backend": lat["backend"], "threshold_psnr": res["threshold"],
        "fastest": res["fastest"], "goals": res["goals"],
        "goals_passes_met": passes and {"passes": passes["n"], **passes["goals"]},
        "networks": t.to_dict(orient="records")})


# the training recipe and test set that runs must share to be compared on one plot
MERGE_SAME = ("seeds", "steps", "crop", "batch", "tile", "threads", "input_shape")


def merge_phase(a) -> None:
    """One plot for several ``train`` runs (attempts at the search with other ``-o`` overrides or
    spaces, the same recipe): ``--out`` gets the scaled networks once and every other network
    of each run, named ``<name>@<run folder>`` and in series ``<series> @<run folder>``; the
    runs are hard-linked, not copied. Then ``measure --out`` times them all in one session."""
    from ernas.io import atomic_write_json
    from ernas.space import load_arch

    out, runs = Path(a.out), [Path(d) for d in a.runs]
    cfgs = [json.loads((d / "config.json").read_text()) for d in runs]
    bad = [k for k in MERGE_SAME if any(c.get(k) != cfgs[0].get(k) for c in cfgs)]
    if bad:
        values = "; ".join(f"{d}: " + ", ".join(f"{k}={c.get(k)}" for k in bad)
                           for d, c in zip(runs, cfgs))
        sys.exit(f"cannot merge: the runs differ in {', '.join(bad)} ({values}); only runs with "
                 f"one training recipe and test set can share a plot.")
    nets, scaled = [], {}
    for d in runs:
        meta = json.loads((d / "networks.json").read_text())
        for n in meta["networks"]:
            arch = Path(n["arch"])
            digest = arch_digest(load_arch(arch))
            if n["series"] == "scaled":
                if scaled.setdefault(n["name"], digest) != digest:
                    sys.exit(f"cannot merge: {n['name']} has another architecture in {d}.")
                if any(m["name"] == n["name"] for m in nets):
                    continue
                name = n["name"]
            else:
                name = f"{n['name']}@{d.name}"
                n = {**n, "series": f"{n['series']} @{d.name}"}
            (out / "archs").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(arch, out / "archs" / f"{name}.yaml")
            dst = out / "runs" / name
            if not dst.exists():
                shutil.copytree(d / "runs" / n["name"], dst, copy_function=os.link)
            nets.append({**n, "name": name, "arch": str(out / "archs" / f"{name}.yaml")})
    first = json.loads((runs[0] / "networks.json").read_text())
    atomic_write_json(out / "networks.json", {**first, "networks": nets})
    atomic_write_json(out / "config.json", {
        **cfgs[0], "merged_from": [str(d) for d in runs],
        "command": " ; ".join([c["command"] for c in cfgs]
                              + [shlex.join([sys.executable, *sys.argv])])})
    print(f"merged {len(nets)} networks of {len(runs)} runs into {out}; next, on a quiet machine: "
          f"python {sys.argv[0]} measure --out {out}")
