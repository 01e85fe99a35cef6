"""The latent space a latent diffusion model works in: a trained autoencoder and its scale;
and mode=reconstruction, the run that trains (or measures) that autoencoder alone.

Where the autoencoder comes from (ckpt.autoencoder, the artifact cache, or training it first
in the same run) is decided by `obtain_latent_space`; a diffusion checkpoint embeds the
autoencoder's weights (`LatentSpace.state`), so `mode=sample` needs nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from difflab.artifacts import Artifact, ArtifactCache, dataset_settings, file_digest, obtain, train_settings
from difflab.data import load_splits, to_model_range
from difflab.errors import UserError
from difflab.models.autoencoder import Autoencoder, build_autoencoder
from difflab.train import distributed as dist
from difflab.train.checkpoint import atomic_save, load_checkpoint
from difflab.train.reconstruction import (autoencoder_train_config, evaluate_autoencoder, held_out_images,
                                          train_autoencoder)

log = logging.getLogger("difflab")

ENCODE_BATCH = 256


def autoencoder_settings(cfg: DictConfig) -> dict:
    """Everything that determines a trained autoencoder: its config, the data set, the training
    settings it is trained with and the seed."""
    autoencoder = OmegaConf.to_container(cfg.autoencoder, resolve=True)
    autoencoder.pop("train")  # enters through the merged train block below
    return {"dataset": dataset_settings(cfg), "autoencoder": autoencoder,
            "train": train_settings(autoencoder_train_config(cfg)), "seed": cfg.seed}


@dataclass
class LatentSpace:
    """What a diffusion model needs of its autoencoder: z = encode(x) * scale, x = decode(z / scale)."""

    autoencoder: Autoencoder
    config: dict  # the autoencoder config group node it was built from
    image_shape: tuple[int, int, int]
    scale: float
    identity: str  # digest of the autoencoder file: names what encoded latents are derived from

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return torch.cat([self.autoencoder.encode(xb).float() for xb in x.split(ENCODE_BATCH)]) * self.scale

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return torch.cat([self.autoencoder.decode(zb / self.scale).float() for zb in z.split(ENCODE_BATCH)])

    def state(self) -> dict:
        return {"config": self.config, "image_shape": list(self.image_shape), "latent_scale": self.scale,
                "identity": self.identity, "weights": self.autoencoder.state_dict()}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> LatentSpace:
        shape = tuple(state["image_shape"])
        autoencoder = build_autoencoder(OmegaConf.create(state["config"]), shape[0], shape[1])
        autoencoder.load_state_dict(state["weights"])
        return cls(autoencoder.to(device).eval().requires_grad_(False), state["config"], shape,
                   state["latent_scale"], state["identity"])

    def encode_dataset(self, images_uint8: Tensor, cfg: DictConfig, device: torch.device) -> Tensor:
        """The scaled latents of a whole (un-augmented) training set, encoded once and kept in the
        artifact cache under a key of the autoencoder file and the images' bytes, so any change
        to either encodes anew."""
        cache = ArtifactCache(cfg.paths.cache_dir)
        images_digest = hashlib.sha256(images_uint8.contiguous().numpy().tobytes()).hexdigest()[:16]
        settings = {"autoencoder_file": self.identity, "latent_scale": self.scale, "images": images_digest}
        with contextlib.ExitStack() as until_stored:
            def encode_all() -> tuple[Path, dict]:  # the latents file lives until obtain has stored it
                cache.root.mkdir(parents=True, exist_ok=True)
                tmp = Path(until_stored.enter_context(tempfile.TemporaryDirectory(dir=cache.root)))
                z = torch.cat([self.encode(to_model_range(chunk.to(device))).cpu()
                               for chunk in images_uint8.split(4096)])
                atomic_save({"latents": z}, tmp / "latents.pt")
                return tmp / "latents.pt", {"images": len(z), "shape": list(z.shape[1:])}

            # Under torchrun rank 0 encodes alone; the other ranks read the stored latents.
            artifact = obtain(cache, "latents", settings, encode_all, what="encoded training latents",
                              collective=False)
        return torch.load(artifact.path, map_location="cpu", weights_only=True)["latents"].to(device)


def load_latent_space(path: Path, cfg: DictConfig, device: torch.device, given_name: str) -> LatentSpace:
    """The autoencoder checkpoint at `path`, checked against the run's autoencoder and data set."""
    state = load_checkpoint(path, f"autoencoder checkpoint ({given_name})")
    if state.get("stage") != "autoencoder" or "latent_scale" not in state:
        raise UserError(f"{given_name}={path} holds a {state.get('stage')!r} model, not a trained autoencoder: "
                        "pass the checkpoints/last.pt of a mode=reconstruction run.")
    trained = OmegaConf.create(state["config"])
    image_shape = tuple(state["meta"]["image_shape"])
    here = (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    expected = build_autoencoder(cfg.autoencoder, here[0], here[1]).latent_shape
    found = tuple(state["meta"]["latent_shape"])
    if image_shape != here or found != expected or trained.autoencoder.name != cfg.autoencoder.name:
        raise UserError(
            f"{given_name}={path} is a {trained.autoencoder.name} autoencoder of {_dims(image_shape)} images with "
            f"{_dims(found)} latents, but this run's autoencoder={cfg.autoencoder.name} and data set make "
            f"{_dims(expected)} latents of {_dims(here)} images: pass an autoencoder trained with these settings, "
            "or leave it out to train one.")
    autoencoder = build_autoencoder(trained.autoencoder, image_shape[0], image_shape[1])
    prefix = "autoencoder."
    autoencoder.load_state_dict({k[len(prefix):]: v for k, v in state["ema"]["model"].items() if k.startswith(prefix)})
    return LatentSpace(autoencoder.to(device).eval().requires_grad_(False),
                       OmegaConf.to_container(trained.autoencoder, resolve=True), image_shape,
                       float(state["latent_scale"]), file_digest(Path(path)))


def load_artifact(artifact: Artifact, cfg: DictConfig, device: torch.device) -> LatentSpace:
    name = "ckpt.autoencoder" if artifact.source == "given" else "the cached autoencoder"
    return load_latent_space(artifact.path, cfg, device, name)


def _dims(shape) -> str:
    return "x".join(map(str, shape))


def obtain_autoencoder(cfg: DictConfig, stage_dir: Path, device: torch.device) -> Artifact:
    """ckpt.autoencoder when given, else the cached autoencoder of these settings, else one
    trained now in stage_dir (and cached)."""
    if cfg.autoencoder.name == "none":
        raise UserError(f"mode={cfg.mode.name} needs an autoencoder, but autoencoder=none: add autoencoder=kl or autoencoder=vq.")
    return obtain(ArtifactCache(cfg.paths.cache_dir), "autoencoder", autoencoder_settings(cfg),
                  lambda: train_autoencoder(cfg, stage_dir, device), reuse=cfg.train.reuse,
                  given=cfg.ckpt.autoencoder, given_name="ckpt.autoencoder", what=f"{cfg.autoencoder.name} autoencoder")


def obtain_latent_space(cfg: DictConfig, run_dir: Path, device: torch.device) -> tuple[LatentSpace, dict]:
    """The latent space of a latent diffusion run, and what its metrics.json says about it."""
    artifact = obtain_autoencoder(cfg, run_dir / "autoencoder", device)
    space = load_artifact(artifact, cfg, device)
    record = {"autoencoder_source": artifact.source, "autoencoder_trained": artifact.trained,
              "autoencoder_key": artifact.key, "autoencoder_checkpoint": str(artifact.path),
              "latent_shape": list(space.shape), "latent_scale": space.scale}
    return space, record


def run_reconstruction(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    """Train the autoencoder (or take it from ckpt.autoencoder or the cache) and measure it."""
    artifact = obtain_autoencoder(cfg, run_dir, device)
    if not dist.is_main():  # measuring and writing are rank 0's
        return {}
    metrics = {**artifact.record.get("metrics", {}), "stage": "reconstruction", "trained": artifact.trained,
               "autoencoder_source": artifact.source, "artifact_key": artifact.key}
    if not artifact.trained:  # the training run measured it; a reused one is measured here
        metrics["checkpoint"] = str(artifact.path)
        space = load_artifact(artifact, cfg, device)
        writer = SummaryWriter(str(run_dir / "tb"))
        images = held_out_images(*load_splits(cfg.dataset, cfg.paths.cache_dir))
        metrics.update(evaluate_autoencoder(space.autoencoder, images, run_dir, device, writer))
        metrics.update({"latent_shape": list(space.shape), "latent_scale": space.scale})
        writer.close()
    return metrics
