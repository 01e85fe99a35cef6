"""difflab's UNet against diffusers' UNet2DModel built with the same architecture; prints JSON.

The DDPM CIFAR-10 network (`unet=ddpm_cifar`: channels 128,256,256,256, 2 ResBlocks per level,
attention at 16x16 with 64-channel heads, dropout 0.1, 35.7M parameters in both) at 32x32x3:

- training images/s at batch 32 (noise, forward, MSE, backward, AdamW step; the same step for
  both networks, so only the networks differ);
- no-grad forward images/s at batch 64;
- a whole DDIM-50 run at batch 64, each library with its own sampler loop (diffusers'
  DDIMScheduler as its pipelines use it);
- peak RSS of a training process per network (`--memory`, each in its own subprocess).

Timings interleave the networks step by step in one process and report medians, so load on the
machine hits both alike. The process keeps freed memory as run.py does (difflab/allocator.py),
for both networks alike, so the ratios compare the networks alone. difflab runs as its trainer
runs it (channels_last, the default since 2026-11-24), and also in NCHW; diffusers as shipped
(NCHW) and, for fairness, in channels_last too. Without diffusers (`pip install -e '.[bench]'`)
only difflab's figures are printed.

    python benchmarks/vs_diffusers.py [--threads 2] [--rounds 7] [--ddim] [--memory] [--device cpu]
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
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from interleaved import interleaved  # noqa: E402

from difflab.allocator import keep_freed_memory  # noqa: E402

SHAPE = (3, 32, 32)
TRAIN_BATCH, FORWARD_BATCH = 32, 64


def difflab_net() -> torch.nn.Module:
    from omegaconf import OmegaConf

    from difflab.models import build_unet

    return build_unet(OmegaConf.load(REPO / "conf" / "unet" / "ddpm_cifar.yaml"), SHAPE[0], SHAPE[1], 0)


def diffusers_net() -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1,
        attention_head_dim=64, norm_num_groups=32,
    )


def have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


class Subject:
    """One network in one memory format, with its optimizer and a uniform eps(x, t) call."""

    def __init__(self, name: str, net: torch.nn.Module, channels_last: bool, device: torch.device):
        self.name, self.channels_last = name, channels_last
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(device).to(memory_format=self.format)
        self.is_diffusers = name.startswith("diffusers")
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4, fused=True)  # as the trainer

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(x.contiguous(memory_format=self.format), t)
        return out.sample if self.is_diffusers else out

    def train_step(self, x0: torch.Tensor, alpha_bar: torch.Tensor) -> None:
        t = torch.randint(0, len(alpha_bar), (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(self.eps(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t), noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def ddim_seconds(subject: Subject, noise: torch.Tensor, steps: int, sync) -> float:
    """One whole DDIM run (eta=0, linear betas as in DDPM): difflab's sampler, or diffusers' scheduler."""
    t0 = time.perf_counter()
    if subject.is_diffusers:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
        sched.set_timesteps(steps)
        x = noise.clone()
        with torch.no_grad():  # as diffusers' pipelines run it
            for t in sched.timesteps:
                x = sched.step(subject.eps(x, t.expand(len(x)).to(x.device)), t, x).prev_sample
    else:
        from difflab.diffusion import GaussianDiffusion, GuidedDenoiser, make_betas, run_sampler

        process = GaussianDiffusion(make_betas("linear", 1000), "eps")
        run_sampler("ddim", GuidedDenoiser(net=lambda a, t, c: subject.eps(a, t), process=process), process, noise, steps)
    sync()
    return time.perf_counter() - t0


def peak_rss_mb(which: str, channels_last: bool, steps: int = 3) -> float:
    """Peak RSS of a fresh process that builds one network and trains it `steps` steps."""
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {str(REPO / 'benchmarks')!r});"
            f"import vs_diffusers as b; print(b.memory_child({which!r}, {channels_last}, {steps}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(which: str, channels_last: bool, steps: int) -> float:
    keep_freed_memory()
    torch.set_num_threads(2)
    device = torch.device("cpu")
    subject = Subject(which, difflab_net() if which.startswith("difflab") else diffusers_net(), channels_last, device)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    x0 = torch.randn(TRAIN_BATCH, *SHAPE)
    for _ in range(steps):
        subject.train_step(x0, alpha_bar)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child started from a
    # large parent would report the parent's peak.
    status = Path("/proc/self/status").read_text()
    return round(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7, help="timed calls per network (medians are reported)")
    ap.add_argument("--ddim", action="store_true",
                    help="also time whole DDIM-50 runs at batch 64, twice per library (minutes on a CPU)")
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--memory", action="store_true", help="also measure each network's peak training RSS")
    args = ap.parse_args()

    allocator = "tuned" if keep_freed_memory() else "default"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    compare = have_diffusers()
    subjects = [Subject("difflab_channels_last", difflab_net(), True, device),
                Subject("difflab_nchw", difflab_net(), False, device)]
    if compare:
        subjects += [Subject("diffusers_nchw", diffusers_net(), False, device),
                     Subject("diffusers_channels_last", diffusers_net(), True, device)]
    params = {s.name: sum(p.numel() for p in s.net.parameters()) for s in subjects}

    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0).to(device)
    x0 = torch.randn(TRAIN_BATCH, *SHAPE, device=device)
    for s in subjects:
        s.net.train()
    train_s = interleaved({s.name: lambda s=s: s.train_step(x0, alpha_bar) for s in subjects}, args.rounds, sync)

    xf = torch.randn(FORWARD_BATCH, *SHAPE, device=device)
    tf = torch.randint(0, 1000, (FORWARD_BATCH,), device=device)
    for s in subjects:
        s.net.eval()
    with torch.inference_mode():
        forward_s = interleaved({s.name: lambda s=s: s.eps(xf, tf) for s in subjects}, args.rounds, sync)

    results = {s.name: {"params": params[s.name],
                        "train_images_per_s": round(TRAIN_BATCH / train_s[s.name], 3),
                        "forward_images_per_s": round(FORWARD_BATCH / forward_s[s.name], 3)} for s in subjects}
    if args.ddim:  # the two headline subjects in the order A B B A, the faster of each pair
        noise = torch.randn(FORWARD_BATCH, *SHAPE, device=device)
        pair = [s for s in subjects if s.name in ("difflab_channels_last", "diffusers_nchw")]
        seconds: dict[str, list[float]] = {s.name: [] for s in pair}
        for s in pair + pair[::-1]:
            seconds[s.name].append(ddim_seconds(s, noise, args.ddim_steps, sync))
        for name, runs in seconds.items():
            results[name][f"ddim{args.ddim_steps}_seconds"] = round(min(runs), 2)
            results[name][f"ddim{args.ddim_steps}_images_per_s"] = round(FORWARD_BATCH / min(runs), 3)
    if args.memory and device.type == "cpu":
        for s in subjects:
            results[s.name]["train_peak_rss_mb"] = peak_rss_mb(s.name, s.channels_last)

    report = {"benchmark": "vs_diffusers", "device": str(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "allocator": allocator, "train_batch": TRAIN_BATCH,
              "forward_batch": FORWARD_BATCH, "rounds": args.rounds, "results": results}
    if compare:
        import diffusers

        report["diffusers"] = diffusers.__version__
        ours, theirs = results["difflab_channels_last"], results["diffusers_nchw"]
        report["speedup_vs_diffusers"] = {
            key: round(ours[key] / theirs[key], 3) for key in ours
            if key.endswith("images_per_s") and key in theirs
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
