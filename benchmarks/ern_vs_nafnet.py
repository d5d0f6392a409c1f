"""Headline benchmark: the searched network against NAFNet of the same geometry.

1. search the space once (``ernas-search`` config, onnxruntime-CPU latency table at 256x256);
2. retrain the derived architecture and the reference NAFNet from scratch with the same budget,
   data and seeds (``--seeds``, ≥ 3);
3. evaluate every model on all held-out bundled photos at σ=25 (seeded test noise), measure
   latency end to end on onnxruntime CPU (fused models, 1x3x256x256), count params and MACs;
4. report mean ± std over seeds and whether the PSNR difference exceeds the seed spread;
5. training throughput with the real input pipeline (random crops + noise from the bundled
   photos) against synthetic tensors, interleaved in one run.

    python benchmarks/ern_vs_nafnet.py --space nafnet_ern_small --seeds 0 1 2 --steps 2000
"""
from __future__ import annotations

import argparse
import json
import statistics as st
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ernas import build_model
from ernas.cli import search as search_cli
from ernas.data import NoisyImageDataset, bundled_images
from ernas.evaluate import ModelEntry, evaluate
from ernas.paths import EXPERIMENTS
from ernas.search.loop import step_batches
from ernas.search.objective import psnr_loss
from ernas.space import find_space, load_arch
from ernas.train import TrainConfig, retrain


def throughput(arch, crop: int, batch: int, steps: int, rounds: int = 3) -> dict:
    """Images/s of AdamW training steps fed by the real pipeline vs by ready-made tensors."""
    torch.manual_seed(0)
    model = build_model(arch).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    real = step_batches(NoisyImageDataset(bundled_images("train"), crop, 25, train=True), batch, 0)
    fixed = real(0)

    def run(source) -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            noisy, clean = source(i)
            loss = psnr_loss(model(noisy), clean)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return steps * batch / (time.perf_counter() - t0)

    res = {"real": [], "synthetic": []}
    for _ in range(rounds):
        res["real"].append(run(real))
        res["synthetic"].append(run(lambda i: fixed))
    t0 = time.perf_counter()
    for i in range(steps):
        real(i)
    loader_only = steps * batch / (time.perf_counter() - t0)
    return {"real_img_s": st.median(res["real"]), "synthetic_img_s": st.median(res["synthetic"]),
            "loader_only_img_s": loader_only}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--space", default="nafnet_ern_small")
    ap.add_argument("--search-steps", type=int, default=600)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=2000, help="retraining steps per model and seed")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ernas_headline_"))
    torch.set_num_threads(2)

    t0 = time.perf_counter()
    with initialize_config_dir(str(EXPERIMENTS), version_base="1.3"):
        cfg = compose("search", [f"space={args.space}", f"search.steps={args.search_steps}",
                                 f"search.warmup_steps={args.search_steps // 4}",
                                 f"search.lam={args.lam}", f"data.crop={args.crop}",
                                 "progress=false"])
        s = search_cli.run(cfg, out / "search")
    search_s = time.perf_counter() - t0
    derived = load_arch(out / "search" / "arch.yaml")
    baseline = find_space(args.space).reference()
    baseline.name = "nafnet"

    psnr = {"derived": [], "nafnet": []}
    ssim = {"derived": [], "nafnet": []}
    lat = {}
    for seed in args.seeds:
        runs = {}
        for name, arch in (("derived", derived), ("nafnet", baseline)):
            tc = TrainConfig(steps=args.steps, batch_size=args.batch, crop=args.crop, seed=seed,
                             val_every=max(50, args.steps // 10), device="cpu")
            runs[name] = out / f"{name}_seed{seed}"
            retrain(arch, runs[name], tc, progress=False)
        ev = evaluate([ModelEntry("derived", derived, str(runs["derived"])),
                       ModelEntry("nafnet", baseline, str(runs["nafnet"]))],
                      out / f"eval_seed{seed}", sigmas=[25],
                      latency_cfg={"backend": {"name": "onnxruntime", "threads": 2}},
                      measure=seed == args.seeds[0], progress=False)
        for row in ev["models"]:
            psnr[row["name"]].append(row["psnr_sigma25"])
            ssim[row["name"]].append(row["ssim_sigma25"])
            if seed == args.seeds[0]:
                lat[row["name"]] = row
    tp = throughput(baseline, args.crop, args.batch, steps=20)

    def ms(xs):
        return f"{st.mean(xs):.2f} ± {st.stdev(xs) if len(xs) > 1 else 0:.2f}"

    d, b = lat["derived"], lat["nafnet"]
    gap = st.mean(psnr["derived"]) - st.mean(psnr["nafnet"])
    spread = max(st.stdev(psnr["derived"]), st.stdev(psnr["nafnet"])) if len(args.seeds) > 1 else 0
    result = {
        "space": args.space, "seeds": args.seeds, "retrain_steps": args.steps,
        "batch": args.batch, "crop": args.crop, "search_steps": args.search_steps,
        "lam": args.lam, "search_seconds": round(search_s, 1),
        "test_images": ev["images"], "latency_backend": ev.get("latency_backend"),
        "search": {k: s.get(k) for k in ("predicted_latency_ms", "baseline_latency_ms",
                                         "decisiveness", "supernet_val_psnr")},
        "derived": {"params": d["params"], "macs": d["macs"], "measured_ms": d["measured_ms"],
                    "predicted_ms": d["predicted_ms"], "psnr": psnr["derived"],
                    "ssim": ssim["derived"]},
        "nafnet": {"params": b["params"], "macs": b["macs"], "measured_ms": b["measured_ms"],
                   "predicted_ms": b["predicted_ms"], "psnr": psnr["nafnet"],
                   "ssim": ssim["nafnet"]},
        "speedup_measured": b["measured_ms"] / d["measured_ms"],
        "param_reduction": 1 - d["params"] / b["params"],
        "psnr_drop_pct": -100 * gap / st.mean(psnr["nafnet"]),
        "psnr_gap_db": gap, "seed_spread_db": spread,
        "difference_exceeds_spread": abs(gap) > spread, "throughput": tp,
    }
    (out / "headline.json").write_text(json.dumps(result, indent=1))
    print(f"{args.space}: search {args.search_steps} steps (λ={args.lam}), retrain {args.steps} "
          f"steps x seeds {args.seeds}, batch {args.batch}, crop {args.crop}; σ=25 on "
          f"{ev['images']} held-out photos; onnxruntime CPU 2 threads, 1x3x256x256")
    print("| model | params | GMACs | measured ms | predicted ms | PSNR (mean ± std) | SSIM |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("derived", d), ("NAFNet", b)):
        k = name.lower() if name == "derived" else "nafnet"
        print(f"| {name} | {r['params']:,} | {r['macs'] / 1e9:.3f} | {r['measured_ms']:.1f} | "
              f"{r['predicted_ms']:.1f} | {ms(psnr[k])} | {ms([x * 100 for x in ssim[k]])}e-2 |")
    print(f"measured speed-up {result['speedup_measured']:.2f}x, params "
          f"{100 * result['param_reduction']:+.1f}% fewer, PSNR {gap:+.2f} dB "
          f"({result['psnr_drop_pct']:.2f}% drop), seed spread {spread:.2f} dB -> difference "
          f"{'exceeds' if result['difference_exceeds_spread'] else 'within'} the spread")
    print(f"training throughput (NAFNet baseline): real pipeline {tp['real_img_s']:.1f} img/s, "
          f"synthetic tensors {tp['synthetic_img_s']:.1f} img/s, loader alone "
          f"{tp['loader_only_img_s']:.0f} img/s")
    print(f"outputs: {out}")


if __name__ == "__main__":
    main()
