"""``ernas-profile``: profile a latency table for a space on a backend, or validate one."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ernas.cli.common import output_dir, user_errors
from ernas.space import find_space
from ernas.io import atomic_write_json
from ernas.latency.backends import MeasureBudget, make_backend
from ernas.latency.ops import build_op
from ernas.latency.profile import profile_keys
from ernas.latency.resolve import default_table_path, resolve_table
from ernas.paths import EXPERIMENTS
from ernas.space import load_arch


@user_errors
def run(cfg: DictConfig, out=None) -> dict:
    space = find_space(cfg.space)
    lat = cfg.latency
    backend = make_backend(lat.backend)
    budget = MeasureBudget.from_mapping(lat.budget)
    shape = [int(s) for s in cfg.input_shape]
    out = out or output_dir()
    if cfg.mode == "validate":
        from ernas.table_validation import validate_table

        table, path = resolve_table(space, shape, backend, lat.granularity,
                                    cfg.output or lat.table, lat.cache_dir, budget, cfg.progress)
        s = validate_table(space, table, backend, out, cfg.validate.n, cfg.validate.seed, budget,
                           path, cfg.validate.store_correction, cfg.progress,
                           cfg.validate.rounds)
        print(f"validated {path} on {s['n']} networks: MAPE {100 * s['mape']:.2f}%, within ±10% "
              f"{100 * s['within_10pct']:.0f}%, Spearman {s['spearman']:.3f} (plain sums: MAPE "
              f"{100 * s['plain_sum']['mape']:.2f}%); wrote {out}/validation.csv, validation.png")
        return s
    if cfg.mode != "profile":
        from ernas.errors import ErnasError

        raise ErnasError(f"field 'mode' is {cfg.mode!r}; use mode=profile or mode=validate.")
    unit = load_arch(cfg.arch) if cfg.arch else space
    keys = unit.op_keys(shape, lat.granularity)
    keys = list(dict.fromkeys(keys))
    path = Path(cfg.output) if cfg.output else default_table_path(
        space, backend, shape, lat.granularity, Path(lat.cache_dir) if lat.cache_dir else None)
    table = profile_keys(keys, build_op, backend, path,
                         {"space": space.name, "input_shape": shape,
                          "granularity": lat.granularity}, budget, progress=cfg.progress)
    summary = {"table": str(path), "keys": len(keys), "rows": len(table),
               "total_ms_of_medians": float(table.lookup(keys).sum()),
               "device": table.metadata.get("device"), "backend": backend.name}
    atomic_write_json(out / "summary.json", summary)
    print(f"latency table with {len(table)} keys for {space.name} at {shape} on {backend.name} "
          f"({table.metadata.get('device')}): {path}")
    return summary


@hydra.main(config_path=str(EXPERIMENTS), config_name="profile", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
