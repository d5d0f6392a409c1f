"""ernas: hardware-aware differentiable architecture search for restoration and segmentation
networks."""
from ernas.errors import ErnasError
from ernas.api import (Result, bench, evaluate, export, list_archs, list_backends, list_families,
                       list_spaces, list_tasks, profile, retrain, search)
from ernas.api import find_arch as load_arch
from ernas.api import find_space as load_space
from ernas.space import Arch, SearchSpace

__version__ = "0.1.0"


def build_model(arch: Arch):
    """The discrete ``torch.nn.Module`` of an architecture (its family's model)."""
    return arch.spec.build(arch)


def inference_model(model):
    """``model`` in eval mode with its inference-time folding applied (``fuse()``: BatchNorm into
    the next conv, skipped blocks removed) when its family provides one; the same module."""
    model.eval()
    return model.fuse() or model if hasattr(model, "fuse") else model


__all__ = ["Arch", "ErnasError", "Result", "SearchSpace", "bench", "build_model", "evaluate",
           "export", "inference_model", "list_archs", "list_backends", "list_families",
           "list_spaces", "list_tasks", "load_arch", "load_space", "profile", "retrain", "search"]
