"""One run.py training run for a benchmark: sampling, evaluation and checkpoints off, in a given
run folder; returns its metrics.json and the peak resident memory of the whole process tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = ["sample.num_images=0", "eval.num_samples=0", "train.reuse=false", "train.progress=false",
         "train.val_every=1000000", "train.checkpoint_every=1000000", "train.image_every=0"]


def run_training(launcher: list[str], threads: int, steps: int, overrides: list[str], folder: Path) -> tuple[dict, int]:
    """(metrics, peak RSS in bytes); exits with run.py's own error sentence if the run fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [*launcher, str(REPO / "run.py"), *QUIET, f"train.max_steps={steps}", f"train.threads={threads}",
           *overrides, f"hydra.run.dir={folder}"]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        # wait4's usage is this child's, its own waited-for children (torchrun's workers) included
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        if proc.returncode != 0:  # run.py's one-sentence error when it gave one, else the log's tail
            err.seek(0)
            stderr = err.read()
            said = [line for line in stderr.splitlines() if line.startswith("error: ")]
            sys.exit(f"{' '.join(cmd)} failed: {said[0] if said else stderr[-3000:]}")
    return json.loads((folder / "metrics.json").read_text()), usage.ru_maxrss * 1024
