"""Encode, decode and training throughput of the autoencoders (conf/autoencoder/*.yaml); prints
one JSON object. Encode is what the encode-once latent cache pays once per data set; decode is
what sampling a latent model pays per image.

    python benchmarks/autoencoder_throughput.py [--device cpu|cuda] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SHAPES = {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}


def measure(name: str, shape: tuple[int, int, int], device: str, repeats: int, batch: int, train_batch: int) -> dict:
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from difflab.models import count_parameters
    from difflab.models.autoencoder import build_autoencoder

    dev = torch.device(device)
    ae = build_autoencoder(OmegaConf.load(REPO / "conf" / "autoencoder" / f"{name}.yaml"), shape[0], shape[1]).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def rate(fn, n: int) -> float:
        fn()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return round(repeats * n / (time.perf_counter() - t0), 1)

    x = torch.randn(batch, *shape, device=dev)
    ae.eval()
    with torch.inference_mode():
        z = ae.encode(x)
        encode = rate(lambda: ae.encode(x), batch)
        decode = rate(lambda: ae.decode(z), batch)
    ae.train()
    opt = torch.optim.AdamW(ae.parameters(), 1e-3)
    xt = torch.randn(train_batch, *shape, device=dev)

    def step():
        out = ae(xt)
        loss = F.mse_loss(out.reconstruction, xt) + out.regularizer
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"autoencoder": name, "image_shape": list(shape), "latent_shape": list(ae.latent_shape),
            "params": count_parameters(ae), "batch": batch, "encode_images_per_s": encode,
            "decode_images_per_s": decode, "train_batch": train_batch, "train_images_per_s": rate(step, train_batch)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = [measure(name, shape, args.device, args.repeats, args.batch, args.train_batch)
               for name in ("kl", "vq") for shape in SHAPES.values()]
    print(json.dumps({"benchmark": "autoencoder_throughput", "device": args.device, "threads": args.threads,
                      "precision": "fp32", "results": results}, indent=2))


if __name__ == "__main__":
    main()
