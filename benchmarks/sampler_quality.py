"""Sample quality against sampler steps for the default MNIST model; prints one JSON object.

The model is the one `python run.py` trains (taken from the artifact cache; run that first).
Each case samples `n` images with its sampler and measures them as `mode=evaluate` does (the
same evaluate_model): FD/KID with the evaluation classifier, class accuracy, and FID/KID/IS/PR
with Inception when its weights are at hand. Usage:

    python benchmarks/sampler_quality.py [--cases ddim:50:1000,dpmpp_2m:20:1000,...] [--threads 1]

A case is sampler:steps:num_samples (steps "all" = every one of the schedule's T steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# The table at one sample count. On a shared 2-core CPU sampling runs at ~50-200
# image-steps/s, so ddpm:all:1000 alone takes hours: pass fewer samples there (see results/).
DEFAULT_CASES = ("dpmpp_2m:10:1000,dpmpp_2m:20:1000,ddim:10:1000,ddim:20:1000,ddim:50:1000,ddim:100:1000,"
                 "ddpm:all:1000")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overrides", default="", help="extra run.py overrides, space separated")
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from difflab.artifacts import ArtifactCache, diffusion_settings
    from difflab.cli import CONF_DIR
    from difflab.evaluate.metrics import evaluate_model
    from difflab.sampling import sample_images
    from difflab.trained import load_diffusion_model

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    results = []
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        for case in args.cases.split(","):
            sampler, steps, n = case.split(":")
            cfg = compose(config_name="config", overrides=[
                f"sampler={sampler}", f"sampler.steps={'null' if steps == 'all' else steps}",
                f"eval.num_samples={n}", *args.overrides.split()])
            entry = ArtifactCache(cfg.paths.cache_dir).find("diffusion", diffusion_settings(cfg))
            if entry is None:
                sys.exit(f"no trained model for these settings in {cfg.paths.cache_dir}/artifacts: run `python run.py` first")
            model = load_diffusion_model(str(entry.path), device)
            t0 = time.perf_counter()
            metrics = evaluate_model(model, cfg, device, str(entry.path),
                                     lambda k: sample_images(model, cfg, k, "balanced", device))
            about = metrics.pop("eval")
            row = {"sampler": sampler, "steps": steps, "num_samples": int(n), **metrics,
                   "wall_s": time.perf_counter() - t0, "extractors": about["extractors"]}
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress, one case per line
            results.append(row)
    print(json.dumps({"model": str(entry.path), "threads": args.threads, "device": "cpu", "results": results}, indent=2))


if __name__ == "__main__":
    main()
