"""Training and sampling throughput of difflab's networks; prints one JSON object.

Each case runs in its own subprocess so its peak memory (max RSS on the CPU, max allocated on
CUDA) is its own. Usage:

    python benchmarks/throughput.py [--device cpu|cuda] [--cases small,ddpm_cifar] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# name -> (unet config, (C, H, W), classes, train batch, sample batch)
CASES = {
    "small": ("small", (1, 28, 28), 10, 128, 250),
    "ddpm_cifar": ("ddpm_cifar", (3, 32, 32), 0, 32, 64),
}


def measure(case: str, device: str, steps: int, sample_steps: int, precision: str) -> dict:
    import resource

    import torch
    from omegaconf import OmegaConf

    from difflab.diffusion import GaussianDiffusion, GuidedDenoiser, make_betas, run_sampler
    from difflab.models import build_unet, count_parameters

    unet_name, shape, classes, train_bs, sample_bs = CASES[case]
    cfg = OmegaConf.load(REPO / "conf" / "unet" / f"{unet_name}.yaml")
    dev = torch.device(device)
    net = build_unet(cfg, shape[0], shape[1], classes).to(dev)
    process = GaussianDiffusion(make_betas("linear", 1000))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=True)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    x = torch.randn(train_bs, *shape, device=dev)
    y = torch.randint(0, classes, (train_bs,), device=dev) if classes else None

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = process.training_loss(lambda xt, t: net(xt, t, y), x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_step()  # warm-up: allocator, kernels
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync()
    train_ips = steps * train_bs / (time.perf_counter() - t0)

    net.eval()
    ys = torch.randint(0, classes, (sample_bs,), device=dev) if classes else None
    den = GuidedDenoiser(net=lambda a, t, c: net(a, t, c), process=process, y=ys)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        xs = torch.randn(sample_bs, *shape, device=dev)
        net(xs, torch.zeros(sample_bs, dtype=torch.long, device=dev), ys)
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            net(xs, torch.zeros(sample_bs, dtype=torch.long, device=dev), ys)
        sync()
        forward_ips = 3 * sample_bs / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_sampler("ddim", den, process, xs, sample_steps)
        sync()
        ddim_s = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "case": case, "device": device, "precision": precision, "threads": torch.get_num_threads(),
        "params": count_parameters(net), "shape": list(shape), "train_batch": train_bs,
        "train_images_per_s": round(train_ips, 2), "forward_batch": sample_bs,
        "forward_images_per_s": round(forward_ips, 2),
        f"ddim{sample_steps}_images_per_s": round(sample_bs / ddim_s, 3),
        "peak_memory_mb": round(peak / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.steps, args.sample_steps, args.precision)))
        return
    results = []
    for case in args.cases.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", case, "--device", args.device, "--steps",
                              str(args.steps), "--sample-steps", str(args.sample_steps), "--precision",
                              args.precision], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "throughput", "results": results}, indent=2))


if __name__ == "__main__":
    main()
