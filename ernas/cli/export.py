"""``ernas-export``: ONNX export (BatchNorm folded, parity against PyTorch on a real image),
int8 static quantisation (``int8=true``) and QAT (``qat.steps > 0``), all in one
``summary.json``."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from ernas.cli.common import arch_for, output_dir, user_errors
from ernas.paths import EXPERIMENTS


@user_errors
def run(cfg: DictConfig, out=None) -> dict:
    import torch

    from ernas.data import bundled_images
    from ernas.export import (export_model, export_qat, qat_finetune, quantize_int8,
                              strip_fake_quant, write_summary)
    from ernas.latency.onnx_export import export_onnx
    from ernas.latency.backends import MeasureBudget
    from ernas.train import load_model, resolve_checkpoint

    torch.set_num_threads(int(cfg.threads))
    out = out or output_dir()
    arch = arch_for(cfg.arch, cfg.checkpoint)
    model = load_model(arch, resolve_checkpoint(cfg.checkpoint) if cfg.checkpoint else None)
    shape = [int(s) for s in cfg.input_shape]
    budget = MeasureBudget.from_mapping(OmegaConf.to_container(cfg.budget, resolve=True))
    summary = {"arch": arch.name, "checkpoint": str(cfg.checkpoint) if cfg.checkpoint else None,
               **export_model(arch, cfg.checkpoint, out, cfg.opset, cfg.dynamic_hw, shape,
                              model=model, threads=cfg.threads)}
    arch.save(out / "arch.yaml")
    color = shape[1] == 3
    if cfg.int8:
        c = cfg.calibration
        summary.update(quantize_int8(summary["onnx"], bundled_images("train", color),
                                     out / "model_int8.onnx", c.crops, c.sigma, cfg.seed,
                                     c.per_channel, c.method, cfg.threads, budget,
                                     eval_hw=shape[2:]))
    if cfg.qat.steps > 0:
        q = cfg.qat
        qmodel = qat_finetune(model, q.steps, q.batch_size, q.crop, q.sigma, q.lr, cfg.seed,
                              q.calibration_batches, cfg.progress)
        summary.update(qat_steps=q.steps, **export_qat(qmodel, out / "model_qat.onnx",
                                                      [1, *shape[1:]], cfg.opset, cfg.threads,
                                                      budget))
        if cfg.int8:  # the QAT weights through the same static int8 path as PTQ
            c = cfg.calibration
            fp = export_onnx(strip_fake_quant(qmodel), torch.zeros(1, *shape[1:]),
                             out / "model_qat_fp32.onnx", opset=cfg.opset)
            r = quantize_int8(fp, bundled_images("train", color), out / "model_qat_int8.onnx",
                              c.crops, c.sigma, cfg.seed, c.per_channel, c.method, cfg.threads,
                              budget, eval_hw=shape[2:])
            summary.update(qat_int8_onnx=r["int8_onnx"], psnr_qat_int8=r["psnr_int8"],
                           qat_int8_ms=r["int8_ms"])
            summary["qat_psnr_delta"] = summary["psnr_qat"] - summary["psnr_fp32"]
    write_summary(out, summary)
    line = f"exported {arch.name} to {summary['onnx']}: max |onnxruntime - torch| = " \
           f"{summary['max_abs_diff']:.2e}"
    if "psnr_int8" in summary:
        line += (f"; int8 PSNR {summary['psnr_int8']:.2f} dB ({summary['psnr_delta']:+.2f} vs "
                 f"fp32), {summary['int8_ms']:.2f} ms vs {summary['fp32_ms']:.2f} ms fp32")
    if "psnr_qat" in summary:
        line += f"; QAT (QDQ) PSNR {summary['psnr_qat']:.2f} dB"
    if "psnr_qat_int8" in summary:
        line += f", QAT weights + static int8 {summary['psnr_qat_int8']:.2f} dB"
    print(line)
    return summary


@hydra.main(config_path=str(EXPERIMENTS), config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
