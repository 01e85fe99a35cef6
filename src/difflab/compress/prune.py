"""Structured channel pruning of a trained UNet (Diff-Pruning, Fang et al. 2023): torch-pruning's
dependency graph finds the channels that must go together (skip concatenations, residual adds,
the embedding's per-channel shift into each norm), magnitude importance picks which, and the
network really becomes narrower. The pruned network's widths go into its checkpoint
(models/widths.py), so it is rebuilt from tensors alone and loads with weights_only=True.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from difflab.artifacts import train_settings
from difflab.errors import UserError
from difflab.models import count_parameters
from difflab.models.group_norm_silu import GroupNormSiLU
from difflab.models.layers import AttentionBlock, Upsample
from difflab.models.widths import network_widths
from difflab.trained import DiffusionModel

log = logging.getLogger("difflab.prune")


def check_prune(cfg: DictConfig) -> None:
    amount = cfg.prune.amount
    if not 0 < amount < 1:
        raise UserError(f"prune.amount={amount} must be the share of channels removed, strictly between 0 and 1: use "
                        "e.g. prune.amount=0.3.")


def prune_settings(cfg: DictConfig, model_key: str) -> dict:
    return {"model": model_key, "prune": OmegaConf.to_container(cfg.prune, resolve=True),
            "train": train_settings(finetune_config(cfg)), "seed": cfg.seed}


def finetune_config(cfg: DictConfig) -> DictConfig:
    p = cfg.prune
    return OmegaConf.merge(cfg.train, {"max_steps": p.finetune_steps, "lr": p.lr,
                                       "batch_size": p.batch_size or cfg.train.batch_size, "resume": None,
                                       "warmup_steps": min(cfg.train.warmup_steps, p.finetune_steps // 10)})


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise UserError("mode=prune needs the torch-pruning package: pip install 'difflab[compress]'.") from None
    return torch_pruning


def _pruners(tp):
    """torch-pruning pruners for the layers it cannot see into: each prunes a unit whose input and output
    channels are the same (prune_in_channels = prune_out_channels couples them)."""
    F = tp.pruner.function

    def keep(n: int, idxs) -> list[int]:
        return sorted(set(range(n)) - set(idxs))

    class NormPruner(F.BasePruningFunc):
        """GroupNorm (+ SiLU): any channels; the groups are re-counted after the pruning (regroup)."""

        def prune_out_channels(self, layer: GroupNormSiLU, idxs):
            kept = keep(layer.num_channels, idxs)
            layer.num_channels = len(kept)
            layer.weight = self._prune_parameter_and_grad(layer.weight, kept, 0)
            layer.bias = self._prune_parameter_and_grad(layer.bias, kept, 0)
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer):
            return layer.num_channels

        get_in_channels = get_out_channels

    class UpsamplePruner(F.BasePruningFunc):
        """nearest + conv3x3 (computed as phase convolutions): the conv's channels, in and out alike."""

        def prune_out_channels(self, layer: Upsample, idxs):
            conv = layer.conv
            kept = keep(conv.out_channels, idxs)
            conv.weight = self._prune_parameter_and_grad(conv.weight, kept, 0)
            conv.weight = self._prune_parameter_and_grad(conv.weight, kept, 1)
            conv.bias = self._prune_parameter_and_grad(conv.bias, kept, 0)
            conv.in_channels = conv.out_channels = len(kept)
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer):
            return layer.conv.out_channels

        get_in_channels = get_out_channels

    class AttentionPruner(F.BasePruningFunc):
        """A residual attention block: the map's channels (its norm, the projections' outer sides); the heads
        keep their width."""

        def prune_out_channels(self, layer: AttentionBlock, idxs):
            NormPruner().prune_out_channels(layer.norm, idxs)
            kept = keep(layer.qkv.in_features, idxs)
            layer.qkv.weight = self._prune_parameter_and_grad(layer.qkv.weight, kept, 1)
            layer.qkv.in_features = len(kept)
            layer.proj_out.weight = self._prune_parameter_and_grad(layer.proj_out.weight, kept, 0)
            layer.proj_out.bias = self._prune_parameter_and_grad(layer.proj_out.bias, kept, 0)
            layer.proj_out.out_features = len(kept)
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer):
            return layer.qkv.in_features

        get_in_channels = get_out_channels

    return {GroupNormSiLU: NormPruner(), Upsample: UpsamplePruner(), AttentionBlock: AttentionPruner()}


def regroup(net: nn.Module, original: nn.Module) -> None:
    """Each pruned GroupNorm keeps its channels per group where its width allows (else the largest group count that
    divides it and the original's)."""
    before = dict(original.named_modules())
    for name, m in net.named_modules():
        if isinstance(m, nn.GroupNorm):
            old = before[name]
            per_group = old.num_channels // old.num_groups
            m.num_groups = (m.num_channels // per_group if m.num_channels % per_group == 0
                            else math.gcd(m.num_channels, old.num_groups))


def prune_unet(net: nn.Module, amount: float, example: tuple) -> nn.Module:
    """A copy of `net` with `amount` of its prunable channels removed (lowest L2 magnitude first); the input and
    output convolutions keep the image's channels. `example`: (x, levels, y) the network is traced with."""
    tp = _torch_pruning()
    pruned = copy.deepcopy(net).cpu().eval()
    outputs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d) and m.out_channels == example[0].shape[1]]
    with torch.enable_grad():  # the dependency graph is traced through autograd
        pruner = tp.pruner.MetaPruner(
            pruned, example_inputs=tuple(t.cpu() if t is not None else None for t in example),
            importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=amount, global_pruning=False,
            ignored_layers=outputs[-1:], customized_pruners=_pruners(tp),
            forward_fn=lambda model, inputs: model(*inputs))
        pruner.step()
    regroup(pruned, net)
    return pruned


def pruned_state(model: DiffusionModel, pruned: nn.Module) -> dict:
    """What a pruned checkpoint adds: the widths that rebuild its network."""
    return {"widths": network_widths(pruned), "original_params": count_parameters(model.net),
            "params": count_parameters(pruned)}


def train_pruned(cfg: DictConfig, run_dir: Path, device: torch.device, model: DiffusionModel, model_key: str,
                 writer=None) -> tuple[Path, dict]:
    """Prune the EMA network of `model` by cfg.prune.amount and fine-tune it in run_dir; (checkpoint, record)."""
    from difflab.train.stages import DiffusionStage  # the fine-tuning is a diffusion training of the narrower net

    stage_cfg = OmegaConf.merge(model.cfg, {"paths": cfg.paths, "seed": cfg.seed, "train": finetune_config(cfg),
                                            "mode": {"name": "diffusion"}, "sample": cfg.sample, "sampler": cfg.sampler})
    stage = DiffusionStage(stage_cfg, run_dir, device, writer, model.latent)
    x0, y = stage.batch(0, _FirstBatch(2))
    levels = model.process.draw_levels(len(x0), device)
    x_in, cond = model.process.net_inputs(x0, levels)
    example = (x_in, cond, y if model.num_classes else None)
    pruned = prune_unet(model.net, cfg.prune.amount, example).to(device)
    record = pruned_state(model, pruned)
    log.info("pruned %.0f%% of the channels: %d -> %d parameters", 100 * cfg.prune.amount, record["original_params"],
             record["params"])
    stage.net, stage.num_params = pruned.train(), record["params"]
    stage.checkpoint_extra = {"pruned": record}
    if cfg.prune.teacher_weight > 0:
        stage.loss = with_teacher_outputs(stage.loss, model.net.eval(), cfg.prune.teacher_weight)
    trainer, result = stage.fit()
    trainer.save("last.pt")
    checkpoint = run_dir / "checkpoints" / "last.pt"
    metrics = {**record, "prune_amount": cfg.prune.amount, "finetune_steps": cfg.prune.finetune_steps,
               "final_loss": result.final_loss, "steps": result.step, "train_wall_time_s": result.wall_time_s,
               "checkpoint": str(checkpoint)}
    return checkpoint, {"metrics": metrics, "run_dir": str(run_dir)}


def with_teacher_outputs(data_loss, teacher: nn.Module, weight: float):
    """`data_loss` plus `weight` times the mean squared difference between the pruned network's outputs and the
    original's on the same inputs (knowledge distillation): the original's outputs are a target without the data
    loss's irreducible variance, and what the pruned network should return to is the original, not the data."""

    def loss(model: nn.Module, batch) -> torch.Tensor:
        seen = []

        def recorded(*inputs):
            out = model(*inputs)
            seen.append((inputs, out))
            return out

        total = data_loss(recorded, batch)
        (inputs, out), = seen
        with torch.no_grad():
            target = teacher(*inputs)
        return total + weight * (out.float() - target.float()).pow(2).mean()

    return loss


class _FirstBatch:
    """The first n images of the data, in order: the pruning's example input."""

    def __init__(self, n: int):
        self.n = n

    def indices(self, step: int) -> torch.Tensor:
        return torch.arange(self.n)
