"""Sampling speed of the cached default model in each memory layout and precision: NCHW against channels_last
(the layout a loaded network gets when it was trained channels_last), fp32 and bf16 autocast, interleaved
(A B C D, A B C D, ..., after one warm-up each) so the machine's drift falls on all alike; prints one JSON object
with each variant's median images/s and how many uint8 pixels the layouts' samples differ in; and the same two layouts
for the networks beside the denoiser (the guidance classifier's gradient, the KL autoencoder's decode and encode: the
run's settings, untrained, since only their time is measured). Usage:

    python benchmarks/sampling_layout.py [--n 250] [--steps 20] [--rounds 3] [--threads 2] [--overrides '...']
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def beside_the_denoiser(cfg, n: int, rounds: int) -> dict:
    """NCHW / channels_last time of the guidance classifier's gradient and the KL autoencoder's decode and encode on
    a batch of n."""
    import torch
    from cached_model import run_config
    from interleaved import interleaved

    from difflab.models import build_classifier
    from difflab.models.autoencoder import build_autoencoder

    c, size = cfg.dataset.channels, cfg.dataset.image_size
    classifier = build_classifier(cfg.classifier, c, size, cfg.dataset.num_classes).eval().requires_grad_(False)
    autoencoder = build_autoencoder(run_config("autoencoder=kl").autoencoder, c, size).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(n, c, size, size, generator=g), torch.rand(n, generator=g)
    y, z = torch.randint(0, cfg.dataset.num_classes, (n,), generator=g), torch.randn(n, *autoencoder.latent_shape)

    def gradient(net):
        x_in = x.clone().requires_grad_(True)
        torch.autograd.grad(torch.log_softmax(net(x_in, t), -1)[torch.arange(n), y].sum(), x_in)

    calls = {}
    for layout in ("nchw", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        clf, ae = copy.deepcopy(classifier).to(memory_format=fmt), copy.deepcopy(autoencoder).to(memory_format=fmt)
        calls[f"classifier_gradient_{layout}"] = lambda clf=clf: gradient(clf)
        calls[f"decode_{layout}"] = lambda ae=ae: torch.no_grad()(ae.decode)(z)
        calls[f"encode_{layout}"] = lambda ae=ae: torch.no_grad()(ae.encode)(x)
    seconds = interleaved(calls, rounds)
    return {"batch": n, "seconds": seconds, "channels_last_speedup": {
        part: seconds[f"{part}_nchw"] / seconds[f"{part}_channels_last"] for part in ("classifier_gradient", "decode",
                                                                                     "encode")}}


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
        "beside_the_denoiser": beside_the_denoiser(cfg, args.n, args.rounds),
    }, indent=2))


if __name__ == "__main__":
    main()
