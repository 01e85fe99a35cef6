"""Post-hoc EMA against fixed-decay EMA copies, from one training: `+sweep=ema_decay` over EMA
widths (sigma_rel), whose first job also keeps and scores the fixed-decay copies
(train.ema.decays), all on the same fixed held-out batch (validation loss, fixed noise).

    python benchmarks/posthoc_ema.py [--steps 800] [--out benchmarks/results/posthoc_ema.json] [OVERRIDE ...]

OVERRIDEs (run.py's, e.g. dataset=folder dataset.root=DIR train.batch_size=16) replace the defaults.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIDTHS = (0.02, 0.03, 0.05, 0.08, 0.12, 0.18, 0.25)
DECAYS = (0.99, 0.995, 0.999, 0.9995)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "posthoc_ema.json")
    parser.add_argument("overrides", nargs="*", help="run.py overrides, after the defaults")
    args = parser.parse_args()
    overrides = ["dataset=fashion_mnist", "unet=tiny", f"train.max_steps={args.steps}", "train.batch_size=64",
                 "train.ema.snapshot_every=50", f"train.ema.decays=[{','.join(map(str, DECAYS))}]",
                 "sample.num_images=0", "eval.num_samples=0", "train.progress=false", "train.threads=2",
                 "train.val_every=100000", "train.image_every=0", "train.checkpoint_every=100000", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        sweep_dir = Path(tmp) / "sweep"
        t0 = time.perf_counter()
        cmd = [sys.executable, str(REPO / "run.py"), "-m", "+sweep=ema_decay",
               f"train.ema.sigma_rel={','.join(map(str, WIDTHS))}", *overrides, f"paths.cache_dir={tmp}/cache",
               f"hydra.sweep.dir={sweep_dir}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        wall = time.perf_counter() - t0
        jobs = [json.loads((sweep_dir / str(i) / "metrics.json").read_text()) for i in range(len(WIDTHS))]
    posthoc = {str(w): m["val_loss"] for w, m in zip(WIDTHS, jobs)}
    fixed = {decay: entry["val_loss"] for decay, entry in jobs[0]["ema"].items()}
    best_w, best_d = min(posthoc, key=posthoc.get), min(fixed, key=fixed.get)
    result = {
        "what": "one training, scored on the fixed held-out batch (val_batches x batch_size held-out images, fixed "
                "noise levels and noise; the validation loss of the objective): post-hoc EMA widths reconstructed from "
                "the snapshots of two profiles (sigma_rel 0.05, 0.10) vs the fixed-decay copies trained beside them",
        "command": " ".join(["python benchmarks/posthoc_ema.py", "--steps", str(args.steps), *args.overrides]),
        "settings": overrides, "trainings": sum(m["trained"] for m in jobs), "wall_clock_s": round(wall, 1),
        "snapshots": jobs[0]["ema_snapshots"], "artifact_keys": len({m["artifact_key"] for m in jobs}),
        "posthoc_val_loss_by_sigma_rel": posthoc, "fixed_decay_val_loss": fixed,
        "best_posthoc": {"sigma_rel": float(best_w), "val_loss": posthoc[best_w]},
        "best_fixed_decay": {"decay": float(best_d), "val_loss": fixed[best_d]},
        "best_posthoc_minus_best_fixed": posthoc[best_w] - fixed[best_d],
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
