"""Benchmark: cost of one search step against training the largest discrete NAFNet of the space.

Three variants, the same batch (noisy/clean, batch x 3 x crop x crop) and the same task loss:

  discrete  the largest architecture of the space (``space.largest()``) built with
            ``ernas.build_model``: forward + backward + AdamW step (+ cosine LR step);
  shared    ``SuperNet(space, "shared")``: one iteration of ``ernas.search.loop.run_search``
            after warm-up, replicated statement by statement: the weight step (probabilities
            detached, forward, task loss, backward, AdamW, LR step, train PSNR) and the α step
            (forward on a validation batch with live probabilities, task + latency + entropy
            objective, ``autograd.grad`` w.r.t. α, Adam step); logging and checkpoints are left
            out (they run every ``log_every`` / ``checkpoint_every`` steps);
  darts     the same with ``SuperNet(space, "darts")`` (all paths, separate weights).

Step time: all variants are built in one process and timed interleaved (round r runs one step of
each variant, the order rotated every round); we report medians, the ratio of the medians and the
median of the per-round ratios. The search step is split into its weight part and its α part.

Peak memory: every variant runs alone in a fresh subprocess.
  CPU:  peak RSS above the RSS just before the first step. Right before the first step (model,
        optimisers, input batches built) the kernel's RSS high-water mark is reset
        (``echo 5 > /proc/self/clear_refs``); after ``--mem-steps`` steps the peak is read from
        VmHWM in /proc/self/status. So the figure holds gradients, optimiser states (allocated at
        the first step), activations and allocator slack, not the parameters themselves. Without
        clear_refs it falls back to ``ru_maxrss`` minus the RSS before the first step.
  CUDA: ``torch.cuda.max_memory_allocated()`` during the steps minus ``memory_allocated()``
        before them (the same split: parameters excluded).
Also printed, allocator-independent: the bytes of tensors saved for backward by one forward
(``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters and buffers excluded),
and the static training state (parameters + gradients + AdamW's two moments).

The latency table only sets the E[LAT] values, which do not change the cost of a step, so by
default a synthetic table (every op key of the space at 1 ms) is used; ``--table PATH`` uses a
real one.

    python benchmarks/search_step_cost.py                  # CPU, nafnet_ern + nafnet_tiny
    python benchmarks/search_step_cost.py --device cuda --batch 8 --crop 256 --amp
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from step_cost_variants import Variant, make_setup

from ernas.latency.backends import machine_description


# --------------------------------------------------------------------------- memory worker
def _rss_kib():
    st = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, v = line.split(":", 1)
            st[k] = v
    return int(st["VmRSS"].split()[0]), int(st["VmHWM"].split()[0])


def memory_worker(args) -> dict:
    import resource

    torch.set_num_threads(args.threads)
    space, device, batches, expected = make_setup(args)
    v = Variant(args.variant, space, args, device, batches, expected)
    saved_w, saved_a = v.saved_bytes()
    import gc

    gc.collect()
    res = {"variant": args.variant, "params": v.n_params, "saved_weight_fwd_bytes": saved_w,
           "saved_alpha_fwd_bytes": saved_a}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(args.mem_steps):
            v.step()
        torch.cuda.synchronize()
        res.update(before_bytes=before, peak_bytes=torch.cuda.max_memory_allocated(),
                   method="cuda max_memory_allocated - memory_allocated before")
    else:
        rss0, _ = _rss_kib()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            method = "VmHWM (reset by clear_refs before step 1) - VmRSS before step 1"
            reset = True
        except OSError:
            method = "ru_maxrss - VmRSS before step 1 (no clear_refs: lower bound)"
            reset = False
        for _ in range(args.mem_steps):
            v.step()
        _, hwm = _rss_kib()
        peak = hwm if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res.update(before_bytes=rss0 * 1024, peak_bytes=peak * 1024, method=method)
    res["delta_bytes"] = res["peak_bytes"] - res["before_bytes"]
    return res


def run_memory(args, variant) -> dict:
    cmd = [sys.executable, __file__, "--_worker", "--variant", variant, "--space", args.space,
           "--batch", str(args.batch), "--crop", str(args.crop), "--device", args.device,
           "--threads", str(args.threads), "--mem-steps", str(args.mem_steps)]
    if args.amp:
        cmd.append("--amp")
    if args.table:
        cmd += ["--table", args.table]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory worker {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- timing
def run_timing(args, variants) -> dict:
    torch.set_num_threads(args.threads)
    space, device, batches, expected = make_setup(args)
    models = {k: Variant(k, space, args, device, batches, expected) for k in variants}
    for _ in range(args.warmup):
        for m in models.values():
            m.step()
    times = {k: [] for k in variants}
    order = list(variants)
    for r in range(args.rounds):
        rot = order[r % len(order):] + order[:r % len(order)]
        for k in rot:
            times[k].append(models[k].step())
    params = {k: m.n_params for k, m in models.items()}
    del models
    return {"times": times, "params": params}


def mib(b):
    return b / 2**20


def bench_space(args, out: Path) -> dict:
    variants = [v for v in args.variants.split(",") if v]
    t0 = time.perf_counter()
    mem = {}
    for rep in range(args.mem_repeats):
        for v in (variants if rep % 2 == 0 else variants[::-1]):
            mem.setdefault(v, []).append(run_memory(args, v))
    timing = run_timing(args, variants)
    wall = time.perf_counter() - t0

    rows = {}
    for v in variants:
        ts = timing["times"][v]
        tot = [w + a for w, a in ts]
        deltas = [m["delta_bytes"] for m in mem[v]]
        rows[v] = {"params": timing["params"][v],
                   "step_s": statistics.median(tot),
                   "weight_s": statistics.median([w for w, _ in ts]),
                   "alpha_s": statistics.median([a for _, a in ts]),
                   "min_s": min(tot),
                   "step_all": tot,
                   "peak_mib": statistics.median([mib(d) for d in deltas]),
                   "peak_mib_all": [round(mib(d), 1) for d in deltas],
                   "saved_w_mib": mib(mem[v][0]["saved_weight_fwd_bytes"]),
                   "saved_a_mib": mib(mem[v][0]["saved_alpha_fwd_bytes"]),
                   "state_mib": mib(4 * 4 * timing["params"][v]),
                   "mem_method": mem[v][0]["method"]}
    base = rows.get("discrete")
    lines = [f"== {args.space}: batch {args.batch}, crop {args.crop}, device {args.device}"
             f"{', bf16 autocast' if args.amp else ''}; {args.warmup} warm-up + {args.rounds} "
             f"timed rounds (interleaved); memory: {args.mem_repeats} fresh subprocess(es) per "
             f"variant x {args.mem_steps} steps; wall {wall:.0f} s",
             f"memory definition: {rows[variants[0]]['mem_method']}",
             f"{'variant':9s} {'params':>11s} {'step ms':>9s} {'(w':>8s} {'+ α)':>8s} "
             f"{'min ms':>8s} "
             f"{'peak MiB':>9s} {'saved-fwd MiB w/α':>18s} {'p+g+adam MiB':>12s}"]
    for v, r in rows.items():
        lines.append(f"{v:9s} {r['params']:>11,d} {1e3 * r['step_s']:9.1f} "
                     f"{1e3 * r['weight_s']:8.1f} {1e3 * r['alpha_s']:8.1f} "
                     f"{1e3 * r['min_s']:8.1f} "
                     f"{r['peak_mib']:9.1f} "
                     f"{r['saved_w_mib']:8.1f} /{r['saved_a_mib']:8.1f} {r['state_mib']:12.1f}"
                     f"   peaks {r['peak_mib_all']}")
    result = {"space": args.space, "rows": rows}
    if base:
        for v in variants:
            if v == "discrete":
                continue
            r = rows[v]
            paired = statistics.median(
                s / b for s, b in zip(r["step_all"], base["step_all"]))
            paired_w = statistics.median(
                w / b for (w, _), b in zip(timing["times"][v], base["step_all"]))
            t_ratio = r["step_s"] / base["step_s"]
            m_ratio = r["peak_mib"] / base["peak_mib"]
            s_ratio = r["saved_a_mib"] / base["saved_w_mib"]
            result[f"{v}_time_ratio"], result[f"{v}_mem_ratio"] = t_ratio, m_ratio
            result[f"{v}_time_ratio_paired"] = paired
            goal = ""
            if v == "shared":  # verdict on the paired ratio (robust to load drifting over rounds)
                goal = (f"  goal ≤2x time (paired): {'MET' if paired <= 2 else 'MISSED'}; "
                        f"≤1.5x memory: {'MET' if m_ratio <= 1.5 else 'MISSED'}")
            min_ratio = min(r["step_all"]) / min(base["step_all"])
            lines.append(f"{v}/discrete: step time {t_ratio:.2f}x (median of per-round ratios "
                         f"{paired:.2f}x; fastest/fastest {min_ratio:.2f}x; weight part alone "
                         f"{paired_w:.2f}x), peak memory "
                         f"{m_ratio:.2f}x, saved activations {s_ratio:.2f}x{goal}")
    text = "\n".join(lines)
    print(text, flush=True)
    (out / f"{args.space}.json").write_text(json.dumps(
        {**result, "timing": timing["times"], "memory": mem, "settings": vars(args)}, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--spaces", default="nafnet_ern,nafnet_tiny")
    ap.add_argument("--variants", default="discrete,shared,darts")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA), as search.amp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    ap.add_argument("--rounds", type=int, default=8, help="timed interleaved rounds")
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--mem-repeats", type=int, default=1)
    ap.add_argument("--table", default=None, help="a latency table CSV (default: synthetic)")
    ap.add_argument("--out", default=None)
    # internal: one memory measurement in a fresh process
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--space", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        print(json.dumps(memory_worker(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="ernas_step_cost_"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"search step cost vs the largest discrete NAFNet; machine: {machine_description()}")
    shown = {k: v for k, v in vars(args).items()
             if not k.startswith("_") and k not in ("variant", "space")}
    print(f"settings: {json.dumps(shown)}")
    print(f"output: {out}")
    t0 = time.perf_counter()
    for space in args.spaces.split(","):
        args.space = space
        bench_space(args, out)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
