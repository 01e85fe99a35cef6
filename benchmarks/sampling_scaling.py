"""How sampling cost grows with sampler steps and with batch size; prints JSON, draws a PNG.

Sampling should cost (fixed overhead) + steps x batch x (cost of one image-step): linear in each.
This times whole DDIM runs of the default MNIST network (`unet=small`, 1x28x28, 10 classes;
random weights, which cost the same as trained ones) over a grid of steps at a fixed batch and of
batches at fixed steps, fits a line to each, and reports the slope (seconds per step, per image),
the intercept and R^2. Usage:

    python benchmarks/sampling_scaling.py [--unet small] [--steps 5,10,25,50,100] [--batches 8,16,32,64,128]
        [--png benchmarks/results/sampling_scaling.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def line_fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares y = a + b x with its R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept_s": round(a, 4), "slope_s": round(b, 5), "r2": round(1 - ss_res / ss_tot, 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet", default="small")
    ap.add_argument("--steps", default="5,10,25,50,100")
    ap.add_argument("--batches", default="8,16,32,64,128")
    ap.add_argument("--fixed-batch", type=int, default=64)
    ap.add_argument("--fixed-steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--png", default=str(REPO / "benchmarks" / "results" / "sampling_scaling.png"))
    args = ap.parse_args()

    from difflab.allocator import keep_freed_memory

    keep_freed_memory()  # as run.py does
    import torch
    from omegaconf import OmegaConf

    from difflab.diffusion import GaussianDiffusion, GuidedDenoiser, make_betas, run_sampler
    from difflab.models import build_unet

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_unet(OmegaConf.load(REPO / "conf" / "unet" / f"{args.unet}.yaml"), 1, 28, 10).eval()
    process = GaussianDiffusion(make_betas("linear", 1000), "v")

    def seconds(steps: int, batch: int) -> float:
        labels = torch.arange(batch) % 10
        denoiser = GuidedDenoiser(net=net, process=process, y=labels, null_class=10)
        noise = torch.randn(batch, 1, 28, 28)
        t0 = time.perf_counter()
        run_sampler("ddim", denoiser, process, noise, steps)
        return time.perf_counter() - t0

    seconds(5, args.fixed_batch)  # warm-up: allocator, kernels
    steps = [int(s) for s in args.steps.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    by_steps = [seconds(s, args.fixed_batch) for s in steps]
    by_batch = [seconds(args.fixed_steps, b) for b in batches]
    report = {
        "benchmark": "sampling_scaling", "unet": args.unet, "sampler": "ddim", "threads": torch.get_num_threads(),
        "by_steps": {"batch": args.fixed_batch, "steps": steps, "seconds": [round(s, 3) for s in by_steps],
                     "fit": line_fit(steps, by_steps)},
        "by_batch": {"steps": args.fixed_steps, "batch": batches, "seconds": [round(s, 3) for s in by_batch],
                     "fit": line_fit(batches, by_batch)},
        "image_steps_per_s": round(args.fixed_batch * steps[-1] / by_steps[-1], 1),
    }
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, xs, ys, key, label in ((axes[0], steps, by_steps, "by_steps", f"steps (batch {args.fixed_batch})"),
                                       (axes[1], batches, by_batch, "by_batch", f"batch ({args.fixed_steps} steps)")):
            fit = report[key]["fit"]
            ax.plot(xs, ys, "o", label="measured")
            ax.plot(xs, [fit["intercept_s"] + fit["slope_s"] * x for x in xs], "-", label=f"linear fit, R²={fit['r2']:.4f}")
            ax.set_xlabel(label)
            ax.set_ylabel("seconds per DDIM run")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"DDIM sampling cost, unet={args.unet}, {torch.get_num_threads()} threads")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        report["png"] = str(Path(args.png).relative_to(REPO)) if Path(args.png).is_relative_to(REPO) else args.png
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
