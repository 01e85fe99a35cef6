"""How far the default model's samples move between step counts, from the same noise: whether a
rung of metric_sensitivity.py's steps ladder is a degradation at all. Samples the cached default
MNIST model as the run samples it (and as the ladder draws them: classifier-free guidance where
guidance=auto decides it) at each step count from one seed, and prints one JSON object: the mean
absolute pixel difference of each count's samples from the finest count's, against the mean
difference between two distinct samples. Usage:

    python benchmarks/step_convergence.py [--steps 5,10,20,50,100] [--n 500] [--overrides '...']
"""

from __future__ import annotations

import argparse
import json

import torch
from cached_model import cached_model, run_config

from difflab.sampling import sample_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="5,10,20,50,100")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--overrides", default="", help="extra run.py overrides, space separated")
    args = parser.parse_args()
    counts = sorted(int(s) for s in args.steps.split(","))
    torch.set_grad_enabled(False)
    model, _ = cached_model(run_config(*args.overrides.split()), torch.device("cpu"))
    images = {}
    for steps in counts:
        cfg = run_config(f"sampler.steps={steps}", "sample.batch_size=250", *args.overrides.split())
        torch.manual_seed(0)
        images[steps] = sample_images(model, cfg, args.n, "balanced", torch.device("cpu")).images.float() / 255
    finest = images[counts[-1]]
    print(json.dumps({
        "samples": args.n, "sampler": cfg.sampler.name, "guidance": cfg.guidance.name, "finest_steps": counts[-1],
        "mean_abs_pixel_difference_from_finest": {str(s): float((images[s] - finest).abs().mean())
                                                  for s in counts[:-1]},
        "share_of_pixels_off_by_over_0.1": {str(s): float(((images[s] - finest).abs() > 0.1).float().mean())
                                            for s in counts[:-1]},
        "mean_abs_pixel_difference_of_distinct_samples": float((finest - finest.roll(1, 0)).abs().mean()),
    }, indent=1))


if __name__ == "__main__":
    main()
