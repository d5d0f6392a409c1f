"""Shared CLI plumbing: user errors as one paragraph with exit status 2, repository paths."""
from __future__ import annotations

import functools
import sys
import textwrap
from pathlib import Path

from ernas.errors import ErnasError


def user_errors(fn):
    """Run ``fn``; an ErnasError becomes ``error: <paragraph>`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ErnasError as e:
            print("error: " + textwrap.fill(str(e), width=100, break_long_words=False,
                                            break_on_hyphens=False), file=sys.stderr)
            sys.exit(2)

    return wrapper


def task_of(cfg):
    """The task object of a command config's ``task`` group (``ernas.task.make_task``)."""
    from omegaconf import OmegaConf

    from ernas.task import make_task

    return make_task(OmegaConf.to_container(cfg.task, resolve=True), "task")


def output_dir():
    """The Hydra run directory (created), or the current directory outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        out = Path.cwd()
    out.mkdir(parents=True, exist_ok=True)
    return out


def resolve_arch(ref):
    """An architecture from a YAML path, a name in ``search_spaces/archs/``, a search-run or
    retrain-run directory (its ``arch.yaml``), or a space name/path (the space's own arch when
    it has one value per decision, else its reference architecture, named ``reference``)."""
    from ernas.paths import SEARCH_SPACES
    from ernas.space import arch_of, load_space

    if ref is None or str(ref) == "":
        raise ErnasError("field 'arch' is empty; pass arch=<arch.yaml>, a shipped arch name "
                         "(e.g. nafnet_sidd_w16) or a run directory holding arch.yaml.")
    p = Path(str(ref))
    if p.is_dir() and (p / "arch.yaml").is_file():
        p = p / "arch.yaml"
    elif not p.exists():
        for cand in (SEARCH_SPACES / "archs" / f"{ref}.yaml", SEARCH_SPACES / f"{ref}.yaml"):
            if cand.is_file():
                p = cand
                break
        else:
            names = sorted(f.stem for f in (SEARCH_SPACES / "archs").glob("*.yaml"))
            spaces = sorted(f.stem for f in SEARCH_SPACES.glob("*.yaml"))
            raise ErnasError(f"arch {ref!r} is neither a file nor a directory with arch.yaml nor a "
                             f"shipped name; shipped archs: {', '.join(names)}; spaces (their "
                             f"reference arch): {', '.join(spaces)}.")
    space = load_space(p)
    if space.is_arch:
        return arch_of(space)
    arch = space.reference()
    arch.name, arch.source = "reference", str(p)
    return arch


def arch_for(ref, checkpoint=None, default: str = "nafnet_tiny"):
    """``resolve_arch(ref)``; without ``ref``, the ``arch.yaml`` beside ``checkpoint`` (a file in
    a run dir, or the run dir itself), else ``default``."""
    if ref:
        return resolve_arch(ref)
    if checkpoint:
        c = Path(str(checkpoint))
        d = c if c.is_dir() else c.parent
        if (d / "arch.yaml").is_file():
            return resolve_arch(d)
    return resolve_arch(default)
