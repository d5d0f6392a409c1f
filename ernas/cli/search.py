"""``ernas-search``: hardware-aware differentiable search on a space, with a latency table."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ernas import distributed as D
from ernas.cli.common import output_dir, user_errors
from ernas.space import find_space
from ernas.data import NoisyImageDataset, bundled_images, clean_folder
from ernas.errors import ErnasError
from ernas.latency.backends import MeasureBudget, make_backend
from ernas.latency.predict import ExpectedLatency
from ernas.latency.resolve import profile_command, resolve_table
from ernas.paths import EXPERIMENTS
from ernas.search import SearchConfig, run_search, step_batches


def search_data(d: DictConfig, seed: int):
    """Training and held-out (α) datasets of random noisy crops."""
    if d.source == "bundled":
        train = bundled_images("train", d.color, d.max_side)
        val = bundled_images("val", d.color, d.max_side)
    elif d.source == "folder":
        if not d.train_folder or not d.val_folder:
            raise ErnasError("data.source=folder needs data.train_folder and data.val_folder "
                             "(folders of clean images; noise is added on the fly).")
        train = clean_folder(d.train_folder, d.color, min_size=d.crop)
        val = clean_folder(d.val_folder, d.color, min_size=d.crop)
    else:
        raise ErnasError(f"field 'data.source' is {d.source!r}; use bundled or folder.")
    sigma = OmegaConf.to_container(d.sigma) if OmegaConf.is_config(d.sigma) else d.sigma
    return (NoisyImageDataset(train, d.crop, sigma, train=True, seed=seed),
            NoisyImageDataset(val, d.crop, sigma, train=True, seed=seed + 1))


@user_errors
def run(cfg: DictConfig, out: Path | None = None) -> dict:
    """Search; under ``torchrun`` each rank draws its own batches, weight and α gradients are
    averaged over ranks (so α, and the derived arch, are identical) and rank 0 writes files."""
    info = D.setup(cfg.search.device)
    try:
        return _run(cfg, info, out)
    finally:
        D.cleanup()


def prepare(cfg: DictConfig, rank: int = 0) -> dict:
    """Everything ``run_search`` needs from a search config: the space, the latency table and
    its differentiable expectation, the search config, and per-step batch functions (keyed by
    seed and rank)."""
    space = find_space(cfg.space)
    if space.is_arch:
        raise ErnasError(f"space {space.source} has nothing to search (every decision has one "
                         f"value); give a search space such as nafnet_tiny.")
    lat = cfg.latency
    shape = [int(s) for s in cfg.input_shape]
    backend = make_backend(lat.backend)
    table, table_path = resolve_table(space, shape, backend, lat.granularity, lat.table,
                                      lat.cache_dir, MeasureBudget.from_mapping(lat.budget),
                                      cfg.progress)
    expected = ExpectedLatency(space, table, shape, lat.granularity,
                               profile_command(space, shape, backend, lat.granularity))
    data_seed = cfg.seed + 1000 * rank
    train, val = search_data(cfg.data, data_seed)
    scfg = SearchConfig.from_dict(OmegaConf.to_container(cfg.search, resolve=True))
    return dict(space=space, shape=shape, table=table, table_path=table_path,
                expected=expected, scfg=scfg,
                train_batch=step_batches(train, scfg.batch_size, data_seed),
                val_batch=step_batches(val, scfg.batch_size, data_seed + 1))


def _run(cfg: DictConfig, info, out: Path | None) -> dict:
    p = prepare(cfg, info.rank)
    space, shape, table, scfg = p["space"], p["shape"], p["table"], p["scfg"]
    out = Path(cfg.resume) if cfg.resume else (out or output_dir())
    if cfg.resume and not (out / "checkpoint.pt").is_file():
        raise ErnasError(f"resume={cfg.resume}: no checkpoint.pt there; give the directory of "
                         f"an earlier ernas-search run.")
    if info.enabled:
        scfg.device = info.device
    s = run_search(space, p["expected"], p["train_batch"], p["val_batch"], scfg, out,
                   resume=bool(cfg.resume), progress=cfg.progress, input_shape=shape)
    s["latency_table"] = str(p["table_path"])
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
    print(f"predicted latency {s['predicted_latency_ms']:.2f} ms"
          + (f" vs baseline {base:.2f} ms ({base / s['predicted_latency_ms']:.2f}x faster)"
             if base else "")
          + f"; params {s['params']:,} vs {s['baseline_params']:,}; decisiveness "
            f"{s['decisiveness']:.3f}; supernet val PSNR {s['supernet_val_psnr']:.2f} dB "
            f"({table.metadata.get('backend')}, {table.metadata.get('device')}, input {shape})")
    return s


@hydra.main(config_path=str(EXPERIMENTS), config_name="search", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
