"""``ernas-demo``: search → retrain (derived and baseline) → evaluate → export, then the table."""
from __future__ import annotations

import json

import hydra
from hydra import compose
from omegaconf import DictConfig

from ernas.cli import evaluate, export, retrain, search
from ernas.cli.common import output_dir, user_errors
from ernas.io import atomic_write_json
from ernas.paths import EXPERIMENTS


def _stage(name: str, overrides: list[str]) -> DictConfig:
    return compose(config_name=name, overrides=[str(o) for o in overrides])


def _table(ev: dict, ex: dict) -> str:
    rows = ev["models"]
    sig = [k.removeprefix("psnr_sigma") for k in rows[0] if k.startswith("psnr_sigma")]
    head = ["model", "params", "GMACs", "pred. ms", "meas. ms"] + [f"PSNR σ{s}" for s in sig] \
        + [f"SSIM σ{s}" for s in sig]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['params']:,}", f"{r['macs'] / 1e9:.3f}",
                 f"{r['predicted_ms']:.2f}", f"{r['measured_ms']:.2f}"]
        cells += [f"{r[f'psnr_sigma{s}']:.2f}" for s in sig]
        cells += [f"{r[f'ssim_sigma{s}']:.4f}" for s in sig]
        lines.append("| " + " | ".join(cells) + " |")
    d, b = rows[0], rows[-1]
    lines.append(f"\nderived vs baseline: {b['measured_ms'] / d['measured_ms']:.2f}x lower measured "
                 f"latency, parameters {100 * (d['params'] / b['params'] - 1):+.1f}%, PSNR "
                 f"σ25 {d['psnr_sigma25'] - b['psnr_sigma25']:+.2f} dB")
    lines.append(f"export: max |onnxruntime − torch| {ex['max_abs_diff']:.2e}"
                 + (f"; int8 PSNR {ex['psnr_int8']:.2f} dB ({ex['psnr_delta']:+.2f} vs fp32), "
                    f"{ex['int8_ms']:.2f} ms vs {ex['fp32_ms']:.2f} ms fp32" if "psnr_int8" in ex
                    else ""))
    return "\n".join(lines)


@user_errors
def run(cfg: DictConfig) -> dict:
    out = output_dir()
    st = cfg.stages
    s_cfg = _stage("search", [f"search.steps={cfg.search_steps}", f"seed={cfg.seed}", *st.search])
    s = search.run(s_cfg, out / "search")
    common = [f"steps={cfg.retrain_steps}", f"seed={cfg.seed}", "init=scratch", *st.retrain]
    retrain.run(_stage("retrain", [f"arch={out / 'search'}", *common]), out / "retrain_derived")
    retrain.run(_stage("retrain", [f"arch={s_cfg.space}", *common]), out / "retrain_baseline")
    ev = evaluate.run(_stage("evaluate", [
        f"checkpoint={out / 'retrain_derived'}", "name=derived", f"baseline.arch={s_cfg.space}",
        f"baseline.checkpoint={out / 'retrain_baseline'}", "baseline.name=NAFNet-baseline",
        *st.evaluate]), out / "evaluate")
    ex = export.run(_stage("export", [f"checkpoint={out / 'retrain_derived'}", *st.export]),
                    out / "export")
    table = _table(ev, ex)
    print("\n" + table)
    summary = {"search": {k: s[k] for k in ("predicted_latency_ms", "baseline_latency_ms",
                                             "decisiveness", "supernet_val_psnr")},
               "models": ev["models"], "export": {k: ex.get(k) for k in (
                   "onnx", "max_abs_diff", "psnr_fp32", "psnr_int8", "fp32_ms", "int8_ms")},
               "table": table}
    atomic_write_json(out / "summary.json", summary)
    (out / "report.md").write_text("# ernas demo\n\n" + table + "\n")
    print(f"\nall outputs in {out} (summary.json, report.md, one folder per stage)")
    return json.loads(json.dumps(summary, default=str))


@hydra.main(config_path=str(EXPERIMENTS), config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
