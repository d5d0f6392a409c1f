"""ernas: hardware-aware differentiable architecture search for NAFNet-style networks."""
from ernas.errors import ErnasError
from ernas.space import Arch, SearchSpace, load_arch, load_space

__version__ = "0.1.0"


def build_model(arch: Arch):
    """The discrete ``torch.nn.Module`` of an architecture (its family's model)."""
    return arch.spec.build(arch)


__all__ = ["Arch", "ErnasError", "SearchSpace", "build_model", "load_arch", "load_space"]
