"""Latent vs pixel diffusion on MNIST at (about) equal wall-clock budget; prints one JSON object.

Runs `python run.py` twice side by side, one torch thread each, each with an empty artifact
cache (so the latent run pays for training its autoencoder and encoding the data set), and
scores both sample sets with a small MNIST classifier this script trains first (held-out
accuracy printed): the accuracy of each sample for the class it was asked for, and the Fréchet
distance between classifier features of the samples and of real test images (FD-clf; the
distance between two halves of the test set is given as its floor). Pick the step counts so
that both runs' training wall clocks (wall time minus sampling) come out about equal.

    python benchmarks/latent_vs_pixel.py --pixel-steps 600 --latent-steps 1000 --ae-steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def run(name: str, overrides: list[str], out: Path, data_dir: str) -> subprocess.Popen:
    args = [sys.executable, str(REPO / "run.py"), *overrides, "train.threads=1", "train.progress=false",
            f"paths.cache_dir={out / name / 'cache'}", f"paths.data_dir={data_dir}", f"hydra.run.dir={out / name / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def train_classifier(images, labels, steps: int = 1500):
    """A small CNN; features = its penultimate layer."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
    net = nn.Sequential(features, nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (128,), generator=gen)
        loss = nn.functional.cross_entropy(net(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), features.eval()


def frechet(a, b) -> float:
    """||mu_a - mu_b||^2 + tr(A + B - 2 (A B)^(1/2)); tr((A B)^(1/2)) = sum of sqrt(eig(A^(1/2) B A^(1/2)))."""
    import numpy as np

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pixel-steps", type=int, default=600)
    ap.add_argument("--latent-steps", type=int, default=1000)
    ap.add_argument("--ae-steps", type=int, default=300)
    ap.add_argument("--latent-unet", default="unet.channels=64,unet.attention_resolutions=[4]")
    ap.add_argument("--num-images", type=int, default=500)
    ap.add_argument("--data-dir", default=os.path.expanduser("~/.cache/difflab/data"))
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()

    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir

    from difflab.cli import CONF_DIR
    from difflab.config import register_configs
    from difflab.data import load_splits, to_model_range

    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="latent_vs_pixel_"))
    common = [f"sample.num_images={args.num_images}", "sample.gif=false"]
    latent_unet = [o for o in args.latent_unet.split(",") if o]
    commands = {
        "pixel": [*common, f"train.max_steps={args.pixel_steps}"],
        "latent": [*common, "autoencoder=kl", f"autoencoder.train.max_steps={args.ae_steps}",
                   f"train.max_steps={args.latent_steps}", *latent_unet],
    }
    t0 = time.perf_counter()
    procs = {name: run(name, cmd, out, args.data_dir) for name, cmd in commands.items()}

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=[f"paths.data_dir={args.data_dir}"])
    train, _ = load_splits(cfg.dataset, cfg.paths.cache_dir)
    from difflab.data import load_split

    test = load_split(cfg.dataset, "test", cfg.paths.cache_dir)
    clf, feats = train_classifier(to_model_range(train.images), train.labels)
    with torch.no_grad():
        x_test = to_model_range(test.images)
        test_acc = float((clf(x_test).argmax(1) == test.labels).float().mean())
        real = feats(x_test[:2000]).numpy()
    floor = frechet(real[:1000], real[1000:2000])

    results = {}
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{name} run failed: {proc.stderr.read()[-2000:]}")
        m = json.loads((out / name / "run" / "metrics.json").read_text())
        data = np.load(out / name / "run" / "samples" / "samples.npz")
        x = to_model_range(torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous())
        with torch.no_grad():
            acc = float((clf(x).argmax(1) == torch.from_numpy(data["labels"])).float().mean())
            fd = frechet(feats(x).numpy(), real[:1000])
        ae = {}
        if name == "latent":
            record = next((out / name / "cache" / "artifacts" / "autoencoder").glob("*/record.json"))
            ae_m = json.loads(record.read_text())["metrics"]
            ae = {"ae_steps": ae_m["steps"], "ae_train_wall_time_s": round(ae_m["train_wall_time_s"], 1),
                  "ae_reconstruction_psnr": round(ae_m["reconstruction_psnr"], 2), "latent_shape": m["latent_shape"]}
        results[name] = {
            "command": "python run.py " + " ".join(commands[name]) + " train.threads=1",
            "steps": m["steps"], "num_params": m["num_params"],
            "diffusion_train_images_per_s": round(m["train_images_per_s"], 1),
            "diffusion_train_wall_time_s": round(m["train_wall_time_s"], 1),
            **ae,
            "wall_time_to_trained_model_s": round(m["wall_time_s"] - m["sampling_seconds"], 1),
            "run_wall_time_s": round(m["wall_time_s"], 1),
            "sampling_images_per_s": round(m["sampling_images_per_s"], 2),
            "sample_class_accuracy": round(acc, 4), "fd_clf": round(fd, 3),
            "grid": str(out / name / "run" / "samples" / "grid.png"),
        }
    print(json.dumps({"benchmark": "latent_vs_pixel", "dataset": "mnist", "threads_per_run": 1,
                      "note": "both runs side by side on a shared 2-core CPU; timings are noisy",
                      "classifier_test_accuracy": round(test_acc, 4), "fd_clf_floor_test_vs_test": round(floor, 3),
                      "elapsed_s": round(time.perf_counter() - t0, 1), "results": results}, indent=2))


if __name__ == "__main__":
    main()
