"""What the space loader checks and says: geometry alternatives, block keys that match no
position, and architecture files that leave decisions unset."""
from __future__ import annotations

import warnings

import yaml

from ernas.errors import ErnasError
from ernas.family import Family


def fmt_values(values) -> str:
    return ", ".join(yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
                     for v in values)


def check_geometries(given, spec: Family, geometry: dict, source: str) -> dict:
    """The ``geometries`` section checked: name -> change of ``geometry`` that the family
    accepts and that keeps every block position."""
    if given is None:
        return {}
    if not isinstance(given, dict) or not given:
        raise ErnasError(f"{source}: field 'geometries' must map names to changes of 'geometry', "
                         f"e.g. geometries: {{w18: {{}}, w12: {{width: 12}}}}.")
    out = {}
    for name, change in given.items():
        where = f"{source}: geometries.{name}"
        if not str(name).replace("_", "").isalnum():
            raise ErnasError(f"{where}: the name must be plain (letters, digits, _).")
        if not isinstance(change or {}, dict) or set(change or {}) - set(spec.geometry_defaults):
            raise ErnasError(f"{where} must map geometry fields "
                             f"({', '.join(spec.geometry_defaults)}) to values, or be {{}}.")
        changed = {**geometry, **(change or {})}
        spec.validate_geometry(changed, where)
        if spec.positions(changed) != spec.positions(geometry):
            raise ErnasError(f"{where} changes the block positions; an alternative may change "
                             f"widths and channels but must keep the block counts of 'geometry', "
                             f"so that every alternative has the same decisions.")
        if changed in [{**geometry, **c} for c in out.values()]:
            raise ErnasError(f"{where} gives the same geometry as another alternative; list each "
                             f"geometry once.")
        out[str(name)] = dict(change or {})
    if all(any(geometry.get(k) != v for k, v in c.items()) for c in out.values()):
        raise ErnasError(f"{source}: no entry of 'geometries' is 'geometry' itself, whose "
                         f"reference network the space compares with; add it, e.g. "
                         f"geometries: {{base: {{}}, ...}}.")
    return out


def no_position_message(source: str, key, positions: list[str]) -> str:
    """The paragraph for a ``blocks`` key that matches no block position of the geometry."""
    fix = ("Check the block counts in 'geometry' (e.g. enc_blk_nums, middle_blk_num, "
           "dec_blk_nums)")
    if not positions:
        return (f"{source}: block key {key!r} matches no block position: this geometry has no "
                f"block positions at all (every block count is 0), so 'blocks' has nothing to "
                f"set. {fix}, or remove the 'blocks' section.")
    groups = ", ".join(sorted({p.split(".")[0] for p in positions}))
    return (f"{source}: block key {key!r} matches no block position of this geometry; valid keys "
            f"are 'all', a group ({groups}), a level or a position such as {positions[0]!r} .. "
            f"{positions[-1]!r}. {fix}.")


def warn_unset_decisions(space) -> None:
    """Warn when an architecture file leaves a decision unset at some positions: those take
    the family's reference value, which the file does not say."""
    def covers(key: str, pos: str) -> bool:
        return key == "all" or pos == key or pos.startswith(key + ".")

    unset: dict[str, list[str]] = {}
    for pos in space.positions:
        given = {d for key, entry in space.blocks.items() if covers(str(key), pos)
                 for d in (entry or {})}
        for d in space.choices[pos]:
            if d not in given:
                unset.setdefault(d, []).append(pos)
    if not unset:
        return
    ref = space.spec.reference
    parts = [f"{d}={fmt_values([ref[d]])} at {_positions(ps, len(space.positions))}"
             for d, ps in unset.items()]
    warnings.warn(f"{space.source}: this architecture does not set every decision, so the "
                  f"family's reference values are taken: {'; '.join(parts)}. Write them in "
                  f"'blocks' (e.g. under 'all') to make the file say what is built.",
                  stacklevel=2)


def _positions(ps: list[str], total: int) -> str:
    if len(ps) == total:
        return f"every position ({total})"
    shown = ", ".join(ps[:6])
    return f"{len(ps)} positions ({shown}{', ...' if len(ps) > 6 else ''})"


def single_geometry_message(space, what: str, field: str) -> str:
    """The paragraph refusing a space with geometry alternatives where one geometry is needed."""
    names = list(space.geometries)
    return (f"field {field!r}: space {space.name} ({space.source}) holds {len(names)} geometry "
            f"alternatives ({', '.join(names)}) and a {what} runs on one geometry. Fix: name "
            f"one, e.g. {field}={space.source}:{names[0]}, and run one {what} per alternative "
            f"at one search.target_ms (ernas-bench does this for a protocol's space).")
