"""Executes a run's plan: obtains each prerequisite the plan lists, trains or loads the model,
samples, evaluates, and writes the run record."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

import difflab.distributed as dist
from difflab.allocator import keep_freed_memory
from difflab.artifacts import ArtifactCache, classifier_settings, diffusion_settings, joint_settings, obtain
from difflab.checkpoint import atomic_write_json
from difflab.compress.distill import distill_settings, student_sampling_cfg, train_student, with_student_sampler
from difflab.compress.prune import prune_settings, train_pruned
from difflab.compress.quantize import quantize_model
from difflab.data import load_splits
from difflab.edit import edit_and_write
from difflab.errors import SamplingInterrupted, UserError
from difflab.evaluate.ema_copies import evaluate_ema_copies, use_ema_length, validation_batch
from difflab.evaluate.extractors import download_inception_weights
from difflab.evaluate.metrics import best_score, evaluate_model
from difflab.export_format import read_model_state
from difflab.plan import (build_plan, init_key, load_artifact_latent_space, obtain_autoencoder,
                          obtain_guidance_classifier, obtain_latent_space, obtain_teacher, resumes_training)
from difflab.record import provenance, write_metrics
from difflab.sampling import sample_and_write, sample_images
from difflab.sweep.hparams import run_identity
from difflab.sweep.metric import objective
from difflab.trackers import OPEN_RUNS, Trackers, open_trackers
from difflab.train.makers import train_classifier, train_diffusion
from difflab.train.reconstruction import evaluate_autoencoder, held_out_images
from difflab.trained import DiffusionModel, diffusion_model_from_state, load_diffusion_model

log = logging.getLogger("difflab")


def _named_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} was asked for but no CUDA GPU is visible: use device=cpu or device=auto.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name} is not a device: use auto, cpu, cuda or cuda:N.") from None


def resolve_device(name: str) -> torch.device:
    """The device `name` means for this process (under torchrun, cuda is this rank's GPU)."""
    return dist.local_device(_named_device(name))


def run_trackers(cfg: DictConfig, run_dir: Path) -> Trackers:
    """The run's trackers (cfg.logger), opened once by run() and closed by it after the final
    metrics; each mode logs its curves, pictures and evaluation to them."""
    if run_dir not in OPEN_RUNS:
        OPEN_RUNS[run_dir] = open_trackers(cfg, *run_identity(cfg, run_dir))
    return OPEN_RUNS[run_dir]


def close_trackers(run_dir: Path, metrics: Optional[dict]) -> None:
    """The final metrics (when the run has them) to every tracker of the run, which is then closed."""
    trackers = OPEN_RUNS.pop(run_dir, None)
    if trackers is None:
        return
    try:
        if metrics is not None:
            trackers.log_final(metrics, trackers.hparams, int(metrics.get("steps") or 0))
    finally:
        trackers.close()


def measure_during_training(cfg: DictConfig, device: torch.device, writer: Trackers):
    """eval.every: (model, step) -> the evaluation of eval.every_samples samples drawn with the same
    seeds at every step (so the curve compares steps, not draws), logged as val/<metric>; returns
    the score of train.best_metric (lower is better), or None for val_loss."""
    every = OmegaConf.merge(cfg, {"eval": {"num_samples": cfg.eval.every_samples, "bootstrap": 0, "memorisation": 0}})
    if cfg.guidance.name == "classifier":  # its classifier is not there yet: measured unguided
        every.guidance.name = "none"

    def measure(model: DiffusionModel, step: int) -> Optional[float]:
        metrics = evaluate_model(model, every, device, f"training step {step}",
                                 balanced_sampler(model, every, device, None), writer, step, tag_prefix="val/")
        return best_score(metrics, cfg.train.best_metric)

    return measure


def balanced_sampler(model: DiffusionModel, cfg: DictConfig, device: torch.device, classifier):
    """n -> n class-balanced samples drawn as the run samples (its sampler and guidance): what
    the evaluation measures."""
    return lambda n: sample_images(model, cfg, n, "balanced", device, classifier=classifier, stage="evaluate")


def sample_and_evaluate(cfg: DictConfig, run_dir: Path, device: torch.device, model: DiffusionModel,
                        classifier: Optional[torch.nn.Module], checkpoint: str, writer, step: int = 0) -> dict:
    """The samples, guided as the run asks, and their evaluation when eval.num_samples > 0."""
    metrics = sample_and_write(model, cfg, run_dir, device, writer, step, classifier)
    if cfg.eval.num_samples > 0:
        metrics.update(evaluate_model(model, cfg, device, checkpoint, balanced_sampler(model, cfg, device, classifier),
                                      writer, step, run_dir / "samples"))
    return metrics


def sampled_counts(cfg: DictConfig) -> list[int]:
    """How many images the run samples from a loaded model, in one call each: the samples, then the evaluation's (an
    edit's inputs are counted only once it has read them)."""
    if cfg.mode.name == "edit":
        return []
    evaluated = [cfg.eval.num_samples] if cfg.mode.name != "sample" and cfg.eval.num_samples > 0 else []
    return [cfg.sample.num_images, *evaluated]


def load_model(cfg: DictConfig, given: str, device: torch.device,
               given_name: str = "ckpt") -> tuple[DiffusionModel, dict, str, dict]:
    """The diffusion model `given` names (a checkpoint, its run folder or an export), with the EMA of width
    train.ema.sigma_rel reconstructed from its post-hoc snapshots when one is asked for, quantised as compress.quantize
    asks; its state, the file or folder it came from, and what the run records about both."""
    state, path = read_model_state(given, given_name)
    model, record = diffusion_model_from_state(state, device), {}
    if cfg.train.ema.sigma_rel is not None:
        record = use_ema_length(model, state, path, cfg.train.ema.sigma_rel,
                                validation_batch(model, cfg.paths.cache_dir, device))
    if cfg.compress.quantize:
        record.update(quantize_model(model, cfg, device, sampled_counts(cfg)))
    return model, state, str(path), record


def run_diffusion(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    """Train (or take from the artifact cache) the diffusion model, then sample from it; mode=joint
    does the same for the diffusion model and classifier trained together. A latent model first
    obtains its autoencoder (given, cached, or trained now), whose key enters its own."""
    joint = cfg.mode.name == "joint"
    latent, latent_record = obtain_latent_space(cfg, run_dir, device) if cfg.autoencoder.name != "none" else (None, {})
    writer = run_trackers(cfg, run_dir)
    measure = measure_during_training(cfg, device, writer) if cfg.eval.every else None
    settings = (joint_settings if joint else diffusion_settings)(cfg, latent_record.get("autoencoder_key"),
                                                                 init_key(cfg))
    artifact = obtain(ArtifactCache(cfg.paths.cache_dir), cfg.mode.name, settings,
                      lambda: train_diffusion(cfg, run_dir, device, writer, latent, measure),
                      reuse=cfg.train.reuse and not resumes_training(cfg, run_dir), other_code=cfg.train.reuse_other_code,
                      what="joint diffusion model and classifier" if joint else "diffusion model")
    classifier, classifier_record = obtain_guidance_classifier(cfg, cfg, latent, run_dir, device,
                                                               str(artifact.path) if joint else None)
    if not dist.is_main():  # sampling and evaluation are rank 0's
        return {}
    metrics = {**artifact.record["metrics"], **latent_record, **classifier_record, "trained": artifact.trained}
    if not artifact.trained:
        metrics["checkpoint"] = str(artifact.path)
    metrics.update({"stage": cfg.mode.name, "artifact_key": artifact.key})
    if cfg.train.init_from:
        metrics["init_from"] = str(Path(cfg.train.init_from).expanduser().resolve())
    write_metrics(run_dir, metrics)  # the training's record is kept whatever happens while sampling
    try:
        model, _, _, record = load_model(cfg, str(artifact.path), device, f"the {cfg.mode.name} model in the artifact cache")
        metrics.update(record)
        metrics.update(sample_and_evaluate(cfg, run_dir, device, model, classifier, metrics["checkpoint"], writer,
                                           metrics["steps"]))
        if cfg.train.ema.decays:
            metrics["ema"] = evaluate_ema_copies(cfg, run_dir, Path(metrics["checkpoint"]), model, device,
                                                 validation_batch(model, cfg.paths.cache_dir, device))
    except KeyboardInterrupt:
        raise SamplingInterrupted(metrics["checkpoint"]) from None
    return metrics


def run_classifier(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    """Train (or take from the artifact cache) the noise-aware classifier of classifier guidance,
    in the latent space of the run's autoencoder when it has one."""
    latent, latent_record = obtain_latent_space(cfg, run_dir, device) if cfg.autoencoder.name != "none" else (None, {})
    artifact = obtain(ArtifactCache(cfg.paths.cache_dir), "classifier",
                      classifier_settings(cfg, latent.key if latent else None, init_key(cfg)),
                      lambda: train_classifier(cfg, run_dir, device, latent),
                      reuse=cfg.train.reuse and not resumes_training(cfg, run_dir), other_code=cfg.train.reuse_other_code,
                      what="noise-aware classifier")
    metrics = {**artifact.record.get("metrics", {}), **latent_record, "stage": "classifier",
               "trained": artifact.trained, "artifact_key": artifact.key}
    if not artifact.trained:
        metrics["checkpoint"] = str(artifact.path)
    return metrics


def run_reconstruction(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    """Train the autoencoder (or take it from ckpt.autoencoder or the cache) and measure it."""
    artifact = obtain_autoencoder(cfg, run_dir, device, main=True)
    if not dist.is_main():  # measuring and writing are rank 0's
        return {}
    metrics = {**artifact.record.get("metrics", {}), "stage": "reconstruction", "trained": artifact.trained,
               "autoencoder_source": artifact.source, "artifact_key": artifact.key}
    if not artifact.trained:  # the training run measured it; a reused one is measured here
        metrics["checkpoint"] = str(artifact.path)
        space = load_artifact_latent_space(artifact, cfg, device)
        images = held_out_images(*load_splits(cfg.dataset, cfg.paths.cache_dir))
        metrics.update(evaluate_autoencoder(space.autoencoder, images, run_dir, device, run_trackers(cfg, run_dir)))
        metrics.update({"latent_shape": list(space.shape), "latent_scale": space.scale})
    return metrics


def run_sample(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    model, state, checkpoint, record = load_model(cfg, cfg.ckpt.model, device)
    classifier, metrics = obtain_guidance_classifier(cfg, model.cfg, model.latent, run_dir, device, given=state)
    metrics.update(record)
    metrics.update({"stage": "sample", "checkpoint": checkpoint})
    metrics.update(sample_and_write(model, cfg, run_dir, device, run_trackers(cfg, run_dir), classifier=classifier))
    return metrics


def run_evaluate(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    model, state, checkpoint, record = load_model(cfg, cfg.ckpt.model, device)
    classifier, metrics = obtain_guidance_classifier(cfg, model.cfg, model.latent, run_dir, device, given=state)
    metrics.update(record)
    writer = run_trackers(cfg, run_dir)
    metrics.update({"stage": "evaluate", "checkpoint": checkpoint,
                    **sample_and_evaluate(cfg, run_dir, device, model, classifier, checkpoint, writer)})
    return metrics


def run_edit(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    model, state, checkpoint, record = load_model(cfg, cfg.ckpt.model, device)
    classifier, metrics = obtain_guidance_classifier(cfg, model.cfg, model.latent, run_dir, device, given=state)
    metrics.update({**record, "stage": "edit", "checkpoint": checkpoint})
    metrics.update(edit_and_write(model, cfg, run_dir, device, classifier))
    return metrics


def _derived_run(cfg: DictConfig, run_dir: Path, device: torch.device, stage: str, source_record: dict, settings: dict,
                 make, what: str) -> dict:
    """Make (or take from the cache) a model derived from `source` (a student, a pruned network), then sample and
    evaluate it as the run asks."""
    writer = run_trackers(cfg, run_dir)
    artifact = obtain(ArtifactCache(cfg.paths.cache_dir), stage, settings, lambda: make(writer),
                      reuse=cfg.train.reuse, other_code=cfg.train.reuse_other_code, what=what)
    metrics = {**artifact.record.get("metrics", {}), **source_record, "stage": stage, "trained": artifact.trained,
               "artifact_key": artifact.key, "checkpoint": str(artifact.path)}
    write_metrics(run_dir, metrics)
    model, _, _, record = load_model(cfg, str(artifact.path), device, f"the {what} in the artifact cache")
    metrics.update(record)
    metrics.update(sample_and_evaluate(cfg, run_dir, device, model, None, metrics["checkpoint"], writer))
    return metrics


def run_distill(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    """Obtain the teacher (given, cached, or trained now), distil it into a few-step student (or take the cached
    student of these settings), then sample the student at its own step count."""
    teacher_artifact, record = obtain_teacher(cfg, run_dir, device)
    teacher = load_diffusion_model(str(teacher_artifact.path), device, "the teacher")
    return _derived_run(student_sampling_cfg(cfg), run_dir, device, "distill", record,
                        distill_settings(cfg, teacher_artifact.key),
                        lambda writer: train_student(cfg, run_dir / "student", device, teacher, teacher_artifact.key,
                                                     writer), f"{cfg.distill.steps}-step {cfg.distill.method} student")


def run_prune(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    """Prune the UNet of ckpt.model (or of the diffusion model of these settings, cached or trained now) by
    prune.amount and fine-tune it (or take the cached result), then sample it."""
    source, record = obtain_teacher(cfg, run_dir, device)
    model = load_diffusion_model(str(source.path), device, "the model to prune")
    return _derived_run(cfg, run_dir, device, "prune", {**record, "original_checkpoint": str(source.path)},
                        prune_settings(cfg, source.key),
                        lambda writer: train_pruned(cfg, run_dir / "pruned", device, model, source.key, writer),
                        f"{cfg.prune.amount:.0%}-pruned model")


MODES = {"reconstruction": run_reconstruction, "diffusion": run_diffusion, "joint": run_diffusion,
         "classifier": run_classifier, "sample": run_sample, "evaluate": run_evaluate, "edit": run_edit,
         "distill": run_distill, "prune": run_prune}


def run(cfg: DictConfig, run_dir: Optional[Path] = None) -> Optional[float]:
    """Run what cfg.mode asks for in run_dir; returns the sweep objective: the value of sweep.metric
    (sweep/metric.py; sweeps/optuna.yaml gives optuna its direction)."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
    cfg = with_student_sampler(cfg)
    plan = build_plan(cfg, run_dir, dist.world_size())
    cfg = plan.config  # guidance=auto decided
    log.info("plan:\n%s", plan.table())
    if dist.is_main():
        atomic_write_json(run_dir / "plan.json", plan.to_json())
        if plan.needs("inception weights", "download"):
            download_inception_weights()
    keep_freed_memory()  # before the first large tensor: 6-13% of a CPU training step (allocator.py)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    log.info("run folder %s, mode=%s, device=%s", run_dir, cfg.mode.name, device)
    t0 = time.perf_counter()
    metrics = None
    try:
        run_trackers(cfg, run_dir)  # the config reaches every tracker before any work
        metrics = MODES[cfg.mode.name](cfg, run_dir, device)
        if not dist.is_main():  # the other torchrun ranks only trained; rank 0 writes the run's record
            return None
        metrics["wall_time_s"] = time.perf_counter() - t0
        metrics["provenance"] = provenance(str(device))
        write_metrics(run_dir, metrics)
    finally:
        close_trackers(run_dir, metrics if dist.is_main() else None)
    log.info("metrics: %s", json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    return objective(metrics, cfg.sweep.metric)
