"""``ernas-export``: ONNX export (BatchNorm folded, parity against PyTorch on a real input),
int8 static quantisation (``int8=true``) and QAT (``qat.steps > 0``), each file judged on the
task's test images and timed, all in one ``summary.json``."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ernas.cli.common import arch_for, claim_run_dir, hydra_main, output_dir, task_of, user_errors
from ernas.cli.schema import LatencyGroup
from ernas.config import validated


@user_errors
def run(cfg: DictConfig, out=None) -> dict:
    import torch

    from ernas.checkpoint import load_model, resolve_checkpoint
    from ernas.export import export_all
    from ernas.io import atomic_write_json
    from ernas.latency.factory import make_backend

    validated({"latency": cfg.latency}, LatencyGroup, "export config")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    arch = arch_for(cfg.arch, cfg.checkpoint)
    task = task_of(cfg)
    task.check_arch(arch)
    model = load_model(arch, resolve_checkpoint(cfg.checkpoint) if cfg.checkpoint else None)
    out = claim_run_dir(out) if out else output_dir()
    plain = OmegaConf.to_container(cfg, resolve=True)
    summary = export_all(arch, model, task, out, make_backend(plain["latency"]["backend"]),
                         plain["latency"]["measure"], cfg.opset, cfg.dynamic_hw,
                         [int(s) for s in cfg.input_shape], bool(cfg.int8),
                         plain["calibration"], plain["qat"], int(cfg.seed), bool(cfg.progress))
    summary["checkpoint"] = str(cfg.checkpoint) if cfg.checkpoint else None
    arch.save(out / "arch.yaml")
    atomic_write_json(out / "summary.json", summary)
    print(_line(summary))
    return summary


def _line(s: dict) -> str:
    m = s["metric"]
    line = (f"exported {s['arch']} to {s['onnx']}: max |onnxruntime - torch| = "
            f"{s['max_abs_diff']:.2e}; fp32 {m} {s[f'{m}_fp32']:.3f}, {s['fp32_ms']:.2f} ms")
    for kind in ("int8", "qat"):
        if f"{kind}_ms" in s:
            r = s[f"{kind}_speedup"]  # paired per round, so it can differ from the ms ratio
            pace = (f"{max(r, 1 / r):.2f}x {'faster' if r >= 1 else 'slower'} than fp32, "
                    f"median of per-round ratios")
            line += (f"; {kind} {m} {s[f'{m}_{kind}']:.3f} ({s[f'{m}_delta_{kind}']:+.3f}), "
                     f"{s[f'{kind}_ms']:.2f} ms ({pace})")
    return line


main = hydra_main("export", run)


if __name__ == "__main__":
    main()
