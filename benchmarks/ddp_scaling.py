"""Training throughput of one run.py run under torchrun with 1, 2, ... processes; prints JSON.

Each configuration trains the same run (the default MNIST one unless overrides say otherwise) for
--steps steps with sampling and evaluation off, in a fresh temporary run folder, and reads
`train_images_per_s` (all processes together) from its metrics.json. Scaling efficiency is
images/s at N processes over N times images/s at one process with the same threads each. With
--baseline-threads T it also runs one plain process with T threads: on a CPU, what DDP over
processes buys against threads in one process. Usage:

    python benchmarks/ddp_scaling.py [--nprocs 1,2] [--threads 1] [--steps 300] [--baseline-threads 2] [overrides ...]
    python benchmarks/ddp_scaling.py --nprocs 1,2,4,8 device=cuda unet=ddpm_cifar dataset=cifar10 train.batch_size=128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_training import run_training  # noqa: E402


def train_images_per_s(launcher: list[str], threads: int, steps: int, overrides: list[str], folder: Path) -> float:
    return run_training(launcher, threads, steps, overrides, folder)[0]["train_images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="run.py overrides")
    ap.add_argument("--nprocs", default="1,2", help="process counts to run under torchrun")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--baseline-threads", type=int, default=0,
                    help="also time one plain process with this many threads (0: skip)")
    args = ap.parse_args()

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.nprocs.split(",")):
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
            ips = train_images_per_s(launcher, args.threads, args.steps, args.overrides, Path(tmp) / f"ddp{n}")
            runs.append({"launcher": "torchrun", "processes": n, "threads_per_process": args.threads,
                         "train_images_per_s": round(ips, 1)})
        if args.baseline_threads:
            ips = train_images_per_s([sys.executable], args.baseline_threads, args.steps, args.overrides,
                                     Path(tmp) / "plain")
            runs.append({"launcher": "python", "processes": 1, "threads_per_process": args.baseline_threads,
                         "train_images_per_s": round(ips, 1)})
    one = next((r["train_images_per_s"] for r in runs if r["launcher"] == "torchrun" and r["processes"] == 1), None)
    for r in runs:
        if one and r["launcher"] == "torchrun":
            r["scaling_efficiency"] = round(r["train_images_per_s"] / (r["processes"] * one), 3)
    print(json.dumps({"benchmark": "ddp_scaling", "overrides": args.overrides, "steps": args.steps, "runs": runs},
                     indent=2))


if __name__ == "__main__":
    main()
