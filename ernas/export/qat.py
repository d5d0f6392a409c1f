"""Quantisation-aware fine-tuning with fake quantisers that export to ONNX QDQ pairs.

Fake quantisation, as onnxruntime's static quantiser does it (U8S8): weights symmetric int8 per
output channel, q(W_c) = s_c·clamp(round(W_c/s_c), −128, 127) with s_c = max|W_c|/127;
activations (the input and the output of every conv) asymmetric uint8 per tensor,
q(x) = s·(clamp(round(x/s) + z, 0, 255) − z) with s = (hi − lo)/255, z = round(−lo/s) from the
observed range [lo, hi] ∋ 0 (min/max over the calibration batches, then an exponential moving
average with momentum 0.9 while fine-tuning; frozen for export). The gradient is the
straight-through estimator: 1 inside the clamp range, 0 outside.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ernas.batches import step_batches


class FakeQuant(nn.Module):
    """Per-tensor asymmetric uint8 fake quantiser of activations with a min/max observer.

    q(x) = s·(clamp(round(x/s) + z, 0, 255) − z), s = (hi − lo)/255, z = round(−lo/s), where
    [lo, hi] ∋ 0 is the observed range. ``mode``: ``calibrate`` (observe only: lo ← min(lo,
    min x), hi ← max(hi, max x); x passes unchanged), ``train`` (lo, hi ← 0.9·old + 0.1·batch
    value, then quantise) or ``frozen`` (fixed s, z: constants in the exported graph)."""

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
    """q_out(conv(q_in(x), q_w(W)) + b): uint8 input and output activations (per tensor) and
    symmetric int8 weights (per output channel, s_c = max|W_c|/127): the pattern onnxruntime
    fuses into ``QLinearConv``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.q_in, self.q_out = FakeQuant(), FakeQuant()
        self.register_buffer("w_scale", torch.zeros(conv.out_channels))
        self.register_buffer("w_zero", torch.zeros(conv.out_channels, dtype=torch.int32))
        self.frozen = False

    def freeze(self) -> None:
        """Fix the weight scales and the activation ranges (for evaluation and export)."""
        with torch.no_grad():
            self.w_scale.copy_(self._scale())
        self.frozen = True
        self.q_in.freeze()
        self.q_out.freeze()

    def _scale(self):
        w = self.conv.weight.detach()
        return (w.abs().amax(dim=(1, 2, 3)) / 127.0).clamp_min(1e-8)

    def forward(self, x):
        scale = self.w_scale if self.frozen else self._scale()
        w = torch.fake_quantize_per_channel_affine(self.conv.weight, scale, self.w_zero, 0,
                                                   -128, 127)
        c = self.conv
        y = nn.functional.conv2d(self.q_in(x), w, c.bias, c.stride, c.padding, c.dilation,
                                 c.groups)
        return self.q_out(y)


def prepare_qat(model: nn.Module) -> nn.Module:
    """A fused copy of ``model`` with every ``nn.Conv2d`` wrapped in :class:`QuantConv2d`."""
    model = copy.deepcopy(model).cpu().eval()
    if hasattr(model, "fuse"):
        model.fuse()

    def swap(parent: nn.Module):
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, name, QuantConv2d(child))
            else:
                swap(child)

    swap(model)
    return model


def strip_fake_quant(qmodel: nn.Module) -> nn.Module:
    """The float network inside a QAT model (each :class:`QuantConv2d` replaced by its conv),
    with the weights fine-tuned under quantisation: input for :func:`quantize_int8`."""
    model = copy.deepcopy(qmodel)

    def swap(parent: nn.Module):
        for name, child in parent.named_children():
            if isinstance(child, QuantConv2d):
                setattr(parent, name, child.conv)
            else:
                swap(child)

    swap(model)
    return model


def _set_mode(model: nn.Module, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, FakeQuant):
            m.mode = mode


def qat_finetune(model: nn.Module, task, steps: int, batch_size: int = 8, crop: int = 64,
                 lr: float = 1e-4, seed: int = 0, calibration_batches: int = 4,
                 progress: bool = False) -> nn.Module:
    """Quantisation-aware fine-tuning: wrap the convs (:func:`prepare_qat`), calibrate the
    activation ranges on ``calibration_batches`` training batches, fine-tune ``steps`` steps
    (AdamW, cosine to 0, the task's loss on its training split), freeze. Returns the
    fake-quantised model (export it with ``export_onnx``: QuantizeLinear/DequantizeLinear
    pairs)."""
    from tqdm.auto import tqdm

    q = prepare_qat(model)
    batch = step_batches(task.dataset("train", crop, seed, random=True), batch_size, seed)
    _set_mode(q, "calibrate")
    with torch.no_grad():
        for i in range(calibration_batches):
            q(batch(10_000_000 + i)[0])
    if steps > 0:
        _set_mode(q, "train")
        q.train()
        params = [p for p in q.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.9))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
        for step in tqdm(range(steps), desc="qat", disable=not progress):
            x, y = batch(step)
            loss = task.loss(q(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    for m in q.modules():
        if isinstance(m, QuantConv2d):
            m.freeze()
    return q.eval()
