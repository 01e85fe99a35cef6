"""difflab from Python: a trained model loaded in one call and sampled exactly as `python run.py mode=sample` samples
it, an export that loads with no pickle, and a run started as the command line starts it.

    import difflab

    pipe = difflab.load("outputs/2025-01-01/12-00-00.000000")  # a run folder, a checkpoint (.pt) or an export
    samples = pipe.sample(16, labels=3, steps=50, seed=1)      # .images: uint8 N,C,H,W; .labels
    samples.to_pil()[0].save("a_three.png")
    difflab.export("outputs/2025-01-01/12-00-00.000000", "my_model")  # `difflab export ckpt=... out=my_model`
    run = difflab.run(["dataset=fashion_mnist", "train.max_steps=500"])  # run.dir, run.metrics

`sample` composes the config `python run.py mode=sample ckpt=... SETTINGS` composes (so its defaults are conf/'s,
not the training run's: sampler=euler, 20 steps, guidance=auto), checks it with that command's plan and draws with the
same function, so `pipe.sample(n, seed=s)` gives the images that command writes to samples/samples.npz.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from hydra.types import RunMode
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import to_pil_image

from difflab.cli import command_line, compose_api, composition_error
from difflab.data import to_model_range, to_uint8
from difflab.errors import UserError
from difflab.export_format import read_model_state, write_export
from difflab.plan import build_plan, model_facts
from difflab.record import read_metrics
from difflab.runner import resolve_device
from difflab.sampling import sample_images
from difflab.trained import LatentSpace, diffusion_model_from_state

Labels = Union[None, int, str, Sequence[int]]


@dataclass
class Samples:
    """What `Pipeline.sample` drew: the images as samples/samples.npz holds them (there as N,H,W,C) and the labels
    they were drawn for (None for an unconditional model)."""

    images: Tensor  # uint8 N,C,H,W, on the CPU
    labels: Optional[Tensor]  # int64 N
    prompts: Optional[list[str]] = None  # a text model's prompt per image

    def to_pil(self) -> list[Image.Image]:
        return [to_pil_image(image) for image in self.images]


@dataclass
class Run:
    """A finished `difflab.run`: its folder and the record it wrote there."""

    dir: Path
    metrics: dict  # metrics.json


def _compose(overrides: list[str], config_dir: Optional[str] = None, hydra: bool = False) -> DictConfig:
    """The config the command line `overrides` composes; Hydra's errors as the one sentence that command prints."""
    from hydra import compose

    try:
        with compose_api(config_dir):
            return compose(config_name="config", overrides=command_line(overrides), return_hydra_config=hydra)
    except UserError:
        raise
    except Exception as e:  # Hydra's own errors: a wrong key, option or type
        raise UserError(composition_error(e)) from None


def _label_overrides(labels: Labels) -> list[str]:
    if labels is None:
        return []
    if isinstance(labels, str):
        return [f"sample.labels={labels}"]
    values = [labels] if isinstance(labels, int) else list(labels)
    return [f"sample.labels=[{','.join(str(int(v)) for v in values)}]"]


def _check_batch(x: Tensor, shape: tuple[int, ...], what: str, fix: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape):
        found = f"shape {list(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
        raise UserError(f"This model's {what} are tensors N,{','.join(map(str, shape))}, not {found}: {fix}.")


class Pipeline:
    """A trained diffusion model with the checks and the sampling of `mode=sample`, without a run folder."""

    def __init__(self, state: dict, device: torch.device):
        self.model = diffusion_model_from_state(state, device)
        self.device = device
        self._facts = model_facts(state)

    @property
    def config(self) -> DictConfig:
        """The resolved config the model was trained with."""
        return self.model.cfg

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.model.shape if self.model.latent is None else self.model.latent.image_shape

    @property
    def latent_shape(self) -> Optional[tuple[int, int, int]]:
        """None for a pixel-space model."""
        return None if self.model.latent is None else self.model.shape

    def sampling_config(self, n: int, labels: Labels = None, sampler: Optional[str] = None,
                        steps: Optional[int] = None, guidance_scale: Optional[float] = None, seed: int = 0,
                        overrides: Sequence[str] = (), prompts: Optional[Sequence[str]] = None) -> DictConfig:
        """The config `python run.py mode=sample ckpt=... sample.num_images=n seed=...` composes from these settings,
        checked as that command's plan checks it."""
        if n < 1:
            raise UserError(f"sample(n={n}) draws nothing: ask for at least one image.")
        given = ["mode=sample", f"sample.num_images={n}", f"seed={seed}", *_label_overrides(labels)]
        given += [f"sampler={sampler}"] if sampler is not None else []
        given += [f"sampler.steps={steps}"] if steps is not None else []
        if guidance_scale is not None:
            given += ["guidance=cfg", f"guidance.scale={guidance_scale}"] if guidance_scale > 0 else ["guidance=none"]
        cfg = _compose([*given, *overrides])
        if prompts is not None:  # set after composing: a prompt may hold anything an override string cannot
            cfg.sample.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if cfg.guidance.name == "classifier":
            raise UserError("Classifier guidance needs a noise-aware classifier that difflab.load does not obtain: "
                            "sample with `python run.py mode=sample ckpt=<checkpoint> guidance=classifier`.")
        return build_plan(cfg, None, given=self._facts).config

    def sample(self, n: int, labels: Labels = None, sampler: Optional[str] = None, steps: Optional[int] = None,
               guidance_scale: Optional[float] = None, seed: int = 0, overrides: Sequence[str] = (),
               prompts: Optional[Sequence[str]] = None) -> Samples:
        """n images, as `python run.py mode=sample` draws them with the same settings.

        labels: None (the config's: balanced over the classes), "balanced", "uniform", a class id for all n, or a
        list repeated to n. sampler, steps: a sampler option (euler, heun, ddim, ddpm, dpmpp_2m, unipc) and its
        steps. guidance_scale: classifier-free guidance at that scale, for a model trained with label dropout
        (guidance=cfg); 0 samples unguided; None: guidance=auto (the model's training decides: CFG at 1.5 or none).
        prompts: a text model's prompts (one string, or a list repeated to n), as sample.prompts.
        overrides: any further `mode=sample` settings, e.g. ["sample.batch_size=64", "sampler.eta=1"]."""
        cfg = self.sampling_config(n, labels, sampler, steps, guidance_scale, seed, overrides, prompts)
        result = sample_images(self.model, cfg, n, cfg.sample.labels, self.device)
        return Samples(result.images, result.labels, result.prompts)

    def _latent_space(self, what: str) -> LatentSpace:
        if self.model.latent is None:
            raise UserError(f"This model diffuses in pixel space (autoencoder=none), so it has no latents to {what}: "
                            "load a latent model (trained with autoencoder=kl or vq) to use encode and decode.")
        return self.model.latent

    def encode(self, images: Tensor) -> Tensor:
        """uint8 images N,C,H,W (as `sample` returns them) -> the scaled latents the diffusion model denoises."""
        self._latent_space("encode into")
        _check_batch(images, self.image_shape, "images", "pass uint8 images N,C,H,W, as sample() returns them")
        if images.dtype != torch.uint8:
            raise UserError(f"encode takes uint8 images (0-255), not {images.dtype}: convert float images in [0, 1] "
                            "with (x * 255).round().to(torch.uint8).")
        return self.model.to_model_space(to_model_range(images).to(self.device)).cpu()

    def decode(self, latents: Tensor) -> Tensor:
        """Latents N,C,H,W (as `encode` returns them) -> uint8 images N,C,H,W."""
        latent = self._latent_space("decode from")
        _check_batch(latents, latent.shape, "latents", "pass latents as encode() returns them")
        return to_uint8(self.model.decode(latents.to(self.device, torch.float32))).cpu()


def load(path: Union[str, os.PathLike], device: str = "auto") -> Pipeline:
    """The diffusion model of a checkpoint (.pt), a run folder (its checkpoints/last.pt, or the checkpoint its
    metrics.json names, e.g. in the artifact cache) or an export folder (read with no pickle); device as device=."""
    return Pipeline(read_model_state(path)[0], resolve_device(device))


def export(ckpt: Union[str, os.PathLike], out: Union[str, os.PathLike]) -> Path:
    """What `difflab export ckpt=CKPT out=OUT` writes (see difflab.export_format); the export folder."""
    return write_export(Path(ckpt), Path(out))


def _given_run_dir(overrides: list[str]) -> bool:
    return any(o.lstrip("+").startswith("hydra.run.dir=") for o in overrides)


def run(overrides: Sequence[str] = (), config_dir: Optional[str] = None, quiet: bool = False) -> Run:
    """Run what `python run.py OVERRIDES` runs, in a process of its own as on the command line (Hydra's run folder and
    logging, Ctrl-C saving the training), its output echoed unless quiet. The run folder is the one Hydra would name
    (hydra.run.dir, or outputs/<date>/<time> in the working directory), fixed here so it can be returned. A mistake
    is the command's one sentence, raised as a UserError."""
    overrides = list(overrides)
    flag = next((o for o in overrides if o.startswith("-")), None)
    if flag is not None:
        raise UserError(f"difflab.run takes key=value overrides, not {flag}: run sweeps (-m) and Hydra's own flags "
                        "from the command line, or pass config_dir= for --config-dir.")
    cfg = _compose(overrides, config_dir, hydra=True)
    if cfg.hydra.mode == RunMode.MULTIRUN:
        raise UserError("difflab.run runs one run, and these overrides make a sweep (a named sweep): start it with "
                        "`difflab +sweep=...` on the command line.")
    run_dir = Path(cfg.hydra.run.dir).expanduser().resolve()
    args = [*(["--config-dir", config_dir] if config_dir else []), *overrides,
            *([] if _given_run_dir(overrides) else [f"hydra.run.dir={run_dir}"])]
    code, tail = _run_cli(args, quiet)
    if code == 2:
        error = next((line for line in reversed(tail) if line.startswith("error: ")), tail[-1] if tail else "")
        raise UserError(error.removeprefix("error: ").strip())
    if code != 0:
        raise RuntimeError(f"`python -m difflab {' '.join(args)}` failed (exit status {code}):\n{''.join(tail)}")
    return Run(run_dir, read_metrics(run_dir))


def _run_cli(args: list[str], quiet: bool) -> tuple[int, list[str]]:
    """`python -m difflab ARGS` with this process's difflab (its folder first on PYTHONPATH): the exit status and the
    last lines of its output. Ctrl-C here reaches the run too, which then saves its training before it stops."""
    package_parent = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen([sys.executable, "-m", "difflab", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        for line in proc.stdout:
            tail.append(line)
            if not quiet:
                sys.stdout.write(line)
        return proc.wait(), list(tail)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
