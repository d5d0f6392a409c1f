"""Benchmark: the entropy regulariser on and off, the same search otherwise (same seed).

The search is the ``ernas-search`` default (``experiments/search.yaml`` composed with Hydra: the
nafnet_tiny space, bundled images, the onnxruntime CPU latency table found by ``resolve_table``,
the same data pipeline and batches), run in-process with ``run_search`` twice per seed:
``search.entropy_max=<on>`` and ``search.entropy_max=0``. For each run it reports

  decisiveness        mean over decisions of max_c softmax(α)_c at the end (goal ≥ 0.95 with H);
  supernet PSNR       the supernet in eval mode (probabilities softmax(α)) on validation batches;
  derived PSNR        ``SuperNet.extract(derive())`` (the discrete network with inherited
                      weights, before any retraining) in eval mode on the same batches; it is
                      re-built from the run's ``arch.yaml`` + ``inherited.pt``;
  gap                 supernet PSNR − derived PSNR (the discretisation gap);
  one-hot check       the supernet forced one-hot on the derived arch (``set_onehot``), which must
                      equal the derived PSNR (extract's contract).

Validation batches are the search's own α batches (``step_batches(val, batch, seed+1)``, steps
0..N-1); with N = the loop's ``eval_batches`` the supernet PSNR equals ``summary.json``'s
``supernet_val_psnr``; ``--eval-batches`` (default 25) uses more for a steadier figure. PSNR is
``ernas.metrics.psnr`` per image (data range 1, prediction clipped), averaged over the images.

    python benchmarks/entropy_ablation.py                       # 1000 steps, seeds 0
    python benchmarks/entropy_ablation.py --steps 600 --seeds 0,1,2 -o search.lam=1
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ernas.cli.search import prepare
from ernas.latency.backends import machine_description



def compose(overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from ernas.paths import EXPERIMENTS

    with initialize_config_dir(config_dir=str(EXPERIMENTS), version_base="1.3"):
        return hcompose(config_name="search", overrides=list(overrides))


@torch.no_grad()
def mean_psnr(model, val_batch, n, identity=False):
    from ernas.metrics import psnr

    if model is not None:
        model.eval()
    vals = []
    for i in range(n):
        noisy, clean = val_batch(i)
        pred = noisy if identity else model(noisy).float()
        vals += [psnr(p, c) for p, c in zip(pred, clean)]
    return float(np.mean(vals))


def evaluate_run(run_dir: Path, s: dict, eval_n: int):
    from ernas import build_model, load_arch
    from ernas.supernet import SuperNet

    summary = json.loads((run_dir / "summary.json").read_text())
    scfg = s["scfg"]
    # the supernet as it ended (checkpoint.pt holds the final state after the last step)
    net = SuperNet(s["space"], scfg.mode, scfg.temperature, scfg.gumbel)
    ck = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(ck["model"])
    arch = load_arch(run_dir / "arch.yaml")
    derived = build_model(arch)
    derived.load_state_dict(torch.load(run_dir / "inherited.pt", map_location="cpu",
                                       weights_only=True), strict=True)
    vb = s["val_batch"]
    res = {"decisiveness": summary["decisiveness"], "entropy": summary["entropy"],
           "summary_supernet_psnr": summary["supernet_val_psnr"],
           "predicted_latency_ms": summary["predicted_latency_ms"],
           "baseline_latency_ms": summary["baseline_latency_ms"], "params": summary["params"],
           "search_seconds": summary["search_seconds"]}
    for label, n in (("loop", scfg.eval_batches), ("eval", eval_n)):
        net.set_onehot(None)
        sup = mean_psnr(net, vb, n)
        der = mean_psnr(derived, vb, n)
        net.set_onehot(arch)
        onehot = mean_psnr(net, vb, n)
        net.set_onehot(None)
        res[label] = {"batches": n, "images": n * scfg.batch_size, "supernet": sup,
                      "derived": der, "gap": sup - der, "onehot": onehot,
                      "noisy_input": mean_psnr(None, vb, n, identity=True)}
    with torch.no_grad():
        pm = {k: float(torch.softmax(v / net.temperature, 0).max()) for k, v in net.alphas.items()}
    res["least_decided"] = sorted(pm.items(), key=lambda kv: kv[1])[:3]
    keep = [p for p, v in arch.values.items() if v.get("keep", True)]
    res["blocks_kept"] = f"{len(keep)}/{len(arch.values)}"
    res["arch"] = {p: v for p, v in arch.values.items() if p in s["space"].searchable}
    return res


def short(v: dict) -> str:
    if not v.get("keep", True):
        return "skip"
    n = {"layernorm": "LN", "batchnorm": "BN", "none": "-"}.get(v["norm"], v["norm"])
    return f"{n}/{'sca' if v['attention'] == 'sca' else '-'}/k{v['kernel']}/" \
           f"d{v['dw_expand']}f{v['ffn_expand']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup-steps", type=int, default=None, help="default: search.yaml's")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--entropy-max", default=None,
                    help="the 'on' arm(s), comma-separated (default: search.yaml's entropy_max)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--eval-batches", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--override", action="append", default=[],
                    help="extra Hydra override for both arms (repeatable)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="ernas_entropy_"))
    out.mkdir(parents=True, exist_ok=True)

    base = [f"search.steps={args.steps}", f"search.batch_size={args.batch}",
            f"data.crop={args.crop}", "search.device=cpu", "progress=false",
            *([f"search.warmup_steps={args.warmup_steps}"] if args.warmup_steps is not None
              else []), *args.override]
    ons = [float(x) for x in args.entropy_max.split(",")] if args.entropy_max else \
        [float(compose(base).search.entropy_max)]
    if not all(h > 0 for h in ons):
        raise SystemExit("the 'on' arm(s) need entropy_max > 0")
    arms = [(f"H={h:g}", h) for h in ons] + [("H off", 0.0)]
    on = ",".join(f"{h:g}" for h in ons)
    print(f"entropy ablation on the ernas-search default; machine: {machine_description()}; torch "
          f"{torch.__version__}")
    print(f"output: {out}")
    t_all = time.perf_counter()
    results = {}
    from ernas.search import run_search

    for seed in [int(x) for x in args.seeds.split(",")]:
        for arm, h in arms:
            cfg = compose(base + [f"seed={seed}", f"search.entropy_max={h}"])
            s = prepare(cfg)
            if not results:
                sc = s["scfg"]
                print(f"settings: space {cfg.space}, data {cfg.data.source} "
                      f"(crop {cfg.data.crop}, sigma {cfg.data.sigma}, max_side "
                      f"{cfg.data.max_side}), steps {sc.steps}, warmup {sc.warmup_steps}, batch "
                      f"{sc.batch_size}, mode {sc.mode}, lr_w {sc.lr_w}, lr_alpha {sc.lr_alpha}, "
                      f"latency {sc.latency_form} lam {sc.lam}, entropy on={on} "
                      f"({sc.entropy_shape}, ramp {sc.entropy_schedule().ramp_steps} steps "
                      f"after step {sc.entropy_schedule().warmup_steps}); eval on "
                      f"{args.eval_batches} val batches; extra overrides {args.override}")
                sp = s["space"]
                n_dec = sum(len(v) > 1 for p in sp.searchable for v in sp.choices[p].values())
                print(f"decisions searched: {len(sp.searchable)} positions, {n_dec} decisions "
                      f"(H̄ is their mean)")
                print(f"latency table: {s['table_path']} (input {s['shape']})")
            run_dir = out / f"seed{seed}_H{h:g}"
            t0 = time.perf_counter()
            run_search(s["space"], s["expected"], s["train_batch"], s["val_batch"], s["scfg"],
                       run_dir, progress=False, input_shape=s["shape"])
            r = evaluate_run(run_dir, s, args.eval_batches)
            r["wall_s"] = time.perf_counter() - t0
            results[(seed, arm)] = r
            print(f"  seed {seed} {arm:7s} done in {r['wall_s']:.0f} s", flush=True)

    lines = ["", f"{'seed':>4s} {'arm':7s} {'decisive':>8s} {'entropy':>7s} {'E[lat] ms':>9s} "
                 f"{'kept':>5s} | {'supernet':>8s} {'derived':>8s} {'gap':>6s} {'1-hot':>7s} "
                 f"(loop's {results[next(iter(results))]['loop']['images']} imgs) | "
                 f"{'supernet':>8s} {'derived':>8s} {'gap':>6s} "
                 f"({results[next(iter(results))]['eval']['images']} imgs)"]
    for (seed, arm), r in results.items():
        lo, ev = r["loop"], r["eval"]
        lines.append(f"{seed:>4d} {arm:7s} {r['decisiveness']:8.3f} {r['entropy']:7.3f} "
                     f"{r['predicted_latency_ms']:9.2f} {r['blocks_kept']:>5s} | "
                     f"{lo['supernet']:8.2f} {lo['derived']:8.2f} {lo['gap']:6.2f} "
                     f"{lo['onehot']:7.2f}                  | {ev['supernet']:8.2f} "
                     f"{ev['derived']:8.2f} {ev['gap']:6.2f}")
    first = next(iter(results.values()))
    lines.append(f"noisy input PSNR on the same batches: {first['loop']['noisy_input']:.2f} dB "
                 f"(loop's), {first['eval']['noisy_input']:.2f} dB (eval); baseline (NAFNet "
                 f"reference) predicted latency {first['baseline_latency_ms']:.2f} ms")
    for (seed, arm), r in results.items():
        lines.append(f"seed {seed} {arm}: summary supernet_val_psnr "
                     f"{r['summary_supernet_psnr']:.2f} dB; arch "
                     + ", ".join(f"{p}={short(v)}" for p, v in r["arch"].items())
                     + "; least decided (max p): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in r["least_decided"]))
    for seed in sorted({k[0] for k in results}):
        b = results[(seed, "H off")]
        for arm, _ in arms[:-1]:
            a = results[(seed, arm)]
            lines.append(f"seed {seed}: decisiveness with {arm} {a['decisiveness']:.3f} (goal ≥ "
                         f"0.95: {'MET' if a['decisiveness'] >= 0.95 else 'MISSED'}), without H "
                         f"{b['decisiveness']:.3f}; gap with {arm} {a['eval']['gap']:.2f} dB, "
                         f"without {b['eval']['gap']:.2f} dB")
    lines.append(f"total wall time {time.perf_counter() - t_all:.0f} s")
    print("\n".join(lines))
    (out / "entropy_ablation.json").write_text(json.dumps(
        {f"seed{k[0]}_{k[1].replace(' ', '_')}": v for k, v in results.items()}, indent=1,
        default=str))


if __name__ == "__main__":
    main()
