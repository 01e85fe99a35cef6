"""Every option of every config group composes, alone and in every combination, and passes
validation (lightning-hydra-template's test_configs pattern)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from difflab.cli import CONF_DIR, _rewrite_ckpt_shorthand
from difflab.config import GROUP_SCHEMAS, validate

GROUPS = list(GROUP_SCHEMAS)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def hydra_ctx():
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        yield
    GlobalHydra.instance().clear()


def _compose(overrides: list[str]):
    cfg = compose(config_name="config", overrides=overrides)
    if cfg.dataset.name == "folder":
        cfg.dataset.root = "/tmp/images"  # the one mandatory value a user must give
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return cfg


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), group
    assert {"mnist", "fashion_mnist", "cifar10", "cifar100", "folder"} <= set(options("dataset"))
    assert {"tiny", "small", "ddpm_cifar"} <= set(options("unet"))
    assert {"linear", "cosine", "dns"} <= set(options("schedule"))
    assert {"ddpm", "ddim"} <= set(options("sampler"))


def test_default_config_composes(hydra_ctx):
    cfg = _compose([])
    assert cfg.dataset.name == "mnist" and cfg.mode.name == "diffusion"
    assert cfg.train.max_steps > 0 and cfg.sample.num_images == 100


@pytest.mark.parametrize("group", GROUPS)
def test_each_option_composes(hydra_ctx, group):
    for option in options(group):
        cfg = _compose([f"{group}={option}"])
        assert cfg[group].name == option


def test_combinations_compose(hydra_ctx):
    """Every dataset x unet x mode combination (where sizes interact), with the options of the
    other groups cycled through so each appears in several combinations."""
    others = [g for g in GROUPS if g not in ("dataset", "unet", "mode")]
    cycles = {g: itertools.cycle(options(g)) for g in others}
    count = 0
    for dataset, unet, mode in itertools.product(options("dataset"), options("unet"), options("mode")):
        chosen = [f"dataset={dataset}", f"unet={unet}", f"mode={mode}"] + [f"{g}={next(cycles[g])}" for g in others]
        _compose(chosen)
        count += 1
    assert count == len(options("dataset")) * len(options("unet")) * len(options("mode"))


def test_issue_example_composes(hydra_ctx):
    cfg = _compose(["dataset=mnist", "mode=diffusion", "schedule=cosine", "sampler=ddim", "sampler.steps=50"])
    assert cfg.schedule.name == "cosine" and cfg.sampler.steps == 50


def test_ckpt_shorthand():
    assert _rewrite_ckpt_shorthand(["mode=sample", "ckpt=/a/last.pt", "ckpt.autoencoder=/b.pt"]) == [
        "mode=sample", "ckpt.model=/a/last.pt", "ckpt.autoencoder=/b.pt"]


def test_evaluation_keys_compose(hydra_ctx):
    cfg = _compose(["mode=evaluate", "ckpt.model=/a/last.pt", "eval.num_samples=2000", "eval.batch_size=100",
                    "eval.extractors=[classifier]", "eval.inception_weights=/w/inception.pth",
                    "eval.classifier_steps=300", "eval.classifier_batch_size=64"])
    assert cfg.mode.name == "evaluate" and cfg.eval.num_samples == 2000 and list(cfg.eval.extractors) == ["classifier"]
    assert cfg.eval.inception_weights == "/w/inception.pth" and cfg.eval.classifier_steps == 300
    assert list(_compose([]).eval.extractors) == ["inception", "classifier"]
