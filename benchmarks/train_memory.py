"""Peak memory and training throughput of one run.py run under the memory-saving settings;
prints JSON. Each --vary KEY=V1,V2,... multiplies the runs (all combinations).

- train.grad_accum_steps=K computes each step's batch in K micro-batches: activation memory of
  batch/K, the same step.
- train.gradient_checkpointing=true stores only each UNet block's input and recomputes the rest
  in the backward: one more forward per step, the same step.

The run is issue 7's ddpm_cifar case (35.7M parameters, batch 32, 32x32x3) with the overrides
given on top; without a dataset= override, on a folder of random images (no download). Usage:

    python benchmarks/train_memory.py [--vary KEY=V1,V2 ...] [--steps 3] [--threads 2] [overrides ...]
    python benchmarks/train_memory.py --vary train.grad_accum_steps=1,2,4 --vary train.gradient_checkpointing=false,true train.batch_size=128
    python benchmarks/train_memory.py --vary train.grad_accum_steps=1,4 device=cuda dataset=cifar10 train.batch_size=512
"""

from __future__ import annotations

import argparse
import itertools
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


def parse_vary(spec: str) -> list[str]:
    key, _, values = spec.partition("=")
    if not key or not values:
        sys.exit(f"--vary {spec}: write it as KEY=V1,V2,... (e.g. train.grad_accum_steps=1,2,4).")
    return [f"{key}={v}" for v in values.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="run.py overrides, on top of ddpm_cifar at batch 32")
    ap.add_argument("--vary", action="append", default=[], help="KEY=V1,V2,...; repeatable")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    series = [parse_vary(v) for v in args.vary or ["train.grad_accum_steps=1,2,4"]]

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = [] if any(o.startswith("dataset=") for o in args.overrides) else [
            "dataset=folder", "dataset.val_size=0", f"dataset.root={random_images(Path(tmp) / 'images')}"]
        for i, varied in enumerate(itertools.product(*series)):
            metrics, peak = run_training([sys.executable], args.threads, args.steps,
                                         [*DEFAULT, *data, *args.overrides, *varied], Path(tmp) / f"run{i}")
            runs.append({**dict(v.split("=", 1) for v in varied),
                         "train_images_per_s": round(metrics["train_images_per_s"], 2),
                         "peak_rss_gb": round(peak / 1e9, 3)})
    print(json.dumps({"benchmark": "train_memory", "overrides": [*DEFAULT, *args.overrides], "steps": args.steps,
                      "threads": args.threads, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
