"""Quantisation-aware fine-tuning whose export *is* the deployed int8 model.

Coverage: exactly what PTQ quantises (``ernas.latency.qdq``: op types ``[Conv]`` and its conv
rule, the convs whose GEMM is big enough to run faster in int8, measured by
``benchmarks/int8_op_types.py``): each such ``nn.Conv2d`` gets fake quantisers on its input, its
weight and its output, the pattern onnxruntime fuses into one ``QLinearConv``; everything else
(other convs, LayerNorm arithmetic, gates, adds, attention, resampling) stays float, as in the
PTQ file. A conv whose input is exactly another quantised conv's output (a direct conv → conv
edge, found by tensor identity in one forward pass) reads that conv's quantised output instead of
quantising it again, so every tensor has one Q/DQ pair, as in a ``quantize_static`` graph.

Grids, as onnxruntime's static quantiser (U8S8, QDQ):

- weights: symmetric int8 per output channel, q(W_c) = s_c·clamp(round(W_c/s_c), −128, 127) with
  s_c = max|W_c|/Q, Q = 63 with ``reduce_range`` (7-bit weights) else 127. On x86 CPUs without
  VNNI onnxruntime's U8S8 kernels multiply-add pairs of u8·s8 products into int16
  (``vpmaddubsw``), which saturates for 8-bit weights (255·127·2 > 32767); 7-bit weights cannot
  saturate (255·63·2 < 32767). Measured here (AVX2, no VNNI): 8-bit weights made onnxruntime's
  optimised int8 graph differ from the fake-quantised PyTorch model by up to 0.27 (outputs in
  [0, 1]); 7-bit by 0.02.
- activations: asymmetric uint8 per tensor, q(x) = s·(clamp(round(x/s) + z, 0, 255) − z), s =
  (hi − lo)/255, z = round(−lo/s), from the observed range [lo, hi] ∋ 0: min/max over the
  calibration batches, then an exponential moving average (momentum 0.9) while fine-tuning;
  frozen for evaluation and export.

The gradient is the straight-through estimator (1 inside the clamp range, 0 outside). The model is
fine-tuned with BatchNorm folded (``model.fuse()``), the deployed form. ``export_onnx`` of the
result gives QuantizeLinear/DequantizeLinear pairs holding the fine-tuned ranges: the file
``ernas-export`` ships as ``model_qat.onnx``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ernas.batches import step_batches
from ernas.errors import ErnasError
from ernas.latency.qdq import CONV_RULE, OP_TYPES, int8_conv


class FakeQuant(nn.Module):
    """Per-tensor asymmetric uint8 fake quantiser of activations with a min/max observer.

    ``mode``: ``calibrate`` (observe only: lo ← min(lo, min x), hi ← max(hi, max x); x passes
    unchanged), ``train`` (lo, hi ← 0.9·old + 0.1·batch value, then quantise) or ``frozen``
    (fixed s, z: constants in the exported graph)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.mode = "calibrate"

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = ((self.hi - self.lo) / 255.0).clamp_min(1e-8)
        zero = torch.round(-self.lo / scale).clamp(0, 255).to(torch.int32)
        return scale.detach(), zero.detach()

    def forward(self, x):
        if self.mode == "frozen":
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero, 0, 255)
        with torch.no_grad():
            lo, hi = x.detach().min().float(), x.detach().max().float()
            if self.mode == "calibrate":
                self.lo.copy_(torch.minimum(self.lo, lo))
                self.hi.copy_(torch.maximum(self.hi, hi))
                return x
            self.lo.mul_(0.9).add_(0.1 * torch.minimum(lo, lo.new_zeros(())))
            self.hi.mul_(0.9).add_(0.1 * torch.maximum(hi, hi.new_zeros(())))
        scale, zero = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)

    def freeze(self) -> None:
        self.scale, self.zero = (t.clone() for t in self.qparams())
        self.mode = "frozen"


class QuantConv2d(nn.Module):
    """q_out(conv(q_in(x), q_w(W)) + b) (module docstring); ``q_in`` is an identity when the
    input is another QuantConv2d's (already quantised) output."""

    def __init__(self, conv: nn.Conv2d, reduce_range: bool = True):
        super().__init__()
        self.conv = conv
        self.qmax = 63 if reduce_range else 127
        self.q_in, self.q_out = FakeQuant(), FakeQuant()
        self.register_buffer("w_scale", torch.zeros(conv.out_channels))
        self.register_buffer("w_zero", torch.zeros(conv.out_channels, dtype=torch.int32))
        self.frozen = False

    def freeze(self) -> None:
        """Fix the weight scales and the activation ranges (for evaluation and export)."""
        with torch.no_grad():
            self.w_scale.copy_(self._scale())
        self.frozen = True
        for q in (self.q_in, self.q_out):
            if isinstance(q, FakeQuant):
                q.freeze()

    def _scale(self):
        w = self.conv.weight.detach()
        return (w.abs().amax(dim=(1, 2, 3)) / self.qmax).clamp_min(1e-8)

    def forward(self, x):
        scale = self.w_scale if self.frozen else self._scale()
        w = torch.fake_quantize_per_channel_affine(self.conv.weight, scale, self.w_zero, 0,
                                                   -128, 127)
        c = self.conv
        y = nn.functional.conv2d(self.q_in(x), w, c.bias, c.stride, c.padding, c.dilation,
                                 c.groups)
        return self.q_out(y)


def _quant_convs(model: nn.Module) -> list[QuantConv2d]:
    return [m for m in model.modules() if isinstance(m, QuantConv2d)]


@torch.no_grad()
def _share_direct_edges(model: nn.Module, example: torch.Tensor) -> int:
    """Make ``q_in`` an identity for every QuantConv2d whose input tensor is another one's output
    (one forward pass in calibrate mode, where quantisers return their input unchanged);
    returns the number of such edges."""
    outputs: list[torch.Tensor] = []
    shared: list[QuantConv2d] = []

    def hook(mod, inp, out):
        if any(inp[0] is t for t in outputs):
            shared.append(mod)
        outputs.append(out)

    handles = [m.register_forward_hook(hook) for m in _quant_convs(model)]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    for m in shared:
        m.q_in = nn.Identity()
    return len(shared)


def prepare_qat(model: nn.Module, example: torch.Tensor, reduce_range: bool = True,
                op_types=OP_TYPES, conv_rule: dict | None = CONV_RULE) -> nn.Module:
    """A fused copy of ``model`` with every ``nn.Conv2d`` that ``conv_rule`` quantises wrapped in
    :class:`QuantConv2d` and direct conv → conv edges sharing one quantiser (module docstring);
    ``example``: one input batch, to find those edges."""
    unknown = sorted(set(op_types) - set(OP_TYPES))
    if unknown:
        raise ErnasError(f"QAT: op types {unknown} are not supported; QAT fake-quantises "
                         f"{list(OP_TYPES)} (set qat.op_types / calibration.op_types to a subset "
                         f"of that, or run PTQ only).")
    model = copy.deepcopy(model).cpu().eval()
    if hasattr(model, "fuse"):
        model.fuse()

    def swap(parent: nn.Module):
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                w = child.weight.shape
                if "Conv" in op_types and int8_conv(w[0], w[1] * w[2] * w[3], conv_rule):
                    setattr(parent, name, QuantConv2d(child, reduce_range))
            else:
                swap(child)

    swap(model)
    _set_mode(model, "calibrate")
    _share_direct_edges(model, example)
    return model


def _set_mode(model: nn.Module, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, FakeQuant):
            m.mode = mode


def finetune(model: nn.Module, task, batch, steps: int, lr: float, progress: bool = False) -> None:
    """``steps`` steps of AdamW (betas 0.9/0.9, lr cosine-annealed to 0) on the task's loss over
    the training batches ``batch(step)``; ``model`` must be in its training mode."""
    from ernas.progress import progress as progress_bar

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
    bar = progress_bar(steps, "qat", unit="step", enabled=progress)
    for step in range(steps):
        bar.update(1)
        x, y = batch(step)
        loss = task.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    bar.close()


CALIBRATION_STEP = 10_000_000  # batch indices from here on are never fine-tuning steps


def training_batches(task, batch_size: int, crop: int, seed: int):
    """``batch(i)``: the i-th random training batch (random crops of the training split)."""
    return step_batches(task.dataset("train", crop, seed, random=True), batch_size, seed)


def qat_finetune(model: nn.Module, task, steps: int, batch_size: int = 8, crop: int = 64,
                 lr: float = 1e-4, seed: int = 0, calibration_batches: int = 4,
                 progress: bool = False, reduce_range: bool = True,
                 op_types=OP_TYPES, conv_rule: dict | None = CONV_RULE) -> nn.Module:
    """Quantisation-aware fine-tuning: wrap the convs (:func:`prepare_qat`), calibrate the
    activation ranges on ``calibration_batches`` training batches, fine-tune ``steps`` steps
    (:func:`finetune`), freeze. Returns the fake-quantised model in eval mode; ``export_onnx`` of
    it is the deployable QDQ graph."""
    batch = training_batches(task, batch_size, crop, seed)
    q = prepare_qat(model, batch(CALIBRATION_STEP)[0], reduce_range, op_types, conv_rule)
    with torch.no_grad():
        for i in range(calibration_batches):
            q(batch(CALIBRATION_STEP + i)[0])
    if steps > 0:
        _set_mode(q, "train")
        q.train()
        finetune(q, task, batch, steps, lr, progress)
    for m in _quant_convs(q):
        m.freeze()
    return q.eval()
