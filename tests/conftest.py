"""Shared fixtures: a tiny labelled image folder and a way to run `python run.py` as a user does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one thread each (so do their run.py)
    os.environ["OMP_NUM_THREADS"] = "1"


def make_shapes_folder(root: Path, per_class: int = 24, size: int = 16) -> Path:
    """Two classes a tiny model can tell apart: a bright square and a bright ring."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for cls in ("ring", "square"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            c = size / 2 + rng.uniform(-2, 2, 2)
            r = size / 4 + rng.uniform(-1, 1)
            if cls == "square":
                img = (np.abs(yy - c[0]) < r) & (np.abs(xx - c[1]) < r)
            else:
                img = np.abs(np.hypot(yy - c[0], xx - c[1]) - r) < 1.2
            Image.fromarray((img * 255).astype(np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def hydra_ctx():
    """Hydra initialised on difflab's conf/, for tests that compose configs in-process."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from difflab.cli import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    return make_shapes_folder(tmp_path_factory.mktemp("shapes"))


# A tiny KL autoencoder's settings, for latent runs on tiny configs.
TINY_AE = ["autoencoder.channels=16", "autoencoder.train.max_steps=8", "autoencoder.train.batch_size=8",
           "autoencoder.train.warmup_steps=2", "train.threads=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """An artifact cache shared by a test file's runs (a file may define its own)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_dir) -> Path:
    """One tiny class-conditional training run per test file, shared by the tests that read its
    outputs (its checkpoints, samples/samples.npz); a file may define its own."""
    base = tmp_path_factory.mktemp("run")
    run_dir = base / "train"
    proc = run_py(*tiny_overrides(shapes_dir, base / "cache"), f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def tiny_overrides(data_dir: Path, cache_dir: Path, objective: str = "ddpm") -> list[str]:
    """A run that finishes in seconds on a CPU but goes through every stage of the real one
    (objective=ddpm on a 50-step schedule unless another objective is named)."""
    return [
        "dataset=folder", f"dataset.root={data_dir}", "dataset.image_size=16", "dataset.channels=1",
        "dataset.val_size=8", "unet=tiny", *(["schedule.T=50"] if objective == "ddpm" else [f"objective={objective}"]),
        "sampler.steps=5",
        "train.max_steps=6", "train.batch_size=8", "train.log_every=2", "train.val_every=3",
        "train.checkpoint_every=3", "train.image_every=3", "train.warmup_steps=2", "train.progress=false",
        "sample.num_images=8", "sample.batch_size=4", "sample.gif_images=2", "sample.gif_frames=3",
        "classifier.channels=16", "classifier.norm_groups=8", "classifier.max_steps=6", "classifier.batch_size=8",
        f"paths.cache_dir={cache_dir}", "device=cpu",
        "eval.num_samples=0",  # tests of evaluation turn it on with eval.classifier_steps tiny
    ]


def run_py(*args: str, cwd: Path | None = None, timeout: int = 300, nproc: int = 1) -> subprocess.CompletedProcess:
    """`python run.py ARGS`; with nproc > 1 `torchrun --standalone --nproc_per_node=NPROC run.py ARGS`."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    env.pop("PYTEST_CURRENT_TEST", None)
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *torchrun, str(REPO / "run.py"), *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def plan_sources(table: str) -> dict[str, str]:
    """step -> source of the plan table `dry_run=true` prints (columns are 2+ spaces apart)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in table.strip().splitlines()]
    assert rows[0][:2] == ["step", "source"], table
    return {row[0]: row[1] for row in rows[1:]}


def nhwc_convolutions(net: torch.nn.Module) -> list[bool]:
    """For each spatial convolution of `net` over more than one channel: whether its weights are channels_last."""
    return [c.weight.is_contiguous(memory_format=torch.channels_last) and not c.weight.is_contiguous()
            for c in net.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size != (1, 1) and c.in_channels > 1]
