"""The seeds' recipes as presets (`+experiment=NAME`): each composes with the seed's settings and
validates, each runs end to end with tiny overrides on the shapes folder (the CIFAR and MNIST data
sets are not available offline), and docs/presets.md's table lists exactly these presets."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_AE, read_metrics, run_py, tiny_overrides
from hydra import compose

from difflab.cli import CONF_DIR
from difflab.models import count_parameters
from difflab.plan import build_plan
from difflab.trained import build_denoiser_net

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
TABLE = REPO / "docs" / "presets.md"

# The preset's networks shrunk to the tiny run's: every setting the presets give, so none survives.
TINY_UNET = ["unet.channels=16", "unet.channel_mults=[1,2]", "unet.num_res_blocks=1", "unet.attention_resolutions=[8]",
             "unet.head_channels=8", "unet.norm_groups=8", "unet.dropout=0.0", "train.threads=1"]
TINY_MLP = ["unet.channels=32", "unet.num_res_blocks=2", "train.threads=1"]
TINY_LATENT = [*TINY_AE, "autoencoder.channel_mults=[1,2,2]", "autoencoder.norm_groups=8",
               "autoencoder.codebook_size=16", "autoencoder.latent_channels=4", "autoencoder.discriminator.start=4",
               "autoencoder.discriminator.num_layers=2"]  # 70x70 patches need more than 16x16 images




def _compose(name: str, *overrides: str):
    return compose(config_name="config", overrides=[f"+experiment={name}", "dataset.root=/tmp/images", *overrides])


def test_one_preset_per_seed():
    assert PRESETS == sorted(["mnist_ldm_joint", "cifar10_ddpm", "vq_ldm", "ddpm_full", "cifar100_vector_ldm"])
    for name in PRESETS:
        text = (Path(CONF_DIR) / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n# Seed 00"), name
        assert "Reported:" in text and "Cost:" in text, name  # what the seed reported and what the recipe costs


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_plans(hydra_ctx, name, tmp_path, shapes_dir):
    cfg = _compose(name, f"paths.cache_dir={tmp_path}", f"dataset.root={shapes_dir}")  # read by vq_ldm's folder
    plan = build_plan(cfg, None)  # every check of a real run, nothing trained
    assert plan.steps and plan.mode == cfg.mode.name
    assert cfg.objective.name == "ddpm" and cfg.schedule.T == 1000 and cfg.sampler.name == "ddpm"


def test_presets_carry_their_seeds_settings(hydra_ctx):
    c = _compose("mnist_ldm_joint")
    assert (c.dataset.name, c.dataset.image_size, c.dataset.channels) == ("mnist", 32, 3)
    assert (c.autoencoder.name, c.autoencoder.latent_channels, c.unet.channels) == ("kl", 2, 32)
    assert (c.mode.name, c.guidance.name, c.classifier.weight) == ("joint", "classifier", 1.0)

    c = _compose("cifar10_ddpm")
    assert (c.dataset.name, c.train.lr, c.train.batch_size, c.train.max_steps, c.train.ema.decay) == (
        "cifar10", 2e-4, 128, 800000, 0.9999)
    net = build_denoiser_net(c, (3, 32, 32), 0)
    assert round(count_parameters(net) / 1e6, 1) == 35.7
    assert _compose("cifar10_ddpm", "schedule=dns").schedule.name == "dns"  # the seed's variant

    c = _compose("vq_ldm")
    ae = c.autoencoder
    assert (ae.name, ae.codebook_size, ae.latent_channels, ae.commitment) == ("vq", 8192, 256, 0.25)
    assert ae.discriminator.enabled and ae.discriminator.num_layers == 3  # 70x70 patches
    assert (c.schedule.name, list(c.unet.attention_resolutions), c.train.grad_clip) == ("cosine", [16, 8], 1.0)

    c = _compose("ddpm_full")
    assert [c.unet.channels * m for m in c.unet.channel_mults] == [64, 128, 256, 512]
    assert c.unet.channels * c.unet.channel_mults[1] // c.unet.head_channels == 8  # heads at the 16x16 level
    assert (c.train.lr_schedule, c.train.grad_clip, c.dataset.augmentation.hflip) == ("cosine", 1.0, True)

    c = _compose("cifar100_vector_ldm")
    assert (c.dataset.name, c.autoencoder.latent, c.autoencoder.latent_dim, c.unet.name) == (
        "cifar100", "vector", 128, "mlp")


def test_the_docs_and_readme_tables_list_the_presets():
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| (\d{3}) \|", TABLE.read_text(), flags=re.M)
    assert sorted(name for name, _ in rows) == PRESETS
    for name, seed in rows:
        text = (Path(CONF_DIR) / "experiment" / f"{name}.yaml").read_text()
        assert f"# Seed {seed}" in text, (name, seed)
    readme = re.findall(r"^\| `([a-z0-9_]+)` \|", (REPO / "README.md").read_text(), flags=re.M)
    assert sorted(readme) == PRESETS  # the README's short table too


def test_an_unknown_preset_is_one_sentence(tmp_path):
    proc = run_py("+experiment=cifar10", "dry_run=true", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "+experiment=cifar10 is not an option: choose one of cifar100_vector_ldm, cifar10_ddpm" in proc.stderr


def _tiny(name: str, shapes_dir: Path, cache: Path) -> list[str]:
    base = [o for o in tiny_overrides(shapes_dir, cache) if o != "unet=tiny"]
    latent = name in ("mnist_ldm_joint", "vq_ldm", "cifar100_vector_ldm")
    return [*base, *(TINY_MLP if name == "cifar100_vector_ldm" else TINY_UNET), *(TINY_LATENT if latent else [])]


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_end_to_end(name, shapes_dir, cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_py(f"+experiment={name}", *_tiny(name, shapes_dir, cache), f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(run_dir)
    assert m["trained"] is True and m["steps"] == 6
    images = np.load(run_dir / "samples" / "samples.npz")["images"]
    assert images.shape == (8, 16, 16, 1) and images.dtype == np.uint8
    if name == "mnist_ldm_joint":
        assert m["classifier_source"] == "run" and (run_dir / "classifier_guided_samples").is_dir()
    if name == "cifar100_vector_ldm":
        assert m["latent_shape"] == [128, 1, 1]
    if name == "vq_ldm":
        assert m["latent_shape"] == [4, 4, 4]
