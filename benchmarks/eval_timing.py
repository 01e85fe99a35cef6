"""Time of the feature-extraction half of an evaluation of N images (default 2000) of the default
MNIST model, without sampling: the N 'samples' are real MNIST test images, so what is timed is
exactly evaluate_model minus its sample() call. Prints one JSON line per run (the second reads
the real images' statistics from torch-fidelity's cache). The sampling half is linear in N: take
it from benchmarks/sampler_quality.py's eval_sampling_seconds.

    python benchmarks/eval_timing.py [--num-samples 2000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from cached_model import cached_model
    from hydra import compose, initialize_config_dir

    from difflab.cli import CONF_DIR
    from difflab.data import load_split
    from difflab.evaluate.metrics import evaluate_model
    from difflab.sampling import SampleResult

    torch.set_num_threads(args.threads)
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=[f"eval.num_samples={args.num_samples}"])
    model, path = cached_model(cfg, torch.device("cpu"))
    test = load_split(cfg.dataset, "test", cfg.paths.cache_dir)
    stand_in = SampleResult(test.images[-args.num_samples:], test.labels[-args.num_samples:], 0.0, [])
    for run in (1, 2):
        t0 = time.perf_counter()
        m = evaluate_model(model, cfg, torch.device("cpu"), path, lambda n: stand_in)
        print(json.dumps({"run": run, "num_samples": args.num_samples, "eval_feature_seconds": m["eval_feature_seconds"],
                          "total_s": time.perf_counter() - t0, "extractors": m["eval"]["extractors"]}), flush=True)


if __name__ == "__main__":
    main()
