"""The editing stage (mode=edit): the given images and masks, the class or prompt each edit is
conditioned on, SDEdit and inpainting through the sampling stage's generator, and the files a
user reads (edits/edited.npz in the samples.npz format, edits/before_after.png)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from omegaconf import OmegaConf
from torch import Tensor

from difflab.data import to_model_range
from difflab.data.edit_inputs import read_edit_images, read_masks
from difflab.diffusion import nfe
from difflab.diffusion.editing import EditTask, start_step
from difflab.errors import UserError
from difflab.pictures import EMPTY, aligned_rows, save_denoising, save_grid
from difflab.sampling import SampleResult, classifier_classes, generate, sampled_with, sampler_steps, write_npz

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from difflab.trained import DiffusionModel

log = logging.getLogger("difflab.edit")


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
    image), else the labels its .npz carries (`given`); None for an unconditional model."""
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


EXAMPLE = "edit.prompts='[\"the digit 8\"]'"


def edit_prompts(spec: Any, labels_spec: Any, n: int, meta: dict,
                 given: Optional[Tensor] = None) -> tuple[list[str], Optional[Tensor]]:
    """A text model's prompt for each of n edited images, and the class each names where known:
    edit.prompts (one for all, or one per image); else, for a model trained on class templates, the
    first template of each image's class (edit.labels, or the .npz's labels)."""
    if spec is not None:
        prompts = list(spec)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise UserError(f"edit.prompts={prompts} must be a non-empty list of prompts: e.g. {EXAMPLE}.")
        if len(prompts) not in (1, n):
            raise UserError(f"edit.prompts has {len(prompts)} prompts for {n} images: give one prompt for all, or one "
                            "per image.")
        return prompts * (n if len(prompts) == 1 else 1), None
    class_prompts = meta.get("class_prompts") or []
    if class_prompts and (labels_spec is not None or given is not None):
        labels = edit_labels(labels_spec, n, len(class_prompts), given)
        return [class_prompts[int(c)] for c in labels], labels
    raise UserError(f"The model is conditioned on prompts, so each edited image needs one: add {EXAMPLE} (one for "
                    "all, or one per image).")


def edit_conditions(model: DiffusionModel, e, n: int, file_labels: Optional[Tensor],
                    classifier: Optional[torch.nn.Module] = None) -> tuple[Optional[Tensor], Optional[Tensor],
                                                                           Optional[list[str]]]:
    """What the edits are conditioned on (labels, or a text model's tokens), the labels, the prompts."""
    if model.text:
        prompts, labels = edit_prompts(e.prompts, e.labels, n, model.meta, file_labels)
        return model.tokenize(prompts), labels, prompts
    check_no_prompts(e.prompts, model.num_classes)
    labels = edit_labels(e.labels, n, model.num_classes or classifier_classes(classifier), file_labels)
    return labels, labels, None


def check_no_prompts(spec: Any, num_classes: int) -> None:
    if spec is not None:
        raise UserError("edit.prompts asks for prompts, but the model is conditioned on "
                        f"{'classes' if num_classes else 'nothing'}: use edit.labels, or train with conditioning=text.")


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
    conditions, labels, prompts = edit_conditions(model, e, n, inputs.file_labels, classifier)
    x_in = model.to_model_space(to_model_range(inputs.images).to(device))
    masks = inputs.masks
    if masks is not None and model.latent is not None:
        masks = model.latent.mask_to_latent(masks)
    result = generate(
        lambda y: model.denoiser(y, cfg.guidance, cfg.sampler.clip_x0, classifier),
        model.process, model.shape, conditions, n, cfg.sampler, e.batch_size, device, cfg.seed,
        decode=model.decode, gif_images=cfg.sample.gif_images if cfg.sample.gif else 0,
        gif_frames=cfg.sample.gif_frames, stage="edit", edit=EditTask(x_in, e.strength, masks, e.resample),
    )
    if inputs.masks is not None:
        result.images = torch.where(inputs.masks.bool(), result.images, inputs.images)
    return replace(result, labels=labels, prompts=prompts)


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
                            else result.labels.tolist(), "prompts": result.prompts, "strength": e.strength,
                            "steps_taken": taken,
                            "nfe": edit_nfe(cfg.sampler.name, taken, e.resample if inputs.masks is not None else 1),
                            "images": e.images, "mask": e.mask, "resample": e.resample}}
