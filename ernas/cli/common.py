"""Shared CLI plumbing: user errors as one paragraph with exit status 2, repository paths."""
from __future__ import annotations

import functools
import sys
import textwrap

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


def output_dir():
    """The Hydra run directory (created), or the current directory outside Hydra."""
    from pathlib import Path

    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        out = Path.cwd()
    out.mkdir(parents=True, exist_ok=True)
    return out
