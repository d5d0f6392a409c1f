"""SearchSpace and Arch: the two files everything in ernas flows through.

Both use one YAML schema::

    family: nafnet
    geometry: {img_channel: 3, width: 32, enc_blk_nums: [2, 2, 4, 8],
               middle_blk_num: 12, dec_blk_nums: [2, 2, 2, 2]}
    blocks:                         # decisions, from the general to the specific
      all:         {norm: [layernorm, batchnorm, none], kernel: [3, 5, 7], keep: [true, false]}
      middle_blks: {norm: layernorm, kernel: 3, keep: true}     # a group: fixed
      encoders.3:  {kernel: [3, 5]}                             # one level
      encoders.3.7: {keep: true}                                # one block position
    geometries: {w32: {}, w24: {width: 24}}  # optional: geometry alternatives, by name

Each position (``encoders.i.j``, ``middle_blks.j``, ``decoders.i.j``, named like the official
NAFNet parameters) starts from the family's reference block and is refined by every entry of
``blocks`` whose key is ``all`` or a dotted prefix of the position, less specific first. A value is
either one choice or a list of candidates. An **Arch** is a file whose every decision resolves to a
single value; a **SearchSpace** may hold several candidates per decision.

``geometries`` (optional) names alternatives of the backbone, each a change of ``geometry``
(``{}``: ``geometry`` itself) that keeps the block positions. The space is then the union of one
single-geometry space per alternative (``space.alternative(name)``, or ``find_space("<space>:
<name>")``), each with the same decisions: its op keys cover every alternative, ``sample`` draws
the alternative uniformly and then each decision (uniform over the union, as the alternatives are
equally large), and a search runs on one alternative. ``reference`` is of ``geometry`` (one of
the alternatives); ``smallest`` and ``largest`` are over all of them.
"""
from __future__ import annotations

import itertools
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ernas import footprint
from ernas.errors import ErnasError
from ernas.family import Family, get_family
from ernas.space_checks import (check_geometries, fmt_values, no_position_message,
                                 warn_unset_decisions)


def _same(value, allowed) -> bool:
    return type(value) is type(allowed) and value == allowed


def _footprint_order(arch) -> tuple:
    """Networks ordered by activation memory, then parameters (``footprint.estimate``)."""
    f = footprint.estimate(arch)
    return (f.activation_bytes or 0, f.params)


@dataclass
class SearchSpace:
    """Backbone geometry plus, per block position, the candidate values of each decision."""

    family: str
    geometry: dict
    choices: dict[str, dict[str, tuple]]  # position -> decision -> candidates
    name: str = "space"
    source: str = "<memory>"
    blocks: dict = field(default_factory=dict, repr=False)  # the file's `blocks` section
    geometries: dict = field(default_factory=dict)  # alternative name -> change of `geometry`

    @property
    def spec(self) -> Family:
        """The family object (decisions, blocks, op keys) of this space."""
        return get_family(self.family, self.source)

    @property
    def positions(self) -> list[str]:
        return list(self.choices)

    @property
    def searchable(self) -> list[str]:
        """Positions with at least one decision holding more than one candidate."""
        return [p for p, c in self.choices.items() if any(len(v) > 1 for v in c.values())]

    @property
    def is_arch(self) -> bool:
        return not self.searchable and not self.geometries

    def alternative(self, name: str) -> "SearchSpace":
        """The single-geometry space of the alternative ``name`` (``geometries[name]`` applied)."""
        if name not in self.geometries:
            names = list(self.geometries)
            raise ErnasError(f"field 'space': {self.source} has no geometry alternative {name!r}; "
                             + (f"its alternatives are {', '.join(names)}: use e.g. space="
                                f"{self.source}:{names[0]}." if names else
                                f"it has one geometry: use space={self.source}."))
        return SearchSpace(self.family, {**self.geometry, **self.geometries[name]}, self.choices,
                           name=f"{self.name}_{name}", source=f"{self.source}:{name}",
                           blocks=self.blocks)

    def members(self) -> list["SearchSpace"]:
        """The single-geometry spaces of this space: one per alternative, else itself."""
        return [self.alternative(n) for n in self.geometries] or [self]

    def combos(self, position: str) -> list[dict]:
        """Every choice (decision -> value) a position can take, in a fixed order."""
        c = self.choices[position]
        names = list(c)
        return [dict(zip(names, vals)) for vals in itertools.product(*(c[n] for n in names))]

    def distinct_combos(self, position: str) -> int:
        """Number of distinct blocks at a position: inactive (skipped) choices count once."""
        spec = self.spec
        combos = self.combos(position)
        active = sum(not spec.inactive(c) for c in combos)
        return active + (1 if active < len(combos) else 0)

    def size(self) -> int:
        """Number of distinct architectures (a skipped block's other decisions do not count),
        summed over the geometry alternatives."""
        return max(len(self.geometries), 1) * math.prod(self.distinct_combos(p)
                                                        for p in self.positions)

    def sample(self, rng: random.Random | int | None = None) -> "Arch":
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        if self.geometries:
            return self.alternative(rng.choice(list(self.geometries))).sample(rng)
        return self._pick(lambda pos, d, cands: rng.choice(cands), "sample")

    def smallest(self) -> "Arch":
        """Cheapest value everywhere; over alternatives, the one of least footprint."""
        if self.geometries:
            return min((m.smallest() for m in self.members()), key=_footprint_order)
        return self._pick(lambda pos, d, cands: self._ordered(d, cands)[0], "smallest")

    def largest(self) -> "Arch":
        """Costliest value everywhere; over alternatives, the one of largest footprint."""
        if self.geometries:
            return max((m.largest() for m in self.members()), key=_footprint_order)
        return self._pick(lambda pos, d, cands: self._ordered(d, cands)[-1], "largest")

    def reference(self) -> "Arch":
        """The family's reference block at every position (for nafnet: the official NAFNet)."""
        ref = self.spec.reference
        return Arch(self.family, dict(self.geometry),
                    {p: {d: ref[d] for d in c} for p, c in self.choices.items()},
                    name=f"{self.name}_reference")

    def _ordered(self, decision: str, cands: tuple) -> list:
        order = self.spec.decisions[decision]
        return sorted(cands, key=lambda v: next(i for i, a in enumerate(order) if _same(v, a)))

    def _pick(self, fn, kind: str) -> "Arch":
        values = {p: {d: fn(p, d, cands) for d, cands in c.items()} for p, c in self.choices.items()}
        return Arch(self.family, dict(self.geometry), values, name=f"{self.name}_{kind}")

    def contains(self, arch: "Arch") -> bool:
        if self.geometries:
            return any(m.contains(arch) for m in self.members())
        if arch.family != self.family or arch.geometry != self.geometry:
            return False
        return all(any(_same(arch.values[p][d], c) for c in cands)
                   for p, ch in self.choices.items() for d, cands in ch.items())

    def to_dict(self) -> dict:
        data = {"family": self.family, "name": self.name, "geometry": dict(self.geometry),
                "blocks": self.blocks}
        return {**data, "geometries": dict(self.geometries)} if self.geometries else data

    def order(self, decision: str) -> tuple:
        """The family's values of ``decision``, cheapest first."""
        return tuple(self.spec.decisions[decision])

    def fixed_keys(self, input_shape, granularity: str = "block") -> list[str]:
        """Op keys of everything outside the block positions (stem, down/up-sampling, head)."""
        return list(self.spec.fixed_keys(self.geometry, tuple(input_shape), granularity))

    def position_keys(self, position: str, choice: dict, input_shape,
                      granularity: str = "block") -> list[str]:
        """Op keys the block at ``position`` runs with ``choice`` (empty when it is skipped)."""
        return list(self.spec.position_keys(self.geometry, position, choice, tuple(input_shape),
                                            granularity))

    def op_keys(self, input_shape, granularity: str = "block") -> list[str]:
        """Every unique op key reachable in the space (every alternative), in first-seen order."""
        if self.geometries:
            return list(dict.fromkeys(k for m in self.members()
                                      for k in m.op_keys(input_shape, granularity)))
        keys = self.fixed_keys(input_shape, granularity)
        for p in self.positions:
            for combo in self.combos(p):
                keys += self.position_keys(p, combo, input_shape, granularity)
        return list(dict.fromkeys(keys))


@dataclass
class Arch:
    """One value per decision per position."""

    family: str
    geometry: dict
    values: dict[str, dict[str, Any]]
    name: str = "arch"
    source: str = "<memory>"

    @property
    def spec(self) -> Family:
        return get_family(self.family, self.source)

    @property
    def positions(self) -> list[str]:
        return list(self.values)

    def as_space(self) -> SearchSpace:
        return SearchSpace(self.family, dict(self.geometry),
                           {p: {d: (v,) for d, v in c.items()} for p, c in self.values.items()},
                           name=self.name, source=self.source, blocks=self.to_dict()["blocks"])

    def to_dict(self) -> dict:
        """Compact form: the most common value of each decision under ``all``, then per position
        only what differs."""
        decisions = list(next(iter(self.values.values()), {}))
        common = {}
        for d in decisions:
            vals = [c[d] for c in self.values.values()]
            common[d] = max(vals, key=lambda v: sum(_same(v, w) for w in vals))
        blocks: dict = {"all": common}
        for p, c in self.values.items():
            diff = {d: v for d, v in c.items() if not _same(v, common[d])}
            if diff:
                blocks[p] = diff
        return {"family": self.family, "name": self.name, "geometry": dict(self.geometry),
                "blocks": blocks}

    def op_keys(self, input_shape, granularity: str = "block") -> list[str]:
        """The op keys this network runs, in execution-independent order, with repeats."""
        space = self.as_space()
        keys = space.fixed_keys(input_shape, granularity)
        for p, choice in self.values.items():
            keys += space.position_keys(p, choice, input_shape, granularity)
        return keys

    def save(self, path: str | Path) -> None:
        from ernas.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- loading

def _read_yaml(path: str | Path, what: str) -> dict:
    from ernas.io import read_yaml

    data = read_yaml(path, what)
    if not isinstance(data, dict):
        raise ErnasError(f"{path}: the {what} file must be a mapping with the fields "
                         f"'family', 'geometry' and 'blocks'.")
    return data


def space_from_dict(data: dict, source: str = "<memory>", name: str | None = None) -> SearchSpace:
    """Validate a space/arch mapping and resolve each position's candidates."""
    unknown = set(data) - {"family", "name", "geometry", "blocks", "description", "geometries"}
    if unknown:
        raise ErnasError(f"{source}: unknown top-level field(s) {sorted(unknown)}; the allowed "
                         f"fields are family, name, description, geometry, blocks, geometries.")
    spec = get_family(data.get("family", "nafnet"), source)
    geometry = dict(spec.geometry_defaults)
    given = data.get("geometry") or {}
    if not isinstance(given, dict):
        raise ErnasError(f"{source}: field 'geometry' must be a mapping of "
                         f"{', '.join(spec.geometry_defaults)}.")
    for k, v in given.items():
        if k not in spec.geometry_defaults:
            raise ErnasError(f"{source}: unknown geometry field {k!r}; allowed fields are "
                             f"{', '.join(spec.geometry_defaults)}.")
        geometry[k] = v
    spec.validate_geometry(geometry, source)
    positions = spec.positions(geometry)

    blocks = data.get("blocks") or {}
    if not isinstance(blocks, dict):
        raise ErnasError(f"{source}: field 'blocks' must map 'all', a group or a position to "
                         f"decisions, e.g. blocks: {{all: {{kernel: [3, 5]}}}}.")
    choices = {p: {d: (v,) for d, v in spec.reference.items()} for p in positions}

    def matches(key: str, pos: str) -> bool:
        return key == "all" or pos == key or pos.startswith(key + ".")

    # less specific keys first: 'all' < group < level < position
    for key in sorted(blocks, key=lambda k: (k != "all", str(k).count("."))):
        entry = blocks[key]
        hit = [p for p in positions if matches(str(key), p)]
        if not hit:
            raise ErnasError(no_position_message(source, key, positions))
        if not isinstance(entry, dict):
            raise ErnasError(f"{source}: block {key!r} must map decisions to a value or a list of "
                             f"candidates, e.g. {{kernel: [3, 5]}}.")
        for d, v in entry.items():
            if d not in spec.decisions:
                raise ErnasError(
                    f"{source}: block {key!r}, field {d!r} is not a decision of family "
                    f"{spec.name!r}; the decisions are {', '.join(spec.decisions)}.")
            cands = tuple(v) if isinstance(v, (list, tuple)) else (v,)
            if not cands:
                raise ErnasError(f"{source}: block {key!r}, field {d!r} has an empty candidate "
                                 f"list; give at least one of {fmt_values(spec.decisions[d])}.")
            for c in cands:
                if not any(_same(c, a) for a in spec.decisions[d]):
                    raise ErnasError(
                        f"{source}: block {key!r}, field {d!r}: value {fmt_values([c])} is not allowed; "
                        f"the allowed values are {fmt_values(spec.decisions[d])}.")
            if len(set(map(repr, cands))) != len(cands):
                raise ErnasError(f"{source}: block {key!r}, field {d!r} lists a candidate twice "
                                 f"({fmt_values(cands)}); list each value once.")
            for p in hit:
                choices[p][d] = cands
    name = name or data.get("name") or (Path(source).stem if source != "<memory>" else "space")
    space = SearchSpace(spec.name, geometry, choices, name=name, source=source, blocks=blocks,
                        geometries=check_geometries(data.get("geometries"), spec, geometry, source))
    for member in space.members():
        size = footprint.check(member.largest(), source,
                               "network" if space.is_arch else "largest network")
    if "geometry" not in data:
        warnings.warn(f"{source} gives no 'geometry', so the family's default geometry is built "
                      f"({fmt_values([geometry])}: {size.describe()}); write the geometry in the file "
                      f"to choose another or to silence this warning.", stacklevel=2)
    return space


def load_space(path: str | Path) -> SearchSpace:
    """Load and validate a search-space YAML file."""
    return space_from_dict(_read_yaml(path, "search space"), str(path))


def find_space(ref: str | Path) -> SearchSpace:
    """A search space by path, or by the name of a shipped space (``search_spaces/<name>.yaml``);
    ``<space>:<name>`` is the single-geometry space of one of its ``geometries``."""
    from ernas.paths import SEARCH_SPACES

    p = Path(str(ref))
    if not p.exists() and ":" in str(ref):
        base, alternative = str(ref).rsplit(":", 1)
        return find_space(base).alternative(alternative)
    if not p.exists() and not p.suffix:
        named = SEARCH_SPACES / f"{ref}.yaml"
        if not named.exists():
            names = ", ".join(sorted(f.stem for f in SEARCH_SPACES.glob("*.yaml")))
            raise ErnasError(f"field 'space' is {str(ref)!r}, which is neither a file nor a "
                             f"shipped space; use a path to a space YAML or one of: {names}.")
        p = named
    return load_space(p)


def load_arch(path: str | Path) -> Arch:
    """Load an architecture file: the space schema with a single value for every decision."""
    space = space_from_dict(_read_yaml(path, "architecture"), str(path))
    if space.geometries:
        raise ErnasError(f"{path}: this is an architecture file, so it has one geometry, but it "
                         f"lists geometries ({', '.join(space.geometries)}). Remove "
                         f"'geometries' and write the chosen one in 'geometry'.")
    multi = [(p, d, c) for p in space.searchable for d, c in space.choices[p].items() if len(c) > 1]
    if multi:
        p, d, c = multi[0]
        raise ErnasError(
            f"{path}: this is an architecture file, so every decision needs a single value, but "
            f"block {p!r}, field {d!r} lists {fmt_values(c)} ({len(multi)} such fields in all). Pick "
            f"one value, or load it as a search space with load_space.")
    warn_unset_decisions(space)
    return arch_of(space)


def arch_of(space: SearchSpace) -> Arch:
    return Arch(space.family, dict(space.geometry),
                {p: {d: v[0] for d, v in c.items()} for p, c in space.choices.items()},
                name=space.name, source=space.source)
