"""The protocol's plan: every network of every arm and every job, fixed before any job runs.

Networks (``plan["networks"]``, name -> record):

- ``reference``: the reference network of the space's geometry (or with ``reference``'s
  ``{geometry, blocks}`` change, e.g. a smaller hand-made network of the same space);
- ``searched_t<i>_s<k>``: the search at target i (fraction f_i of the reference's predicted
  latency L_ref, so T_i = f_i·L_ref) with search seed k; its arch is the search's ``arch.yaml``
  (with ``tune.lams``: the searches are added once λ is chosen, ``ernas.bench.tune``). A space
  with geometry alternatives (``geometries``) gets one search per alternative g and seed,
  ``searched_t<i>_<g>_s<k>``, on the single-geometry space ``<space>:<g>``; validation chooses
  among all of them as among seeds;
- ``random_t<i>_d<j>``: uniform samples of the space (of the union of its alternatives)
  accepted when |L̂(a)/T_i − 1| ≤ tolerance, drawn in order from one seeded generator per target;
- ``scaled_<name>``: the protocol's reference with the stated geometry and block values changed.

Jobs (``plan["jobs"]``, id -> record): tuning searches (``tune_t<i>_l<j>``: target i, λ_j of
``tune.lams``, seed ``tune.seed``) or searches, one training per network and seed (the reference
with every ``train.seeds``, the others with ``train.others_seeds``), one test evaluation per
training. The selected networks' extra seeds are added after selection (``add_selected_seeds``).
"""
from __future__ import annotations

import random
from pathlib import Path

from omegaconf import OmegaConf

from ernas.errors import ErnasError
from ernas.latency.predict import predict_ms
from ernas.latency.settings import LatencySettings
from ernas.space import Arch, find_space, space_from_dict

TABLE = "latency_table.csv"  # the protocol's table, copied into the bench directory
CHECKPOINTS = {"search": "checkpoint.pt", "retrain": "last.pt", "evaluate": None}


def reference_arch(space, change: dict | None = None) -> Arch:
    """The protocol's reference: the space's reference network, or with ``change``
    (``{geometry, blocks}``, as a scaled variant states it) applied to it."""
    if change and (change.get("geometry") or change.get("blocks")):
        return _changed(space, [change], "reference")
    arch = space.reference()
    arch.name = "reference"
    return arch


def scaled_arch(space, spec: dict, reference: dict | None = None) -> Arch:
    """The protocol's reference (``reference``: its change of the space's reference) with
    ``spec['geometry']`` changed and ``spec['blocks']`` (decision values, by
    ``all``/group/level/position) over it."""
    return _changed(space, [reference or {}, spec], f"scaled_{spec['name']}")


def _changed(space, changes: list[dict], name: str) -> Arch:
    """The space's reference block everywhere with ``changes`` applied in order."""
    blocks, geometry = {"all": dict(space.spec.reference)}, dict(space.geometry)
    for change in changes:
        geometry.update(dict(change.get("geometry") or {}))
        for where, values in (change.get("blocks") or {}).items():
            blocks[where] = {**blocks.get(where, {}), **dict(values)}
    data = {"family": space.family, "name": name, "geometry": geometry, "blocks": blocks}
    made = space_from_dict(data, f"protocol {name}")
    if any(len(v) > 1 for c in made.choices.values() for v in c.values()):
        raise ErnasError(f"bench config: {name!r} lists several values for a decision; give "
                         f"one value each.")
    return Arch(made.family, dict(made.geometry),
                {p: {d: v[0] for d, v in c.items()} for p, c in made.choices.items()},
                name=name)


def random_archs(space, table, shape, target_ms: float, draws: int, tolerance: float,
                 seed: int, max_tries: int, label: str) -> list[tuple[Arch, float]]:
    """``draws`` uniform samples of ``space`` predicted within ±tolerance of ``target_ms``."""
    rng = random.Random(seed)
    found, seen = [], set()
    for _ in range(max_tries):
        a = space.sample(rng)
        digest = repr((sorted(a.geometry.items()), sorted(a.values.items())))
        if digest in seen:
            continue
        seen.add(digest)
        ms = predict_ms(table, a, shape)
        if abs(ms / target_ms - 1) <= tolerance:
            found.append((a, ms))
            if len(found) == draws:
                return found
    raise ErnasError(f"bench config: only {len(found)} of random.draws={draws} networks of "
                     f"{space.name} are predicted within ±{tolerance:.0%} of {label} "
                     f"({target_ms:.2f} ms) after {max_tries} samples; widen random.tolerance, "
                     f"raise random.max_tries, or choose a target the space reaches.")


def _node(cfg, key: str) -> dict:
    return OmegaConf.to_container(cfg[key], resolve=True)


def hand_made(cfg, space) -> tuple[Arch, list[Arch]]:
    """The protocol's reference and its scaled variants; a change the space or family refuses
    raises ErnasError (``ernas-bench`` calls this before it claims a run directory)."""
    if space.geometries and cfg.tune.lams:
        raise ErnasError(f"bench config: tune.lams chooses λ with one search per target, but "
                         f"space {space.name} holds geometry alternatives "
                         f"({', '.join(space.geometries)}), each searched separately; state "
                         f"search.lam and set tune.lams=[].")
    change = _node(cfg, "reference")
    return reference_arch(space, change), [scaled_arch(space, spec, change)
                                           for spec in _node(cfg, "scaled")]


def build_plan(cfg, table, bench: Path) -> tuple[dict, dict[str, Arch]]:
    """Networks and jobs of the protocol ``cfg`` priced on ``table``, and the arch files to
    write (``{path: Arch}``, under ``bench/archs/``); nothing is written here."""
    space = find_space(cfg.space)
    shape = [int(s) for s in cfg.input_shape]
    ref, scaled = hand_made(cfg, space)
    ref_ms = predict_ms(table, ref, shape)
    archs = bench / "archs"
    networks = {"reference": {"arm": "reference", "arch": str(archs / "reference.yaml"),
                              "predicted_ms": ref_ms, **_alternative(space, ref)}}
    written = {"reference": ref}
    targets = [{"fraction": float(f), "ms": float(f) * ref_ms} for f in cfg.targets]
    for i, t in enumerate(targets):
        for k in cfg.search.seeds:
            for g in list(space.geometries) or [None]:
                tag = f"t{i}_s{k}" if g is None else f"t{i}_{g}_s{k}"
                networks[f"searched_{tag}"] = {
                    "arm": "searched", "target": i, "search_seed": int(k), "geometry": g,
                    "arch": str(bench / "jobs" / f"search_{tag}" / "arch.yaml")}
        drawn = random_archs(space, table, shape, t["ms"], cfg.random.draws,
                             cfg.random.tolerance, cfg.random.seed + 1000 * i,
                             cfg.random.max_tries, f"target {t['fraction']}")
        for j, (a, ms) in enumerate(drawn):
            name = f"random_t{i}_d{j}"
            a.name = name
            written[name] = a
            networks[name] = {"arm": "random", "target": i, "draw": j, "predicted_ms": ms,
                              "arch": str(archs / f"{name}.yaml"), **_alternative(space, a)}
    for a in scaled:
        written[a.name] = a
        networks[a.name] = {"arm": "scaled", "arch": str(archs / f"{a.name}.yaml"),
                            "predicted_ms": _predicted_or_none(table, a, shape),
                            **_alternative(space, a)}
    plan = {"protocol": cfg.protocol, "reference_ms": ref_ms, "targets": targets,
            "networks": networks, "jobs": {}, "nodes": job_nodes(cfg, bench / TABLE)}
    for i, t in enumerate(targets):
        if cfg.tune.lams:
            for j, lam in enumerate(cfg.tune.lams):
                add_job(plan, bench, f"tune_t{i}_l{j}", "search",
                        {**search_overrides(cfg, t, cfg.tune.seed), "search.lam": float(lam)})
            continue
        for name, rec in networks.items():
            if rec["arm"] == "searched" and rec["target"] == i:
                job = name.replace("searched_", "search_", 1)
                add_job(plan, bench, job, "search",
                        search_overrides(cfg, t, rec["search_seed"], rec["geometry"]))
    for name in networks:
        seeds = cfg.train.seeds if name == "reference" else cfg.train.others_seeds
        for s in seeds:
            add_training(plan, bench, cfg, name, int(s))
    return plan, {str(archs / f"{name}.yaml"): a for name, a in written.items()}


def _alternative(space, arch: Arch) -> dict:
    """``{"geometry": g}`` for the space's alternative g whose geometry ``arch`` has (none for a
    space without alternatives, or a geometry outside them)."""
    names = [g for g in space.geometries if space.alternative(g).geometry == arch.geometry]
    return {"geometry": names[0]} if names else {}


def job_nodes(cfg, table_path) -> dict:
    """The task node of the protocol, and its latency node pinned to the protocol's table (no
    probe, no re-anchoring: every search optimises the same prices). With keys timed at other
    threads (``latency.key_threads``) anchoring stays on: it keeps the line the table carries."""
    node = _node(cfg, "latency")
    lat = {**node, "table": str(table_path), "trust_table": True,
           "anchor": LatencySettings.from_config(node).keys_elsewhere}
    return {"task": _node(cfg, "task"), "latency": lat}


def _predicted_or_none(table, arch, shape):
    keys = arch.op_keys(shape, table.metadata.get("granularity", "block"))
    return predict_ms(table, arch, shape) if all(k in table for k in keys) else None


def search_overrides(cfg, target: dict, seed: int, geometry: str | None = None) -> dict:
    """A search job's overrides (``geometry``: the space's alternative it searches)."""
    space = str(cfg.space) if geometry is None else f"{cfg.space}:{geometry}"
    return {**_node(cfg.search, "overrides"), "space": space,
            "input_shape": [int(s) for s in cfg.input_shape], "seed": int(seed),
            "search.target_ms": round(target["ms"], 6), "threads": cfg.threads,
            "progress": False}


def add_tuned_searches(plan: dict, bench: Path, cfg, chosen: dict[int, int]) -> None:
    """The searches at each target's chosen λ (``chosen``: target -> index into ``tune.lams``)."""
    for i, t in enumerate(plan["targets"]):
        lam = float(cfg.tune.lams[chosen[i]])
        for k in cfg.search.seeds:
            add_job(plan, bench, f"search_t{i}_s{k}", "search",
                    {**search_overrides(cfg, t, k), "search.lam": lam})


def add_job(plan: dict, bench: Path, job_id: str, command: str, overrides: dict,
            after: str | None = None) -> None:
    """A job: ``command`` with ``overrides`` and the protocol's task and pinned latency nodes."""
    nodes = {k: v for k, v in plan["nodes"].items() if command != "retrain" or k == "task"}
    plan["jobs"][job_id] = {"command": command, "overrides": overrides, "nodes": nodes,
                            "run_dir": str(bench / "jobs" / job_id), "after": after}


def add_training(plan: dict, bench: Path, cfg, network: str, seed: int) -> None:
    """The training of ``network`` with training seed ``seed`` and its test evaluation."""
    train_id = f"train_{network}_seed{seed}"
    if train_id in plan["jobs"]:
        return
    arch = plan["networks"][network]["arch"]
    recipe = _node(cfg.train, "overrides")
    add_job(plan, bench, train_id, "retrain",
            {**recipe, "arch": arch, "seed": seed, "init": "scratch", "threads": cfg.threads,
             "progress": False})
    tile = {"tile": recipe["val_tile"]} if recipe.get("val_tile") else {}  # test as validated
    add_job(plan, bench, f"test_{network}_seed{seed}", "evaluate",
            {"checkpoint": str(bench / "jobs" / train_id), "name": network,
             "seed": int(cfg.evaluate.seed), "baseline.enabled": False,
             "predict_latency": False, "measure_latency": False,
             "input_shape": [int(s) for s in cfg.input_shape], "threads": cfg.threads,
             "progress": False, **tile}, after=train_id)


def add_selected_seeds(plan: dict, bench: Path, cfg, selected: list[str]) -> None:
    """Every ``train.seeds`` of the validation-selected networks."""
    for name in selected:
        for s in cfg.train.seeds:
            add_training(plan, bench, cfg, name, int(s))


def check_jobs(plan: dict) -> None:
    """Compose and validate the config of the first job of each command, so a bad setting in
    the protocol is refused before anything is written or run."""
    from ernas.api import compose
    from ernas.cli import schema
    from ernas.config import validated
    from ernas.search import SearchConfig

    first = {}
    for job in plan["jobs"].values():
        first.setdefault(job["command"], job)
    for command, job in first.items():
        cfg = compose(command, job["overrides"], job["nodes"])
        validated(cfg, getattr(schema, command.capitalize()), f"bench: the {command} jobs' config")
        if command == "search":
            SearchConfig.from_dict(OmegaConf.to_container(cfg.search, resolve=True))
        if command == "retrain":
            from ernas.train import TrainConfig

            TrainConfig.from_dict(validated(cfg, schema.Retrain, "retrain").train_fields())


def stage_jobs(plan: dict, command: str) -> list[str]:
    return [j for j, rec in plan["jobs"].items() if rec["command"] == command]
