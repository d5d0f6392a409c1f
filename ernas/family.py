"""The Family contract: everything the generic search, latency, training and export code needs to
know about one network family (NAFNet, U-Net, HRNet-lite, or a user's own).

A family is one module (or package) that defines a :class:`Family` subclass and exposes an
instance as ``FAMILY``. It declares

- ``decisions``: each decision's values, **cheapest first** (so ``space.smallest()`` takes the
  first candidate of every decision and ``largest()`` the last), and ``reference``: the family's
  reference block (the hand-made network is the reference at every position);
- ``geometry_defaults`` and ``validate_geometry``: the backbone (widths, block counts, channels);
- ``positions(geometry)``: the searchable block positions. A position's name is the module path
  of its block in the built model (``model.get_submodule(position)``), so its weights are the
  state-dict entries under ``f"{position}."``;
- ``inactive(choice)``: True when a choice makes the block an identity (no op, no weight);
  ``skip_decision``: the name of the boolean decision that does so (NAFNet's ``keep``), if any,
  which the search's weight step can draw as stochastic depth (``SuperNet.drop_paths``);
- ``build(arch, block=None)``: the discrete model; ``block(position, value)`` overrides the block
  made at each position (the supernet puts its super-blocks there);
- ``make_block(geometry, position, choice)`` and ``super_block(geometry, position, candidates,
  mode)``: one block, and the weight-shared mixture of a position's candidates (a
  :class:`ernas.nn.mixed.SuperBlock`, whose ``extract_state(choice)`` returns the discrete
  block's weights);
- ``fixed_keys`` / ``position_keys``: the op keys (``ernas.latency.ops``) the network runs
  outside the positions and at one position with one choice, and ``ops``: builders for the op
  names that only this family uses;
- ``io_channels(geometry)``: input and output channels (tasks check them against their data);
- optional: ``feature_modules(model)``/``feature_channels(arch)`` for feature distillation and
  ``map_pretrained(model, state)`` for loading official weights.

Families are found by name (:func:`get_family`): the built-ins first, then a module
``ernas.families.<name>``, then the entry-point group ``ernas.families`` (so a user's package can
add a family without editing ernas)::

    [options.entry_points]
    ernas.families =
        mynet = mypackage.mynet      # a module holding FAMILY
"""
from __future__ import annotations

import abc
import importlib
from typing import Any, Callable

from torch import nn

from ernas.errors import ErnasError

BUILTIN = ("nafnet", "unet", "hrnet_lite")
_REGISTRY: dict[str, "Family"] = {}


class Family(abc.ABC):
    """Base class of a network family (see the module docstring for the contract)."""

    name: str = ""
    decisions: dict[str, tuple] = {}
    reference: dict[str, Any] = {}
    geometry_defaults: dict[str, Any] = {}
    ops: dict[str, Callable] = {}           # op name -> builder(attrs: dict, shape: tuple)
    super_modes: tuple[str, ...] = ("shared",)
    skip_decision: str | None = None        # boolean decision whose False makes an identity

    # ------------------------------------------------------------------ geometry
    @abc.abstractmethod
    def validate_geometry(self, geometry: dict, source: str) -> None:
        """Raise ErnasError naming ``source`` and the field when the geometry is invalid."""

    @abc.abstractmethod
    def positions(self, geometry: dict) -> list[str]:
        """Block positions in execution order (module paths of the built model)."""

    def inactive(self, choice: dict) -> bool:
        """Whether ``choice`` makes the block an identity (default: never)."""
        return False

    @abc.abstractmethod
    def io_channels(self, geometry: dict) -> tuple[int, int]:
        """(input channels, output channels) of the network."""

    # ------------------------------------------------------------------ models
    @abc.abstractmethod
    def build(self, arch, block: Callable[[str, Any], nn.Module] | None = None) -> nn.Module:
        """The network of ``arch``; ``block(position, value)`` makes each position's block
        (default: ``make_block(arch.geometry, position, value)``)."""

    @abc.abstractmethod
    def make_block(self, geometry: dict, position: str, choice: dict) -> nn.Module:
        """The discrete block at ``position`` (an identity when ``inactive(choice)``)."""

    @abc.abstractmethod
    def super_block(self, geometry: dict, position: str, candidates: dict[str, tuple],
                    mode: str = "shared") -> nn.Module:
        """The weight-shared mixture of the candidates at ``position``."""

    # ------------------------------------------------------------------ latency
    @abc.abstractmethod
    def fixed_keys(self, geometry: dict, input_shape, granularity: str) -> list[str]:
        """Op keys outside the block positions (stem, resampling, head)."""

    @abc.abstractmethod
    def position_keys(self, geometry: dict, position: str, choice: dict, input_shape,
                      granularity: str) -> list[str]:
        """Op keys the block at ``position`` runs with ``choice`` (none when inactive)."""

    # ------------------------------------------------------------------ optional
    def feature_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose outputs are distilled (feature distillation)."""
        raise ErnasError(f"family {self.name!r} does not define features for distillation; "
                         f"use output distillation only (teacher.w_feat=0).")

    def feature_channels(self, arch) -> list[int]:
        """Channels of each ``feature_modules`` output for ``arch``."""
        raise ErnasError(f"family {self.name!r} does not define features for distillation; "
                         f"use output distillation only (teacher.w_feat=0).")

    def map_pretrained(self, model: nn.Module, state: dict) -> dict:
        """Copy a checkpoint of the hand-made network into ``model`` where shapes allow; return
        a report (``copied``, ``adapted``, ``left_at_init``, ``unused_source_keys``)."""
        raise ErnasError(f"family {self.name!r} has no mapping of pretrained weights; use "
                         f"init=scratch or init=supernet.")

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def register_family(family: Family) -> Family:
    """Make ``family`` findable by its name (and register its op builders)."""
    from ernas.keys import register_ops

    if not isinstance(family, Family):
        raise TypeError(f"register_family takes a Family instance, got {type(family).__name__}")
    d = family.skip_decision
    if d is not None and [type(v) for v in family.decisions.get(d, ())].count(bool) != 2:
        raise ErnasError(f"family {family.name!r}: skip_decision={d!r} must name one of its "
                         f"decisions whose values are False and True (decisions: "
                         f"{', '.join(family.decisions)}); set it to None if no choice skips a "
                         f"block.")
    _REGISTRY[family.name] = family
    register_ops(family.ops, owner=family.name)
    return family


def _from_module(module_name: str) -> Family | None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            return None
        raise
    fam = getattr(module, "FAMILY", None)
    return fam if isinstance(fam, Family) else None


def _entry_points(group: str) -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=group)}


def get_family(name: str, where: str = "<space>") -> Family:
    """The family called ``name``: built-in, ``ernas.families.<name>``, or entry point."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    fam = _from_module(f"ernas.families.{name}") if name.isidentifier() else None
    if fam is None:
        ep = _entry_points("ernas.families").get(name)
        if ep is not None:
            obj = ep.load()
            fam = getattr(obj, "FAMILY", obj)
    if not isinstance(fam, Family):
        known = sorted(set(BUILTIN) | set(_REGISTRY) | set(_entry_points("ernas.families")))
        raise ErnasError(f"{where}: field 'family' is {name!r}, which is not a known network "
                         f"family; use one of {', '.join(known)}, or install a package that "
                         f"registers it under the entry-point group 'ernas.families'.")
    if fam.name != name:
        raise ErnasError(f"{where}: family {name!r} resolves to a Family named {fam.name!r}; the "
                         f"entry-point name and Family.name must agree.")
    return register_family(fam)


def all_families() -> list[Family]:
    """Every family that can be found (built-ins and entry points), imported."""
    names = list(BUILTIN) + sorted(set(_entry_points("ernas.families")) - set(BUILTIN))
    out = []
    for n in names:
        try:
            out.append(get_family(n))
        except ErnasError:
            continue
    return out
