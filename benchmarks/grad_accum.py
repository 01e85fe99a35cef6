"""Peak memory and training throughput of one run.py run at several train.grad_accum_steps;
prints JSON. The step's batch stays train.batch_size; accumulation computes it in micro-batches
one after another, so activation memory shrinks with the micro-batch.

The run is issue 7's ddpm_cifar case (35.7M parameters, batch 32, 32x32x3) with the overrides
given on top; without a dataset= override, on a folder of random images (no download). Usage:

    python benchmarks/grad_accum.py [--accum 1,2,4] [--steps 6] [--threads 2] [overrides ...]
    python benchmarks/grad_accum.py --accum 1,2,4 --steps 3 train.batch_size=128
    python benchmarks/grad_accum.py --accum 1,4 device=cuda dataset=cifar10 train.batch_size=512
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_training import run_training  # noqa: E402

DEFAULT = ["unet=ddpm_cifar", "train.batch_size=32", "train.warmup_steps=1"]


def random_images(folder: Path, count: int = 256, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="run.py overrides, on top of ddpm_cifar at batch 32")
    ap.add_argument("--accum", default="1,2,4", help="train.grad_accum_steps values")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = [] if any(o.startswith("dataset=") for o in args.overrides) else [
            "dataset=folder", "dataset.val_size=0", f"dataset.root={random_images(Path(tmp) / 'images')}"]
        overrides = [*DEFAULT, *data, *args.overrides]
        for accum in (int(v) for v in args.accum.split(",")):
            metrics, peak = run_training([sys.executable], args.threads, args.steps,
                                         [*overrides, f"train.grad_accum_steps={accum}"], Path(tmp) / f"accum{accum}")
            runs.append({"grad_accum_steps": accum, "train_images_per_s": round(metrics["train_images_per_s"], 2),
                         "peak_rss_gb": round(peak / 1e9, 3)})
    print(json.dumps({"benchmark": "grad_accum", "overrides": [*DEFAULT, *args.overrides], "steps": args.steps,
                      "threads": args.threads, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
