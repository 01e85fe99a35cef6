"""The sampling stage: labels, batches, and the files a user reads (samples.npz, grid.png,
the denoising frames and GIF)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
from einops import rearrange
from omegaconf import OmegaConf
from torch import Tensor
from torchvision.utils import make_grid

from difflab.data import class_names, to_model_range, to_uint8
from difflab.diffusion import Churn, GuidedDenoiser, NoiseProcess, nfe, run_sampler, sampling_grid
from difflab.diffusion.spacing import spacing_of
from difflab.errors import UserError
from difflab.pictures import Grid, class_grid, save_denoising, save_grid
from difflab.progress import progress

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from difflab.trained import DiffusionModel

log = logging.getLogger("difflab.sample")


def make_labels(spec: Any, n: int, num_classes: int, generator: torch.Generator) -> Optional[Tensor]:
    """`balanced`: equal counts (within one), in class order; `uniform`: drawn at random;
    a list: those labels, repeated to n."""
    if num_classes == 0:
        return None
    if spec == "balanced":
        return torch.arange(n) * num_classes // n
    if spec == "uniform":
        return torch.randint(0, num_classes, (n,), generator=generator)
    if isinstance(spec, (list, tuple)) or hasattr(spec, "__iter__") and not isinstance(spec, str):
        labels = torch.tensor([int(v) for v in spec], dtype=torch.long)
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(f"sample.labels={list(spec)} must be non-empty class ids in 0..{num_classes - 1}: fix the list.")
        return labels.repeat(-(-n // len(labels)))[:n]
    raise UserError(f"sample.labels={spec!r} is not understood: use balanced, uniform or a list such as [3,3,7].")


@dataclass
class SampleResult:
    images: Tensor  # uint8 N,C,H,W
    labels: Optional[Tensor]
    seconds: float
    frames: list[Grid]  # denoising grids (x_t above the predicted x0) of the first batch's first images


def generate(
    make_denoiser: Callable[[Optional[Tensor]], GuidedDenoiser],
    process: NoiseProcess,
    shape: tuple[int, int, int],
    labels: Optional[Tensor],
    n: int,
    sampler_cfg,
    batch_size: int,
    device: torch.device,
    seed: int,
    decode: Callable[[Tensor], Tensor] = lambda z: z,
    gif_images: int = 0,
    gif_frames: int = 25,
    stage: str = "sample",
) -> SampleResult:
    """Sample n images in batches; `make_denoiser(y)` builds the guided denoiser for labels y.

    Noise comes from a generator seeded by `seed`, so the same command gives the same images.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    out, frames = [], []
    t0 = time.perf_counter()
    steps = sampler_steps(process, sampler_cfg)
    keep = set(np.linspace(0, steps - 1, min(gif_frames, steps)).round().astype(int).tolist())
    with progress(stage, n, unit="img") as bar:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            y = None if labels is None else labels[start:start + b].to(device)
            noise = torch.randn((b, *shape), generator=gen, device=device)
            shown = torch.linspace(0, b - 1, min(gif_images, b)).long()  # spread over the classes

            def record(i: int, x: Tensor, x0: Tensor) -> None:
                if i in keep:  # top row x_t, bottom row the model's current guess of x0
                    both = to_uint8(decode(torch.cat([x[shown], x0[shown]]))).cpu()
                    frames.append(Grid(make_grid(both, nrow=len(both) // 2, padding=2, pad_value=255),
                                       [f"x_t, step {i + 1}/{steps}", "predicted x0"]))

            x0 = run_sampler(sampler_cfg.name, make_denoiser(y), process, noise, sampler_cfg.steps,
                             eta=sampler_cfg.eta, generator=gen,
                             on_step=record if start == 0 and gif_images > 0 else None, **sampler_options(sampler_cfg))
            out.append(to_uint8(decode(x0)).cpu())
            bar.update(b)
    return SampleResult(torch.cat(out), labels, time.perf_counter() - t0, frames)


def sampler_steps(process: NoiseProcess, sampler_cfg) -> int:
    """The steps a sampler config takes on a process (ValueError for steps it cannot take)."""
    return len(sampling_grid(process, sampler_cfg.steps, sampler_cfg.spacing, sampler_cfg.rho))


def sampler_options(sampler_cfg) -> dict:
    """run_sampler's spacing, rho and churn from a sampler config."""
    s = sampler_cfg
    churn = Churn(s.s_churn, s.s_tmin, math.inf if s.s_tmax is None else s.s_tmax, s.s_noise)
    return {"spacing": s.spacing, "rho": s.rho, "churn": churn}


def write_samples(result: SampleResult, folder: Path, writer=None, step: int = 0,
                  names: Optional[list[str]] = None) -> dict:
    """samples.npz (images uint8 N,H,W,C; labels int64 N), grid.png (rows named by `names`, the
    class names), denoising frames + GIF."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = result.labels if result.labels is not None else torch.full((len(result.images),), -1)
    np.savez_compressed(
        folder / "samples.npz",
        images=rearrange(result.images, "n c h w -> n h w c").numpy(),
        labels=labels.numpy().astype(np.int64),
    )
    grid = class_grid(result.images, result.labels, names=names)
    save_grid(grid, folder / "grid.png")
    if writer is not None:
        writer.add_image("samples/grid", grid.image, step)
    if result.frames:
        save_denoising(result.frames, folder / "denoising", folder / "denoising.gif")
        for i, frame in enumerate(result.frames if writer is not None else []):  # the slider walks the steps
            writer.add_image("samples/denoising", frame.image, i)
    log.info("wrote %d samples to %s (%.1f images/s)", len(result.images), folder,
             len(result.images) / max(result.seconds, 1e-9))
    return {"num_images": len(result.images), "sampling_seconds": result.seconds,
            "sampling_images_per_s": len(result.images) / max(result.seconds, 1e-9)}


def sample_images(model: DiffusionModel, cfg: DictConfig, n: int, labels_spec, device: torch.device,
                  gif: bool = False, classifier: Optional[torch.nn.Module] = None, stage: str = "sample") -> SampleResult:
    labels = make_labels(labels_spec, n, model.num_classes or _classifier_classes(classifier),
                         torch.Generator().manual_seed(cfg.seed))
    return generate(
        lambda y: model.denoiser(y, cfg.guidance, cfg.sampler.clip_x0, classifier),
        model.process, model.shape, labels, n, cfg.sampler, cfg.sample.batch_size, device, cfg.seed,
        decode=model.decode, gif_images=cfg.sample.gif_images if gif else 0, gif_frames=cfg.sample.gif_frames,
        stage=stage,
    )


def _classifier_classes(classifier: Optional[torch.nn.Module]) -> int:
    """An unconditional model guided by a classifier samples the classifier's classes."""
    return 0 if classifier is None else classifier.num_classes


@torch.no_grad()
def class_accuracy(classifier: torch.nn.Module, model: DiffusionModel, result: SampleResult,
                   device: torch.device) -> float:
    """Share of samples the noise-aware classifier, read at the least noisy level (on the
    re-encoded latents in latent space), assigns to the requested class."""
    x = to_model_range(result.images).to(device)
    if model.latent is not None:
        x = model.latent.encode(x)
    logits = classifier(*model.process.net_inputs(x, model.process.clean_levels(len(x), device)))
    return float((logits.argmax(1).cpu() == result.labels).float().mean())


def sampled_with(cfg: DictConfig, process: NoiseProcess) -> dict:
    """The settings that made a run's samples, for its record: the sampler, its steps, spacing
    and network evaluations per sample (NFE), guidance, seed and labels."""
    s = cfg.sampler
    steps = sampler_steps(process, s)
    return {"sampler": s.name, "steps": steps, "spacing": spacing_of(process, s.spacing),
            "nfe": nfe(s.name, steps), "eta": s.eta,
            "guidance": cfg.guidance.name, "guidance_scale": cfg.guidance.scale, "seed": cfg.seed,
            "labels": OmegaConf.to_container(cfg.sample.labels) if OmegaConf.is_config(cfg.sample.labels)
            else cfg.sample.labels}


def sample_and_write(model: DiffusionModel, cfg: DictConfig, run_dir: Path, device: torch.device,
                     writer=None, step: int = 0, classifier: Optional[torch.nn.Module] = None) -> dict:
    if cfg.sample.num_images == 0:
        return {}
    result = sample_images(model, cfg, cfg.sample.num_images, cfg.sample.labels, device, gif=cfg.sample.gif,
                           classifier=classifier)
    names = class_names(model.cfg.dataset)
    metrics = {**write_samples(result, run_dir / "samples", writer, step, names),
               "sampled_with": sampled_with(cfg, model.process)}
    if classifier is not None and result.labels is not None:
        write_samples(replace(result, frames=[]), run_dir / "classifier_guided_samples", names=names)
        metrics["sample_class_accuracy_t0"] = class_accuracy(classifier, model, result, device)
        log.info("classifier guidance scale %g: %.1f%% of samples read as their class by the classifier at t=0",
                 cfg.guidance.scale, 100 * metrics["sample_class_accuracy_t0"])
    return metrics
