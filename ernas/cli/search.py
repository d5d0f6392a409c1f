"""``ernas-search``: hardware-aware differentiable search on a space, with a latency table."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ernas import distributed as D
from ernas.batches import step_batches
from ernas.cli.common import (claim_run_dir, hydra_main, log_start, output_dir,
                              record_run_config, resumed_config, task_of, user_errors)
from ernas.cli.schema import Search
from ernas.config import validated
from ernas.errors import ErnasError
from ernas.latency.factory import make_backend
from ernas.latency.predict import ExpectedLatency
from ernas.latency.resolve import profile_command, resolve_from_config, table_choice
from ernas.latency.table import LatencyTable
from ernas.search import SearchConfig, run_search
from ernas.search.config import RESUME_FREE as SEARCH_RESUME_FREE
from ernas.space import find_space
from ernas.space_checks import single_geometry_message


# settings of the command line, not of the run: a resumed run always takes this invocation's
INVOCATION = ("resume", "progress")
# run settings that may differ when a run is resumed (they do not change what is computed); not
# given on the command line, each keeps the run's value. The search's own are the library's list.
RESUME_FREE = ("threads", "latency.cache_dir", "latency.probe_cache_s",
               *(f"search.{k}" for k in sorted(SEARCH_RESUME_FREE)))
# the table a run started with, copied into its directory: a resumed run continues with it, so a
# probe that fails on a busy machine (and re-profiles) cannot change the objective mid-run
RUN_TABLE = "latency_table.csv"
log = logging.getLogger(__name__)


@user_errors
def run(cfg: DictConfig, out: Path | None = None) -> dict:
    """Search; under ``torchrun`` each rank draws its own batches, weight and α gradients are
    averaged over ranks (so α, and the derived arch, are identical) and rank 0 writes files."""
    if cfg.resume:
        cfg = resumed_config(cfg, "search", RESUME_FREE, "search.checkpoint_every", INVOCATION)
    params = validated(cfg, Search, "search config")
    SearchConfig.from_dict(OmegaConf.to_container(cfg.search, resolve=True))  # ranges, up front
    if params.threads:
        import torch

        torch.set_num_threads(params.threads)
    info = D.setup(cfg.search.device)
    try:
        return _run(cfg, info, out)
    finally:
        D.cleanup()


def run_table(run_dir: Path) -> tuple[LatencyTable, str] | None:
    """The latency table a search in ``run_dir`` started with (``RUN_TABLE``, written by
    ``keep_run_table``) and the path it was resolved from; None when the run has no copy."""
    path = Path(run_dir) / RUN_TABLE
    if not path.is_file():
        return None
    t = LatencyTable.load(path)
    origin = t.metadata.pop("search_run", {})
    t.probe = {**origin.get("probe", {}), "action": "resumed", "copy": str(path)}
    return t, origin.get("source", str(path))


def keep_run_table(table: LatencyTable, source: Path, run_dir: Path) -> None:
    """Copy the resolved ``table`` (with its probe record and source path) into ``run_dir``."""
    copy = LatencyTable(table.to_frame(), {**table.metadata, "search_run": {
        "source": str(source), "probe": table.probe}})
    copy.save(Path(run_dir) / RUN_TABLE)


def prepare(cfg: DictConfig, rank: int = 0, out: Path | None = None, device: str | None = None
            ) -> dict:
    """Everything ``run_search`` needs from a search config: the space, the task, the latency
    table and its differentiable expectation, the search config, and per-step batch functions
    (keyed by seed and rank). A resumed run uses the table copied into its directory. With
    ``out`` (the run folder), rank 0 logs the start line once the inputs are checked, before the
    table is resolved (which may profile for minutes)."""
    space = find_space(cfg.space)
    task = task_of(cfg)
    task.check_arch(space.reference())
    if space.is_arch:
        raise ErnasError(f"space {space.source} has nothing to search (every decision has one "
                         f"value); give a search space such as nafnet_tiny.")
    if space.geometries:
        raise ErnasError(single_geometry_message(space, "search", "space"))
    data_seed = cfg.seed + 1000 * rank
    scfg = SearchConfig.from_dict(OmegaConf.to_container(cfg.search, resolve=True))
    # the data first: a data error refuses the run before any latency is timed
    train = task.dataset("train", scfg.crop, data_seed, random=True)
    val = task.dataset("val", scfg.crop, data_seed + 1, random=True)
    lat = cfg.latency
    shape = [int(s) for s in cfg.input_shape]
    backend = make_backend(lat.backend)
    if out is not None and D.is_main():
        log_start("search", out, device, backend, space=space.name, input_shape=shape,
                  steps=scfg.steps, resuming=cfg.resume or None,
                  ranks=D.world_size() if D.is_dist() else None)
    # rank 0 alone resolves (a probe, perhaps a profile) and the others receive its table, so
    # every rank optimises one objective and no two processes profile one cache file at once
    resolved = None
    if D.is_main():
        kept = run_table(Path(cfg.resume)) if cfg.resume else None
        if kept:
            log.info("resuming with the latency table the run started with (%s, resolved from "
                     "%s)", RUN_TABLE, kept[1])
            log.info("latency table %s: %s", kept[1], table_choice(*kept))
        resolved = kept or resolve_from_config(space, shape, lat, cfg.progress)
        resolved = (resolved[0].to_frame(), resolved[0].metadata, resolved[0].probe,
                    str(resolved[1]))
    frame, meta, probe, table_path = D.broadcast_object(resolved)
    table = LatencyTable(frame, meta, table_path)
    table.probe = probe
    expected = ExpectedLatency(space, table, shape, lat.granularity,
                               profile_command(space, shape, backend, lat.granularity))
    return dict(space=space, task=task, shape=shape, table=table, table_path=table_path,
                expected=expected, scfg=scfg,
                train_batch=step_batches(train, scfg.batch_size, data_seed),
                val_batch=step_batches(val, scfg.batch_size, data_seed + 1))


def _run(cfg: DictConfig, info, out: Path | None) -> dict:
    # the run directory is claimed first (a busy or used one is refused before any profiling)
    # and its config recorded once every check of prepare() passed
    main = info.rank == 0
    if cfg.resume:
        out = claim_run_dir(cfg.resume, resume=True, main=main)
    else:
        out = claim_run_dir(out, main=main, record=False) if out else \
            output_dir(main=main, record=False)
    p = prepare(cfg, info.rank, out, info.device)
    space, shape, table, scfg = p["space"], p["shape"], p["table"], p["scfg"]
    if main and not cfg.resume:
        record_run_config(out)
    if info.enabled:
        scfg.device = info.device
    if main and not cfg.resume:
        keep_run_table(table, p["table_path"], out)
    s = run_search(space, p["expected"], p["train_batch"], p["val_batch"], scfg, out, p["task"],
                   resume=bool(cfg.resume), progress=cfg.progress, input_shape=shape)
    s["latency_table"] = str(p["table_path"])
    s["table_probe"] = table.probe
    if info.enabled:
        print(f"rank {info.rank}/{info.world_size}: derived architecture {s['arch_digest']}",
              flush=True)
    if not D.is_main():
        return s
    from ernas.io import atomic_write_json

    atomic_write_json(out / "summary.json", s)
    base = s.get("baseline_latency_ms")
    print(f"derived architecture: {out / 'arch.yaml'}")
    print(Path(out / "arch.yaml").read_text().rstrip())
    r = base / s["predicted_latency_ms"] if base else None
    anchored = bool((table.metadata.get("correction") or {}).get("anchored"))
    print(f"predicted latency {s['predicted_latency_ms']:.2f} ms"
          + (f" vs baseline {base:.2f} ms ({max(r, 1 / r):.2f}x "
             f"{'faster' if r >= 1 else 'slower'})" if base else "")
          + f"; params {s['params']:,} vs {s['baseline_params']:,}; decisiveness "
            f"{s['decisiveness']:.3f}; supernet val {s['metric']} "
            f"{s['supernet_val_' + s['metric']]:.3f} "
            f"(table: {table.metadata.get('backend')}, {table.metadata.get('device')}"
            f"{', anchored on this host' if anchored else ''}, input {shape})")
    if scfg.derive == "budget":
        print(f"derive=budget: the argmax was predicted at {s['argmax_predicted_ms']:.2f} ms, "
              f"the derived network at {s['predicted_latency_ms']:.2f} ms (T = "
              f"{s['target_ms']:.2f} ms); changed: {'; '.join(s['derive_changes']) or 'nothing'}")
    if scfg.lam > 0 and scfg.latency_form == "hinge" and s["latency_active_fraction"] == 0:
        print(f"note: the hinge target {s['target_ms']:.2f} ms never bound: the expected latency "
              f"stayed below it (at most {s['max_expected_ms']:.2f} ms in the α steps), so the "
              f"latency term never acted and this is the architecture of a λ=0 search; set "
              f"search.target_ms below {s['max_expected_ms']:.2f} ms to trade quality for "
              f"latency.")
    return s


main = hydra_main("search", run, objective=lambda s: s[f"supernet_val_{s['metric']}"])


if __name__ == "__main__":
    main()
