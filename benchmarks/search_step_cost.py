"""Benchmark: cost of one search step against training the largest discrete network of the space.

Three variants, the same batch (noisy/clean, batch x 3 x crop x crop) and the same task loss:

  discrete  ``space.largest()`` built with ``ernas.build_model``: forward + backward + AdamW step;
  shared    ``SuperNet(space, "shared")``: one iteration of ``ernas.search.loop.run_search``
            after warm-up, replicated statement by statement: the weight step and the α step
            (task + latency + entropy objective, ``autograd.grad`` w.r.t. α, Adam step);
            logging and checkpoints are left out;
  darts     the same with ``SuperNet(space, "darts")`` (all paths, separate weights).

Step time: all variants are built in one process and timed interleaved (round r runs one step of
each variant, the order rotated every round): medians, the ratio of the medians and the median
of the per-round ratios; the search step is split into its weight part and its α part.

Peak memory: every variant runs alone in a fresh subprocess. CPU: VmHWM (reset through
``/proc/self/clear_refs`` right before the first step) minus the RSS before it, so gradients,
optimiser states, activations and allocator slack, not the parameters; CUDA:
``max_memory_allocated`` minus ``memory_allocated`` before the steps. Also printed: the bytes of
tensors saved for backward by one forward, and the static training state (parameters, gradients
and AdamW's two moments). The latency table only sets E[LAT], which does not change the cost of
a step, so a synthetic table (every op key at 1 ms) is used unless ``--table PATH`` is given.

    python benchmarks/search_step_cost.py                  # CPU, nafnet_ern + nafnet_tiny
    python benchmarks/search_step_cost.py --device cuda --batch 8 --crop 256 --amp
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ernas import build_model
from ernas.latency.backends import machine_description
from ernas.latency.predict import ExpectedLatency
from ernas.latency.table import LatencyTable
from ernas.search.loop import frozen
from ernas.search.objective import EntropySchedule, LatencyLoss, SearchObjective, normalized_entropy
from ernas.space import find_space
from ernas.supernet import SuperNet
from ernas.tasks.denoise import batch_psnr, psnr_loss


# --------------------------------------------------------------------------- setup
def synthetic_table(space, shape, granularity="block"):
    t = LatencyTable(metadata={"backend": "synthetic", "device": "none",
                               "input_shape": list(shape), "granularity": granularity})
    for k in space.op_keys(shape, granularity):
        t.add(k, [1.0])
    return t


class Variant:
    """One model with its optimisers and a ``step()`` that does what the loop (or a plain
    training loop) does."""

    def __init__(self, kind, space, args, device, batches, expected):
        torch.manual_seed(0)
        self.kind, self.device = kind, device
        self.train_b, self.val_b = batches
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                       enabled=args.amp and device.type == "cuda")
        if kind == "discrete":
            self.net = build_model(space.largest()).to(device)
            self.opt_w = torch.optim.AdamW(self.net.parameters(), lr=1e-3, weight_decay=0.0)
        else:
            self.net = SuperNet(space, kind, 1.0, False).to(device)
            self.opt_w = torch.optim.AdamW(self.net.weight_parameters(), lr=1e-3,
                                           weight_decay=0.0)
            self.opt_a = torch.optim.Adam(self.net.arch_parameters(), lr=3e-2,
                                          betas=(0.5, 0.999))
            self.expected = expected.to(device)
            target = expected.of_arch(space.reference())
            # entropy term switched on (weight > 0 at the timed step), as late in a search
            self.objective = SearchObjective(psnr_loss, LatencyLoss("additive", 0.5, target, 0.6),
                                             EntropySchedule(0.3, 0, 0, "cosine"))
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt_w, T_max=10**6,
                                                                eta_min=1e-6)
        self.task = psnr_loss
        self.n_params = sum(p.numel() for p in self.net.parameters())

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def weight_step(self):
        net = self.net
        net.train()
        noisy, clean = self.train_b
        if self.kind == "discrete":
            with self.autocast:
                pred = net(noisy)
            task = self.task(pred.float(), clean)
            self.opt_w.zero_grad(set_to_none=True)
            task.backward()
            self.opt_w.step()
            self.sched.step()
            return
        # == run_search, step 1 (weights on a training batch)
        with torch.no_grad():
            probs = net.probs()
        with self.autocast:
            pred = net(noisy, probs)
        task = self.objective.task(pred.float(), clean)
        if not torch.isfinite(task):
            raise RuntimeError("task loss not finite")
        self.opt_w.zero_grad(set_to_none=True)
        task.backward()
        self.opt_w.step()
        self.sched.step()
        batch_psnr(pred, clean)

    def alpha_step(self, step=10**6):
        # == run_search, step 2 (architecture on a validation batch)
        net = self.net
        vn, vc = self.val_b
        alphas = net.arch_parameters()
        with frozen(net.weight_parameters()):
            probs = net.probs()
            with self.autocast:
                vpred = net(vn, probs)
            total, parts = self.objective(vpred.float(), vc, self.expected(probs),
                                          normalized_entropy(net.probs(sample=False)), step)
            if not math.isfinite(parts["total"]):
                raise RuntimeError("objective not finite")
            grads = torch.autograd.grad(total, alphas, allow_unused=True)
        for a, g in zip(alphas, grads):
            a.grad = torch.zeros_like(a) if g is None else g
        self.opt_a.step()

    def step(self):
        """Seconds of (weight part, α part); α part 0 for the discrete model."""
        if self.device.type == "cuda":
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
            self.weight_step()
            ev[1].record()
            if self.kind != "discrete":
                self.alpha_step()
            ev[2].record()
            torch.cuda.synchronize()
            return ev[0].elapsed_time(ev[1]) / 1e3, ev[1].elapsed_time(ev[2]) / 1e3
        t0 = time.perf_counter()
        self.weight_step()
        t1 = time.perf_counter()
        if self.kind != "discrete":
            self.alpha_step()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    def saved_bytes(self):
        """Bytes of unique tensor storages saved for backward by one forward of the weight step
        (and of the α step), parameters and buffers excluded."""
        skip = {t.untyped_storage().data_ptr() for t in
                list(self.net.parameters()) + list(self.net.buffers())}

        def measure(fn):
            seen = {}

            def pack(t):
                s = t.untyped_storage()
                if s.data_ptr() not in skip and s.data_ptr() != 0:
                    seen[s.data_ptr()] = s.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = fn()
            del out
            return sum(seen.values())

        noisy, _ = self.train_b
        self.net.train()
        if self.kind == "discrete":
            with self.autocast:
                return measure(lambda: self.net(noisy)), 0
        with torch.no_grad():
            probs = self.net.probs()
        with self.autocast:
            w = measure(lambda: self.net(noisy, probs))
            with frozen(self.net.weight_parameters()):
                a = measure(lambda: self.net(self.val_b[0], self.net.probs()))
        return w, a


def make_setup(args):
    device = torch.device(args.device)
    space = find_space(args.space)
    shape = (1, 3, 256, 256)
    if args.table:
        table = LatencyTable.load(args.table)
        shape = tuple(table.metadata["input_shape"])
    else:
        table = synthetic_table(space, shape)
    expected = ExpectedLatency(space, table, shape, table.metadata.get("granularity", "block"))
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):  # a training and a validation batch
        clean = torch.rand(args.batch, 3, args.crop, args.crop, generator=g)
        noisy = clean + 25 / 255 * torch.randn(clean.shape, generator=g)
        batches.append((noisy.to(device), clean.to(device)))
    return space, device, batches, expected


# --------------------------------------------------------------------------- memory worker
def _rss_kib():
    """(VmRSS, VmHWM) of this process in KiB."""
    st = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(st["VmRSS"].split()[0]), int(st["VmHWM"].split()[0])


def memory_worker(args) -> dict:
    torch.set_num_threads(args.threads)
    space, device, batches, expected = make_setup(args)
    v = Variant(args.variant, space, args, device, batches, expected)
    saved_w, saved_a = v.saved_bytes()
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
