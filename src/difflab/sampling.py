"""The sampling stage: labels, batches, and the files a user reads (samples.npz, grid.png,
the denoising frames and GIF, one PNG per sample with sample.save_png, real images beside
generated ones, and one real image noised at increasing levels)."""

from __future__ import annotations

import logging
import math
import re
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

from difflab.data import class_names, load_splits, to_model_range, to_uint8
from difflab.diffusion import Churn, GuidedDenoiser, NoiseProcess, nfe, run_sampler, sampling_grid
from difflab.diffusion.editing import EditTask, Inpainting, noised, start_step
from difflab.diffusion.samplers import OnStep
from difflab.diffusion.spacing import spacing_of
from difflab.errors import UserError
from difflab.pictures import (Grid, class_grid, save_denoising, save_grid, save_noising_strip, save_png,
                              save_real_vs_generated, save_schedule_plot)
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
    prompts: Optional[list[str]] = None  # a text model's prompt per image


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """The batches `generate` draws n images in."""
    return [slice(first, min(first + batch_size, n)) for first in range(0, n, batch_size)]


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
        for batch in batch_slices(n, batch_size):
            first, b = batch.start, batch.stop - batch.start
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
    """The samples.npz format: images uint8 N,H,W,C; labels int64 N (-1 without labels); a text model's prompts,
    str N."""
    labels = result.labels if result.labels is not None else torch.full((len(result.images),), -1)
    prompts = {} if result.prompts is None else {"prompts": np.array(result.prompts, dtype=str)}
    np.savez_compressed(path, images=rearrange(result.images, "n c h w -> n h w c").numpy(),
                        labels=labels.numpy().astype(np.int64), **prompts)


def write_sample_pngs(result: SampleResult, folder: Path, names: Optional[list[str]] = None) -> None:
    """One PNG per sample, named by its index and label (its class name where there is one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result.images):
        label = "" if result.labels is None else int(result.labels[i])
        if label != "" and names is not None and 0 <= label < len(names):
            label = re.sub(r"[^A-Za-z0-9_-]+", "-", names[label])  # a class name as a safe file name
        save_png(image, folder / (f"{i:05d}_{label}.png" if label != "" else f"{i:05d}.png"), min_size=0)


def write_samples(result: SampleResult, folder: Path, writer=None, step: int = 0,
                  names: Optional[list[str]] = None, pngs: bool = False) -> dict:
    """samples.npz (images uint8 N,H,W,C; labels int64 N; a text model's prompts, str N), grid.png
    (rows named by `names`, the class names, or by the prompts), denoising frames + GIF, and with
    `pngs` every sample in images/."""
    folder.mkdir(parents=True, exist_ok=True)
    if pngs:
        write_sample_pngs(result, folder / "images", names)
    write_npz(result, folder / "samples.npz")
    rows, names = (result.labels, names) if result.prompts is None else prompt_rows(result.prompts)
    grid = class_grid(result.images, rows, names=names)
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


def prompt_rows(prompts: list[str]) -> tuple[Tensor, list[str]]:
    """Each image's row of a grid by prompt (in the order the prompts first come), and the rows' names."""
    distinct = list(dict.fromkeys(prompts))
    index = {p: i for i, p in enumerate(distinct)}
    return torch.tensor([index[p] for p in prompts]), distinct


def sample_prompts(meta: dict, prompts: Optional[list[str]], labels_spec, n: int,
                   generator: torch.Generator) -> tuple[list[str], Optional[Tensor]]:
    """A text model's n prompts, and the class each names where known: `prompts` repeated to n;
    else the first template of each class of sample.labels (a model trained on class templates),
    or the training captions (one trained on a folder's metadata) repeated."""
    if prompts:
        return [prompts[i % len(prompts)] for i in range(n)], None
    if meta.get("class_prompts"):
        labels = make_labels(labels_spec, n, len(meta["class_prompts"]), generator)
        return [meta["class_prompts"][int(c)] for c in labels], labels
    captions = meta["prompts"]
    return [captions[i % len(captions)] for i in range(n)], None


def sample_images(model: DiffusionModel, cfg: DictConfig, n: int, labels_spec, device: torch.device,
                  gif: bool = False, classifier: Optional[torch.nn.Module] = None, stage: str = "sample",
                  prompts: Optional[list[str]] = None) -> SampleResult:
    """n samples for sample.labels (`labels_spec`), or a text model's prompts (`prompts`, else sample.prompts)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    given = prompts or cfg.sample.get("prompts")
    if model.text:
        prompts, labels = sample_prompts(model.meta, list(given) if given else None, labels_spec, n, generator)
        conditions = model.tokenize(prompts)
    else:
        labels = make_labels(labels_spec, n, model.num_classes or classifier_classes(classifier), generator)
        conditions, prompts = labels, None
    result = generate(
        lambda y: model.denoiser(y, cfg.guidance, cfg.sampler.clip_x0, classifier),
        model.process, model.shape, conditions, n, cfg.sampler, cfg.sample.batch_size, device, cfg.seed,
        decode=model.decode, gif_images=cfg.sample.gif_images if gif else 0, gif_frames=cfg.sample.gif_frames,
        stage=stage,
    )
    return replace(result, labels=labels, prompts=prompts)


def classifier_classes(classifier: Optional[torch.nn.Module]) -> int:
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
            else cfg.sample.labels,
            **({"prompts": list(cfg.sample.prompts)} if cfg.sample.get("prompts") else {})}


def sample_and_write(model: DiffusionModel, cfg: DictConfig, run_dir: Path, device: torch.device,
                     writer=None, step: int = 0, classifier: Optional[torch.nn.Module] = None) -> dict:
    if cfg.sample.num_images == 0:
        return {}
    result = sample_images(model, cfg, cfg.sample.num_images, cfg.sample.labels, device, gif=cfg.sample.gif,
                           classifier=classifier)
    names = class_names(model.cfg.dataset)
    metrics = {**write_samples(result, run_dir / "samples", writer, step, names, pngs=cfg.sample.save_png),
               "sampled_with": sampled_with(cfg, model.process)}
    write_data_pictures(model, cfg, result, run_dir / "samples", device, names)
    write_schedule_plot(model.process, cfg.sampler, run_dir / "schedule.png")
    if classifier is not None and result.labels is not None:
        write_samples(replace(result, frames=[]), run_dir / "classifier_guided_samples", names=names)
        metrics["sample_class_accuracy_t0"] = class_accuracy(classifier, model, result, device)
        log.info("classifier guidance scale %g: %.1f%% of samples read as their class by the classifier at t=0",
                 cfg.guidance.scale, 100 * metrics["sample_class_accuracy_t0"])
    return metrics


def schedule_points(process: NoiseProcess, sampler_cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The process's log-SNR over its grid of levels (t from 0 = data to 1 = noise, finite values only), and the
    sampler's steps placed on that curve (t, log-SNR)."""
    index = torch.arange(process.index_count)
    curve = _log_snr(process, process.index_level(index))
    t = (index.double() / max(process.index_count - 1, 1)).numpy()
    steps = _log_snr(process, sampling_grid(process, sampler_cfg.steps, sampler_cfg.spacing, sampler_cfg.rho).levels)
    finite = np.isfinite(curve)  # log-SNR falls monotonically in t: each step's t is where the curve has its value
    return t[finite], curve[finite], np.interp(-steps, -curve[finite], t[finite]), steps


def write_schedule_plot(process: NoiseProcess, sampler_cfg, path: Path) -> None:
    """schedule.png: log-SNR against t, with the sampler's steps marked."""
    save_schedule_plot(*schedule_points(process, sampler_cfg), process.summary(), path)


def _log_snr(process: NoiseProcess, levels: Tensor) -> np.ndarray:
    alpha, sigma = process.alpha_sigma(levels.double())
    return (2 * (alpha.log() - sigma.log())).numpy()


NOISING_LEVELS = 8  # columns of the forward-noising strip, the clean image first


def write_data_pictures(model: DiffusionModel, cfg: DictConfig, result: SampleResult, folder: Path,
                        device: torch.device, names: Optional[list[str]]) -> None:
    """real_vs_generated.png (real images of each class beside generated ones) and
    forward_noising.png (a real image of each class at increasing noise levels, in the space the
    model denoises, decoded). Skipped with a warning when the training data cannot be read here."""
    try:
        real, _ = load_splits(model.cfg.dataset, cfg.paths.cache_dir)
    except (UserError, OSError) as e:
        log.warning("real_vs_generated.png and forward_noising.png are skipped: the training data cannot be read (%s)", e)
        return
    real_labels = real.labels if real.num_classes else None
    save_real_vs_generated(real.images, real_labels, result.images, result.labels, folder / "real_vs_generated.png",
                           names=names)
    classes = real.labels.unique()[:4] if real_labels is not None else torch.zeros(0)
    firsts = torch.tensor([int((real.labels == c).nonzero()[0]) for c in classes]) if len(classes) else torch.arange(1)
    process = model.process
    index = torch.linspace(0, process.index_count - 1, NOISING_LEVELS - 1).round().long()
    levels = process.index_level(index).to(device)
    with torch.no_grad():
        x0 = model.to_model_space(to_model_range(real.images[firsts]).to(device))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        noisy = [process.add_noise(x0, noise, level.expand(len(x0))) for level in levels]
        frames = torch.stack([to_uint8(model.decode(x)).cpu() for x in [x0, *noisy]], dim=1)
    alpha, sigma = process.alpha_sigma(levels.cpu())
    titles = ["x0", *(f"snr {float(a * a / (s * s)):.2g}" for a, s in zip(alpha, sigma))]
    row_names = [names[int(c)] if names and int(c) < len(names) else str(int(c)) for c in classes] or [""]
    save_noising_strip(frames, titles, row_names, folder / "forward_noising.png")
