"""Knowledge distillation from a frozen teacher of any architecture of the same family.

    L = L_task + w_out·L_out(y_s, y_t) + w_feat·Σ_l mean((A_l f_s,l − f_t,l)²)

``L_out`` is the task's output-distillation loss (``Task.distill_loss``: L1 for denoising, KL of
softened class probabilities for segmentation); ``f_l`` are the outputs of the family's feature
modules (``Family.feature_modules``: NAFNet's encoder and decoder stages), captured with forward
hooks; ``A_l`` is a trainable 1x1 conv where the student's and teacher's channel counts differ,
the identity otherwise (as in Feature-Align distillation). Both networks must list as many
features (set ``w_feat=0`` for output-only distillation between different layouts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ernas.checkpoint import load_model
from ernas.errors import ErnasError
from ernas.space import Arch


def forward_with_features(net: nn.Module, family, x: torch.Tensor):
    """``(net(x), features)`` in one pass; features are the outputs of
    ``family.feature_modules(net)`` in that order."""
    feats: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: feats.append(out))
               for m in family.feature_modules(net)]
    try:
        out = net(x)
    finally:
        for h in handles:
            h.remove()
    return out, feats


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
    """Frozen teacher plus trainable adapters A_l. ``loss(x, y_s, a_s)`` returns
    ``(w_out·L_out(y_s, y_t), w_feat·Σ_l mean((a_s,l − f_t,l)²))`` where ``a_s,l = A_l f_s,l``
    is computed by the student module (so that DDP averages the adapters' gradients too)."""

    def __init__(self, student_arch: Arch, cfg: DistillConfig, task):
        if cfg.w_feat:
            if cfg.arch.family != student_arch.family:
                raise ErnasError(f"feature distillation needs teacher and student of one family; "
                                 f"teacher {cfg.arch.name!r} is {cfg.arch.family!r}, the student "
                                 f"{student_arch.family!r} (set teacher.w_feat=0 for output-only "
                                 f"distillation).")
            cs, ct = (student_arch.spec.feature_channels(a) for a in (student_arch, cfg.arch))
            if len(cs) != len(ct):
                raise ErnasError(f"teacher {cfg.arch.name!r} has {len(ct)} feature maps and the "
                                 f"student {len(cs)}: feature distillation needs as many (e.g. "
                                 f"the same number of levels); set teacher.w_feat=0 for "
                                 f"output-only distillation.")
        self.cfg, self.task, self.family = cfg, task, cfg.arch.spec
        self.teacher = load_model(cfg.arch, cfg.checkpoint).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleList(
            nn.Identity() if a == b else nn.Conv2d(a, b, 1) for a, b in zip(cs, ct)
        ) if cfg.w_feat else None

    def to(self, device) -> "Distiller":
        self.teacher.to(device)
        return self

    def loss(self, x, y_s, a_s) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            y_t, f_t = forward_with_features(self.teacher, self.family, x)
        zero = y_s.new_zeros((), dtype=torch.float32)
        out = self.cfg.w_out * self.task.distill_loss(y_s, y_t) if self.cfg.w_out else zero
        feat = zero
        if a_s is not None:
            for s, t in zip(a_s, f_t):
                feat = feat + (s.float() - t.float()).pow(2).mean()
            feat = self.cfg.w_feat * feat
        return out, feat


class Student(nn.Module):
    """What DDP wraps: the network (``net``) and, for feature distillation, the adapters;
    returns ``(output, adapted features or None)``."""

    def __init__(self, net: nn.Module, family, adapters: nn.ModuleList | None):
        super().__init__()
        self.net, self.adapters = net, adapters
        self.family = family

    def forward(self, x):
        if self.adapters is None:
            return self.net(x), None
        out, feats = forward_with_features(self.net, self.family, x)
        return out, [a(f) for a, f in zip(self.adapters, feats)]
