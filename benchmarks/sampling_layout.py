"""Sampling speed of the cached default model in each memory layout and precision: NCHW against channels_last
(the layout a loaded network gets when it was trained channels_last), fp32 and bf16 autocast, interleaved
(A B C D, A B C D, ..., after one warm-up each) so the machine's drift falls on all alike; prints one JSON object
with each variant's median images/s and how many uint8 pixels the layouts' samples differ in. Usage:

    python benchmarks/sampling_layout.py [--n 250] [--steps 20] [--rounds 3] [--threads 2] [--overrides '...']
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=250)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overrides", default="", help="extra run.py overrides, space separated")
    args = parser.parse_args()

    import torch
    from cached_model import cached_model, run_config
    from interleaved import interleaved

    from difflab.allocator import keep_freed_memory
    from difflab.compress.quantize import Autocast
    from difflab.sampling import sample_images

    keep_freed_memory()  # as run.py does
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = run_config(f"sampler.steps={args.steps}", *args.overrides.split())
    model, path = cached_model(cfg, device)
    nhwc = model.net
    nchw = copy.deepcopy(nhwc).to(memory_format=torch.contiguous_format)
    nets = {"fp32_nchw": nchw, "fp32_channels_last": nhwc,
            "bf16_nchw": Autocast(nchw, torch.bfloat16), "bf16_channels_last": Autocast(nhwc, torch.bfloat16)}
    images = {}

    def draw(name: str, net) -> None:
        model.net = net
        torch.manual_seed(0)
        images[name] = sample_images(model, cfg, args.n, "balanced", device).images

    seconds = interleaved({name: lambda name=name, net=net: draw(name, net) for name, net in nets.items()}, args.rounds)
    rate = {k: args.n / s for k, s in seconds.items()}
    differ = images["fp32_nchw"] != images["fp32_channels_last"]
    print(json.dumps({
        "model": path, "samples": args.n, "sampler": cfg.sampler.name, "steps": args.steps,
        "guidance": cfg.guidance.name, "threads": args.threads, "rounds": args.rounds,
        "images_per_s": rate,
        "channels_last_speedup": {"fp32": rate["fp32_channels_last"] / rate["fp32_nchw"],
                                  "bf16": rate["bf16_channels_last"] / rate["bf16_nchw"]},
        "fp32_pixels_differing": int(differ.sum()), "fp32_pixels": differ.numel(),
    }, indent=2))


if __name__ == "__main__":
    main()
