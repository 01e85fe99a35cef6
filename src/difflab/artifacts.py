"""The artifact cache: trained weights stored under a key derived from the settings that
determine them, so a run whose model was already trained with the same settings (a sweep over
sampling-only settings, a re-run, a later stage needing a prerequisite) reuses it.

Layout: {cache_dir}/artifacts/<stage>/<key>/{model.pt, record.json}. A file lock per key makes
parallel jobs that need the same artifact wait for the one that trains it. Under torchrun only
rank 0 reads, locks and writes the cache; the other ranks follow its decisions (see `obtain`).
The number of processes is not part of a key: like the device, it changes how a model is
trained, not the settings it is trained with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from difflab.errors import UserError
from difflab.train import distributed as dist

log = logging.getLogger("difflab")

# train.* keys that change how a run is watched or resumed, never the weights it ends with.
OBSERVATION_KEYS = ("resume", "progress", "log_every", "val_every", "val_batches", "image_every",
                    "checkpoint_every", "keep_checkpoints", "threads", "reuse", "compile", "gradient_checkpointing")


def dataset_settings(cfg: DictConfig) -> dict:
    """The data set as far as it determines trained weights (not where it is read from, nor
    how much of it is held out for the validation loss)."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    dataset.pop("val_size")
    dataset.pop("download")
    if dataset["name"] != "folder":
        dataset.pop("root")  # the standard data sets are the same bytes wherever they are read from
    return dataset


def train_settings(train_cfg: DictConfig) -> dict:
    settings = {k: v for k, v in OmegaConf.to_container(train_cfg, resolve=True).items() if k not in OBSERVATION_KEYS}
    if not settings["ema"]["decays"]:  # no extra EMA copies: the key models trained before copies existed had
        del settings["ema"]["decays"]
    if settings.get("grad_accum_steps") == 1:  # whole batches: the key models trained before accumulation existed had
        del settings["grad_accum_steps"]
    return settings


def _autoencoder_settings(autoencoder_key: Optional[str]) -> dict:
    """A latent model is determined by its autoencoder, named by that one's own key."""
    return {"key": autoencoder_key} if autoencoder_key else {"name": "none"}


def diffusion_settings(cfg: DictConfig, autoencoder_key: Optional[str] = None) -> dict:
    """Everything that determines a trained diffusion model, and nothing that only affects
    sampling (sampler, guidance scale, sample.*, eval.*) or bookkeeping."""
    return {
        "dataset": dataset_settings(cfg),
        "autoencoder": _autoencoder_settings(autoencoder_key),
        "unet": OmegaConf.to_container(cfg.unet, resolve=True),
        "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
        "objective": OmegaConf.to_container(cfg.objective, resolve=True),
        "label_dropout": cfg.guidance.p_uncond if cfg.guidance.name == "cfg" else 0.0,
        "train": train_settings(cfg.train),
        "seed": cfg.seed,
    }


# classifier.* keys that never enter a key: reporting, and the separate mode=classifier training
# (which enters through its train block). classifier.weight shapes only a joint model.
CLASSIFIER_REPORT_KEYS = ("accuracy_bands", "max_steps", "batch_size", "lr")


def _classifier_network(cfg: DictConfig, with_weight: bool) -> dict:
    node = OmegaConf.to_container(cfg.classifier, resolve=True)
    return {k: v for k, v in node.items() if k not in CLASSIFIER_REPORT_KEYS and (with_weight or k != "weight")}


def classifier_settings(cfg: DictConfig, autoencoder_key: Optional[str] = None) -> dict:
    """Everything that determines a classifier trained by mode=classifier: the data it sees
    (through which autoencoder), the schedule that noises it, its network and its training
    (classifier.{max_steps,...} replace the train block's)."""
    from difflab.train.classifier_stages import classifier_train_cfg

    network = _classifier_network(cfg, with_weight=False)
    return {
        "dataset": dataset_settings(cfg),
        "autoencoder": _autoencoder_settings(autoencoder_key),
        "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
        "classifier": network,
        "train": train_settings(classifier_train_cfg(cfg)),
        "seed": cfg.seed,
    }


def joint_settings(cfg: DictConfig, autoencoder_key: Optional[str] = None) -> dict:
    """A joint model is the diffusion model's settings plus the classifier's network and weight."""
    network = _classifier_network(cfg, with_weight=True)
    return {**diffusion_settings(cfg, autoencoder_key), "classifier": network}


FORMAT_VERSION = 1  # bump when a change to the code makes stored weights unusable


def settings_key(settings: dict) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """A file's identity by content, for artifacts derived from a given (not cached) file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


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


@dataclass
class Artifact:
    """What `obtain` found or made: the weights file and how it came to be."""

    path: Path
    key: str
    source: str  # "given" (an explicit path), "cache" or "trained" (by this run, then stored)
    record: dict  # what the training run stored beside the weights (metrics, run_dir); {} when given

    @property
    def trained(self) -> bool:
        return self.source == "trained"


TrainFn = Callable[[], tuple[Path, dict]]  # trains the stage -> (checkpoint file, record to store)


def obtain(cache: ArtifactCache, stage: str, settings: dict, train: TrainFn, *, reuse: bool = True,
           given: Optional[str] = None, given_name: str = "a path", what: Optional[str] = None,
           collective: bool = True) -> Artifact:
    """The artifact of `stage` for `settings`: the file `given` explicitly, else the cached one,
    else the result of `train()`, stored in the cache. The lookup and the training run under the
    key's file lock, so parallel jobs that need the same artifact train it once. Logs one line
    saying which of the three it did, naming the artifact `what` (default: the stage's name);
    `reuse=False` trains anew (and replaces the cached entry).

    Under torchrun every rank calls this and all take rank 0's branch: rank 0 alone takes the
    lock, looks and stores; `train()` runs on every rank (DDP training needs them all) or, with
    collective=False, on rank 0 alone; every rank returns what rank 0 stored."""
    what = what or stage
    if given:
        path = Path(given).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"The {what} file {path} given by {given_name} does not exist: point {given_name} "
                            "to a .pt file inside a run's checkpoints/ folder, or leave it out to train one.")
        log.info("using the %s given by %s=%s", what, given_name, path)
        return Artifact(path, f"file-{file_digest(path)}", "given", {})
    key = settings_key(settings)
    with cache.lock(stage, key) if dist.is_main() else contextlib.nullcontext():
        cached = dist.from_main(lambda: cache.find(stage, key) if reuse else None)
        if cached is not None:
            record = cache.record(stage, key)
            log.info("reusing the %s made with these settings by %s (%s); train.reuse=false trains anew",
                     what, record.get("run_dir"), cached)
            return Artifact(cached, key, "cache", record)
        log.info("no %s made with these settings in the artifact cache yet: making it now (key %s)", what, key)
        checkpoint, record = train() if collective or dist.is_main() else (None, {})

        def store() -> tuple[Path, dict]:
            return cache.store(stage, key, checkpoint, {**record, "settings": settings}), record

        stored, record = dist.from_main(store)  # the other ranks wait until it is stored
        log.info("stored the %s in the artifact cache: %s", what, stored)
        return Artifact(stored, key, "trained", record)
