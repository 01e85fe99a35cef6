"""How much of the default model's FD is its faint background haze: real MNIST backgrounds are exactly 0,
sampled ones mostly a few levels above it. Draws the evaluation's balanced samples from the cached default
model (as `python run.py` samples it) once, then measures the same samples as mode=evaluate does with every
pixel at or below each threshold (of 255) set to 0; prints one JSON object with the samples' and the real
test images' shares of such pixels. Usage:

    python benchmarks/background_haze.py [--num-samples 2000] [--thresholds 0,4,12,25] [--overrides '...']
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

KEPT = ("fd_classifier", "fd_classifier_se", "real_fd_classifier", "kid_classifier", "kid_classifier_se",
        "precision_classifier", "recall_classifier", "class_accuracy")


def pixel_shares(images) -> dict:
    """Shares of uint8 pixels at 0, at 1-12 and at 13-50."""
    import torch

    hist = torch.bincount(images.flatten().long(), minlength=256).double() / images.numel()
    return {"0": float(hist[0]), "1-12": float(hist[1:13].sum()), "13-50": float(hist[13:51].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--thresholds", default="0,4,12,25")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overrides", default="", help="extra run.py overrides, space separated")
    args = parser.parse_args()

    import torch
    from cached_model import cached_model, run_config

    from difflab.data import load_split
    from difflab.evaluate.metrics import evaluate_model
    from difflab.sampling import sample_images

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = run_config(f"eval.num_samples={args.num_samples}", "eval.memorisation=0", *args.overrides.split())
    model, path = cached_model(cfg, device)
    t0 = time.perf_counter()
    drawn = sample_images(model, cfg, args.num_samples, "balanced", device)
    sampling_s = time.perf_counter() - t0
    real = load_split(cfg.dataset, "test", cfg.paths.cache_dir).images
    rows = {}
    for threshold in (int(t) for t in args.thresholds.split(",")):
        images = drawn.images.clone()
        images[images <= threshold] = 0
        metrics = evaluate_model(model, cfg, device, path,
                                 lambda k, images=images: replace(drawn, images=images[:k]))
        rows[str(threshold)] = {k: metrics[k] for k in KEPT if k in metrics}
        print(json.dumps({"threshold": threshold, **rows[str(threshold)]}), file=sys.stderr, flush=True)
    print(json.dumps({"model": path, "num_samples": args.num_samples, "sampler": cfg.sampler.name,
                      "steps": cfg.sampler.steps, "guidance": cfg.guidance.name, "sampling_s": sampling_s,
                      "pixel_shares": {"samples": pixel_shares(drawn.images), "real_test": pixel_shares(real)},
                      "by_threshold": rows}, indent=2))


if __name__ == "__main__":
    main()
