"""Headline benchmark: searched networks against NAFNet scaled to the same measured latency.

Method (issue 14), on one search space (default ``nafnet_ern_small``) and the denoising task:

1. **Scaled-NAFNet front**: the official NAFNet of the space's geometry (the reference) and its
   uniform reductions: other widths at the same depth (``--widths``), and at the reference width
   one block per level and one middle block (``shallow``), LayerNorm-free (``noln``: norm=none),
   attention-free (``nosca``: attention=none), both (``noln_nosca``), LayerNorm replaced by
   BatchNorm, which is folded into the convolutions at export (``bn``), and replaced only in the
   blocks at the two finest resolution levels, where LayerNorm costs most (its cost grows with
   H·W·C, halving per level) while the coarse levels, where BatchNorm lets NAFNet's gate products
   overflow, keep it (``bnhi``; ``bnhi3``: the three finest levels) (``--reductions``).
   Reductions compose (parts joined by "_", e.g. ``shallow_bnhi``) and also apply at the
   widths of ``--reduction-widths`` (e.g. ``nafnet_w12_bnhi``): the combinations a user
   tries once one reduction has paid off.
2. **Searched front**: one search per λ of the additive latency term (``--lams``: λ·E/T,
   T = the reference's predicted latency) and one per hinge target (``--targets``: fractions f of
   the reference's predicted latency, λ_h·max(0, E/(f·T) − 1), ``--hinge-lam``; with
   ``--hinge-form band`` λ_h·|E/(f·T) − 1|, which also pulls a network below f·T up), each through
   ``ernas.cli.search.run``; the derived arch is retrained from scratch (and, with
   ``--init scratch supernet``, also from the supernet's inherited weights, a separate series
   that shares the scratch series' architectures and hence their timings; ``supernet_eq``: the
   same, retrained for fewer steps so that the inherited weights see as many training crops in
   search and retraining together as every scaled network does in its retraining). ``--distill W``
   adds, for each of those, a series ``<series>_kd`` distilled from the reference network of the
   same seed (``ernas.distill``: output L1 weight W, feature weight ``--distill-feat``), trained
   once its search and that reference run have finished. It is another recipe than the scaled
   front's, so its figures are an attempt beside the goals, not a claim on them.
3. Every network is retrained with the same recipe and budget (``ernas.train.retrain``, NAFNet's
   recipe, ``--steps``/``--batch``/``--crop``), for every seed of ``--seeds``, and evaluated
   (``ernas.evaluate.evaluate``) at σ 15/25/50 on the held-out tiles: every bundled image the
   colour task never trains or validates on (the colour test photos and every grey photo, read as
   RGB), cut into non-overlapping ``--tile`` squares (grid centred), written as PNGs to
   ``<out>/test_tiles`` and used as the task's ``test_dir``. Test noise is seeded by (0, tile
   index): identical for every network and seed, so differences are paired.
4. ``measure`` (run it on a quiet machine): every distinct architecture is timed end to end
   with the latency protocol (``ernas.evaluate.measure_latencies``: all networks interleaved in
   shuffled rounds, the latency config's backend, session options and statistic), and its
   predicted latency is ``predict_ms`` on ONE table holding the op keys of every network on the
   plot, profiled in one interleaved session (``profile_table``) right before the timing, so
   all predictions come from the same machine state. This is repeated ``--passes`` times
   (default 3), each pass with new onnxruntime sessions: a session of some networks runs
   1.5–2.2x slower than another session of the same file for its whole life
   (``benchmarks/session_variance.py``), which interleaving cannot cancel. The figures are combined
   (``combine_passes``: medians; the paired speed-up over all passes' rounds) and every goal is
   also judged on each pass alone, so a verdict that holds in one period only is visible.
5. ``report``: ``pareto.csv`` (one row per network and seed), ``pareto.png`` (measured latency
   vs PSNR σ25, mean ± std over seeds, both fronts), ``summary.json`` and a printed summary.
   Fronts are the non-dominated (measured ms, mean PSNR σ25) networks of a series; the scaled
   front is interpolated linearly in (log latency, PSNR). Printed: at the reference's PSNR minus
   0.5% the fastest network of each series; per network the PSNR gap to the scaled front at its
   latency and the speed-up over it at its PSNR; predicted/measured speed-up agreement; goals.

Goals (σ25, mean over seeds): a searched network ≥2x faster (measured) than the reference at
≤0.5% PSNR drop; most of the searched front ≥0.2 dB above, or ≥1.3x faster than, the scaled
front; predicted and measured speed-ups (vs the reference) within 10% for every network.

Phases (all resumable: finished runs are skipped, files are written atomically)::

    ernas-profile space=nafnet_ern_small            # optional, quiet machine: the search's table
    python benchmarks/pareto.py train --out DIR     # searches, retraining, quality (hours)
    python benchmarks/pareto.py measure --out DIR   # latency of every network (3 passes), report
    python benchmarks/pareto.py report --out DIR
    python benchmarks/pareto.py merge --out ALL DIR DIR2 ...  # search attempts on one plot

``train`` resolves the search space's latency table first (profiling it here if no table holds on
this machine) and pins it (``<out>/search_table.csv``) for every search of the run and for the
hinge targets (fractions of the reference's prediction from it). Its jobs run in ``--workers``
processes of ``--train-threads`` torch threads each. Budget of the defaults (14 networks x 3
seeds x 2500 steps, 6 searches x 1000 steps), from per-step CPU times measured at 1 thread on
this 2-core VM: ~11 CPU-hours, i.e. ~5.5 h with 2 workers on 2 free cores.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from pareto_phases import base_overrides, compose_cfg, measure_phase, merge_phase, report_phase
from pareto_setup import (REDUCTIONS, equal_sample_steps, make_task, pin_table, reduction,
                          scaled_archs, write_tiles)

FIXED = ("space", "steps", "search_steps", "hinge_lam", "hinge_form", "crop", "batch", "tile",
         "threads", "overrides")
OLD_DEFAULTS = {"hinge_form": "hinge"}  # what a config.json written before the option held


# --------------------------------------------------------------------------- pure parts
def distill_change(old: dict, new: dict) -> list[str]:
    """The distillation settings a resumed run may not change: a finished ``_kd`` run is kept,
    so resuming with another weight (or feature weight) would mix two recipes in one series.
    Adding distillation to a run without it is allowed (a new series); a ``config.json`` from
    before ``--distill`` existed had none."""
    was, now = old.get("distill"), new.get("distill")
    if was is None or now is None:
        return []
    return [k for k, default in (("distill", None), ("distill_feat", 0.1))
            if old.get(k, default) != new.get(k, default)]


def search_job(tag: str, overrides: list[str], out: Path, threads: int) -> dict:
    """One search into ``out``; resumed from its checkpoint, skipped when finished."""
    import torch

    from ernas.cli import search

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if not (out / "summary.json").is_file():
        resume = (out / "checkpoint.pt").is_file()
        if out.exists() and not resume:
            shutil.rmtree(out)  # stopped before its first checkpoint: nothing to keep
        search.run(compose_cfg(overrides + ([f"resume={out}"] if resume else [])),
                   None if resume else out)
    s = json.loads((out / "summary.json").read_text())
    return {"predicted_ms": s["predicted_latency_ms"], "seconds": time.perf_counter() - t0,
            "of_target": s["predicted_latency_ms"] / s["target_ms"],
            "acted": s["latency_active_fraction"] > 0}


def teacher_of(n: dict, seed: int, out: Path, ref_arch: str, w_out: float, w_feat: float):
    """The ``DistillConfig`` of network ``n`` for ``seed`` (its teacher's best checkpoint);
    None for a network without a teacher or while the teacher's run has not finished."""
    from ernas.distill import DistillConfig
    from ernas.space import load_arch

    if not n.get("teacher"):
        return None
    run = out / "runs" / n["teacher"] / f"seed{seed}"
    s = run / "summary.json"
    if not (s.is_file() and json.loads(s.read_text()).get("finished")):
        return None
    return DistillConfig(load_arch(ref_arch), str(run / "best.pt"), w_out, w_feat)


def train_job(n: dict, seed: int, out: Path, task, tc, space, shape, threads: int,
              distill=None) -> str:
    """Retrain one network for one seed (resumed from ``last.pt``, skipped when finished) and
    evaluate it on the test tiles (skipped when done)."""
    import torch

    from ernas.evaluate import ModelEntry, evaluate
    from ernas.space import load_arch
    from ernas.train import resume, retrain

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run = out / "runs" / n["name"] / f"seed{seed}"
    arch = load_arch(n["arch"])
    s = run / "summary.json"
    if not (s.is_file() and json.loads(s.read_text()).get("finished")):
        if (run / "last.pt").is_file():
            resume(run, progress=False)
        else:
            retrain(arch, run, task, tc, init=n["init"], source=n["source"], progress=False,
                    space=space, distill=distill)
    if not (run / "eval" / "summary.json").is_file():
        evaluate([ModelEntry(n["name"], arch, str(run))], run / "eval", task, seed=0,
                 latency_cfg=None, input_shape=shape, progress=False)
    q = json.loads((run / "eval" / "summary.json").read_text())
    return (f"{n['name']} seed {seed}: PSNR σ25 {q['psnr']:.3f} dB "
            f"[{time.perf_counter() - t0:.0f} s]")


def train_phase(a) -> None:
    """Searches and retraining+evaluation jobs in ``--workers`` processes: the searches and the
    scaled networks first, each searched network's jobs once its search has finished."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from ernas.io import atomic_write_json
    from ernas.latency.predict import predict_ms
    from ernas.latency.table import LatencyTable
    from ernas.space import find_space
    from ernas.train import TrainConfig

    out = Path(a.out)
    c = {k: getattr(a, k) for k in ("space", "seeds", "steps", "search_steps", "lams", "targets",
                                     "hinge_lam", "hinge_form", "widths", "reductions",
                                     "reduction_widths",
                                     "init", "distill",
                                     "distill_feat", "crop", "batch",
                                     "threads", "tile", "overrides", "workers", "train_threads")}
    if (out / "config.json").is_file():
        old = json.loads((out / "config.json").read_text())
        was = {k: old.get(k, OLD_DEFAULTS.get(k)) for k in FIXED}
        diff = [k for k in FIXED if was[k] != c[k]] + distill_change(old, c)
        if diff:
            sys.exit(f"{out} was trained with other {', '.join(diff)} "
                     f"({', '.join(f'{k}={was.get(k, old.get(k))}' for k in diff)}); "
                     f"use a new --out.")
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose_cfg(base_overrides(c))
    c.update(command=shlex.join([sys.executable, *sys.argv]),
             input_shape=list(cfg.input_shape))
    atomic_write_json(out / "config.json", c)
    space, shape = find_space(cfg.space), [int(s) for s in cfg.input_shape]

    tiles_dir = out / "test_tiles"
    if not (tiles_dir / "tiles.json").is_file():
        write_tiles(tiles_dir, a.tile)
    counts = json.loads((tiles_dir / "tiles.json").read_text())
    print(f"test set: {sum(counts.values())} tiles of {a.tile}x{a.tile} from {len(counts)} "
          f"held-out photos ({', '.join(f'{k} {v}' for k, v in counts.items())})", flush=True)
    task = make_task(cfg, tiles_dir)

    # every job in a fresh process (max_tasks_per_child=1): profiling and searches free memory
    ex = ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1)
    pinned = out / "search_table.csv"
    if not pinned.is_file():
        print(f"search table: {ex.submit(pin_table, base_overrides(c), pinned).result()}",
              flush=True)
    ref_ms = predict_ms(LatencyTable.load(pinned), space.reference(), shape,
                        cfg.latency.granularity)
    print(f"search table pinned: {pinned}; reference predicted {ref_ms:.2f} ms", flush=True)
    pin = [f"latency.table={pinned}", "latency.trust_table=true"]
    searches = {f"lam{lam:g}": ["search.latency_form=additive", f"search.lam={lam}",
                                "search.target_ms=null"] for lam in a.lams}
    searches.update({f"t{f:g}": [f"search.latency_form={a.hinge_form}",
                                 f"search.lam={a.hinge_lam}",
                                 f"search.target_ms={f * ref_ms}"] for f in a.targets})
    nets = []
    ref_name = f"nafnet_w{space.geometry['width']}"
    for name, arch in scaled_archs(space, a.widths, a.reductions, a.reduction_widths).items():
        arch.save(out / "archs" / f"{name}.yaml")
        nets.append({"name": name, "series": "scaled", "reference": name == ref_name,
                     "arch": str(out / "archs" / f"{name}.yaml"), "init": "scratch",
                     "source": None, "search": None})
    eq_steps = equal_sample_steps(a.steps, a.batch, a.search_steps, int(cfg.search.batch_size))
    for tag in searches:
        for init in a.init:
            for kd in ([False, True] if a.distill is not None else [False]):
                suffix = ("" if init == "scratch" else f"_{init}") + ("_kd" if kd else "")
                nets.append({"name": f"search_{tag}{suffix}", "series": f"searched{suffix}",
                             "reference": False, "arch": str(out / "search" / tag / "arch.yaml"),
                             "init": "supernet" if init == "supernet_eq" else init,
                             "steps": eq_steps if init == "supernet_eq" else None,
                             "source": str(out / "search" / tag), "search": tag,
                             "teacher": ref_name if kd else None})
    atomic_write_json(out / "networks.json", {"reference_predicted_ms": ref_ms,
                                              "search_table": str(pinned), "networks": nets})

    tcs = {seed: TrainConfig(steps=a.steps, batch_size=a.batch, crop=a.crop, seed=seed,
                             val_every=max(50, a.steps // 10), device="cpu") for seed in a.seeds}

    ref_arch = next(n["arch"] for n in nets if n["reference"])
    waiting: list = []  # distilled jobs whose teacher run has not finished yet

    def train_jobs(tag):
        jobs = {}
        for seed in a.seeds:
            for n in (n for n in nets if n["search"] == tag):
                kd = teacher_of(n, seed, out, ref_arch, a.distill, a.distill_feat)
                if n.get("teacher") and kd is None:
                    waiting.append((n, seed))
                    continue
                tc = tcs[seed] if n.get("steps") is None else replace(
                    tcs[seed], steps=n["steps"], val_every=max(50, n["steps"] // 10))
                jobs[ex.submit(train_job, n, seed, out, task, tc, space, shape,
                               a.train_threads, kd)] = None
        return jobs

    def released():
        jobs = {}
        for n, seed in list(waiting):
            kd = teacher_of(n, seed, out, ref_arch, a.distill, a.distill_feat)
            if kd is not None:
                waiting.remove((n, seed))
                tc = tcs[seed] if n.get("steps") is None else replace(
                    tcs[seed], steps=n["steps"], val_every=max(50, n["steps"] // 10))
                jobs[ex.submit(train_job, n, seed, out, task, tc, space, shape,
                               a.train_threads, kd)] = None
        return jobs

    with ex:
        todo = {ex.submit(search_job, tag, base_overrides(c) + pin + ov, out / "search" / tag,
                          a.train_threads): tag for tag, ov in searches.items()}
        todo.update(train_jobs(None))
        try:
            while todo:
                done, _ = wait(todo, return_when=FIRST_COMPLETED)
                for f in done:
                    tag, r = todo.pop(f), f.result()
                    if tag is None:
                        print(r, flush=True)
                        todo.update(released())
                        continue
                    idle = "" if r["acted"] else "; the latency term never acted: a λ=0 network"
                    print(f"search {tag}: predicted {r['predicted_ms']:.2f} ms "
                          f"({ref_ms / r['predicted_ms']:.2f}x, {r['of_target']:.2f} of its T"
                          f"{idle}) [{r['seconds']:.0f} s]", flush=True)
                    todo.update(train_jobs(tag))
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)
            raise
    for n, seed in waiting:
        print(f"{n['name']} seed {seed}: not trained, its teacher {n['teacher']} seed {seed} "
              f"did not finish", flush=True)
    print(f"train phase done; next, on a quiet machine: python {sys.argv[0]} measure --out {out}")


def positive(v: str) -> int:
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"{v!r} is not a whole number >= 1")
    return int(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="phase", required=True)
    tr = sub.add_parser("train", help="searches, retraining and quality (resumable)")
    ms = sub.add_parser("measure", help="latency of every network (quiet machine), then report")
    rp = sub.add_parser("report", help="pareto.csv, pareto.png, summary")
    mg = sub.add_parser("merge", help="several train runs (search attempts) on one plot")
    for p in (tr, ms, rp, mg):
        p.add_argument("--out", required=True)
    mg.add_argument("runs", nargs="+", help="train-phase output folders (same recipe)")
    ms.add_argument("--passes", type=positive, default=3,
                    help="measure passes, each profiling its own table and timing every network "
                         "(combined: medians; goals also judged per pass)")
    tr.add_argument("--space", default="nafnet_ern_small")
    tr.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    tr.add_argument("--steps", type=int, default=2500, help="retraining steps")
    tr.add_argument("--search-steps", type=int, default=1000)
    tr.add_argument("--lams", type=float, nargs="*", default=[0.25, 1.0],
                    help="additive latency weights of the λ sweep")
    tr.add_argument("--targets", type=float, nargs="*", default=[0.7, 0.5, 0.4, 0.3],
                    help="hinge targets, fractions of the reference's predicted latency")
    tr.add_argument("--hinge-lam", type=float, default=1.0)
    tr.add_argument("--hinge-form", choices=["hinge", "band"], default="hinge",
                    help="latency form of the --targets searches (band: also pulls up to f·T)")
    tr.add_argument("--widths", type=int, nargs="*", default=[8, 12],
                    help="scaled widths (the reference width is always included)")
    tr.add_argument("--reductions", nargs="*", default=list(REDUCTIONS), type=reduction,
                    help="reductions of the reference, parts joined by '_' (e.g. shallow_bnhi)")
    tr.add_argument("--reduction-widths", type=int, nargs="*", default=[],
                    help="also apply every reduction at these widths (nafnet_w<width>_<r>)")
    tr.add_argument("--init", nargs="+", default=["scratch"],
                    choices=["scratch", "supernet", "supernet_eq"],
                    help="initialisations of the searched networks, one series each (supernet: "
                         "the search's weights, retrained --steps; supernet_eq: the same, "
                         "retrained only as many steps as leave the weights' crops in search and "
                         "retraining equal to the scaled networks' budget)")
    tr.add_argument("--distill", type=float, default=None, metavar="W",
                    help="also train each searched network distilled from the reference of the "
                         "same seed, output L1 weight W (a series <series>_kd)")
    tr.add_argument("--distill-feat", type=float, default=0.1,
                    help="feature-distillation weight of --distill")
    tr.add_argument("--crop", type=int, default=64)
    tr.add_argument("--batch", type=int, default=8)
    tr.add_argument("--tile", type=int, default=128, help="side of the test tiles")
    tr.add_argument("--workers", type=int, default=2,
                    help="processes running searches and retraining side by side")
    tr.add_argument("--train-threads", type=int, default=1,
                    help="torch threads per worker (on this shared 2-core machine under load a "
                         "step took ~15x longer at 2 threads than at 1)")
    for p in (tr, ms):
        p.add_argument("--threads", type=int, default=None if p is ms else 2,
                       help="latency backend threads (measure: default the train phase's)")
        p.add_argument("-o", "--override", dest="overrides", action="append", default=[],
                       help="extra Hydra override of the search config (also the latency "
                            "config of measure), e.g. -o latency.cache_dir=DIR; repeatable")
    a = ap.parse_args()
    {"train": train_phase, "measure": measure_phase, "report": report_phase,
     "merge": merge_phase}[a.phase](a)


if __name__ == "__main__":
    main()
