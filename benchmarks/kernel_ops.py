"""Milliseconds of one training step (forward, backward, AdamW) of a unet config, channels_last as
run.py trains, against the src folder given, so that two checkouts can be timed against each
other with farm-bench's pairing; prints one JSON object. How results/kernel_ops_cpu.json was made:

    farm-bench -n 5 --timeout 600 --vs "python benchmarks/kernel_ops.py /tmp/before/src" -- \
        python benchmarks/kernel_ops.py src --dropout 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="the src/ folder of the checkout to time")
    p.add_argument("--unet", default="small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only where the CPU has AMX)")
    args = p.parse_args()
    sys.path.insert(0, str(args.src.resolve()))
    from difflab.allocator import keep_freed_memory

    keep_freed_memory()  # first, as run.py does
    import torch
    from omegaconf import OmegaConf

    from difflab.models import build_unet

    cfg = OmegaConf.to_container(OmegaConf.load(args.src.resolve().parent / "conf" / "unet" / f"{args.unet}.yaml"))
    cfg.pop("defaults", None)
    cfg["dropout"] = args.dropout
    shape = (3, 32, 32) if args.unet == "ddpm_cifar" else (1, 28, 28)
    torch.manual_seed(0)
    net = build_unet(OmegaConf.create(cfg), in_channels=shape[0], image_size=shape[1], num_classes=10)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x = torch.randn(args.batch, *shape).contiguous(memory_format=torch.channels_last)
    t, y = torch.randint(0, 1000, (args.batch,)), torch.randint(0, 10, (args.batch,))

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            out = net(x, t, y)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(3):
        step()
    times = sorted(step() for _ in range(args.steps))
    print(json.dumps({"src": str(args.src), "unet": args.unet, "batch": args.batch, "dropout": args.dropout,
                      "ms_median": round(1000 * times[len(times) // 2], 1), "ms_min": round(1000 * times[0], 1)}))


if __name__ == "__main__":
    main()
