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
from difflab.data.edit_inputs import read_edit_images, read_masks
from difflab.diffusion import Churn, GuidedDenoiser, NoiseProcess, nfe, run_sampler, sampling_grid
from difflab.diffusion.editing import EditTask, Inpainting, noised, start_step
from difflab.diffusion.samplers import OnStep
from difflab.diffusion.spacing import spacing_of
from difflab.errors import UserError
from difflab.pictures import EMPTY, Grid, aligned_rows, class_grid, save_denoising, save_grid
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


def _label_values(spec: Any) -> Optional[list]:
    """edit.labels as a list of ints (one label: a list of one), None when not given."""
    if spec is None:
        return None
    values = list(spec) if isinstance(spec, (list, tuple)) or OmegaConf.is_list(spec) else [spec]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UserError(f"edit.labels={spec!r} is not understood: give one class id for all images (edit.labels=8) "
                        "or one per image (edit.labels=[3,8]).")
    return values


def edit_labels(spec: Any, n: int, num_classes: int, given: Optional[Tensor] = None) -> Optional[Tensor]:
    """The class each of n edited images is conditioned on: edit.labels (one for all, or one per
    image), else the labels its .npz carries (`given`); None for an unconditional model. (The
    conditions of an edit: a prompt per image would be read beside these.)"""
    values = _label_values(spec)
    if num_classes == 0:
        if values is not None:
            raise UserError(f"edit.labels={values} asks for classes, but the model is unconditional: leave edit.labels "
                            "out, or edit with a class-conditional model.")
        return None
    if values is None:
        if given is not None and len(given) == n and bool(((given >= 0) & (given < num_classes)).all()):
            return given.clone()
        raise UserError(f"The model is class-conditional, so each edited image needs a class: add edit.labels=<one id "
                        f"in 0..{num_classes - 1} for all> or one per image (e.g. edit.labels=[3,8]).")
    if len(values) not in (1, n):
        raise UserError(f"edit.labels has {len(values)} labels for {n} images: give one label for all, or one per "
                        "image.")
    if min(values) < 0 or max(values) >= num_classes:
        raise UserError(f"edit.labels={values} has a class outside 0..{num_classes - 1}, the model's classes: fix "
                        "the list.")
    return torch.tensor(values * (n if len(values) == 1 else 1), dtype=torch.long)


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
    edit: Optional[EditTask] = None,
) -> SampleResult:
    """Sample n images in batches; `make_denoiser(y)` builds the guided denoiser for labels y; with
    `edit`, edit its n inputs instead (SDEdit from part way down the grid, inpainting by its masks).

    Noise comes from a generator seeded by `seed`, so the same command gives the same images (and an
    edit at strength 1 without a mask is the sample of the same seed).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    out, frames = [], []
    t0 = time.perf_counter()
    grid = sampling_grid(process, sampler_cfg.steps, sampler_cfg.spacing, sampler_cfg.rho)
    start = 0 if edit is None else start_step(len(grid), edit.strength)
    taken = grid.from_step(start)  # the steps the sampler takes
    steps = len(taken)
    keep = set(np.linspace(0, steps - 1, min(gif_frames, steps)).round().astype(int).tolist())
    with progress(stage, n, unit="img") as bar:
        for first in range(0, n, batch_size):
            b = min(batch_size, n - first)
            batch = slice(first, first + b)
            y = None if labels is None else labels[batch].to(device)
            noise = torch.randn((b, *shape), generator=gen, device=device)
            shown = torch.linspace(0, b - 1, min(gif_images, b)).long()  # spread over the classes
            denoiser = make_denoiser(y)

            def record(i: int, x: Tensor, x0: Tensor) -> None:
                if i in keep:  # top row x_t, bottom row the model's current guess of x0
                    both = to_uint8(decode(torch.cat([x[shown], x0[shown]]))).cpu()
                    frames.append(Grid(make_grid(both, nrow=len(both) // 2, padding=2, pad_value=255),
                                       [f"x_t, step {i + 1}/{steps}", "predicted x0"]))

            hooks = [record] if first == 0 and gif_images > 0 else []
            x_t = None
            if edit is not None:
                x_in = edit.inputs[batch].to(device)
                x_t = noised(taken, x_in, noise) if start > 0 else None  # strength 1: as sampling
                if edit.masks is not None:
                    hooks.insert(0, Inpainting(denoiser, taken, x_in, edit.masks[batch].to(device), edit.resample, gen))
            x0 = run_sampler(sampler_cfg.name, denoiser, process, noise, sampler_cfg.steps,
                             eta=sampler_cfg.eta, generator=gen, on_step=_chained(hooks), start=start, x_t=x_t,
                             **sampler_options(sampler_cfg))
            out.append(to_uint8(decode(x0)).cpu())
            bar.update(b)
    return SampleResult(torch.cat(out), labels, time.perf_counter() - t0, frames)


def _chained(hooks: list[OnStep]) -> Optional[OnStep]:
    """One step hook running `hooks` in order, each on the x_t the one before left."""
    if not hooks:
        return None

    def chained(i: int, x: Tensor, x0: Tensor) -> Tensor:
        for hook in hooks:
            out = hook(i, x, x0)
            x = x if out is None else out
        return x
    return chained


def sampler_steps(process: NoiseProcess, sampler_cfg) -> int:
    """The steps a sampler config takes on a process (ValueError for steps it cannot take)."""
    return len(sampling_grid(process, sampler_cfg.steps, sampler_cfg.spacing, sampler_cfg.rho))


def sampler_options(sampler_cfg) -> dict:
    """run_sampler's spacing, rho and churn from a sampler config."""
    s = sampler_cfg
    churn = Churn(s.s_churn, s.s_tmin, math.inf if s.s_tmax is None else s.s_tmax, s.s_noise)
    return {"spacing": s.spacing, "rho": s.rho, "churn": churn}


def write_npz(result: SampleResult, path: Path) -> None:
    """The samples.npz format: images uint8 N,H,W,C; labels int64 N (-1 without labels)."""
    labels = result.labels if result.labels is not None else torch.full((len(result.images),), -1)
    np.savez_compressed(path, images=rearrange(result.images, "n c h w -> n h w c").numpy(),
                        labels=labels.numpy().astype(np.int64))


def write_samples(result: SampleResult, folder: Path, writer=None, step: int = 0,
                  names: Optional[list[str]] = None) -> dict:
    """samples.npz (images uint8 N,H,W,C; labels int64 N), grid.png (rows named by `names`, the
    class names), denoising frames + GIF."""
    folder.mkdir(parents=True, exist_ok=True)
    write_npz(result, folder / "samples.npz")
    grid = class_grid(result.images, result.labels, names=names)
    save_grid(grid, folder / "grid.png")
    if writer is not None:
        writer.add_image("samples/grid", grid.image, step)
    if result.frames:
        save_denoising(result.frames, folder / "denoising", folder / "denoising.gif")
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


@dataclass
class EditInputs:
    """What mode=edit is given: the images (uint8 N,C,H,W), their masks (float N,1,H,W, 1 =
    regenerate; None: edit whole images) and the labels an .npz carries."""

    images: Tensor
    masks: Optional[Tensor]
    file_labels: Optional[Tensor]


def read_edit_inputs(edit_cfg) -> EditInputs:
    """edit.images and edit.mask, read and checked (one sentence for a missing or broken file)."""
    images, file_labels = read_edit_images(edit_cfg.images)
    masks = read_masks(edit_cfg.mask, len(images), tuple(images.shape[-2:])) if edit_cfg.mask else None
    return EditInputs(images, masks, file_labels)


def edit_images(model: DiffusionModel, cfg: DictConfig, inputs: EditInputs, device: torch.device,
                classifier: Optional[torch.nn.Module] = None) -> SampleResult:
    """SDEdit (and inpainting where there are masks) of the inputs with the run's sampler and guidance,
    in the space the model denoises; the images come back in the inputs' order. Masked edits keep
    the pixels outside the mask exactly as given (in latent space, past the autoencoder too)."""
    e, n = cfg.edit, len(inputs.images)
    labels = edit_labels(e.labels, n, model.num_classes or _classifier_classes(classifier), inputs.file_labels)
    x_in = model.to_model_space(to_model_range(inputs.images).to(device))
    masks = inputs.masks
    if masks is not None and model.latent is not None:
        masks = model.latent.mask_to_latent(masks)
    result = generate(
        lambda y: model.denoiser(y, cfg.guidance, cfg.sampler.clip_x0, classifier),
        model.process, model.shape, labels, n, cfg.sampler, e.batch_size, device, cfg.seed,
        decode=model.decode, gif_images=cfg.sample.gif_images if cfg.sample.gif else 0,
        gif_frames=cfg.sample.gif_frames, stage="edit", edit=EditTask(x_in, e.strength, masks, e.resample),
    )
    if inputs.masks is not None:
        result.images = torch.where(inputs.masks.bool(), result.images, inputs.images)
    return result


def edit_nfe(sampler: str, taken: int, resample: int = 1) -> int:
    """Network evaluations per edited image: the sampler's over the steps taken, plus one per
    resampling of each step but the last (into clean data, which is not resampled)."""
    return nfe(sampler, taken) + (resample - 1) * max(taken - 1, 0) if taken else 0


def edit_and_write(model: DiffusionModel, cfg: DictConfig, run_dir: Path, device: torch.device,
                   classifier: Optional[torch.nn.Module] = None) -> dict:
    """edits/edited.npz (the samples.npz format, in the inputs' order), edits/before_after.png (each
    input above its edit; with masks, the masked input between them) and the denoising frames."""
    inputs = read_edit_inputs(cfg.edit)
    result = edit_images(model, cfg, inputs, device, classifier)
    folder = run_dir / "edits"
    folder.mkdir(parents=True, exist_ok=True)
    write_npz(result, folder / "edited.npz")
    sets, names = [inputs.images, result.images], ["before", "after"]
    if inputs.masks is not None:  # the regenerated region in grey
        sets.insert(1, torch.where(inputs.masks.bool(), torch.full_like(inputs.images, EMPTY), inputs.images))
        names.insert(1, "masked")
    save_grid(aligned_rows(sets, names), folder / "before_after.png")
    if result.frames:
        save_denoising(result.frames, folder / "denoising", folder / "denoising.gif")
    steps = sampler_steps(model.process, cfg.sampler)
    taken = steps - start_step(steps, cfg.edit.strength)
    log.info("edited %d images in %s (strength %g: %d of %d steps%s)", len(result.images), folder,
             cfg.edit.strength, taken, steps, ", inpainting" if inputs.masks is not None else "")
    e = cfg.edit
    return {"num_images": len(result.images), "editing_seconds": result.seconds,
            "edited_with": {**sampled_with(cfg, model.process), "labels": None if result.labels is None
                            else result.labels.tolist(), "strength": e.strength, "steps_taken": taken,
                            "nfe": edit_nfe(cfg.sampler.name, taken, e.resample if inputs.masks is not None else 1),
                            "images": e.images, "mask": e.mask, "resample": e.resample}}
