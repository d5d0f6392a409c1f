"""Helpers for data-parallel runs under ``torchrun`` (every function is a no-op on one process).

``torchrun --nproc_per_node N -m ernas.cli.retrain ...`` starts N processes with the environment
variables RANK, WORLD_SIZE and LOCAL_RANK set; :func:`setup` joins them into one process group
(``nccl`` on CUDA, ``gloo`` on CPU). Without WORLD_SIZE (a plain ``python`` run) nothing is
initialised and every helper acts on the single process.

Conventions used by retraining and, for the architecture parameters α, by the search loop:

- only rank 0 writes files and shows progress (:func:`is_main`);
- model weights are kept equal by DDP (gradients all-reduced every step); parameters outside DDP
  (e.g. α) stay equal when they start equal (:func:`sync_parameters`, a broadcast from rank 0)
  and every rank applies the same averaged gradient (:func:`average_gradients`:
  g ← (1/N)·Σ_r g_r) with the same optimiser;
- data differ per rank: each rank draws its own samples (keyed by rank), so N ranks see N times
  the data of one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_gather_object", "all_reduce_mean", "average_gradients", "barrier",
           "broadcast_object", "cleanup", "is_dist", "is_main", "rank", "setup", "sync_parameters",
           "world_size"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, and the
    torch device it should compute on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Join the process group described by RANK/WORLD_SIZE/LOCAL_RANK (``env://``).

    ``device``: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``. On CUDA each rank
    uses ``cuda:LOCAL_RANK``. ``backend`` defaults to ``nccl`` on CUDA and ``gloo`` on CPU. With
    WORLD_SIZE unset (or 1) no group is created."""
    use_cuda = torch.cuda.is_available() if device == "auto" else str(device).startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = (device if str(device).startswith("cuda") else "cuda") if use_cuda else "cpu"
        return DistInfo(device=dev)
    rank_, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not is_dist():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), init_method="env://")
    return DistInfo(rank_, world, local, f"cuda:{local}" if use_cuda else "cpu")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """True on rank 0 (and on a single process): the one that writes files."""
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (any picklable object)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not is_dist():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over ranks, (1/N)·Σ_r v_r, of a tensor (a new tensor) or a Python number."""
    if not is_dist():
        return value
    is_number = not isinstance(value, torch.Tensor)
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(float(value), dtype=torch.float64, device=dev) if is_number \
        else value.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= world_size()
    return float(t) if is_number else t


def sync_parameters(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank, in place (e.g. α before search)."""
    if not is_dist():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each ``.grad`` by its mean over ranks; a missing gradient counts as zero (so every
    rank calls the same collectives)."""
    if not is_dist():
        return
    n = world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= n


def cleanup() -> None:
    """Leave the process group (safe to call when none exists)."""
    if is_dist():
        dist.destroy_process_group()
