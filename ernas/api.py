"""The public Python API: every command as a function, and every shipped file by name.

Each command function composes the same Hydra config as its console script
(``experiments/<command>.yaml`` plus ``overrides``) and calls the same ``run`` function, so the
CLI and the API are one path. ``overrides`` is a mapping ``{"search.steps": 50}`` or a list of
Hydra override strings (``["search.steps=50"]``). A bad value raises :class:`ErnasError` with the
paragraph the CLI would print; nothing is written before the checks pass.

    import ernas
    r = ernas.search("nafnet_tiny", {"search.steps": 50}, run_dir="runs/my_search")
    r.summary["predicted_latency_ms"], r.run_dir / "arch.yaml"
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ernas.errors import ErnasError

__all__ = ["Result", "compose", "run_command", "search", "retrain", "evaluate", "export",
           "profile", "bench", "list_spaces", "list_archs", "list_families", "list_tasks",
           "list_backends", "find_space", "find_arch"]


@dataclass
class Result:
    """What a command produced: its run directory and its ``summary.json`` (headline figures)."""

    run_dir: Path
    summary: dict = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """A file of the run, e.g. ``result.path("arch.yaml")``."""
        return self.run_dir / name


def _literal(value) -> str:
    """``value`` in Hydra's override grammar (strings quoted unless plain)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    text = str(value)
    plain = all(c.isalnum() or c in "_-./:" for c in text) and text[:1] not in "-:" and text
    return text if plain else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _override(key: str, value) -> str:
    return f"{key}={_literal(value)}"


def as_overrides(overrides: Mapping | Sequence[str] | None) -> list[str]:
    """Hydra override strings from a mapping ``{dotted key: value}`` or a list of strings."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [_override(str(k), v) for k, v in overrides.items()]
    if isinstance(overrides, str):
        raise ErnasError(f"overrides={overrides!r} is one string; pass a list of Hydra overrides "
                         f"(['search.steps=50']) or a mapping ({{'search.steps': 50}}).")
    return [str(o) for o in overrides]


def compose(command: str, overrides: Mapping | Sequence[str] | None = None,
            nodes: Mapping | None = None):
    """The composed config of ``command`` (e.g. ``"search"``) with ``overrides``, as the console
    script would compose it (the ``hydra`` node is left out); ``nodes`` replaces whole config
    nodes after composition (``{"task": {...}}``: another run's task)."""
    cfg = _composed(command, overrides)
    if nodes:
        from omegaconf import OmegaConf, open_dict

        with open_dict(cfg):
            for key, node in nodes.items():
                cfg[key] = OmegaConf.create(dict(node))
    return cfg


def _composed(command: str, overrides):
    import importlib

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ernas.paths import EXPERIMENTS

    from ernas.search.config import register_schema

    importlib.import_module(f"ernas.cli.{command}")
    # again on every call: launchers (joblib, ray) restore Hydra's ConfigStore from the parent
    # process before each job, dropping what an earlier job's import registered
    register_schema()
    ovs = as_overrides(overrides)
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app using experiments/
            return hydra_compose(config_name=command, overrides=ovs)
        with initialize_config_dir(str(EXPERIMENTS), version_base="1.3"):
            return hydra_compose(config_name=command, overrides=ovs)
    except (HydraException, OmegaConfBaseException) as e:
        raise ErnasError(f"ernas.{command}: the overrides do not fit the config: {e}. See "
                         f"`ernas-{command} --cfg job` for the fields.") from None


def run_command(command: str, overrides=None, run_dir=None, nodes: Mapping | None = None
                ) -> Result:
    """Run ``ernas-<command>`` (search, retrain, evaluate, export, profile, bench) with
    ``overrides`` into ``run_dir``; the same ``run`` function as the console script. ``nodes``
    replaces whole config nodes after composition (``{"task": {...}}``: another run's task)."""
    import importlib

    if run_dir is None:
        raise ErnasError(f"ernas.{command}: give run_dir=<folder> (a new folder, or the run to "
                         f"continue with overrides={{'resume': <folder>}}).")
    cfg = compose(command, overrides, nodes)
    run = importlib.import_module(f"ernas.cli.{command}").run
    run = getattr(run, "__wrapped__", run)  # the function itself: ErnasError is raised, not exit 2
    summary = run(cfg, Path(run_dir))
    return Result(Path(run_dir), summary if isinstance(summary, dict) else {})


def _call(command: str, overrides, run_dir, first: dict) -> Result:
    ovs = [_override(k, v) for k, v in first.items() if v is not None] + as_overrides(overrides)
    return run_command(command, ovs, run_dir)


def search(space: str | None = None, overrides=None, run_dir=None) -> Result:
    """Search ``space`` (a shipped name or a YAML path) as ``ernas-search`` does; the derived
    network is ``result.path("arch.yaml")``."""
    return _call("search", overrides, run_dir, {"space": space})


def retrain(arch: str | None = None, overrides=None, run_dir=None) -> Result:
    """Train ``arch`` (arch YAML, shipped arch name, search run dir or ``reference:<space>``) as
    ``ernas-retrain`` does; the best validation checkpoint is ``result.path("best.pt")``."""
    return _call("retrain", overrides, run_dir, {"arch": arch})


def evaluate(checkpoint: str | None = None, overrides=None, run_dir=None) -> Result:
    """Quality, size and latency of a trained model beside a baseline, as ``ernas-evaluate``."""
    return _call("evaluate", overrides, run_dir, {"checkpoint": checkpoint})


def export(checkpoint: str | None = None, overrides=None, run_dir=None) -> Result:
    """ONNX (and int8 / QAT) export with parity and measured latency, as ``ernas-export``."""
    return _call("export", overrides, run_dir, {"checkpoint": checkpoint})


def profile(space: str | None = None, overrides=None, run_dir=None) -> Result:
    """Profile (or validate) a latency table, as ``ernas-profile``."""
    return _call("profile", overrides, run_dir, {"space": space})


def bench(experiment: str | None = None, overrides=None, run_dir=None) -> Result:
    """Run a benchmark protocol (``experiment=protocol_denoise_tiny`` …) as ``ernas-bench``."""
    return _call("bench", overrides, run_dir, {"experiment": experiment})


# --------------------------------------------------------------------------- shipped names
def list_spaces() -> list[str]:
    """Names of the shipped search spaces (``load_space(name)`` loads one)."""
    from ernas.paths import SEARCH_SPACES

    return sorted(p.stem for p in SEARCH_SPACES.glob("*.yaml"))


def list_archs() -> list[str]:
    """Names of the shipped architectures (hand-made references and benchmark results)."""
    from ernas.paths import SEARCH_SPACES

    return sorted(p.stem for p in (SEARCH_SPACES / "archs").glob("*.yaml"))


def list_families() -> list[str]:
    """Registered network families (built in and plug-ins)."""
    from ernas.family import all_families

    return sorted(f.name for f in all_families())


def list_tasks() -> list[str]:
    """Registered tasks (built in and plug-ins)."""
    from importlib.metadata import entry_points

    from ernas.paths import EXPERIMENTS

    shipped = {p.stem for p in (EXPERIMENTS / "task").glob("*.yaml")}
    return sorted(shipped | {ep.name for ep in entry_points(group="ernas.tasks")})


def list_backends() -> list[str]:
    """Latency backend configs (``latency=<name>``)."""
    from ernas.paths import EXPERIMENTS

    return sorted(p.stem for p in (EXPERIMENTS / "latency").glob("*.yaml"))


def find_space(ref: str | Path):
    """A :class:`SearchSpace` from a YAML path, a shipped space name, or a shipped arch name
    (an arch is a space with one value per decision)."""
    from ernas.paths import SEARCH_SPACES
    from ernas.space import find_space as _find
    from ernas.space import load_space

    shipped_arch = SEARCH_SPACES / "archs" / f"{ref}.yaml"
    if not Path(str(ref)).exists() and shipped_arch.is_file() \
            and not (SEARCH_SPACES / f"{ref}.yaml").is_file():
        return load_space(shipped_arch)
    return _find(ref)


def find_arch(ref: str | Path):
    """An :class:`Arch` from a YAML path, a shipped arch name, a run directory holding
    ``arch.yaml``, or ``reference:<space>``."""
    from ernas.cli.common import resolve_arch

    return resolve_arch(ref)
