"""Checkpoints: reading weights of any origin, loading models and supernets, initialising a
derived architecture.

Initialisation (:func:`init_model`):

- ``scratch``: PyTorch's default init, seeded;
- ``supernet``: the search run's ``checkpoint.pt`` rebuilt as a SuperNet, then
  ``SuperNet.extract(arch)`` (the chosen sub-weights);
- ``pretrained``: the hand-made network's official weights (top level or under ``params`` /
  ``params_ema`` / ``state_dict``), mapped by the family (``Family.map_pretrained``).

Every file is read with ``torch.load(weights_only=True)``: no code from a checkpoint is run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ernas import build_model
from ernas.errors import ErnasError
from ernas.space import Arch, SearchSpace, find_space, space_from_dict

NESTED_KEYS = ("model", "params", "params_ema", "state_dict", "net")


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
                         f"checkpoint.pt) for supernet, the hand-made network's official weights "
                         f"(.pth) for pretrained.")
    elif init == "supernet":
        supernet = load_supernet(source, space)
        model = supernet.extract(arch)
        report.update(space=supernet.space.name, mode=supernet.mode,
                      copied=list(model.state_dict()), adapted={}, left_at_init=[])
    elif init == "pretrained":
        model = build_model(arch)
        report.update(arch.spec.map_pretrained(model, read_state_dict(source)))
        if not report["copied"] and not report["adapted"]:
            raise ErnasError(f"{source}: no tensor of this checkpoint fits architecture "
                             f"{arch.name!r} (names or shapes all differ); is it a checkpoint of "
                             f"the family's reference network ({arch.family}) of the same width?")
    else:
        raise ErnasError(f"init={init!r} is not known; use scratch, supernet or pretrained.")
    report.setdefault("counts", {k: len(report[k]) for k in ("copied", "adapted",
                                                             "left_at_init")})
    return model, report
