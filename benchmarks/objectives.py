"""The objectives (ddpm, edm, flow) trained at the same budget on the same network, and measured
the same way; prints one JSON object.

Each objective is one `python run.py` (the default recipe unless --overrides change it) in its
own folder under --out, with the evaluation at --num-samples samples; its row is the run's
metrics.json: the project's FD and KID with the evaluation classifier, class accuracy, the real
data's reference values, training time and the sampler's NFE. Usage:

    python benchmarks/objectives.py [--objectives ddpm,edm,flow] [--num-samples 2000] \\
        [--overrides "dataset=fashion_mnist sampler=heun sampler.steps=10"] [--out /tmp/objectives]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEPT = ("fd_classifier", "fd_classifier_se", "kid_classifier", "class_accuracy", "class_accuracy_se",
        "real_fd_classifier", "real_class_accuracy", "final_loss", "best_val_loss", "train_wall_time_s", "sampled_with", "num_params")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", default="ddpm,edm,flow")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--overrides", default="", help="extra run.py overrides, space separated")
    parser.add_argument("--out", type=Path, default=Path("/tmp/difflab_objectives"))
    args = parser.parse_args()
    rows = []
    for objective in args.objectives.split(","):
        run_dir = args.out / objective
        command = [sys.executable, str(REPO / "run.py"), f"objective={objective}", f"eval.num_samples={args.num_samples}",
                   "eval.extractors=[classifier]", "train.progress=false", f"hydra.run.dir={run_dir}",
                   *args.overrides.split()]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{objective} failed: {done.stderr.strip().splitlines()[-1:]}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        row = {"objective": objective, **{k: metrics.get(k) for k in KEPT}, "wall_s": time.perf_counter() - start}
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    print(json.dumps({"overrides": args.overrides, "num_samples": args.num_samples, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
