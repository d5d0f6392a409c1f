"""How large do a trained network's activations get on real images? Overflow, measured.

A NAFNet block gates by a product, SimpleGate(x) = x₁ ⊙ x₂. Under LayerNorm each block's input is
normalised per sample, so the gate's output does not grow with the input's scale. Under
BatchNorm (folded into the convolutions at export) the normalisation is a fixed affine map learnt
from the training crops: an input k times larger than those leaves the gate ~k² times larger,
and the next BatchNorm block squares that again, k → k² → k⁴ ... until float32 overflows.

This script runs trained networks (retrain run folders holding ``arch.yaml`` and ``best.pt``) on
every image of a folder, with the evaluation's noise (``test_noise``: seed 0, image index i in
file-name order, not clipped), and prints per network: the largest |output| of any module over
all images and where it occurs, how many images drive some module above float16's largest finite
value (65504: the network cannot run in half precision on them) and how many give a non-finite
output. It writes nothing.

    python benchmarks/activation_range.py --images runs/p31/test_tiles --sigma 25 RUN [RUN ...]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

FP16_MAX = 65504.0


def activation_range(model: nn.Module, images, sigma: float, seed: int = 0) -> dict:
    """Run ``model`` on ``[(name, HxWxC float image)]`` plus ``test_noise(sigma, seed, i)``.
    Returns ``peak`` (max |output| of any module, inf when non-finite), ``where`` (that module),
    ``modules`` (each module's max over the images), ``per_image`` (each image's peak),
    ``over_fp16`` and ``nonfinite`` (image names)."""
    from ernas.tasks.denoise.data import test_noise

    model.eval()
    current: dict[str, float] = {}

    def hook(name):
        def record(_module, _inputs, out):
            if isinstance(out, torch.Tensor):
                v = out.detach().abs().amax().item()
                current[name] = math.inf if math.isnan(v) else max(v, current.get(name, 0.0))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    peak, where, modules, per_image, over, nonfinite = 0.0, None, {}, {}, [], []
    try:
        for i, (name, img) in enumerate(images):
            clean = torch.from_numpy(img.transpose(2, 0, 1).copy())
            current.clear()
            with torch.no_grad():
                y = model(test_noise(clean, sigma, seed, i)[None])
            for k, v in current.items():
                modules[k] = max(v, modules.get(k, 0.0))
            top = max(current, key=current.get)
            per_image[name] = current[top]
            if current[top] > peak or where is None:
                peak, where = current[top], top
            if current[top] > FP16_MAX:
                over.append(name)
            if not torch.isfinite(y).all():
                nonfinite.append(name)
    finally:
        for h in handles:
            h.remove()
    return {"peak": peak, "where": where, "modules": modules, "per_image": per_image,
            "over_fp16": over, "nonfinite": nonfinite}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="retrain run folders (arch.yaml and best.pt)")
    ap.add_argument("--images", required=True, help="folder of clean images")
    ap.add_argument("--sigma", type=float, default=25.0, help="noise σ, 0..255 units")
    ap.add_argument("--grey", action="store_true", help="read the images as one channel")
    a = ap.parse_args(argv)
    from ernas.checkpoint import load_model
    from ernas.errors import ErnasError
    from ernas.space import load_arch
    from ernas.tasks.denoise.data import clean_folder

    torch.set_num_threads(1)
    try:
        images = clean_folder(a.images, color=not a.grey)
        models = []
        for run in a.runs:
            r = Path(run)
            if not (r / "arch.yaml").is_file() or not (r / "best.pt").is_file():
                raise ErnasError(f"{run}: not a retrain run folder (it needs arch.yaml and "
                                 f"best.pt); pass the folder of one seed, e.g. "
                                 f"runs/p31/runs/<network>/seed0.")
            models.append(load_model(load_arch(r / "arch.yaml"), r / "best.pt"))
    except ErnasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(images)} images of {a.images}, noise σ {a.sigma:g} (test_noise, seed 0)")
    for run, model in zip(a.runs, models):
        res = activation_range(model, images, a.sigma)
        print(f"{run}: peak |activation| {res['peak']:.3g} at {res['where']}; above fp16's "
              f"{FP16_MAX:g} on {len(res['over_fp16'])} images; non-finite output on "
              f"{len(res['nonfinite'])}" + (f" ({', '.join(res['nonfinite'])})"
                                            if res["nonfinite"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
