"""``ernas-evaluate``: quality, size and latency of a model beside a baseline (``results.csv``,
``per_image.csv``, ``report.md``, ``summary.json``), or with ``runs=[...]`` the latency–PSNR
Pareto plot of several runs (``pareto.png``, ``pareto.csv``)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from ernas.cli.common import arch_for, output_dir, resolve_arch, user_errors
from ernas.io import atomic_write_json
from ernas.paths import EXPERIMENTS


@user_errors
def run(cfg: DictConfig, out=None) -> dict:
    from ernas.evaluate import ModelEntry, evaluate, pareto

    if cfg.threads:
        import torch
        torch.set_num_threads(int(cfg.threads))
    out = out or output_dir()
    if cfg.runs:
        df = pareto([str(r) for r in cfg.runs], out / "pareto.png", cfg.pareto_table)
        summary = {"runs": df.to_dict(orient="records"),
                   "front": df.loc[df["on_front"], "name"].tolist(),
                   "plot": str(out / "pareto.png"), "csv": str(out / "pareto.csv")}
        atomic_write_json(out / "summary.json", summary)
        print(f"Pareto front of {len(df)} runs: {', '.join(summary['front'])}; wrote "
              f"{out / 'pareto.png'} and pareto.csv")
        return summary
    arch = arch_for(cfg.arch, cfg.checkpoint)
    entries = [ModelEntry(cfg.name or arch.name, arch,
                          str(cfg.checkpoint) if cfg.checkpoint else None)]
    b = cfg.baseline
    if b.enabled:
        if b.arch:
            b_arch = resolve_arch(b.arch)
        else:
            b_arch = arch.as_space().reference()
            b_arch.name = "reference"
        same = (b_arch.geometry, b_arch.values, b.checkpoint) == (arch.geometry, arch.values,
                                                                   cfg.checkpoint)
        if not same:  # comparing a model with itself adds nothing
            entries.append(ModelEntry(b.name or b_arch.name, b_arch,
                                      str(b.checkpoint) if b.checkpoint else None))
    latency = OmegaConf.to_container(cfg.latency, resolve=True) if cfg.get("latency") else None
    summary = evaluate(entries, out, [s for s in cfg.sigmas], cfg.data, cfg.clean_dir,
                       cfg.noisy_dir, cfg.seed, cfg.color, cfg.max_side, cfg.crop, latency,
                       tuple(cfg.input_shape), cfg.predict_latency, cfg.measure_latency,
                       cfg.device, cfg.progress)
    lat = summary["latency_ms"]
    print(f"{summary['name']}: PSNR {summary['psnr']:.2f} dB / SSIM {summary['ssim']:.4f} at "
          f"sigma={summary['psnr_sigma']}, latency "
          f"{'n/a' if lat is None else f'{lat:.2f} ms'}; wrote {out}/report.md, results.csv")
    return summary


@hydra.main(config_path=str(EXPERIMENTS), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
