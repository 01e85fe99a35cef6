"""The artifact cache: trained weights stored under a key derived from the settings that
determine them, so a run whose model was already trained with the same settings (a sweep over
sampling-only settings, a re-run, a later stage needing a prerequisite) reuses it.

Layout: {cache_dir}/artifacts/<stage>/<key>/{model.pt, record.json}. A file lock per key makes
parallel jobs that need the same artifact wait for the one that trains it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

# train.* keys that change how a run is watched or resumed, never the weights it ends with.
OBSERVATION_KEYS = ("resume", "progress", "log_every", "val_every", "val_batches", "image_every",
                    "checkpoint_every", "keep_checkpoints", "threads", "reuse", "compile")


def _dataset_settings(cfg: DictConfig) -> dict:
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    dataset.pop("val_size")
    dataset.pop("download")
    if dataset["name"] != "folder":
        dataset.pop("root")  # the standard data sets are the same bytes wherever they are read from
    return dataset


def _train_settings(train: DictConfig) -> dict:
    settings = {k: v for k, v in OmegaConf.to_container(train, resolve=True).items() if k not in OBSERVATION_KEYS}
    if not settings["ema"]["decays"]:  # no extra EMA copies: the key models trained before copies existed had
        del settings["ema"]["decays"]
    return settings


def diffusion_settings(cfg: DictConfig) -> dict:
    """Everything that determines a trained diffusion model, and nothing that only affects
    sampling (sampler, guidance scale, sample.*, eval.*) or bookkeeping."""
    return {
        "dataset": _dataset_settings(cfg),
        "autoencoder": OmegaConf.to_container(cfg.autoencoder, resolve=True),
        "unet": OmegaConf.to_container(cfg.unet, resolve=True),
        "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
        "objective": OmegaConf.to_container(cfg.objective, resolve=True),
        "label_dropout": cfg.guidance.p_uncond if cfg.guidance.name == "cfg" else 0.0,
        "train": _train_settings(cfg.train),
        "seed": cfg.seed,
    }


# classifier.* keys that change how the classifier is used or reported, not the weights it ends with.
CLASSIFIER_USE_KEYS = ("weight", "accuracy_bands", "max_steps", "batch_size", "lr")


def classifier_settings(cfg: DictConfig) -> dict:
    """Everything that determines a classifier trained by mode=classifier: the data it sees,
    the schedule that noises it, its network and its training (classifier.{max_steps,...}
    replace the train block's)."""
    from difflab.train.classifier_stages import classifier_train_cfg

    network = {k: v for k, v in OmegaConf.to_container(cfg.classifier, resolve=True).items()
               if k not in CLASSIFIER_USE_KEYS}
    return {
        "dataset": _dataset_settings(cfg),
        "autoencoder": OmegaConf.to_container(cfg.autoencoder, resolve=True),
        "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
        "classifier": network,
        "train": _train_settings(classifier_train_cfg(cfg)),
        "seed": cfg.seed,
    }


def joint_settings(cfg: DictConfig) -> dict:
    """A joint model is the diffusion model's settings plus the classifier's network and weight."""
    network = {k: v for k, v in OmegaConf.to_container(cfg.classifier, resolve=True).items()
               if k not in ("accuracy_bands", "max_steps", "batch_size", "lr")}
    return {**diffusion_settings(cfg), "classifier": network}


FORMAT_VERSION = 1  # bump when a change to the code makes stored weights unusable


def settings_key(settings: dict) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ArtifactCache:
    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir).expanduser() / "artifacts"

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    @contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / stage / f"{key}.lock")):
            yield

    def find(self, stage: str, key: str) -> Optional[Path]:
        """The stored weights, if a complete entry exists (record.json is written last)."""
        folder = self.folder(stage, key)
        return folder / "model.pt" if (folder / "record.json").is_file() else None

    def record(self, stage: str, key: str) -> dict:
        return json.loads((self.folder(stage, key) / "record.json").read_text())

    def store(self, stage: str, key: str, checkpoint: Path, record: dict) -> Path:
        """Copy a checkpoint in atomically, then write the record that marks the entry complete."""
        folder = self.folder(stage, key)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        shutil.copyfile(checkpoint, tmp)
        os.replace(tmp, folder / "model.pt")
        tmp_record = folder / "record.json.tmp"
        tmp_record.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_record, folder / "record.json")
        return folder / "model.pt"
