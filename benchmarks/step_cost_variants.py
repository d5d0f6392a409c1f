"""The three variants of ``search_step_cost.py`` (discrete, shared, darts), each a model with its
optimisers and a ``step()`` that does what the search loop (or a plain training loop) does, and
the shared setup: space, device, a training and a validation batch, E[LAT] on a table."""
from __future__ import annotations

import math
import time

import torch

from ernas.search.loop import frozen
from ernas.space import find_space


# --------------------------------------------------------------------------- setup
def synthetic_table(space, shape, granularity="block"):
    from ernas.latency.table import LatencyTable

    t = LatencyTable(metadata={"backend": "synthetic", "device": "none",
                               "input_shape": list(shape), "granularity": granularity})
    for k in space.op_keys(shape, granularity):
        t.add(k, [1.0])
    return t


class Variant:
    """One model with its optimisers and a ``step()`` that does what the loop (or a plain
    training loop) does."""

    def __init__(self, kind, space, args, device, batches, expected):
        from ernas import build_model
        from ernas.search.objective import EntropySchedule, LatencyLoss, SearchObjective
        from ernas.supernet import SuperNet
        from ernas.tasks.denoise import psnr_loss

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
        from ernas.tasks.denoise import batch_psnr

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
        from ernas.search.objective import normalized_entropy

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
    from ernas.latency.predict import ExpectedLatency
    from ernas.latency.table import LatencyTable

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
