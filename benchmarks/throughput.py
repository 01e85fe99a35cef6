"""Training and sampling throughput of difflab's networks; prints one JSON object.

Each case runs in its own subprocess so its peak memory (max RSS on the CPU, max allocated on
CUDA) is its own. The forward FLOPs per image are counted (torch.utils.flop_counter), so the
training FLOP rate (3x forward per image) and, given the device's peak, the model FLOP
utilisation (MFU) come out too. Usage:

    python benchmarks/throughput.py [--device cpu|cuda] [--cases small,ddpm_cifar] [--steps 5]
    # the GPU matrix of issue 7 (fp32 eager, bf16 eager, bf16 compiled; H100 dense bf16 ~800 TFLOP/s measured):
    python benchmarks/throughput.py --device cuda --cases ddpm_cifar --train-batch 128 --channels-last \
        --precision fp32,bf16,bf16+compile --peak-tflops 800
    # what keeping freed memory in the process buys (difflab/allocator.py; run.py always does):
    python benchmarks/throughput.py --allocator default,tuned --steps 10
"""

from __future__ import annotations

import argparse
import itertools
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


def forward_flops(net, shape, classes: int, device) -> float:
    """Multiply-adds x 2 of one image's forward pass, as counted by torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *shape, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if classes else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, torch.zeros(1, dtype=torch.long, device=device), y)
    return float(counter.get_total_flops())


def measure(case: str, device: str, steps: int, sample_steps: int, precision: str, allocator: str,
            train_batch: int | None, channels_last: bool, peak_tflops: float | None) -> dict:
    import resource

    from difflab.allocator import keep_freed_memory

    tuned = allocator == "tuned" and keep_freed_memory()  # first, as run.py does
    import torch
    from omegaconf import OmegaConf

    from difflab.diffusion import GaussianDiffusion, GuidedDenoiser, make_betas, run_sampler
    from difflab.models import build_unet, count_parameters

    unet_name, shape, classes, train_bs, sample_bs = CASES[case]
    train_bs = train_batch or train_bs
    cfg = OmegaConf.load(REPO / "conf" / "unet" / f"{unet_name}.yaml")
    dev = torch.device(device)
    net = build_unet(cfg, shape[0], shape[1], classes).to(dev)
    flops = forward_flops(net, shape, classes, dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    process = GaussianDiffusion(make_betas("linear", 1000))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)  # as the trainer
    compiled = precision.endswith("+compile")
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision.removesuffix("+compile")]
    model = torch.compile(net) if compiled else net
    x = torch.randn(train_bs, *shape, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (train_bs,), device=dev) if classes else None

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = process.training_loss(lambda xt, t: model(xt, t, y), x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3 if compiled else 1):  # warm-up: allocator, kernels, compilation
        train_step()
    sync()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync()
    train_ips = steps * train_bs / (time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps

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
    train_tflops = train_ips * 3 * flops / 1e12  # backward ~ 2x forward
    return {
        "case": case, "device": device, "precision": precision, "channels_last": channels_last,
        "allocator": "tuned" if tuned else "default", "page_faults_per_train_step": round(faults),
        "threads": torch.get_num_threads(), "params": count_parameters(net), "shape": list(shape),
        "forward_gflop_per_image": round(flops / 1e9, 3), "train_batch": train_bs,
        "train_images_per_s": round(train_ips, 2), "train_tflops": round(train_tflops, 4),
        **({"mfu": round(train_tflops / peak_tflops, 4)} if peak_tflops else {}), "forward_batch": sample_bs,
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
    ap.add_argument("--precision", default="fp32",
                    help="comma-separated: fp32, bf16, bf16+compile (torch.compile of the network)")
    ap.add_argument("--train-batch", type=int, help="training batch (default: the case's)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--allocator", default="tuned",
                    help="comma-separated: tuned (glibc keeps freed memory, as run.py), default (glibc's own)")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak, for the model FLOP utilisation")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA GPU is visible here; run this on a GPU machine, or use --device cpu.")
    if args.one:
        case, precision, allocator = args.one.split(":")
        print(json.dumps(measure(case, args.device, args.steps, args.sample_steps, precision, allocator,
                                 args.train_batch, args.channels_last, args.peak_tflops)))
        return
    results = []
    for case, precision, allocator in itertools.product(args.cases.split(","), args.precision.split(","),
                                                        args.allocator.split(",")):
        cmd = [sys.executable, __file__, "--one", f"{case}:{precision}:{allocator}", "--device", args.device,
               "--steps", str(args.steps), "--sample-steps", str(args.sample_steps)]
        cmd += ["--channels-last"] if args.channels_last else []
        cmd += ["--train-batch", str(args.train_batch)] if args.train_batch else []
        cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:  # one failed configuration (e.g. out of memory) does not lose the others
            results.append({"case": case, "precision": precision, "allocator": allocator,
                            "error": (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]})
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "throughput", "results": results}, indent=2))


if __name__ == "__main__":
    main()
