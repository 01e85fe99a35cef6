"""Few-step students of a trained diffusion model: progressive distillation (Salimans & Ho 2022),
halving the steps each round, and consistency distillation (Song et al. 2023), both over the
objective's (alpha, sigma), so every objective distils alike, in pixel or latent space.

The student is the teacher's network, started from its EMA weights. Classifier-free guidance is
baked in: with guidance=cfg the teacher's targets are guided at guidance.scale and the student
learns them from one conditional pass (it then samples with guidance=none at that scale, at half
the cost per step). Its checkpoint is a diffusion checkpoint with a `distilled` entry naming its
method, step count and sampler, so `mode=sample ckpt=<student>` samples it as it was distilled.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from difflab.artifacts import dataset_settings, train_settings
from difflab.diffusion.distillation import (ConsistencyProcess, consistency_target, ddim_step, halvings,
                                            progressive_target, smallest_ve, truncated_snr_weight)
from difflab.diffusion.process import per_example
from difflab.diffusion.spacing import sampling_grid
from difflab.errors import UserError
from difflab.export_format import read_model_state
from difflab.models import count_parameters
from difflab.pictures import save_loss_curve
from difflab.record import write_loss_csv
from difflab.train.loop import Trainer
from difflab.train.stages import NoisyDataStage
from difflab.trained import DiffusionModel

log = logging.getLogger("difflab.distill")

STUDENT_STEPS = (1, 2, 4, 8)
SPACING = "trailing"  # its N-step grid is every other level of its 2N-step grid, for every objective
# A distill setting left null takes its method's. Progressive: a chain from 16 teacher steps at 5e-4 (on the default
# MNIST model, 2 x 800 steps: 4-step student FD 4.9 at 5e-4 against 5.4 at 1e-4; docs/compression.md); its EMA at
# 0.995. Consistency: CD's 64-level grid, 1e-4 and a fast target network (0.95).
METHOD_DEFAULTS = {"progressive": {"teacher_steps": 16, "lr": 5e-4, "ema_decay": 0.995},
                   "consistency": {"teacher_steps": 64, "lr": 1e-4, "ema_decay": 0.95}}


def student_sampler(method: str, steps: int) -> dict:
    """The sampler settings a student samples with."""
    return {"name": "ddim" if method == "progressive" else "consistency", "steps": steps, "spacing": SPACING,
            "eta": 0.0}


def with_method_defaults(cfg: DictConfig) -> DictConfig:
    """cfg with each null distill setting at its method's default (METHOD_DEFAULTS). The plan resolves them once,
    before the student's key is made, so a default spelled out names the same student as one left null."""
    d = cfg.distill
    unset = {k: v for k, v in METHOD_DEFAULTS[d.method].items() if d[k] is None}
    return OmegaConf.merge(cfg, {"distill": unset}) if unset else cfg


def round_steps(distill: DictConfig) -> list[int]:
    """The student step counts of each round: teacher_steps / 2, ..., steps (consistency: one round)."""
    if distill.method == "consistency":
        return [distill.steps]
    return [distill.teacher_steps >> k for k in range(1, halvings(distill.teacher_steps, distill.steps) + 1)]


def check_distill(cfg: DictConfig, index_count: int) -> None:
    """The distill block is one the student can be made with (a sentence naming the fix)."""
    d = cfg.distill
    if d.steps not in STUDENT_STEPS:
        raise UserError(f"distill.steps={d.steps} is not a student step count: use one of "
                        f"{', '.join(map(str, STUDENT_STEPS))}.")
    if d.method == "progressive":
        try:
            halvings(d.teacher_steps, d.steps)
        except ValueError:
            raise UserError(f"distill.teacher_steps={d.teacher_steps} does not halve down to distill.steps={d.steps}: "
                            f"use distill.steps times a power of 2, e.g. {d.steps * 16}.") from None
    if d.teacher_steps > index_count:
        raise UserError(f"distill.teacher_steps={d.teacher_steps} exceeds the teacher's {index_count} levels: use at "
                        f"most {index_count}.")
    if cfg.guidance.name == "classifier":
        raise UserError("mode=distill distils classifier-free guidance only: use guidance=cfg or guidance=none.")


def distill_settings(cfg: DictConfig, teacher_key: str) -> dict:
    """Everything that determines a student: its teacher (by key), the distillation, the guidance baked in."""
    return {"teacher": teacher_key, "distill": OmegaConf.to_container(cfg.distill, resolve=True),
            "guidance_scale": cfg.guidance.scale if cfg.guidance.name == "cfg" else None,
            "clip_x0": cfg.sampler.clip_x0, "train": train_settings(student_train_config(cfg)), "seed": cfg.seed,
            "dataset": dataset_settings(cfg)}


def student_train_config(cfg: DictConfig) -> DictConfig:
    """train.* with the distillation's length, learning rate, batch and EMA."""
    d = cfg.distill
    return OmegaConf.merge(cfg.train, {
        "max_steps": d.steps_per_round, "lr": d.lr, "batch_size": d.batch_size or cfg.train.batch_size,
        "warmup_steps": min(cfg.train.warmup_steps, d.steps_per_round // 10), "resume": None,
        "ema": {"decay": d.ema_decay, "decays": []}})


def distilled_sampler(path: str) -> Optional[dict]:
    """The sampler a student checkpoint names, or None (not a student, or not a readable file: the plan says so)."""
    try:
        return read_model_state(path)[0].get("distilled", {}).get("sampler")
    except UserError:
        return None


def with_student_sampler(cfg: DictConfig) -> DictConfig:
    """cfg with the sampler a distilled student samples with: the one mode=distill makes, or the one the
    checkpoint of mode=sample / evaluate names (the user's sampler settings give way to it)."""
    if cfg.mode.name == "distill":
        sampler = student_sampler(cfg.distill.method, cfg.distill.steps)
    elif cfg.mode.name in ("sample", "evaluate") and cfg.ckpt.model:
        sampler = distilled_sampler(cfg.ckpt.model)
    else:
        sampler = None
    if sampler is None:
        return cfg
    log.info("a distilled student samples as distilled: sampler=%s, %d steps", sampler["name"], sampler["steps"])
    return OmegaConf.merge(cfg, {"sampler": sampler})


def student_sampling_cfg(cfg: DictConfig) -> DictConfig:
    """How mode=distill samples its student: unguided when the guidance is baked into it."""
    return OmegaConf.merge(cfg, {"guidance": {"name": "none", "scale": 0.0}}) if cfg.guidance.name == "cfg" else cfg


class DistillStage(NoisyDataStage):
    """Trains the student on the teacher's data (in its latent space), round after round."""

    name = "diffusion"  # the student is a diffusion model, loaded as one

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, teacher: DiffusionModel,
                 teacher_key: str, writer=None):
        data_cfg = OmegaConf.merge(teacher.cfg, {"paths": cfg.paths, "seed": cfg.seed,
                                                 "train": student_train_config(cfg)})
        super().__init__(data_cfg, run_dir, device, writer, teacher.latent)
        self.run_cfg, self.teacher, self.teacher_key = cfg, teacher, teacher_key
        self.guidance_scale = cfg.guidance.scale if cfg.guidance.name == "cfg" else 1.0
        # Unguided, the student keeps the teacher's label dropout (and so its own CFG); guided, it learns the
        # guided predictions of each label and has no unconditional branch left.
        self.label_dropout = teacher.cfg.guidance.p_uncond if teacher.trained_with_label_dropout and \
            self.guidance_scale == 1.0 else 0.0
        self.clip_x0 = cfg.sampler.clip_x0 and teacher.latent is None

    # ---- what teacher and student predict
    def _labels(self, y: Tensor) -> Optional[Tensor]:
        if not self.teacher.num_classes:
            return None
        if self.label_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.teacher.num_classes), y)
        return y

    def _teacher_x0(self, net: nn.Module, y: Optional[Tensor], scale: float):
        model = copy.copy(self.teacher)
        model.net = net
        guidance = OmegaConf.create({"name": "cfg" if scale != 1.0 else "none", "scale": scale})
        denoiser = model.denoiser(y, guidance, self.clip_x0)
        return lambda x, level: denoiser(x, level)[0]

    def _student_x0(self, net: nn.Module, process, y: Optional[Tensor]):
        return lambda x, level: process.to_x0_eps(net(*process.net_inputs(x, level), y).float(), x, level)[0]

    # ---- the losses
    def progressive_loss(self, teacher_net: nn.Module, steps: int, scale: float):
        """Student step i of `steps` matches two teacher DDIM steps over the same span of the 2x grid."""
        grid = sampling_grid(self.process, 2 * steps, SPACING)
        alphas, sigmas = torch.tensor(grid.alphas, dtype=torch.float64), torch.tensor(grid.sigmas, dtype=torch.float64)

        def loss(model: nn.Module, batch) -> Tensor:
            x0, y = batch
            y = self._labels(y)
            i = 2 * torch.randint(0, steps, (len(x0),))
            a_t, s_t, a_m, s_m, a_s, s_s = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1], alphas[i + 2], sigmas[i + 2]
            level, mid = grid.levels[i].to(x0.device), grid.levels[i + 1].to(x0.device)
            z_t = per_example(a_t, x0) * x0 + per_example(s_t, x0) * torch.randn_like(x0)
            with torch.no_grad():
                teacher = self._teacher_x0(teacher_net, y, scale)
                z_m = ddim_step(teacher(z_t, level), z_t, a_t, s_t, a_m, s_m)
                z_s = ddim_step(teacher(z_m, mid), z_m, a_m, s_m, a_s, s_s)
                target = progressive_target(z_t, z_s, a_t, s_t, a_s, s_s)
            pred = self._student_x0(model, self.process, y)(z_t, level)
            weight = truncated_snr_weight(a_t, s_t).to(pred)
            return (weight * (pred - target).square().flatten(1).mean(1)).mean()

        return loss

    def consistency_loss(self, trainer_ref: list, process: ConsistencyProcess):
        """CD: f(x at level j) matches the EMA's f at the level after one teacher DDIM step (the last level's
        step lands on clean data, where f is the identity: the boundary that anchors the rest). `trainer_ref`
        holds the round's Trainer, whose EMA is CD's target network."""
        grid = sampling_grid(self.process, self.run_cfg.distill.teacher_steps, SPACING)
        alphas, sigmas = torch.tensor(grid.alphas, dtype=torch.float64), torch.tensor(grid.sigmas, dtype=torch.float64)
        last = len(grid) - 1

        def loss(model: nn.Module, batch) -> Tensor:
            x0, y = batch
            y = self._labels(y)
            j = torch.randint(0, len(grid), (len(x0),))
            level, level_n = grid.levels[j].to(x0.device), grid.levels[(j + 1).clamp(max=last)].to(x0.device)
            x = per_example(alphas[j], x0) * x0 + per_example(sigmas[j], x0) * torch.randn_like(x0)
            with torch.no_grad():
                target = consistency_target(self._student_x0(trainer_ref[0].ema.model, process, y),
                                            self._teacher_x0(self.teacher.net, y, self.guidance_scale), x, level,
                                            level_n, (alphas[j], sigmas[j]), (alphas[j + 1], sigmas[j + 1]))
            pred = self._student_x0(model, process, y)(x, level)
            return (pred - target).square().flatten(1).mean(1).mean()

        return loss

    # ---- the rounds
    def _round(self, net: nn.Module, steps: int, loss_fn, ckpt_dir: Path, trainer_ref: list) -> tuple[Trainer, object]:
        distilled = {"method": self.run_cfg.distill.method, "steps": steps, "teacher_key": self.teacher_key,
                     "guidance_scale": None if self.guidance_scale == 1.0 else self.guidance_scale,
                     "sampler": student_sampler(self.run_cfg.distill.method, steps)}
        meta = {"shape": list(self.shape), "num_classes": self.teacher.num_classes, "label_dropout": self.label_dropout}
        extra = {"config": OmegaConf.to_container(self.teacher.cfg, resolve=True), "stage": self.name, "meta": meta,
                 "autoencoder": self.latent.state() if self.latent else None, "distilled": distilled}
        train_cfg = self.cfg.train
        trainer = Trainer(net, train_cfg, ckpt_dir, self.device, self.writer, extra, seed=self.cfg.seed,
                          stage=f"distill {steps} steps")
        trainer_ref[:] = [trainer]
        batches = trainer.step_batches(len(self.train_data), train_cfg.batch_size, "distill.batch_size")
        result = trainer.fit(loss_fn, lambda s: self.batch(s, batches), train_cfg.batch_size)
        trainer.save("last.pt")
        save_loss_curve(result.loss_history, ckpt_dir.parent / "loss_curve.png")
        write_loss_csv(ckpt_dir.parent / "losses.csv", result.loss_history, [])
        return trainer, result

    def fit(self) -> tuple[Path, dict]:
        """Every round; (the last student's checkpoint, its record)."""
        d = self.run_cfg.distill
        net = copy.deepcopy(self.teacher.net).train().requires_grad_(True)
        teacher_net, scale, rounds, trainer_ref = self.teacher.net, self.guidance_scale, [], []
        for steps in round_steps(d):
            folder = self.run_dir / f"{steps}_steps"
            if d.method == "progressive":
                loss_fn = self.progressive_loss(teacher_net, steps, scale)
            else:
                loss_fn = self.consistency_loss(trainer_ref, ConsistencyProcess(self.process, smallest_ve(self.process)))
            log.info("distilling %s: a %d-step student (%s)", d.method, steps, folder)
            trainer, result = self._round(net, steps, loss_fn, folder / "checkpoints", trainer_ref)
            rounds.append({"steps": steps, "final_loss": result.final_loss, "wall_time_s": result.wall_time_s})
            # the next round's teacher is this round's (EMA) student, guidance already in it; its student starts there
            teacher_net = copy.deepcopy(trainer.ema.model).eval().requires_grad_(False)
            net = copy.deepcopy(trainer.ema.model).train().requires_grad_(True)
            scale = 1.0
        checkpoint = self.run_dir / f"{d.steps}_steps" / "checkpoints" / "last.pt"
        metrics = {"distill_method": d.method, "student_steps": d.steps, "distill_rounds": rounds,
                   "distill_wall_time_s": sum(r["wall_time_s"] for r in rounds), "final_loss": rounds[-1]["final_loss"],
                   "steps": sum(d.steps_per_round for _ in rounds), "num_params": count_parameters(net),
                   "checkpoint": str(checkpoint)}
        return checkpoint, {"metrics": metrics, "run_dir": str(self.run_dir)}


def train_student(cfg: DictConfig, run_dir: Path, device: torch.device, teacher: DiffusionModel,
                  teacher_key: str, writer=None) -> tuple[Path, dict]:
    """Distil `teacher` as cfg.distill says, in run_dir; (checkpoint, record) for the artifact cache."""
    return DistillStage(cfg, run_dir, device, teacher, teacher_key, writer).fit()
