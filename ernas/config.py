"""One validation layer for configs: a dataclass schema checked with OmegaConf's structured
configs, at the edge, once.

The YAML files in ``experiments/`` hold the defaults; a schema (a dataclass, fields typed, values
``MISSING`` where the YAML must give them) holds the types, and its ``__post_init__`` the ranges
and relations (``warmup_steps < steps``, ``lr > 0``, ...). :func:`validated` merges a composed
config into its schema: an unknown key, a value of the wrong type, a missing value or a value out
of range becomes one ``ErnasError`` naming the field and what is allowed (exit status 2 in the
CLIs), before anything runs or is written.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping, TypeVar

from ernas.errors import ErnasError

T = TypeVar("T")


def validated(cfg: Any, schema: type[T], where: str) -> T:
    """``cfg`` (a DictConfig or mapping) as an instance of the dataclass ``schema``."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

    data = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg or {}))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        check(where, nonfinite_values(OmegaConf.to_container(merged, resolve=True), schema))
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        names = ", ".join(f.name for f in dataclasses.fields(schema))
        raise ErnasError(f"{where}: unknown field {_key(e)!r}; the fields here are {names}. "
                         f"Check the spelling (or the config group it belongs to).") from None
    except MissingMandatoryValue as e:
        raise ErnasError(f"{where}: field {_key(e)!r} has no value; give one (e.g. "
                         f"{_key(e)}=...).") from None
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise ErnasError(f"{where}: field {_key(e)!r}: {msg}; give a value of the right type."
                         ) from None


def _key(e) -> str:
    return str(getattr(e, "full_key", None) or getattr(e, "key", "?"))


def from_mapping(cls: type[T], data: Mapping | None, where: str) -> T:
    """``cls(**data)`` for a plain dataclass, with unknown fields named in an ErnasError."""
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ErnasError(f"{where}: unknown field(s) {unknown}; the fields are "
                         f"{', '.join(sorted(names))}.")
    check(where, nonfinite_values(data, cls))
    return cls(**data)


def nonfinite_values(data: Any, schema: type | None = None, prefix: str = "") -> list[str]:
    """Every NaN or infinite number in ``data`` (mappings and lists, walked), as problems for
    :func:`check`. A schema dataclass may list fields where infinity means "no limit" in a
    class attribute ``INF_OK``; NaN is never a setting. Nested schemas are followed by field."""
    if isinstance(data, Mapping):
        types = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
        inf_ok = getattr(schema, "INF_OK", ())
        bad = []
        for k, v in data.items():
            if isinstance(v, float) and math.isinf(v) and k in inf_ok:
                continue
            sub = types.get(k)
            bad += nonfinite_values(v, sub if isinstance(sub, type) else None, f"{prefix}{k}.")
        return bad
    if isinstance(data, (list, tuple)):
        return [p for i, v in enumerate(data)
                for p in nonfinite_values(v, None, f"{prefix.removesuffix('.')}[{i}].")]
    if isinstance(data, float) and not math.isfinite(data):
        return [f"{prefix.removesuffix('.')}={data} must be a finite number"]
    return []


def check(where: str, problems: list[str]) -> None:
    """Raise one ErnasError listing every problem (``["lr=-1 must be > 0", ...]``)."""
    if problems:
        raise ErnasError(f"{where}: " + "; ".join(problems) + ". Fix these values.")
