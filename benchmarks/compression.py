"""Few-step and compressed inference against the teacher: images/s and the project metrics (FD on the
data set's own classifier features, class accuracy) of the teacher at 50 DDIM steps, its distilled
8/4/2/1-step students, int8 and bf16 sampling and 30%/50% pruning. Prints JSON.

Each variant is one `python run.py` (as the named sweep sweeps/compression.yaml runs them), so the
artifact cache trains the teacher once and every variant is measured by the same evaluation:

    python benchmarks/compression.py                                # the default MNIST model, 2000 samples
    python benchmarks/compression.py --samples 200 --steps-per-round 100 --finetune-steps 100 \
        --variants teacher50 distill4 bf16 pruned30 --extra train.max_steps=300   # a small run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("teacher50", "distill8", "distill4", "distill2", "distill1", "int8", "bf16", "pruned30", "pruned50")
KEPT = ("fd_classifier", "fd_classifier_se", "real_fd_classifier", "class_accuracy", "class_accuracy_se",
        "fd_inception", "distill_wall_time_s", "train_wall_time_s", "params", "original_params", "quantize",
        "quantize_seconds")


def measure(variant: str, args, folder: Path) -> dict:
    run_dir = folder / variant
    cmd = [sys.executable, str(REPO / "run.py"), f"+compression={variant}", f"hydra.run.dir={run_dir}",
           f"eval.num_samples={args.samples}", "eval.extractors=[classifier]", "sample.num_images=100",
           "train.progress=false", *args.extra]
    cmd += [f"distill.steps_per_round={args.steps_per_round}"] if args.steps_per_round else []
    cmd += [f"prune.finetune_steps={args.finetune_steps}"] if args.finetune_steps else []
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    flat = {**metrics, **metrics.get("eval", {})}
    out = {k: flat[k] for k in KEPT if k in flat}
    # the evaluation's own draw of args.samples images is the timed one (the run's 100-image grid is too short)
    out["sampling_seconds"] = metrics["eval_sampling_seconds"]
    out["sampling_images_per_s"] = args.samples / metrics["eval_sampling_seconds"]
    out["sampled_with"] = {k: metrics["sampled_with"][k] for k in ("sampler", "steps", "nfe")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--steps-per-round", type=int, default=None, help="distill.steps_per_round (default: the config's)")
    p.add_argument("--finetune-steps", type=int, default=None, help="prune.finetune_steps (default: the config's)")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run, e.g. train.max_steps=300")
    p.add_argument("--out", type=Path, default=None, help="where the run folders go (default: a temporary folder)")
    args = p.parse_args()
    folder = args.out or Path(tempfile.mkdtemp(prefix="compression_"))
    results = {v: measure(v, args, folder) for v in args.variants}
    base = results.get("teacher50", {}).get("sampling_images_per_s")
    for r in results.values():
        if base and "sampling_images_per_s" in r:
            r["speedup_vs_teacher50"] = r["sampling_images_per_s"] / base
    print(json.dumps({"settings": vars(args) | {"out": str(folder)}, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
