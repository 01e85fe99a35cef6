"""Stage plan and dispatch: what a run does, in which order, and where it writes."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from difflab.artifacts import ArtifactCache, diffusion_settings, settings_key
from difflab.config import validate
from difflab.errors import UserError
from difflab.evaluate.metrics import evaluate_model
from difflab.evaluate.visualize import class_rows, save_loss_curve
from difflab.sweep.hparams import overrides_to_hparams, write_hparams
from difflab.sampling import sample_and_write, sample_images
from difflab.train.stages import DiffusionModel, DiffusionStage, load_diffusion_model

log = logging.getLogger("difflab")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} was asked for but no CUDA GPU is visible: use device=cpu or device=auto.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name} is not a device: use auto, cpu, cuda or cuda:N.") from None


def _writer(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb"))


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


def train_diffusion(cfg: DictConfig, run_dir: Path, device: torch.device, writer) -> tuple[dict, DiffusionModel]:
    stage = DiffusionStage(cfg, run_dir, device, writer)
    writer.add_text("schedule/alpha_bar_T", f"{stage.process.alpha_bar_T:.6g}")
    writer.add_scalar("schedule/alpha_bar_T", stage.process.alpha_bar_T, 0)

    def grid_to_tensorboard(net, step: int) -> None:
        result = sample_images(stage.model(net), cfg, 4 * max(1, stage.num_classes), "balanced", device)
        writer.add_image("samples/grid", class_rows(result.images, result.labels, per_row=4), step)

    trainer, result = stage.fit(grid_to_tensorboard)
    trainer.save("last.pt")
    save_loss_curve(result.loss_history, run_dir / "loss_curve.png", trainer.val_history)
    write_loss_csv(run_dir / "losses.csv", result.loss_history, trainer.val_history)
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
    return metrics, stage.model(trainer.ema.model)


def run_diffusion(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    """Train (or take from the artifact cache) the diffusion model, then sample from it."""
    cache, settings = ArtifactCache(cfg.paths.cache_dir), diffusion_settings(cfg)
    key = settings_key(settings)
    writer = _writer(run_dir)
    # The lock makes parallel sweep jobs that need the same model wait for the one training it.
    with cache.lock("diffusion", key):
        cached = cache.find("diffusion", key) if cfg.train.reuse and not cfg.train.resume else None
        if cached is not None:
            record = cache.record("diffusion", key)
            log.info("reusing the diffusion model trained with these settings by %s (%s); train.reuse=false trains anew",
                     record["run_dir"], cached)
            model = load_diffusion_model(str(cached), device)
            metrics = {**record["metrics"], "trained": False, "checkpoint": str(cached)}
        else:
            metrics, model = train_diffusion(cfg, run_dir, device, writer)
            stored = cache.store("diffusion", key, run_dir / "checkpoints" / "last.pt",
                                 {"metrics": metrics, "run_dir": str(run_dir), "settings": settings})
            log.info("stored the trained model in the artifact cache: %s", stored)
            metrics["trained"] = True
    metrics.update({"stage": "diffusion", "artifact_key": key})
    metrics.update(sample_and_write(model, cfg, run_dir, device, writer, metrics["steps"]))
    if cfg.eval.num_samples > 0:
        metrics.update(evaluate_model(model, cfg, device, metrics["checkpoint"],
                                      lambda n: sample_images(model, cfg, n, "balanced", device), writer, metrics["steps"]))
    writer.close()
    return metrics


def run_sample(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    if not cfg.ckpt.model:
        raise UserError("mode=sample needs a trained model: add ckpt=<run folder>/checkpoints/last.pt.")
    model = load_diffusion_model(cfg.ckpt.model, device)
    metrics = {"stage": "sample", "checkpoint": str(Path(cfg.ckpt.model).expanduser().resolve())}
    metrics.update(sample_and_write(model, cfg, run_dir, device))
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
    metrics.update(sample_and_write(model, cfg, run_dir, device, writer))  # a grid of what is measured
    metrics.update(evaluate_model(model, cfg, device, checkpoint,
                                  lambda n: sample_images(model, cfg, n, "balanced", device), writer))
    writer.close()
    return metrics


MODES = {"diffusion": run_diffusion, "sample": run_sample, "evaluate": run_evaluate}


def run(cfg: DictConfig, run_dir: Optional[Path] = None) -> Optional[float]:
    """Run what cfg.mode asks for in run_dir; returns the sweep objective (lower is better)."""
    validate(cfg)
    overrides: list[str] = []
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        overrides = list(HydraConfig.get().overrides.task)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    log.info("run folder %s, mode=%s, device=%s", run_dir, cfg.mode.name, device)
    t0 = time.perf_counter()
    metrics = MODES[cfg.mode.name](cfg, run_dir, device)
    metrics["wall_time_s"] = time.perf_counter() - t0
    write_metrics(run_dir, metrics)
    write_hparams(run_dir / "tb", overrides_to_hparams(overrides), metrics)
    log.info("metrics: %s", json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    return metrics.get("final_loss")
