"""Every option of every config group composes, alone and in every combination, and passes
validation (lightning-hydra-template's test_configs pattern)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose
from omegaconf import OmegaConf

from difflab.cli import CONF_DIR, _objective_for_ddpm_settings, _rewrite_ckpt_shorthand
from difflab.config import GROUP_SCHEMAS, validate

GROUPS = list(GROUP_SCHEMAS)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))




# Options valid only beside another group's option: the partner replaces that group's choice.
PARTNERS = {"mode=reconstruction": ("autoencoder", "kl")}


def _with_partners(overrides: list[str]) -> list[str]:
    for option, (group, partner) in PARTNERS.items():
        if option in overrides:
            overrides = [o for o in overrides if not o.startswith(f"{group}=")] + [f"{group}={partner}"]
    return overrides


def _compose(overrides: list[str]):
    cfg = compose(config_name="config", overrides=_with_partners(overrides))
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
    """Every dataset x unet combination (where sizes interact), twice, with the options of the
    other groups (mode included) cycled through so each appears in several combinations."""
    others = [g for g in GROUPS if g not in ("dataset", "unet")]
    cycles = {g: itertools.cycle(options(g)) for g in others}
    seen = {g: set() for g in others}
    for dataset, unet, _ in itertools.product(options("dataset"), options("unet"), range(2)):
        chosen = {g: next(cycles[g]) for g in others}
        cfg = _compose([f"dataset={dataset}", f"unet={unet}"] + [f"{g}={o}" for g, o in chosen.items()])
        assert cfg.dataset.name == dataset and cfg.unet.name == unet
        for g, option in chosen.items():
            seen[g].add(option)
    assert all(seen[g] == set(options(g)) for g in others), seen


def test_issue_example_composes(hydra_ctx):
    cfg = _compose(["dataset=mnist", "mode=diffusion", "schedule=cosine", "sampler=ddim", "sampler.steps=50"])
    assert cfg.schedule.name == "cosine" and cfg.sampler.steps == 50


def test_latent_examples_compose(hydra_ctx):
    """The README's latent diffusion commands, seed 000's geometry and seed 002's options."""
    cfg = _compose(["dataset=mnist", "autoencoder=kl", "mode=reconstruction", "autoencoder.train.max_steps=50"])
    assert cfg.autoencoder.name == "kl" and cfg.autoencoder.train.max_steps == 50 and cfg.autoencoder.train.lr == 1e-3
    cfg = _compose(["dataset=mnist", "autoencoder=vq", "autoencoder.discriminator.enabled=true", "ckpt.autoencoder=/a.pt"])
    assert cfg.autoencoder.discriminator.enabled and cfg.autoencoder.commitment == 0.25 and cfg.ckpt.autoencoder == "/a.pt"
    assert {"none", "kl", "vq"} <= set(options("autoencoder")) and "reconstruction" in options("mode")


def test_ckpt_shorthand():
    assert _rewrite_ckpt_shorthand(["mode=sample", "ckpt=/a/last.pt", "ckpt.autoencoder=/b.pt"]) == [
        "mode=sample", "ckpt.model=/a/last.pt", "ckpt.autoencoder=/b.pt"]


def test_the_implied_objective_joins_the_overrides_before_hydras_flags():
    """Hydra reads one run of overrides: `schedule=cosine -m` plus objective=ddpm after -m would be refused."""
    assert _objective_for_ddpm_settings(["schedule=cosine", "-m"]) == ["schedule=cosine", "objective=ddpm", "-m"]
    assert _objective_for_ddpm_settings(["-m", "schedule=cosine"]) == ["-m", "schedule=cosine", "objective=ddpm"]


def test_named_sweeps_compose(hydra_ctx):
    """Every sweeps/*.yaml is a multirun that composes with the defaults (`+sweep=NAME`)."""
    from hydra.types import RunMode

    from difflab.sweep.named import SWEEPS_DIR

    names = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
    assert {"guidance_scale", "ema_decay", "schedules", "samplers"} <= set(names)
    for name in names:
        cfg = compose(config_name="config", overrides=[f"+sweep={name}"], return_hydra_config=True)
        assert cfg.hydra.mode == RunMode.MULTIRUN, name
        validate(cfg)
    guided = compose(config_name="config", overrides=["+sweep=guidance_scale"], return_hydra_config=True)
    assert guided.guidance.name == "cfg" and guided.hydra.sweeper.params["guidance.scale"] == "0,1,2,3,5"
    ema = compose(config_name="config", overrides=["+sweep=ema_decay"], return_hydra_config=True)
    assert ema.train.ema.posthoc and len(ema.hydra.sweeper.params["train.ema.sigma_rel"].split(",")) >= 3
    study = compose(config_name="config", overrides=["+sweep=optuna", "sweep.metric=class_accuracy"],
                    return_hydra_config=True)
    assert study.hydra.sweeper._target_.endswith("OptunaSweeper") and study.hydra.sweeper.direction == "maximize"


@pytest.mark.parametrize("launcher", ["parallel", "slurm", "slurm_local"])
def test_launcher_presets_compose(hydra_ctx, launcher):
    cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
    assert cfg.hydra.callbacks.compare_jobs._target_ == "difflab.sweep.callback.CompareJobs"


def test_ema_decays_are_checked(hydra_ctx):
    from difflab.errors import UserError

    assert list(_compose(["train.ema.decays=[0.9,0.999]"]).train.ema.decays) == [0.9, 0.999]
    with pytest.raises(UserError, match="train.ema.decays"):
        _compose(["train.ema.decays=[0.9,1.5]"])


def test_evaluation_keys_compose(hydra_ctx):
    cfg = _compose(["mode=evaluate", "ckpt.model=/a/last.pt", "eval.num_samples=2000", "eval.batch_size=100",
                    "eval.extractors=[classifier]", "eval.inception_weights=/w/inception.pth",
                    "eval.classifier_steps=300", "eval.classifier_batch_size=64"])
    assert cfg.mode.name == "evaluate" and cfg.eval.num_samples == 2000 and list(cfg.eval.extractors) == ["classifier"]
    assert cfg.eval.inception_weights == "/w/inception.pth" and cfg.eval.classifier_steps == 300
    assert list(_compose([]).eval.extractors) == ["inception", "classifier"]


def test_batches_must_split_over_processes_and_micro_batches(hydra_ctx):
    from difflab.config import validate_batch_splits
    from difflab.errors import UserError

    validate_batch_splits(_compose(["train.batch_size=64", "train.grad_accum_steps=4"]), world_size=2)
    with pytest.raises(UserError, match=r"train.batch_size=64 does not split into train.grad_accum_steps=3 equal "
                                        r"micro-batches on each of the 2 torchrun processes: use a multiple of 6"):
        validate_batch_splits(_compose(["train.batch_size=64", "train.grad_accum_steps=3"]), world_size=2)
    with pytest.raises(UserError, match="autoencoder.train.batch_size=30 does not split"):
        validate_batch_splits(_compose(["autoencoder=kl", "autoencoder.train.batch_size=30",
                                        "train.grad_accum_steps=4"]), world_size=1)
    validate_batch_splits(_compose(["mode=sample", "train.grad_accum_steps=3"]), world_size=1)  # trains nothing


def _numeric_fields(schema, prefix: str = ""):
    """Dotted keys of every int or float setting (or list of them) in a dataclass schema."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            yield from _numeric_fields(kind, f"{key}.")
            continue
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        inner = args[0] if args else kind
        inner = (typing.get_args(inner) or [inner])[0] if typing.get_origin(inner) in (list, typing.List) else inner
        if inner in (int, float):
            yield key


def test_every_numeric_setting_has_a_range():
    from difflab.config import GROUP_SCHEMAS, OBJECTIVE_SCHEMAS, RANGES, Config

    keys = set(_numeric_fields(Config)) - set(GROUP_SCHEMAS)
    schemas = [*GROUP_SCHEMAS.items(), *(("objective", schema) for schema in OBJECTIVE_SCHEMAS.values())]
    for group, schema in schemas:
        keys |= {f"{group}.{k}" for k in _numeric_fields(schema)}
    assert keys - set(RANGES) == set()
    assert set(RANGES) - keys == set()  # and no entry for a setting that does not exist
