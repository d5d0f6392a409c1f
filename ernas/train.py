"""Retraining a derived architecture: initialisation, optional distillation, the training loop.

Recipe (NAFNet's, by default): AdamW (lr 1e-3, weight decay 0, betas (0.9, 0.9)), cosine decay
of the learning rate to 1e-7 over ``steps``, PSNR loss
``L_task = (10/ln 10)·mean_i log(MSE_i + 1e-8)`` (= −mean PSNR), optional gradient-norm clipping.

Initialisation (:func:`init_model`):

- ``scratch``: PyTorch's default init, seeded;
- ``supernet``: the search run's ``checkpoint.pt`` rebuilt as a SuperNet, then
  ``SuperNet.extract(arch)`` (the chosen sub-weights);
- ``pretrained``: an official NAFNet ``.pth`` (weights at the top level or under ``params`` /
  ``params_ema`` / ``state_dict``) mapped by :func:`map_pretrained`.

Distillation (optional, :class:`Distiller`): a frozen teacher of any architecture and

    L = L_task + w_out·mean|y_s − y_t| + w_feat·Σ_l mean((A_l f_s,l − f_t,l)²)

over the encoder and decoder features ``f_l`` of ``NAFNet.features`` (both nets must have the
same number of levels); ``A_l`` is a trainable 1x1 conv where the channel counts differ, the
identity otherwise (as in Feature-Align distillation).

Batches are pure functions of (seed, rank, step) (``ernas.search.loop.step_batches``), and
``last.pt`` holds the model, optimiser, schedule, adapters and log, so a run stopped and resumed
gives bit-identical weights to an uninterrupted one on CPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ernas import build_model
from ernas import distributed as D
from ernas.errors import ErnasError
from ernas.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text
from ernas.search.objective import psnr_loss  # one loss definition for search and retraining
from ernas.space import Arch, SearchSpace, find_space, space_from_dict

__all__ = ["DistillConfig", "Distiller", "TrainConfig", "init_model", "load_model",
           "load_supernet", "load_weights", "map_pretrained", "psnr_loss", "read_state_dict",
           "resume", "retrain"]

FORMAT = "ernas-retrain-v1"
NESTED_KEYS = ("model", "params", "params_ema", "state_dict", "net")


# =========================================================================== checkpoints
def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or a run directory (its ``best.pt``, else ``last.pt``, else a search
    run's ``inherited.pt``)."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt", "inherited.pt"):
            if (p / name).is_file():
                return p / name
        raise ErnasError(f"{p}: this directory holds no best.pt, last.pt or inherited.pt; pass a "
                         f"checkpoint file or a retrain run directory.")
    if not p.is_file():
        raise ErnasError(f"{p}: the checkpoint file does not exist; check the path (relative "
                         f"paths are resolved from the current directory).")
    return p


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: ours (``model``), BasicSR/official (``params`` or
    ``params_ema``), ``state_dict``/``net``, or a bare state dict; a DDP ``module.`` prefix is
    removed. Loaded with ``weights_only=True`` (no code from the file is run)."""
    p = resolve_checkpoint(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise ErnasError(f"{p}: could not read this checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); it must be a torch.save'd state dict "
                         f"or a dict holding one under 'model'/'params'/'state_dict'.") from None
    for key in NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor)
                                                       for v in obj.values()):
        raise ErnasError(f"{p}: no state dict found (expected a mapping of parameter names to "
                         f"tensors, possibly under one of {', '.join(NESTED_KEYS)}).")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _show(items, n=4) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def load_weights(model: nn.Module, path, arch: Arch | None = None) -> nn.Module:
    """Load a checkpoint into ``model`` strictly; a mismatch is an ErnasError that lists a few
    missing, unexpected and mis-shaped keys."""
    sd = read_state_dict(path)
    target = model.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        what = f"architecture {arch.name!r} ({arch.source})" if arch is not None else "the model"
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) missing from the checkpoint: {_show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_show(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (checkpoint vs model): "
                         f"{_show(shapes, 3)}")
        raise ErnasError(f"{path}: the checkpoint does not match {what}: " + "; ".join(parts)
                         + ". Pass the architecture the checkpoint was trained with (a retrain "
                           "run directory holds both arch.yaml and best.pt), or map weights of a "
                           "different network with init=pretrained.")
    model.load_state_dict({k: sd[k] for k in target}, strict=True)
    return model


def load_model(arch: Arch, checkpoint=None) -> nn.Module:
    """``build_model(arch)`` with the checkpoint's weights (None: seeded random init)."""
    if checkpoint is None:
        torch.manual_seed(0)
        return build_model(arch)
    return load_weights(build_model(arch), checkpoint, arch)


# =========================================================================== initialisation
def _banks(n_src: int, n_dst: int) -> torch.Tensor:
    """Channels of a SimpleGate input kept when it shrinks from n_src to n_dst: the first
    n_dst/2 of each half."""
    h, H = n_dst // 2, n_src // 2
    return torch.cat([torch.arange(h), H + torch.arange(h)])


# per block tensor, what each dimension means: banks (gate halves), first (leading channels),
# centre (kernel taps, zero-padded or centre-cropped) or same (must agree)
_RULES = {
    "conv1.weight": ("banks", "same", "same", "same"), "conv1.bias": ("banks",),
    "conv2.weight": ("banks", "same", "centre", "centre"), "conv2.bias": ("banks",),
    "conv3.weight": ("same", "first", "same", "same"),
    "sca.1.weight": ("first", "first", "same", "same"), "sca.1.bias": ("first",),
    "conv4.weight": ("banks", "same", "same", "same"), "conv4.bias": ("banks",),
    "conv5.weight": ("same", "first", "same", "same"),
}


def _adapt(name: str, src: torch.Tensor, shape) -> tuple[torch.Tensor, str] | None:
    """``src`` fitted to ``shape`` by the rules of a block tensor, or None when impossible."""
    rule = _RULES.get(name)
    if rule is None or src.dim() != len(shape):
        return None
    out, notes = src, []
    for dim, (kind, n_src, n_dst) in enumerate(zip(rule, src.shape, shape)):
        if n_src == n_dst:
            continue
        if kind == "banks" and n_dst < n_src and n_dst % 2 == 0:
            out = out.index_select(dim, _banks(n_src, n_dst))
            notes.append(f"first {n_dst // 2} channels of each gate half")
        elif kind == "first" and n_dst < n_src:
            out = out.narrow(dim, 0, n_dst)
            notes.append(f"first {n_dst} channels")
        elif kind == "centre" and (n_dst - n_src) % 2 == 0:
            d = (n_dst - n_src) // 2
            if d > 0:
                pad = [0, 0] * (out.dim() - dim - 1) + [d, d]
                out = F.pad(out, pad)
                notes.append(f"kernel {n_src}->{n_dst} zero-padded")
            else:
                out = out.narrow(dim, -d, n_dst)
                notes.append(f"kernel {n_src}->{n_dst} centre-cropped")
        else:
            return None
    return out.contiguous(), "; ".join(dict.fromkeys(notes))


def map_pretrained(model: nn.Module, source: dict[str, torch.Tensor]) -> dict:
    """Copy an official NAFNet state dict into ``model`` (a NAFNet of a derived arch) where
    shapes allow, in place; return the report.

    Same-name tensors of equal shape are copied. Block tensors of another shape are adapted:
    expansion reduced by keeping the first channels of each gate half (the output channels of
    conv1/conv2/conv4, the matching inputs of conv3/conv5 and SCA); depthwise kernels zero-padded
    (3 -> 5/7 keeps the function) or centre-cropped. Everything else stays at its
    initialisation; source tensors of skipped blocks are dropped."""
    target = model.state_dict()
    arch: Arch | None = getattr(model, "arch", None)
    positions = sorted(arch.values, key=len, reverse=True) if arch is not None else []
    new, copied, adapted, left = {}, [], {}, []
    for key, t in target.items():
        s = source.get(key)
        if s is None:
            left.append(key)
        elif s.shape == t.shape:
            new[key] = s
            copied.append(key)
        else:
            pos = next((p for p in positions if key.startswith(p + ".")), None)
            fit = _adapt(key[len(pos) + 1:], s, tuple(t.shape)) if pos else None
            if fit is None:
                left.append(key)
            else:
                new[key] = fit[0].to(t.dtype)
                adapted[key] = f"{tuple(s.shape)} -> {tuple(t.shape)}: {fit[1]}"
    model.load_state_dict(new, strict=False)
    skipped = [p for p in positions if not arch.values[p].get("keep", True)] if arch else []
    unused = [k for k in source if k not in target]
    return {"copied": copied, "adapted": adapted, "left_at_init": left,
            "dropped_blocks": sorted(p for p in skipped
                                     if any(k.startswith(p + ".") for k in source)),
            "unused_source_keys": unused,
            "counts": {"copied": len(copied), "adapted": len(adapted), "left_at_init": len(left),
                       "unused_source_keys": len(unused)}}


def _space_of_search_run(ckpt: dict, run_dir: Path, space) -> SearchSpace:
    if isinstance(space, SearchSpace):
        return space
    if space is not None:
        return find_space(space)
    stored = ckpt.get("space")
    if isinstance(stored, dict):
        return space_from_dict(stored, f"{run_dir}/checkpoint.pt:space")
    raise ErnasError(f"{run_dir}: cannot tell which search space the supernet checkpoint belongs "
                     f"to (no 'space' in checkpoint.pt); pass the space explicitly "
                     f"(space=<name or YAML>).")


def load_supernet(source, space=None):
    """The SuperNet of a search run (its directory or its ``checkpoint.pt``), weights and α
    loaded. The space comes from ``space`` or else the checkpoint's ``space`` entry."""
    from ernas.supernet import SuperNet

    p = Path(source)
    ck_path = p / "checkpoint.pt" if p.is_dir() else p
    if not ck_path.is_file():
        raise ErnasError(f"{source}: no supernet checkpoint there; pass a search run directory "
                         f"(holding checkpoint.pt) or the checkpoint file itself.")
    try:
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ErnasError(f"{ck_path}: could not read the supernet checkpoint ({type(e).__name__}:"
                         f" {str(e).splitlines()[0][:200]}).") from None
    state = next((ck[k] for k in ("model", "supernet", "state_dict") if isinstance(ck.get(k), dict)),
                 None)
    if state is None:
        raise ErnasError(f"{ck_path}: not a search checkpoint (no 'model' state dict inside).")
    cfg = ck.get("config") or {}
    sp = _space_of_search_run(ck, ck_path.parent, space)
    net = SuperNet(sp, cfg.get("mode", "shared"), cfg.get("temperature", 1.0),
                   cfg.get("gumbel", False))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ErnasError(f"{ck_path}: the supernet weights do not fit space {sp.name!r} in mode "
                         f"{net.mode!r} ({str(e).splitlines()[0][:300]}); pass the space the "
                         f"search ran on.") from None
    return net


def init_model(arch: Arch, init: str = "scratch", source=None, seed: int = 0,
               space=None) -> tuple[nn.Module, dict]:
    """``(model, report)`` for ``init`` = scratch | supernet | pretrained (see module docs).

    ``report`` says what was copied, adapted and left at initialisation (JSON-ready)."""
    torch.manual_seed(seed)
    report: dict[str, Any] = {"init": init, "source": str(source) if source else None}
    if init == "scratch":
        model = build_model(arch)
        report.update(copied=[], adapted={}, left_at_init=list(model.state_dict()))
    elif init in ("supernet", "pretrained") and source is None:
        raise ErnasError(f"init={init} needs source=<path>: a search run directory (or its "
                         f"checkpoint.pt) for supernet, an official NAFNet .pth for pretrained.")
    elif init == "supernet":
        supernet = load_supernet(source, space)
        model = supernet.extract(arch)
        report.update(space=supernet.space.name, mode=supernet.mode,
                      copied=list(model.state_dict()), adapted={}, left_at_init=[])
    elif init == "pretrained":
        model = build_model(arch)
        report.update(map_pretrained(model, read_state_dict(source)))
        if not report["copied"] and not report["adapted"]:
            raise ErnasError(f"{source}: no tensor of this checkpoint fits architecture "
                             f"{arch.name!r} (names or shapes all differ); is it a NAFNet "
                             f"checkpoint of the same width?")
    else:
        raise ErnasError(f"init={init!r} is not known; use scratch, supernet or pretrained.")
    report.setdefault("counts", {k: len(report[k]) for k in ("copied", "adapted",
                                                             "left_at_init")})
    return model, report


# =========================================================================== distillation
def forward_with_features(net: nn.Module, x: torch.Tensor):
    """``(net(x), features)`` in one pass, features as ``NAFNet.features`` lists them (encoder
    outputs, then decoder outputs), captured with forward hooks."""
    feats: list[torch.Tensor] = []
    mods = list(net.encoders) + list(net.decoders)
    handles = [m.register_forward_hook(lambda _m, _i, out: feats.append(out)) for m in mods]
    try:
        out = net(x)
    finally:
        for h in handles:
            h.remove()
    return out, feats


def feature_channels(arch: Arch) -> list[int]:
    """Channels of each ``NAFNet.features`` entry: encoders then decoders (deepest first)."""
    g = arch.geometry
    levels = len(g["enc_blk_nums"])
    enc = [g["width"] * 2 ** i for i in range(levels)]
    return enc + [g["width"] * 2 ** (levels - 1 - k) for k in range(levels)]


@dataclass
class DistillConfig:
    """Teacher (architecture + checkpoint) and the weights of the two distillation terms."""

    arch: Arch
    checkpoint: str | None
    w_out: float = 1.0
    w_feat: float = 0.1

    def to_dict(self) -> dict:
        return {"arch": self.arch.to_dict(), "arch_source": self.arch.source,
                "checkpoint": self.checkpoint, "w_out": self.w_out, "w_feat": self.w_feat}


class Distiller:
    """Frozen teacher plus trainable adapters A_l (1x1 conv student->teacher channels, or the
    identity). ``loss(x, y_s, a_s)`` returns ``(w_out·mean|y_s − y_t|,
    w_feat·Σ_l mean((a_s,l − f_t,l)²))`` where ``a_s,l = A_l f_s,l`` is computed by the student
    module (so that DDP averages the adapters' gradients too)."""

    def __init__(self, student_arch: Arch, cfg: DistillConfig):
        if len(student_arch.geometry["enc_blk_nums"]) != len(cfg.arch.geometry["enc_blk_nums"]) \
                and cfg.w_feat:
            raise ErnasError(f"teacher {cfg.arch.name!r} has "
                             f"{len(cfg.arch.geometry['enc_blk_nums'])} levels and the student "
                             f"{len(student_arch.geometry['enc_blk_nums'])}: feature "
                             f"distillation needs the same number of levels (set w_feat=0 for "
                             f"output-only distillation).")
        self.cfg = cfg
        self.teacher = load_model(cfg.arch, cfg.checkpoint).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleList(
            nn.Identity() if cs == ct else nn.Conv2d(cs, ct, 1)
            for cs, ct in zip(feature_channels(student_arch), feature_channels(cfg.arch))
        ) if cfg.w_feat else None

    def to(self, device) -> "Distiller":
        self.teacher.to(device)
        return self

    def loss(self, x, y_s, a_s) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            y_t, f_t = forward_with_features(self.teacher, x)
        zero = y_s.new_zeros((), dtype=torch.float32)
        out = self.cfg.w_out * F.l1_loss(y_s.float(), y_t.float()) if self.cfg.w_out else zero
        feat = zero
        if a_s is not None:
            for s, t in zip(a_s, f_t):
                feat = feat + (s.float() - t.float()).pow(2).mean()
            feat = self.cfg.w_feat * feat
        return out, feat


class _Student(nn.Module):
    """What DDP wraps: the network (``net``) and, for feature distillation, the adapters;
    returns ``(output, adapted features or None)``."""

    def __init__(self, net: nn.Module, adapters: nn.ModuleList | None):
        super().__init__()
        self.net, self.adapters = net, adapters

    def forward(self, x):
        if self.adapters is None:
            return self.net(x), None
        out, feats = forward_with_features(self.net, x)
        return out, [a(f) for a, f in zip(self.adapters, feats)]


# =========================================================================== training
@dataclass
class TrainConfig:
    """Retraining hyper-parameters (plain values; saved in ``last.pt`` and the summary)."""

    steps: int = 200
    batch_size: int = 8                 # per rank
    crop: int = 64
    sigma: Any = 25                     # number | [lo, hi] | {choice: [...]}, 0..255 units
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.9)
    eta_min: float = 1e-7
    grad_clip: float | None = None      # max gradient norm; None: no clipping
    val_every: int = 50
    val_crop: int | None = 128          # centre crop of the val images (None: whole images)
    val_sigma: float | None = None      # None: sigma when fixed, else 25
    max_side: int | None = None         # downscale bundled images to this longest side
    color: bool = True
    data: str = "bundled"               # bundled | folder (clean_dir + sigma) | paired
    clean_dir: str | None = None
    noisy_dir: str | None = None
    num_workers: int = 0
    amp: bool = True                    # autocast on CUDA only (bfloat16, else float16)
    log_every: int = 10
    device: str = "auto"

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ErnasError(f"retrain config: unknown field(s) {unknown}; the fields are "
                             f"{', '.join(sorted(names))}.")
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def check(self) -> None:
        for f in ("steps", "batch_size", "crop", "val_every", "log_every"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ErnasError(f"retrain config: {f}={v!r} must be a positive integer.")
        if self.data not in ("bundled", "folder", "paired"):
            raise ErnasError(f"retrain config: data={self.data!r}; use bundled, folder "
                             f"(clean_dir + sigma) or paired (noisy_dir + clean_dir).")


# fields that may differ when resuming (they do not change the computation)
RESUME_FREE = ("num_workers", "log_every", "device")


def _train_dataset(cfg: TrainConfig, seed: int):
    from ernas.data import (NoisyImageDataset, PairedImageDataset, bundled_images, clean_folder,
                            paired_folders)

    if cfg.data == "bundled":
        images = bundled_images("train", cfg.color, cfg.max_side)
        return NoisyImageDataset(images, cfg.crop, cfg.sigma, train=True, seed=seed)
    if cfg.data == "folder":
        if not cfg.clean_dir:
            raise ErnasError("data=folder needs clean_dir=<folder of clean images>.")
        return NoisyImageDataset(clean_folder(cfg.clean_dir, cfg.color, cfg.crop), cfg.crop,
                                 cfg.sigma, train=True, seed=seed)
    if not (cfg.clean_dir and cfg.noisy_dir):
        raise ErnasError("data=paired needs noisy_dir=<folder> and clean_dir=<folder> with "
                         "images matched by file name.")
    return PairedImageDataset(paired_folders(cfg.noisy_dir, cfg.clean_dir, cfg.color, cfg.crop),
                              cfg.crop, train=True, seed=seed)


def val_sigma(cfg: TrainConfig) -> float:
    if cfg.val_sigma is not None:
        return float(cfg.val_sigma)
    return float(cfg.sigma) if isinstance(cfg.sigma, (int, float)) else 25.0


def _val_dataset(cfg: TrainConfig):
    from ernas.data import NoisyImageDataset, bundled_images

    images = bundled_images("val", cfg.color, cfg.max_side)
    crop = cfg.val_crop
    if crop is not None:
        crop = min(crop, *(min(im.shape[:2]) for _, im in images))
    return NoisyImageDataset(images, crop, val_sigma(cfg), train=False, seed=cfg.seed)


class _StepBatches(torch.utils.data.Dataset):
    """Item ``step`` = the whole batch of that step, ``step_batches(dataset, batch_size, key)``
    (a pure function of key and step), so a DataLoader over steps may use worker processes and
    still give the same batches; the dataset is re-keyed by step (``set_epoch``) per call."""

    def __init__(self, dataset, batch_size: int, key: int):
        self.dataset, self.batch_size, self.key = dataset, batch_size, key
        self._fn = None

    def __len__(self):
        return 2 ** 62

    def __getstate__(self):  # the batch function is rebuilt in each worker
        return {**self.__dict__, "_fn": None}

    def __getitem__(self, step):
        if self._fn is None:
            from ernas.search.loop import step_batches

            self._fn = step_batches(self.dataset, self.batch_size, self.key)
        return self._fn(int(step))


def data_key(seed: int, rank: int) -> int:
    """Data seed of a rank: ``seed`` on rank 0 (so one process equals rank 0 of a DDP run)."""
    return int(seed) + 1_000_003 * int(rank)


@torch.no_grad()
def validate(net: nn.Module, dataset, device) -> float:
    """Mean PSNR (``ernas.metrics.psnr``, data range 1, output clipped) over the val images."""
    from ernas.metrics import psnr

    was = net.training
    net.eval()
    vals = []
    for i in range(len(dataset)):
        item = dataset[i]
        out = net(item["noisy"][None].to(device)).float().cpu()[0]
        vals.append(psnr(out, item["clean"]))
    net.train(was)
    return float(np.mean(vals))


def state_digest(module: nn.Module) -> str:
    """SHA-1 of every tensor of the state dict (to compare ranks)."""
    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _device(info: D.DistInfo, want: str) -> torch.device:
    if want == "cuda" and not torch.cuda.is_available():
        raise ErnasError("retrain device='cuda' but no CUDA device is available; use cpu or auto.")
    return torch.device(info.device if want in ("auto", "cuda") else want)


def _plot(rows: list[dict], path: Path) -> None:
    """curves.png: training loss and validation PSNR against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    tr = [r for r in rows if r.get("loss") is not None]
    a.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="total")
    if any(r.get("feat_loss") or r.get("out_loss") for r in tr):
        a.plot([r["step"] for r in tr], [r["task_loss"] for r in tr], label="task (PSNR loss)")
        a.legend(fontsize=7)
    a.set(xlabel="step", ylabel="loss", title="training loss")
    va = [r for r in rows if r.get("val_psnr") is not None]
    b.plot([r["step"] for r in va], [r["val_psnr"] for r in va], marker="o")
    b.set(xlabel="step", ylabel="PSNR (dB)", title="validation PSNR")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _write_log(rows: list[dict], out: Path) -> None:
    import pandas as pd

    cols = ["step", "lr", "loss", "task_loss", "out_loss", "feat_loss", "val_psnr", "seconds"]
    atomic_write_text(out / "log.csv", pd.DataFrame(rows, columns=cols).to_csv(index=False))
    _plot(rows, out / "curves.png")


@dataclass
class _State:
    step: int = 0
    best_val_psnr: float | None = None
    best_step: int | None = None
    last_val_psnr: float | None = None
    seconds: float = 0.0
    images: int = 0
    log: list = field(default_factory=list)
    window: list = field(default_factory=list)  # losses since the last log row


def _run(arch: Arch, out: Path, cfg: TrainConfig, model: nn.Module, distill: DistillConfig | None,
         init_info: dict, ckpt: dict | None, progress: bool, stop_at: int | None,
         info: D.DistInfo) -> dict | None:
    """The training loop shared by :func:`retrain` and :func:`resume`."""
    from tqdm.auto import tqdm

    from ernas.metrics import count_macs, count_params

    main = info.rank == 0
    device = _device(info, cfg.device)
    distiller = Distiller(arch, distill).to(device) if distill is not None else None
    adapters = distiller.adapters if distiller is not None else None
    if adapters is not None:
        torch.manual_seed(cfg.seed + 1)
        for m in adapters:
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
    student = _Student(model, adapters).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.eta_min)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    st = _State()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if adapters is not None:
            adapters.load_state_dict(ckpt["adapters"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        st = _State(**ckpt["state"])
    wrapped = student
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)

    key = data_key(cfg.seed, info.rank)
    batches = _StepBatches(_train_dataset(cfg, key), cfg.batch_size, key)
    end = cfg.steps if stop_at is None else min(cfg.steps, int(stop_at))
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(st.step, end),
                                         num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda")
    val_set = _val_dataset(cfg) if main else None
    shape = (1, arch.geometry["img_channel"], 256, 256)
    size = {"params": count_params(model), "macs": count_macs(model, shape),
            "macs_input_shape": list(shape)}

    def save_last():
        atomic_torch_save({
            "format": FORMAT, "arch": arch.to_dict(), "arch_name": arch.name,
            "model": model.state_dict(),
            "adapters": adapters.state_dict() if adapters is not None else None,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "state": dataclasses.asdict(st), "config": cfg.to_dict(), "init": init_info,
            "distill": distill.to_dict() if distill is not None else None}, out / "last.pt")

    bar = tqdm(total=cfg.steps, initial=st.step, disable=not (progress and main), desc="retrain")
    t0 = time.perf_counter()
    for noisy, clean in loader:
        noisy, clean = noisy.to(device, non_blocking=True), clean.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            pred, feats = wrapped(noisy)
        task = psnr_loss(pred.float(), clean)
        out_l, feat_l = distiller.loss(noisy, pred, feats) if distiller is not None else (
            task.new_zeros(()), task.new_zeros(()))
        loss = task + out_l + feat_l
        if not torch.isfinite(loss):
            raise ErnasError(f"retrain step {st.step}: the loss is not finite (task "
                             f"{float(task):.4g}); lower lr (now {sched.get_last_lr()[0]:.3g}) or "
                             f"set grad_clip. {out / 'last.pt'} holds the last saved state.")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        lr = float(sched.get_last_lr()[0])
        sched.step()
        st.step += 1
        st.images += noisy.shape[0] * info.world_size
        st.window.append([float(t.detach()) for t in (loss, task, out_l, feat_l)])
        bar.update(1)
        validate_now = st.step % cfg.val_every == 0 or st.step == cfg.steps
        if st.step % cfg.log_every == 0 or validate_now:
            m = [float(v) for v in np.mean(st.window, axis=0)]
            st.window.clear()
            st.log.append({"step": st.step, "lr": lr, "loss": m[0], "task_loss": m[1],
                           "out_loss": m[2], "feat_loss": m[3], "val_psnr": None,
                           "seconds": st.seconds + time.perf_counter() - t0})
            bar.set_postfix(loss=f"{m[0]:.3f}")
        if validate_now and main:
            st.seconds += time.perf_counter() - t0
            v = validate(model, val_set, device)
            st.log[-1]["val_psnr"] = st.last_val_psnr = v
            if st.best_val_psnr is None or v > st.best_val_psnr:
                st.best_val_psnr, st.best_step = v, st.step
                atomic_torch_save({"format": FORMAT, "arch": arch.to_dict(),
                                   "arch_name": arch.name, "model": model.state_dict(),
                                   "step": st.step, "val_psnr": v}, out / "best.pt")
            save_last()
            _write_log(st.log, out)
            bar.set_postfix(loss=f"{st.log[-1]['loss']:.3f}", val=f"{v:.2f}dB")
            t0 = time.perf_counter()
    bar.close()
    st.seconds += time.perf_counter() - t0
    digests = D.all_gather_object(state_digest(student))
    summary = None
    if main:
        if st.step < cfg.steps:  # stopped early (stop_at): keep a resumable state
            save_last()
            _write_log(st.log, out)
        summary = {
            "arch": arch.name, "arch_file": str(out / "arch.yaml"), "init": init_info.get("init"),
            "source": init_info.get("source"), "distill": distill is not None,
            "steps": st.step, "target_steps": cfg.steps, "finished": st.step >= cfg.steps,
            "best_val_psnr": st.best_val_psnr, "best_step": st.best_step,
            "final_val_psnr": st.last_val_psnr, "val_sigma": val_sigma(cfg), **size,
            "seconds": st.seconds, "images": st.images,
            "throughput_img_s": st.images / st.seconds if st.seconds > 0 else None,
            "world_size": info.world_size, "device": str(device),
            "weights_identical_across_ranks": len(set(digests)) == 1,
            "best": str(out / "best.pt"), "last": str(out / "last.pt"),
            "config": cfg.to_dict()}
        atomic_write_json(out / "summary.json", summary)
    D.barrier()
    return summary


def retrain(arch: Arch, out_dir, cfg: TrainConfig | None = None, init: str = "scratch",
            source=None, distill: DistillConfig | None = None, progress: bool = True,
            stop_at: int | None = None, space=None) -> dict | None:
    """Train ``arch`` into ``out_dir``: arch.yaml, init_report.json, best.pt (best val PSNR),
    last.pt, log.csv, curves.png, summary.json (written by rank 0 only). ``stop_at=k`` stops
    after step k as if interrupted (``last.pt`` is written; :func:`resume` continues). Under
    torchrun it trains with DDP. Returns the summary (None on ranks > 0)."""
    cfg = cfg or TrainConfig()
    cfg.check()
    info = D.setup(cfg.device)
    out = Path(out_dir)
    model, report = init_model(arch, init, source, cfg.seed, space)
    if info.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        arch.save(out / "arch.yaml")
        atomic_write_json(out / "init_report.json", report)
    init_info = {"init": init, "source": str(source) if source else None}
    return _run(arch, out, cfg, model, distill, init_info, None, progress, stop_at, info)


def resume(run_dir, progress: bool = True, stop_at: int | None = None,
           **overrides) -> dict | None:
    """Continue the run in ``run_dir`` from its ``last.pt`` with the stored architecture,
    configuration, initialisation record and teacher (whose checkpoint must still exist). Only
    the fields in ``RESUME_FREE`` may be overridden."""
    from ernas.space import arch_of

    out = Path(run_dir)
    path = out / "last.pt"
    if not path.is_file():
        raise ErnasError(f"resume={run_dir}: no last.pt there; pass the directory of an "
                         f"interrupted retrain run.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != FORMAT:
        raise ErnasError(f"{path}: not a retrain checkpoint (format {ckpt.get('format')!r}).")
    bad = sorted(set(overrides) - set(RESUME_FREE))
    if bad:
        raise ErnasError(f"resume: cannot change {bad} of a run; only {list(RESUME_FREE)} may "
                         f"differ. Start a new run to change the rest.")
    cfg = TrainConfig.from_dict({**ckpt["config"], **overrides})
    info = D.setup(cfg.device)
    arch = arch_of(space_from_dict(ckpt["arch"], str(out / "arch.yaml"), ckpt.get("arch_name")))
    distill = None
    if ckpt.get("distill"):
        d = ckpt["distill"]
        t_arch = arch_of(space_from_dict(d["arch"], d.get("arch_source") or "<teacher>"))
        distill = DistillConfig(t_arch, d["checkpoint"], d["w_out"], d["w_feat"])
    state = {k: ckpt[k] for k in ("model", "adapters", "optimizer", "scheduler", "scaler",
                                  "state")}
    return _run(arch, out, cfg, build_model(arch), distill, ckpt["init"], state, progress,
                stop_at, info)
