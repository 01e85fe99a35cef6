"""Where a training step's time goes: torch.profiler over real training steps; prints JSON.

The steps are the ones `python run.py <overrides>` takes: the config is composed by Hydra, the
stage (data in memory, loss) and the Trainer (autocast, AdamW, grad clip, EMA) are the run's own.
Reports the step time, the share of each kind of work (convolutions, matrix products,
attention, normalisation, activations, optimizer, other) and the top operators by self time;
`--trace` also writes a Chrome trace (open in chrome://tracing or Perfetto). Usage:

    python benchmarks/profile_step.py [overrides ...] [--steps 10] [--trace trace.json]
    python benchmarks/profile_step.py unet=ddpm_cifar dataset=cifar10 train.batch_size=32 ...
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

KINDS = (  # first match wins
    ("convolution", ("convolution", "conv2d")),
    ("attention", ("attention",)),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear")),
    ("normalisation", ("group_norm", "layer_norm")),
    ("activation", ("silu", "gelu")),
    ("optimizer", ("adam", "optimizer", "lerp")),  # lerp: the EMA update
)


def kind_of(op: str) -> str:
    low = op.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="run.py overrides (the default run when none)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--trace", help="also write a Chrome trace here")
    args = ap.parse_args()

    import torch
    from hydra import compose, initialize_config_dir
    from torch.profiler import ProfilerActivity, profile

    from difflab.config import register_configs
    from difflab.runner import resolve_device
    from difflab.train.loop import Trainer
    from difflab.train.stages import DiffusionStage

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[*args.overrides, "train.progress=false"])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.device)
    run_dir = Path(tempfile.mkdtemp(prefix="difflab_profile_"))
    stage = DiffusionStage(cfg, run_dir, device)
    trainer = Trainer(stage.net, cfg.train, run_dir / "checkpoints", device)
    batches = trainer.step_batches(len(stage.train_data), cfg.train.batch_size)
    objective = trainer._objective(stage.loss)  # what fit() steps with

    def step() -> None:
        trainer._train_step(objective, stage.batch(trainer.step, batches))

    for _ in range(3):  # warm-up: allocator, oneDNN primitive caches, autocast weight casts
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    step_s = (time.perf_counter() - t0) / args.steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    if args.trace:
        prof.export_chrome_trace(args.trace)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    print(json.dumps({
        "benchmark": "profile_step", "overrides": args.overrides, "device": str(device),
        "threads": torch.get_num_threads(), "batch_size": cfg.train.batch_size, "precision": cfg.train.precision,
        "autocast_dtype": str(trainer.amp_dtype), "step_ms": round(1e3 * step_s, 2),
        "images_per_s": round(cfg.train.batch_size / step_s, 1),
        "share_by_kind": {k: round(v / total, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key, "calls_per_step": round(e.count / args.steps, 1),
                     "ms_per_step": round(e.self_cpu_time_total / 1e3 / args.steps, 3),
                     "share": round(e.self_cpu_time_total / total, 4)} for e in top],
    }, indent=2))


if __name__ == "__main__":
    main()
