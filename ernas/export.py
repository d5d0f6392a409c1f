"""Deployment: ONNX export with runtime parity, int8 post-training quantisation, and QAT.

- :func:`export_model`: BatchNorm folded (``NAFNet.fuse``), skipped blocks are ``Identity`` and
  leave no node; ONNX via ``export_onnx``, ``onnx.checker``, then onnxruntime vs PyTorch on a
  real bundled image crop with σ=25 noise: ``max_abs_diff = max |y_ort − y_torch|``.
- :func:`quantize_int8`: ``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel
  symmetric int8 weights, uint8 activations, MinMax calibration on noisy crops of real images),
  then PSNR at σ=25 on the bundled test images and onnxruntime CPU latency, int8 vs fp32.
- :func:`qat_finetune`: quantisation-aware fine-tuning with our own fake quantisers (below),
  which export to ONNX ``QuantizeLinear``/``DequantizeLinear`` pairs.

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
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ernas.errors import ErnasError
from ernas.io import atomic_write_json
from ernas.latency.onnx_export import export_onnx
from ernas.space import Arch

__all__ = ["FakeQuant", "QuantConv2d", "export_model", "export_qat", "make_calibration_reader", "onnx_psnr",
           "ort_latency_ms", "prepare_qat", "qat_finetune", "quantize_int8", "strip_fake_quant", "test_crops"]


# =========================================================================== real inputs
def _fit(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Centre crop to h x w, reflect-padding first where the image is smaller."""
    ph, pw = max(0, h - img.shape[0]), max(0, w - img.shape[1])
    if ph or pw:
        img = np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)),
                     mode="reflect")
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[top:top + h, left:left + w]


def test_crops(hw, channels: int = 3, sigma: float = 25, seed: int = 0) -> list[dict]:
    """Centre h x w crops of the bundled test images with ``test_noise`` at ``sigma``:
    ``[{"image", "noisy", "clean"}]`` (1 x C x h x w float32 tensors)."""
    from ernas.data import bundled_images, test_noise

    out = []
    for i, (name, img) in enumerate(bundled_images("test", channels == 3)):
        clean = torch.from_numpy(np.ascontiguousarray(_fit(img, *hw).transpose(2, 0, 1)))
        out.append({"image": name, "clean": clean[None],
                    "noisy": test_noise(clean, sigma, seed, i)[None].float()})
    return out


def _session(path, threads: int):
    from ernas.latency.backends import OnnxRuntimeBackend

    return OnnxRuntimeBackend(threads=threads).session(path)


def onnx_psnr(path, items: list[dict], threads: int = 2) -> float:
    """Mean PSNR (``ernas.metrics.psnr``) of an ONNX model on ``test_crops`` items."""
    from ernas.metrics import psnr

    sess = _session(path, threads)
    return float(np.mean([psnr(torch.from_numpy(sess.run(None, {"input": it["noisy"].numpy()})[0]),
                               it["clean"]) for it in items]))


def ort_latency_ms(path, input_shape, threads: int = 2, budget=None) -> float:
    """Median onnxruntime CPU latency (ms) of one ``run`` at ``input_shape`` (same session
    settings as the latency tables: sequential, ``threads`` intra-op threads, all
    optimisations)."""
    from ernas.latency.backends import MeasureBudget, run_with_budget

    sess = _session(path, threads)
    x = np.random.default_rng(0).random(tuple(input_shape), dtype=np.float32)

    def once():
        t = time.perf_counter()
        sess.run(None, {"input": x})
        return (time.perf_counter() - t) * 1e3

    return float(np.median(run_with_budget(once, budget or MeasureBudget(time_cap_s=2.0))))


def _graph_stats(path) -> dict:
    import onnx

    g = onnx.load(str(path)).graph
    ops: dict[str, int] = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"nodes": len(g.node), "op_types": dict(sorted(ops.items())),
            "names": [n.name for n in g.node]}


# =========================================================================== fp32 export
def export_model(arch: Arch, checkpoint, out_dir, opset: int = 17, dynamic_hw: bool = False,
                 input_shape=(1, 3, 256, 256), model: nn.Module | None = None,
                 threads: int = 2) -> dict:
    """Export ``arch`` with ``checkpoint`` (or an already loaded ``model``) to
    ``out_dir/model.onnx``; check it and measure parity on a real image. Returns the summary
    part (``max_abs_diff``, node counts, ...). With ``dynamic_hw`` the graph takes any H, W
    (the pad to a multiple of 2^levels is traced at the example size, so other sizes must be
    such multiples); parity is checked at a second size too."""
    import onnx

    from ernas.train import load_model, resolve_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = load_model(arch, resolve_checkpoint(checkpoint) if checkpoint else None)
    model = copy.deepcopy(model).cpu().eval().fuse()
    n, c, h, w = (int(s) for s in input_shape)
    if c != arch.geometry["img_channel"]:
        raise ErnasError(f"input_shape {list(input_shape)} has {c} channels but architecture "
                         f"{arch.name!r} takes {arch.geometry['img_channel']}.")
    item = test_crops((h, w), c)[0]
    x = item["noisy"].repeat(n, 1, 1, 1)
    path = export_onnx(model, x, out / "model.onnx", opset=opset, dynamic_hw=dynamic_hw)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"exported ONNX failed onnx.checker: {e}") from None
    stats = _graph_stats(path)
    skipped = [p for p, v in arch.values.items() if not v.get("keep", True)]
    skipped_nodes = sum(any(f"/{p}/" in name for p in skipped) for name in stats.pop("names"))
    sess = _session(path, threads)
    with torch.no_grad():
        ref = model(x).numpy()
    diff = float(np.abs(sess.run(None, {"input": x.numpy()})[0] - ref).max())
    summary = {"onnx": str(path), "opset": opset, "dynamic_hw": dynamic_hw,
               "input_shape": [n, c, h, w], "max_abs_diff": diff, "parity_ok": diff <= 1e-4,
               "onnx_bytes": path.stat().st_size, **stats,
               "batchnorm_nodes": stats["op_types"].get("BatchNormalization", 0),
               "skipped_blocks": skipped, "skipped_block_nodes": skipped_nodes}
    if dynamic_hw:
        m = 2 ** len(arch.geometry["enc_blk_nums"])
        h2, w2 = h + m, w + 2 * m
        x2 = test_crops((h2, w2), c)[1]["noisy"]
        with torch.no_grad():
            ref2 = model(x2).numpy()
        summary["max_abs_diff_other_size"] = float(
            np.abs(sess.run(None, {"input": x2.numpy()})[0] - ref2).max())
        summary["other_size"] = [1, c, h2, w2]
    return summary


# =========================================================================== int8 PTQ
def make_calibration_reader(images, hw, n: int = 16, sigma: float = 25, seed: int = 0):
    """A ``CalibrationDataReader`` yielding ``n`` noisy random h x w crops (σ noise) of the
    calibration images (``[(name, HxWxC)]`` or ``[HxWxC]``), round-robin over the images."""
    from onnxruntime.quantization import CalibrationDataReader

    arrays = [im[1] if isinstance(im, tuple) else im for im in images]
    if not arrays:
        raise ErnasError("quantize_int8: no calibration images given.")
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        img = arrays[i % len(arrays)]
        img = _fit(img, max(hw[0], img.shape[0]), max(hw[1], img.shape[1]))
        top = int(rng.integers(img.shape[0] - hw[0] + 1))
        left = int(rng.integers(img.shape[1] - hw[1] + 1))
        clean = img[top:top + hw[0], left:left + hw[1]].transpose(2, 0, 1)
        noisy = clean + rng.standard_normal(clean.shape, dtype=np.float32) * np.float32(sigma / 255)
        crops.append(np.ascontiguousarray(noisy[None], dtype=np.float32))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(crops)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {"input": x}

        def rewind(self):
            self._it = iter(crops)

    return Reader()


def _static_hw(path, default=(256, 256)) -> tuple[int, int]:
    import onnx

    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    hw = [d.dim_value if d.HasField("dim_value") else None for d in dims[2:]]
    return tuple(hw) if all(hw) else tuple(default)


def quantize_int8(onnx_path, calibration_images, out_path, n_calibration: int = 16,
                  sigma: float = 25, seed: int = 0, per_channel: bool = True,
                  calibrate_method: str = "MinMax", threads: int = 2, budget=None,
                  eval_hw=None) -> dict:
    """Post-training static int8 quantisation of an fp32 ONNX model (QDQ), then PSNR (σ=25,
    bundled test crops) and onnxruntime CPU latency of int8 vs fp32. Returns the summary part.

    ``calibrate_method``: MinMax | Entropy | Percentile. The model is pre-processed
    (``quant_pre_process``: shape inference and graph optimisation) first."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    hw = _static_hw(onnx_path, eval_hw or (256, 256))
    pre = out_path.with_name(out_path.stem + "_pre.onnx")
    try:
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        src = pre
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation, not a requirement
        src = onnx_path
    methods = {"MinMax": CalibrationMethod.MinMax, "Entropy": CalibrationMethod.Entropy,
               "Percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise ErnasError(f"calibrate_method={calibrate_method!r}; use one of {list(methods)}.")
    reader = make_calibration_reader(calibration_images, hw, n_calibration, sigma, seed)
    quantize_static(str(src), str(out_path), reader, quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=methods[calibrate_method])
    pre.unlink(missing_ok=True)
    for extra in out_path.parent.glob("augmented_model*.onnx"):
        extra.unlink(missing_ok=True)
    dims = onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim
    channels = dims[1].dim_value if dims[1].HasField("dim_value") else 3
    items = test_crops(hw, channels, 25.0, seed)
    shape = (1, channels, *hw)
    fp32_psnr, int8_psnr = onnx_psnr(onnx_path, items, threads), onnx_psnr(out_path, items, threads)
    fp32_ms = ort_latency_ms(onnx_path, shape, threads, budget)
    int8_ms = ort_latency_ms(out_path, shape, threads, budget)
    stats = _graph_stats(out_path)
    stats.pop("names")
    return {"int8_onnx": str(out_path), "calibration_crops": n_calibration,
            "calibrate_method": calibrate_method, "per_channel": per_channel,
            "eval_input_shape": list(shape), "eval_sigma": 25.0,
            "psnr_fp32": fp32_psnr, "psnr_int8": int8_psnr, "psnr_delta": int8_psnr - fp32_psnr,
            "fp32_ms": fp32_ms, "int8_ms": int8_ms, "int8_speedup": fp32_ms / int8_ms,
            "threads": threads, "quantize_linear_nodes": stats["op_types"].get("QuantizeLinear", 0),
            "int8_nodes": stats["nodes"]}


# =========================================================================== QAT
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


def qat_finetune(model: nn.Module, steps: int, batch_size: int = 8, crop: int = 64,
                 sigma=25, lr: float = 1e-4, seed: int = 0, calibration_batches: int = 4,
                 progress: bool = False) -> nn.Module:
    """Quantisation-aware fine-tuning: wrap the convs (:func:`prepare_qat`), calibrate the
    activation ranges on ``calibration_batches`` training batches, fine-tune ``steps`` steps
    (AdamW, cosine to 0, PSNR loss, bundled train split), freeze. Returns the fake-quantised
    model (export it with ``export_onnx``: QuantizeLinear/DequantizeLinear pairs)."""
    from tqdm.auto import tqdm

    from ernas.data import NoisyImageDataset, bundled_images
    from ernas.search.loop import step_batches
    from ernas.train import psnr_loss

    q = prepare_qat(model)
    channels = 3
    first = next((m for m in q.modules() if isinstance(m, QuantConv2d)), None)
    if first is not None:
        channels = first.conv.in_channels
    ds = NoisyImageDataset(bundled_images("train", channels == 3), crop, sigma, train=True,
                           seed=seed)
    batch = step_batches(ds, batch_size, seed)
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
            noisy, clean = batch(step)
            loss = psnr_loss(q(noisy), clean)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    for m in q.modules():
        if isinstance(m, QuantConv2d):
            m.freeze()
    return q.eval()


def export_qat(qmodel: nn.Module, path, input_shape, opset: int = 17, threads: int = 2,
               budget=None) -> dict:
    """Export a frozen fake-quantised model as QDQ ONNX; PSNR (σ=25 test crops) and latency."""
    path = export_onnx(qmodel, torch.zeros(tuple(input_shape)), path, opset=opset)
    items = test_crops(tuple(input_shape[2:]), int(input_shape[1]))
    stats = _graph_stats(path)
    stats.pop("names")
    return {"qat_onnx": str(path), "psnr_qat": onnx_psnr(path, items, threads),
            "qat_ms": ort_latency_ms(path, input_shape, threads, budget),
            "qat_quantize_linear_nodes": stats["op_types"].get("QuantizeLinear", 0)}


def write_summary(out_dir, summary: dict) -> None:
    atomic_write_json(Path(out_dir) / "summary.json", summary)
