"""The network's share of each compression variant's speed-up: one forward pass of the cached default model's
network at the sampling batch under CFG (500 = 250 images x conditional/unconditional), fp32 in NCHW and in
channels_last (the layout sampling uses), bf16 autocast, int8 (compress.quantize's PT2E graph) and the network
pruned by each --prune amount (widths only: speed does not depend on the fine-tuning). The variants run
interleaved in one process, --rounds times, so the machine's drift falls on all alike; prints one JSON object with
each one's median seconds, its speed-up over fp32 channels_last and its relative L2 error on the same inputs.

    python benchmarks/compression_forward.py [--batch 500] [--rounds 8] [--prune 0.3,0.5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prune", default="0.3,0.5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overrides", default="", help="extra run.py overrides, space separated")
    args = parser.parse_args()

    import torch
    from cached_model import cached_model, run_config
    from interleaved import interleaved

    from difflab.allocator import keep_freed_memory
    from difflab.compress.prune import prune_unet
    from difflab.compress.quantize import Autocast, calibration_inputs, quantize_int8
    from difflab.models import count_parameters

    keep_freed_memory()  # as run.py does
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = torch.device("cpu")
    cfg = run_config("compress.quantize=int8", *args.overrides.split())
    model, path = cached_model(cfg, device)
    net = model.net
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *model.shape, generator=gen)
    inputs = (*model.process.net_inputs(x, model.process.draw_levels(args.batch, device)),
              torch.randint(0, model.num_classes + 1, (args.batch,), generator=gen) if model.num_classes else None)
    t0 = time.perf_counter()
    int8 = quantize_int8(copy.deepcopy(net), calibration_inputs(model, cfg, device), model.num_classes)
    quantize_s = time.perf_counter() - t0
    nets = {"fp32_nchw": copy.deepcopy(net).to(memory_format=torch.contiguous_format), "fp32": net,
            "bf16": Autocast(net, torch.bfloat16), "int8": int8}
    params = {}
    for amount in (float(a) for a in args.prune.split(",") if a):
        pruned = prune_unet(net, amount, tuple(t[:2] if t is not None else None for t in inputs))
        nets[f"pruned{round(100 * amount)}"] = pruned.to(memory_format=torch.channels_last).eval()
        params[f"pruned{round(100 * amount)}"] = count_parameters(pruned)
    reference = net(*inputs).float()
    error = {k: float((n(*inputs).float() - reference).norm() / reference.norm()) for k, n in nets.items()}
    median = interleaved({name: lambda n=n: n(*inputs) for name, n in nets.items()}, args.rounds)
    print(json.dumps({
        "model": path, "batch": args.batch, "rounds": args.rounds, "threads": args.threads,
        "params": {"original": count_parameters(net), **params}, "int8_prepare_calibrate_compile_s": quantize_s,
        "median_s": median, "speedup_vs_fp32_channels_last": {k: median["fp32"] / v for k, v in median.items()},
        "relative_l2_error": error,
    }, indent=2))


if __name__ == "__main__":
    main()
