"""``ernas-export``: ONNX export (BatchNorm folded, parity against PyTorch on a real input),
int8 static quantisation (``int8=true``) and QAT (``qat.steps > 0``), each file judged on the
task's test images and timed, all in one ``summary.json``. ``format=executorch``: fp32 and int8
(PT2E, XNNPACK quantizer) ``.pte`` files instead (``ernas.export.executorch``), timed with the
ExecuTorch backend. ``format=tflite``: fp32 and int8 (PT2E) ``.tflite`` files for LiteRT
(``ernas.export.tflite``), timed with the LiteRT backend."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ernas.cli.common import (arch_for, claim_run_dir, hydra_main, log_start, output_dir,
                              task_of, user_errors)
from ernas.cli.schema import LatencyGroup
from ernas.config import validated

FORMATS = ("onnx", "executorch", "tflite")


@user_errors
def run(cfg: DictConfig, out=None) -> dict:
    import torch

    from ernas.checkpoint import load_model, resolve_checkpoint
    from ernas.export import export_all
    from ernas.io import atomic_write_json
    from ernas.latency.factory import make_backend

    validated({"latency": cfg.latency}, LatencyGroup, "export config")
    _check_format(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    arch = arch_for(cfg.arch, cfg.checkpoint)
    task = task_of(cfg)
    task.check_arch(arch)
    model = load_model(arch, resolve_checkpoint(cfg.checkpoint) if cfg.checkpoint else None)
    out = claim_run_dir(out) if out else output_dir()
    b = cfg.latency.backend
    log_start("export", out, "cpu", arch=arch.name, format=cfg.get("format", "onnx"),
              timed_on=f"{b.name}" + (f" ({b.threads} threads)" if b.get("threads") else ""),
              int8=bool(cfg.int8), qat_steps=cfg.qat.steps or None)
    plain = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("format", "onnx") == "executorch":
        summary = _export_executorch(cfg, plain, arch, model, task, out)
    elif cfg.get("format", "onnx") == "tflite":
        summary = _export_tflite(cfg, plain, arch, model, task, out)
    else:
        summary = export_all(arch, model, task, out, make_backend(plain["latency"]["backend"]),
                             plain["latency"]["measure"], cfg.opset, cfg.dynamic_hw,
                             [int(s) for s in cfg.input_shape], bool(cfg.int8),
                             plain["calibration"], plain["qat"], int(cfg.seed),
                             bool(cfg.progress), memory_runs=int(cfg.memory_runs))
    summary["checkpoint"] = str(cfg.checkpoint) if cfg.checkpoint else None
    arch.save(out / "arch.yaml")
    atomic_write_json(out / "summary.json", summary)
    print(_line(summary))
    return summary


def _check_format(cfg: DictConfig) -> None:
    """Refuse, before anything is written, a format this install or config cannot serve."""
    from ernas.errors import ErnasError
    from ernas.extras import EXECUTORCH, LITERT

    fmt, backend = cfg.get("format", "onnx"), cfg.latency.backend.get("name")
    if not isinstance(cfg.memory_runs, int) or cfg.memory_runs < 0:
        raise ErnasError(f"memory_runs={cfg.memory_runs!r} must be an integer >= 0 (fresh "
                         f"processes measuring each exported file's peak memory; 0: not "
                         f"measured).")
    if fmt not in FORMATS:
        raise ErnasError(f"format={fmt!r} is not an export format; use one of "
                         f"{', '.join(FORMATS)}.")
    if fmt == "executorch":
        EXECUTORCH.require("format=executorch", "use format=onnx")
        if cfg.dynamic_hw:
            raise ErnasError("dynamic_hw=true is not available with format=executorch (the .pte "
                             "is lowered at input_shape); set dynamic_hw=false and input_shape "
                             "to the deployed size, or use format=onnx.")
    elif fmt == "tflite":
        LITERT.require("format=tflite", "use format=onnx")
        given = [f for f, on in (("qat.steps > 0", cfg.qat.steps > 0),
                                 ("dynamic_hw=true", cfg.dynamic_hw)) if on]
        if given:
            raise ErnasError(f"{', '.join(given)}: not available with format=tflite, which writes "
                             f"an fp32 and (int8=true) an int8 .tflite at input_shape, without "
                             f"QAT; set qat.steps=0 and dynamic_hw=false, or use format=onnx.")
    elif backend == "executorch_xnnpack":
        raise ErnasError("format=onnx times ONNX files, which latency=executorch_xnnpack cannot "
                         "run; use format=executorch to export and time .pte files, or a latency "
                         "backend that runs ONNX (latency=onnxruntime_cpu).")
    elif backend == "litert":
        raise ErnasError("format=onnx times ONNX files, which latency=litert cannot run; use "
                         "format=tflite to export and time a .tflite file, or a latency backend "
                         "that runs ONNX (latency=onnxruntime_cpu).")


def _export_executorch(cfg, plain: dict, arch, model, task, out) -> dict:
    """format=executorch: timed on the ExecuTorch backend, the latency group's when it is
    executorch_xnnpack, else one with the latency group's thread count."""
    from ernas.export.executorch import export_executorch_all
    from ernas.latency.executorch import ExecutorchBackend
    from ernas.latency.factory import make_backend

    b = plain["latency"]["backend"]
    backend = make_backend(b) if b["name"] == "executorch_xnnpack" else \
        ExecutorchBackend(threads=b.get("threads") or 2)
    return export_executorch_all(arch, model, task, out, backend, plain["latency"]["measure"],
                                 [int(s) for s in cfg.input_shape], bool(cfg.int8),
                                 plain["calibration"], int(cfg.seed),
                                 memory_runs=int(cfg.memory_runs), qat=plain["qat"],
                                 progress=bool(cfg.progress))


def _export_tflite(cfg, plain: dict, arch, model, task, out) -> dict:
    """format=tflite: timed on the LiteRT backend, the latency group's when it is litert, else
    one with the latency group's thread count."""
    from ernas.export.tflite import export_tflite_all
    from ernas.latency.factory import make_backend
    from ernas.latency.litert import LitertBackend

    b = plain["latency"]["backend"]
    backend = make_backend(b) if b["name"] == "litert" else \
        LitertBackend(threads=int(b.get("threads") or 2))
    return export_tflite_all(arch, model, task, out, backend, plain["latency"]["measure"],
                             [int(s) for s in cfg.input_shape], int(cfg.seed), bool(cfg.int8),
                             plain["calibration"])


def _line(s: dict) -> str:
    m = s["metric"]
    if s.get("format") == "executorch":
        return _pte_line(s)
    if s.get("format") == "tflite":
        return _quantized_parts(
            f"exported {s['arch']} to {s['tflite']}: max |litert - torch| = "
            f"{s['max_abs_diff']:.2e}; fp32 {m} {s[f'{m}_fp32']:.3f}, {s['fp32_ms']:.2f} ms", s)
    line = (f"exported {s['arch']} to {s['onnx']}: max |onnxruntime - torch| = "
            f"{s['max_abs_diff']:.2e}; fp32 {m} {s[f'{m}_fp32']:.3f}, {s['fp32_ms']:.2f} ms")
    return _quantized_parts(line, s)


def _quantized_parts(line: str, s: dict) -> str:
    """``line`` with the int8 and QAT files' quality, latency and paired speed-up appended."""
    m = s["metric"]
    for kind in ("int8", "qat"):
        if f"{kind}_ms" in s:
            r = s[f"{kind}_speedup"]  # paired per round, so it can differ from the ms ratio
            pace = (f"{max(r, 1 / r):.2f}x {'faster' if r >= 1 else 'slower'} than fp32, "
                    f"median of per-round ratios")
            line += (f"; {kind} {m} {s[f'{m}_{kind}']:.3f} ({s[f'{m}_delta_{kind}']:+.3f}), "
                     f"{s[f'{kind}_ms']:.2f} ms ({pace})")
    return line


def _pte_line(s: dict) -> str:
    m = s["metric"]
    line = (f"exported {s['arch']} to {s['pte']}: max |executorch - torch| = "
            f"{s['max_abs_diff']:.2e}; fp32 {m} {s[f'{m}_fp32']:.3f}, {s['fp32_ms']:.2f} ms")
    return _quantized_parts(line, s) + "".join(
        f"\n  {kind}: {d['delegated']} nodes delegated to XNNPACK; portable: "
        f"{', '.join(f'{k} x{v}' for k, v in d['portable'].items()) or 'none'}"
        for kind in ("fp32", "int8", "qat") if (d := s.get(f"delegation_{kind}")))


main = hydra_main("export", run)


if __name__ == "__main__":
    main()
