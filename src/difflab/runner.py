"""Stage plan and dispatch: what a run does, in which order, and where it writes."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from difflab.allocator import keep_freed_memory
from difflab.artifacts import ArtifactCache, classifier_settings, diffusion_settings, joint_settings, obtain, settings_key
from difflab.config import validate, validate_batch_splits
from difflab.errors import UserError
from difflab.evaluate.ema_copies import evaluate_ema_copies
from difflab.evaluate.metrics import evaluate_model
from difflab.evaluate.visualize import class_rows, save_accuracy_curve, save_loss_curve
from difflab.latent import LatentSpace, obtain_latent_space, run_reconstruction
from difflab.sweep.hparams import overrides_to_hparams, write_hparams
from difflab.sampling import sample_and_write, sample_images
from difflab.train import distributed as dist
from difflab.train.classifier_stages import ClassifierStage, JointStage, accuracy_by_band, load_classifier
from difflab.train.stages import DiffusionModel, DiffusionStage, load_diffusion_model

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


def _writer(run_dir: Path):
    return dist.summary_writer(run_dir / "tb")


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """Merge into metrics.json (atomically), so stages of one run add to one file."""
    path = run_dir / "metrics.json"
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(metrics)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_loss_csv(path: Path, train: list, val: list) -> None:
    """step,split,loss rows: the curves a sweep comparison overlays without reading TensorBoard."""
    rows = [f"{s},train,{v:.6g}" for s, v in train] + [f"{s},val,{v:.6g}" for s, v in val]
    path.write_text("step,split,loss\n" + "\n".join(rows) + "\n")


def finish_training(trainer, result, run_dir: Path) -> None:
    """The files every training stage leaves: last.pt, the loss curve and its CSV."""
    trainer.save("last.pt")
    save_loss_curve(result.loss_history, run_dir / "loss_curve.png", trainer.val_history)
    write_loss_csv(run_dir / "losses.csv", result.loss_history, trainer.val_history)


def balanced_sampler(model: DiffusionModel, cfg: DictConfig, device: torch.device, classifier):
    """n -> n class-balanced samples drawn as the run samples (its sampler and guidance): what
    the evaluation measures."""
    return lambda n: sample_images(model, cfg, n, "balanced", device, classifier=classifier)


def _resumes(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether this run continues a training: resume=auto with no checkpoint in this folder starts
    afresh (e.g. a re-run sweep job that had reused a model), so it may reuse a cached one."""
    resume = cfg.train.resume
    return bool(resume) and (resume != "auto" or (run_dir / "checkpoints" / "last.pt").is_file())


def train_diffusion(cfg: DictConfig, run_dir: Path, device: torch.device, writer,
                    latent: Optional[LatentSpace] = None) -> tuple[dict, Optional[DiffusionModel]]:
    """Train the diffusion model (mode=joint: with the classifier beside it); its metrics and EMA
    model on the process that writes, ({}, None) on the other torchrun ranks."""
    stage = (JointStage if cfg.mode.name == "joint" else DiffusionStage)(cfg, run_dir, device, writer, latent)
    writer.add_text("schedule/alpha_bar_T", f"{stage.process.alpha_bar_T:.6g}")
    writer.add_scalar("schedule/alpha_bar_T", stage.process.alpha_bar_T, 0)

    def grid_to_tensorboard(net, step: int) -> None:
        if step == cfg.train.max_steps and cfg.sample.num_images:
            return  # the samples drawn after training go under the same tag at this step
        result = sample_images(stage.model(net), cfg, 4 * max(1, stage.num_classes), "balanced", device)
        writer.add_image("samples/grid", class_rows(result.images, result.labels, per_row=4), step)

    trainer, result = stage.fit(grid_to_tensorboard)
    if not trainer.writes:  # another torchrun rank: it lent its gradients, rank 0 writes and measures
        return {}, None
    finish_training(trainer, result, run_dir)
    metrics = {
        "final_loss": result.final_loss,
        "best_val_loss": result.best_val_loss,
        "steps": result.step,
        "early_stopped": result.early_stopped,
        "train_images_per_s": result.images_per_s,
        "train_wall_time_s": result.wall_time_s,
        "num_params": stage.num_params,
        "precision": str(trainer.amp_dtype or torch.float32).removeprefix("torch."),
        "alpha_bar_T": stage.process.alpha_bar_T,
        "checkpoint": str(run_dir / "checkpoints" / "last.pt"),
        "resumed_from": result.resumed_from,
    }
    ema = trainer.ema.model
    if isinstance(stage, JointStage):
        metrics["classifier_accuracy_by_t"] = report_accuracy(
            accuracy_by_band(stage, ema.classifier, cfg.classifier.accuracy_bands), run_dir, writer)
        ema = ema.unet
    return metrics, stage.model(ema)


def run_diffusion(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    """Train (or take from the artifact cache) the diffusion model, then sample from it; mode=joint
    does the same for the diffusion model and classifier trained together. A latent model first
    obtains its autoencoder (given, cached, or trained now), whose key enters its own."""
    joint = cfg.mode.name == "joint"
    latent, latent_record = obtain_latent_space(cfg, run_dir, device) if cfg.autoencoder.name != "none" else (None, {})
    writer = _writer(run_dir)

    def train() -> tuple[Path, dict]:
        metrics, _ = train_diffusion(cfg, run_dir, device, writer, latent)
        return run_dir / "checkpoints" / "last.pt", {"metrics": metrics, "run_dir": str(run_dir)}

    settings = (joint_settings if joint else diffusion_settings)(cfg, latent_record.get("autoencoder_key"))
    artifact = obtain(ArtifactCache(cfg.paths.cache_dir), cfg.mode.name, settings, train,
                      reuse=cfg.train.reuse and not _resumes(cfg, run_dir),
                      what="joint diffusion model and classifier" if joint else "diffusion model")
    if not dist.is_main():  # sampling and evaluation are rank 0's
        return {}
    model = load_diffusion_model(str(artifact.path), device)
    metrics = {**artifact.record["metrics"], **latent_record, "trained": artifact.trained}
    if not artifact.trained:
        metrics["checkpoint"] = str(artifact.path)
    metrics.update({"stage": cfg.mode.name, "artifact_key": artifact.key})
    classifier = guidance_classifier(cfg, model, device, str(artifact.path) if joint else None)
    metrics.update(sample_and_write(model, cfg, run_dir, device, writer, metrics["steps"], classifier))
    if cfg.eval.num_samples > 0:
        metrics.update(evaluate_model(model, cfg, device, metrics["checkpoint"],
                                      balanced_sampler(model, cfg, device, classifier),
                                      writer, metrics["steps"]))
    if cfg.train.ema.decays:
        metrics["ema"] = evaluate_ema_copies(cfg, run_dir, Path(metrics["checkpoint"]), model, device)
    writer.close()
    return metrics


def report_accuracy(by_band: dict[str, float], run_dir: Path, writer) -> dict[str, float]:
    """Classifier accuracy per band of t to TensorBoard and a PNG; returned for metrics.json."""
    for band, acc in by_band.items():
        if "-" in band:  # the x axis is t; the clean accuracy is logged on its own
            writer.add_scalar("classifier/accuracy_by_t", acc, int(band.split("-")[0]))
    if "t=0" in by_band:
        writer.add_scalar("classifier/accuracy_clean", by_band["t=0"], 0)
    save_accuracy_curve(by_band, run_dir / "classifier_accuracy.png")
    log.info("classifier accuracy by t: %s", ", ".join(f"{b}: {a:.3f}" for b, a in by_band.items()))
    return by_band


def run_classifier(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    """Train (or take from the artifact cache) the noise-aware classifier of classifier guidance,
    in the latent space of the run's autoencoder when it has one."""
    latent, latent_record = obtain_latent_space(cfg, run_dir, device) if cfg.autoencoder.name != "none" else (None, {})

    def train() -> tuple[Path, dict]:
        writer = _writer(run_dir)
        stage = ClassifierStage(cfg, run_dir, device, writer, latent)
        trainer, result = stage.fit()
        if not trainer.writes:  # another torchrun rank: rank 0 writes and measures
            return run_dir / "checkpoints" / "last.pt", {}
        finish_training(trainer, result, run_dir)
        by_band = report_accuracy(accuracy_by_band(stage, trainer.ema.model, cfg.classifier.accuracy_bands),
                                  run_dir, writer)
        writer.close()
        metrics = {
            "final_loss": result.final_loss,
            "best_val_loss": result.best_val_loss,
            "steps": result.step,
            "train_images_per_s": result.images_per_s,
            "train_wall_time_s": result.wall_time_s,
            "num_params": stage.num_params,
            "classifier_accuracy_by_t": by_band,
            "classifier_accuracy_clean": by_band.get("t=0"),
            "checkpoint": str(run_dir / "checkpoints" / "last.pt"),
            "resumed_from": result.resumed_from,
        }
        return run_dir / "checkpoints" / "last.pt", {"metrics": metrics, "run_dir": str(run_dir)}

    artifact = obtain(ArtifactCache(cfg.paths.cache_dir), "classifier",
                      classifier_settings(cfg, latent.identity if latent else None), train,
                      reuse=cfg.train.reuse and not _resumes(cfg, run_dir), what="noise-aware classifier")
    metrics = {**artifact.record["metrics"], **latent_record, "stage": "classifier", "trained": artifact.trained,
               "artifact_key": artifact.key}
    if not artifact.trained:
        metrics["checkpoint"] = str(artifact.path)
    return metrics


def guidance_classifier(cfg: DictConfig, model: DiffusionModel, device: torch.device,
                        own: Optional[str] = None) -> Optional[torch.nn.Module]:
    """The classifier for guidance=classifier: ckpt.classifier, else the run's own (mode=joint or
    a joint checkpoint), else one trained by mode=classifier with the model's data and schedule
    (artifact cache). None for other guidance; a UserError naming the fix when there is none."""
    if cfg.guidance.name != "classifier":
        return None
    path = cfg.ckpt.classifier or own
    if path is None and cfg.mode.name in ("sample", "evaluate") and model.cfg.mode.name == "joint":
        path = cfg.ckpt.model  # a joint checkpoint carries its classifier
    if path is None:
        lookup = OmegaConf.merge(model.cfg, {"classifier": cfg.classifier, "seed": cfg.seed,
                                             "paths": cfg.paths})
        settings = classifier_settings(lookup, model.latent.identity if model.latent else None)
        found = ArtifactCache(cfg.paths.cache_dir).find("classifier", settings_key(settings))
        if found is None:
            raise UserError("guidance=classifier needs a noise-aware classifier for this data set and schedule and none "
                            "was found: train one with `python run.py mode=classifier` and the same dataset/schedule "
                            "settings, use mode=joint, or pass ckpt.classifier=PATH.")
        path = str(found)
        log.info("classifier guidance with the cached classifier %s", path)
    classifier, _, meta = load_classifier(path, device)
    if tuple(meta["shape"]) != tuple(model.shape):
        raise UserError(f"The classifier {path} reads inputs of shape {tuple(meta['shape'])} but the model "
                        f"denoises {tuple(model.shape)}: use a classifier trained on the same data (and autoencoder).")
    return classifier


def run_sample(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    if not cfg.ckpt.model:
        raise UserError("mode=sample needs a trained model: add ckpt=<run folder>/checkpoints/last.pt.")
    model = load_diffusion_model(cfg.ckpt.model, device)
    metrics = {"stage": "sample", "checkpoint": str(Path(cfg.ckpt.model).expanduser().resolve())}
    metrics.update(sample_and_write(model, cfg, run_dir, device, classifier=guidance_classifier(cfg, model, device)))
    return metrics


def run_evaluate(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    if not cfg.ckpt.model:
        raise UserError("mode=evaluate needs a trained model: add ckpt=<run folder>/checkpoints/last.pt.")
    if cfg.eval.num_samples <= 0:
        raise UserError(f"mode=evaluate with eval.num_samples={cfg.eval.num_samples} has nothing to measure: add e.g. eval.num_samples=2000.")
    model = load_diffusion_model(cfg.ckpt.model, device)
    checkpoint = str(Path(cfg.ckpt.model).expanduser().resolve())
    writer = _writer(run_dir)
    metrics = {"stage": "evaluate", "checkpoint": checkpoint}
    classifier = guidance_classifier(cfg, model, device)
    metrics.update(sample_and_write(model, cfg, run_dir, device, writer, classifier=classifier))  # what is measured
    metrics.update(evaluate_model(model, cfg, device, checkpoint,
                                  balanced_sampler(model, cfg, device, classifier),
                                  writer))
    writer.close()
    return metrics


MODES = {"reconstruction": run_reconstruction, "diffusion": run_diffusion, "joint": run_diffusion,
         "classifier": run_classifier, "sample": run_sample, "evaluate": run_evaluate}


def run(cfg: DictConfig, run_dir: Optional[Path] = None) -> Optional[float]:
    """Run what cfg.mode asks for in run_dir; returns the sweep objective (lower is better)."""
    validate(cfg)
    validate_batch_splits(cfg, dist.world_size())
    overrides: list[str] = []
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        overrides = list(HydraConfig.get().overrides.task)
    keep_freed_memory()  # before the first large tensor: 6-13% of a CPU training step (allocator.py)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    log.info("run folder %s, mode=%s, device=%s", run_dir, cfg.mode.name, device)
    t0 = time.perf_counter()
    metrics = MODES[cfg.mode.name](cfg, run_dir, device)
    if not dist.is_main():  # the other torchrun ranks only trained; rank 0 writes the run's record
        return None
    metrics["wall_time_s"] = time.perf_counter() - t0
    write_metrics(run_dir, metrics)
    write_hparams(run_dir / "tb", overrides_to_hparams(overrides), metrics)
    log.info("metrics: %s", json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    return metrics.get("final_loss")
