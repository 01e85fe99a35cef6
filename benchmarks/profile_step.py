"""Where a training step's time goes, over real training steps; prints JSON.

The steps are the ones `python run.py <overrides>` takes: the config is composed by Hydra, the
stage (data in memory, loss) and the Trainer (autocast, AdamW, grad clip, EMA) are the run's own.
Two views:

- torch.profiler (default): the step time, the share of each kind of work (convolutions, matrix
  products, attention, normalisation, activations, optimizer, other) and the top operators by
  self time; `--trace` also writes a Chrome trace (chrome://tracing or Perfetto). On the CPU the
  profiler's own overhead inflates short memory-bound operators (a SiLU up to 10x), so these
  shares overstate them.
- `--ablate`: what each kind of layer really costs. The step is timed with every SiLU, every
  GroupNorm, every attention block or every dropout replaced by the identity, interleaved with
  the unchanged step so that load on the machine hits all alike; the difference is the cost.

    python benchmarks/profile_step.py [overrides ...] [--steps 10] [--trace trace.json] [--ablate]
    python benchmarks/profile_step.py unet=ddpm_cifar dataset=cifar10 train.batch_size=32 ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

KINDS = (  # first match wins
    ("convolution", ("convolution", "conv2d")),
    ("attention", ("attention",)),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear")),
    ("normalisation", ("group_norm", "groupnorm", "layer_norm")),  # groupnorm: the fused kernel
    ("activation", ("silu", "gelu")),
    ("optimizer", ("adam", "optimizer", "lerp")),  # lerp: the EMA update
)
ABLATIONS = ("silu", "group_norm", "attention_block", "dropout")


def kind_of(op: str) -> str:
    low = op.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def ablate(net, kind: str) -> int:
    """Replace every layer of one ABLATIONS kind in `net` by the identity; returns how many. Of a
    fused GroupNormSiLU the rest stays, fused where the kernel can still do it."""
    import torch.nn.functional as F
    from torch import nn

    from difflab.models.group_norm_silu import GroupNormSiLU
    from difflab.models.layers import AttentionBlock

    class Skipped(nn.Module):
        def forward(self, x, *args):  # ResBlocks hand their layers an embedding too
            return x

    class Rest(nn.Module):
        """A GroupNormSiLU without its norm or its SiLU: the norm (kernel) if kept, then SiLU and
        dropout as torch layers (the kernel drops only after its own SiLU)."""

        def __init__(self, fused: GroupNormSiLU, keep_norm: bool, silu: bool):
            super().__init__()
            self.norm = GroupNormSiLU(fused.num_groups, fused.num_channels, silu=False) if keep_norm else None
            self.silu, self.p = silu, fused.dropout

        def forward(self, x, shift=None):
            if self.norm is not None:
                x = self.norm(x, shift)
            elif shift is not None:
                x = x + shift[:, :, None, None]
            x = F.silu(x) if self.silu else x
            return F.dropout(x, self.p, self.training) if self.p else x

    layer_type = {"silu": nn.SiLU, "group_norm": nn.GroupNorm, "attention_block": AttentionBlock,
                  "dropout": nn.Dropout}[kind]
    count = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            fused = isinstance(child, GroupNormSiLU) and child.silu
            if fused and kind == "dropout" and child.dropout:
                child.dropout = 0.0
            elif fused and kind in ("silu", "group_norm"):
                setattr(module, name, Rest(child, keep_norm=kind == "silu", silu=kind == "group_norm"))
            elif isinstance(child, layer_type):
                setattr(module, name, Skipped())
            else:
                continue
            count += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="run.py overrides (the default run when none)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--trace", help="also write a Chrome trace here")
    ap.add_argument("--ablate", action="store_true", help="measure each layer kind's cost by removing it")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --ablate (medians reported)")
    args = ap.parse_args()

    from difflab.allocator import keep_freed_memory

    keep_freed_memory()  # as run.py does
    import torch
    from hydra import compose, initialize_config_dir

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
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def training_step(kind: str | None = None) -> tuple[Callable[[], None], Trainer, int]:
        """One run's training step (optionally with a kind of layer ablated), warmed up."""
        torch.manual_seed(cfg.seed)
        run_dir = Path(tempfile.mkdtemp(prefix="difflab_profile_"))
        stage = DiffusionStage(cfg, run_dir, device)
        removed = ablate(stage.net, kind) if kind else 0
        trainer = Trainer(stage.net, cfg.train, run_dir / "checkpoints", device)
        batches = trainer.step_batches(len(stage.train_data), cfg.train.batch_size)
        objective = trainer._objective(stage.loss)  # what fit() steps with

        def step() -> None:
            trainer._train_step(objective, stage.batch(trainer.step, batches))

        for _ in range(3):  # warm-up: allocator, oneDNN primitive caches, autocast weight casts
            step()
        return step, trainer, removed

    def seconds_per_step(step: Callable[[], None]) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        return (time.perf_counter() - t0) / args.steps

    report = {"benchmark": "profile_step", "overrides": args.overrides, "device": str(device),
              "threads": torch.get_num_threads(), "batch_size": cfg.train.batch_size,
              "precision": cfg.train.precision}
    if args.ablate:
        variants = {kind: training_step(kind) for kind in (None, *ABLATIONS)}
        times: dict = defaultdict(list)
        for _ in range(args.rounds):
            for kind, (step, _, _) in variants.items():
                times[kind].append(seconds_per_step(step))
        base = statistics.median(times[None])
        report.update({
            "step_ms": round(1e3 * base, 2), "images_per_s": round(cfg.train.batch_size / base, 1),
            "cost_per_step": {kind: {"layers": variants[kind][2],
                                     "ms": round(1e3 * (base - statistics.median(times[kind])), 2),
                                     "share": round(1 - statistics.median(times[kind]) / base, 4)}
                              for kind in ABLATIONS},
        })
        print(json.dumps(report, indent=2))
        return

    from torch.profiler import ProfilerActivity, profile

    step, trainer, _ = training_step()
    step_s = seconds_per_step(step)
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
    report.update({
        "autocast_dtype": str(trainer.amp_dtype), "step_ms": round(1e3 * step_s, 2),
        "images_per_s": round(cfg.train.batch_size / step_s, 1),
        "share_by_kind": {k: round(v / total, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key, "calls_per_step": round(e.count / args.steps, 1),
                     "ms_per_step": round(e.self_cpu_time_total / 1e3 / args.steps, 3),
                     "share": round(e.self_cpu_time_total / total, 4)} for e in top],
    })
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
