"""The artifact cache: trained weights stored under a key of the settings and the code that
determine them, so a run whose model was already trained with the same settings by the same
code (a sweep over sampling-only settings, a re-run, a later stage needing a prerequisite)
reuses it, and a researcher who edits the loss or the network trains anew.

Layout: {cache_dir}/artifacts/<stage>/<key>/{model.pt, record.json, last_used}. record.json is written
last and holds the sha256 of model.pt, which is checked before an entry is handed out, so a
damaged or half-copied file is never reused. A file lock per key makes parallel jobs that need
the same artifact wait for the one that makes it. Under torchrun only rank 0 reads, locks and
writes the cache; the other ranks follow its decisions (see `obtain`). The number of processes
is not part of a key: like the device, it changes how a model is trained, not the settings it
is trained with.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

import difflab.distributed as dist
from difflab.checkpoint import atomic_copy, atomic_write_json
from difflab.config import autoencoder_train_config, classifier_train_config, noise_settings
from difflab.errors import UserError
from difflab.version import __version__

log = logging.getLogger("difflab")

# train.* keys that change how a run is watched or resumed, never the weights it ends with.
# (init_from enters a key as the digest of its file, not as a path.)
OBSERVATION_KEYS = ("resume", "progress", "log_every", "val_every", "val_batches", "image_every",
                    "checkpoint_every", "keep_checkpoints", "threads", "reuse", "reuse_other_code", "compile",
                    "gradient_checkpointing", "init_from")

# The code that determines what a trained artifact is: the networks, the diffusion math, the
# training stages and loop, pruning, the data pipeline, and how a checkpoint becomes a model.
CODE_PARTS = ("models", "diffusion", "train", "compress/prune.py", "data", "trained.py")
CODE_SUFFIXES = (".py", ".cpp", ".h")
FORMAT_VERSION = 2  # bump when a change to the code makes stored weights unusable
LAST_USED = "last_used"  # an empty file in an entry's folder, touched whenever it is handed out


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """difflab's version and a hash of the source files in CODE_PARTS."""
    package = Path(__file__).parent
    digest = hashlib.sha256(__version__.encode())
    for part in CODE_PARTS:
        root = package / part
        files = sorted(p for p in root.rglob("*") if p.suffix in CODE_SUFFIXES) if root.is_dir() else [root]
        for path in files:
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def dataset_settings(cfg: DictConfig) -> dict:
    """The data set as far as it determines trained weights (not where it is read from, nor
    how much of it is held out for the validation loss)."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    dataset.pop("val_size")
    dataset.pop("download")
    dataset.pop("captions", None)  # text conditioning's: in conditioning_settings
    if dataset["name"] != "folder":
        dataset.pop("root")  # the standard data sets are the same bytes wherever they are read from
    return dataset


def conditioning_settings(cfg: DictConfig) -> dict:
    """The network and how its condition enters it. The keys of conditioning=class leave out the
    cross-attention and caption settings it does not read (the keys its models had before them)."""
    unet = OmegaConf.to_container(cfg.unet, resolve=True)
    name = (cfg.get("conditioning") or {}).get("name") or "class"
    if name == "class":
        for key in ("cross_attention_resolutions", "context_dim"):
            unet.pop(key, None)
        return {"unet": unet}
    settings = {"unet": unet, "conditioning": OmegaConf.to_container(cfg.conditioning, resolve=True)}
    if name == "text":
        settings["text_encoder"] = OmegaConf.to_container(cfg.text_encoder, resolve=True)
        settings["captions"] = OmegaConf.to_container(cfg.dataset.captions, resolve=True)
    return settings


def train_settings(train_cfg: DictConfig) -> dict:
    settings = {k: v for k, v in OmegaConf.to_container(train_cfg, resolve=True).items() if k not in OBSERVATION_KEYS}
    ema = settings["ema"]
    if not ema["decays"]:  # no extra EMA copies: the key models trained before copies existed had
        del ema["decays"]
    ema.pop("sigma_rel", None)  # the post-hoc EMA width is chosen when the model is loaded, so one training serves all
    if not ema.get("posthoc"):  # no post-hoc profiles: the key models trained before they existed had
        for key in ("posthoc", "sigma_rels", "snapshot_every"):
            ema.pop(key, None)
    if settings.get("grad_accum_steps") == 1:  # whole batches: the key models trained before accumulation existed had
        del settings["grad_accum_steps"]
    return settings


def _with_init(settings: dict, init_key: Optional[str]) -> dict:
    """A stage initialised from a checkpoint (train.init_from) is determined by that file too."""
    return {**settings, "init_from": init_key} if init_key else settings


def _autoencoder_settings(autoencoder_key: Optional[str]) -> dict:
    """A latent model is determined by its autoencoder, named by that one's own key."""
    return {"key": autoencoder_key} if autoencoder_key else {"name": "none"}


def autoencoder_settings(cfg: DictConfig, init_key: Optional[str] = None) -> dict:
    """Everything that determines a trained autoencoder: its config, the data set, the training
    settings it is trained with and the seed."""
    autoencoder = OmegaConf.to_container(cfg.autoencoder, resolve=True)
    autoencoder.pop("train")  # enters through the merged train block below
    if autoencoder.get("latent") == "spatial":  # a map latent: the key autoencoders trained before vector latents had
        autoencoder.pop("latent")
        autoencoder.pop("latent_dim")
    return _with_init({"dataset": dataset_settings(cfg), "autoencoder": autoencoder,
                       "train": train_settings(autoencoder_train_config(cfg)), "seed": cfg.seed}, init_key)


def diffusion_settings(cfg: DictConfig, autoencoder_key: Optional[str] = None, init_key: Optional[str] = None) -> dict:
    """Everything that determines a trained diffusion model, and nothing that only affects
    sampling (sampler, guidance scale, sample.*, eval.*) or bookkeeping."""
    return _with_init({
        "dataset": dataset_settings(cfg),
        "autoencoder": _autoencoder_settings(autoencoder_key),
        **conditioning_settings(cfg),
        "noise": noise_settings(cfg),
        "objective": OmegaConf.to_container(cfg.objective, resolve=True),
        "label_dropout": cfg.guidance.p_uncond if cfg.guidance.name == "cfg" else 0.0,
        "train": train_settings(cfg.train),
        "seed": cfg.seed,
    }, init_key)


# classifier.* keys that never enter a key: reporting, and the separate mode=classifier training
# (which enters through its train block). classifier.weight shapes only a joint model.
CLASSIFIER_REPORT_KEYS = ("accuracy_bands", "max_steps", "batch_size", "lr")


def _classifier_network(cfg: DictConfig, with_weight: bool) -> dict:
    node = OmegaConf.to_container(cfg.classifier, resolve=True)
    return {k: v for k, v in node.items() if k not in CLASSIFIER_REPORT_KEYS and (with_weight or k != "weight")}


def classifier_settings(cfg: DictConfig, autoencoder_key: Optional[str] = None, init_key: Optional[str] = None) -> dict:
    """Everything that determines a classifier trained by mode=classifier: the data it sees
    (through which autoencoder), the objective's noise levels it reads, its network and its training
    (classifier.{max_steps,...} replace the train block's)."""
    return _with_init({
        "dataset": dataset_settings(cfg),
        "autoencoder": _autoencoder_settings(autoencoder_key),
        "noise": noise_settings(cfg),
        "classifier": _classifier_network(cfg, with_weight=False),
        "train": train_settings(classifier_train_config(cfg)),
        "seed": cfg.seed,
    }, init_key)


def joint_settings(cfg: DictConfig, autoencoder_key: Optional[str] = None, init_key: Optional[str] = None) -> dict:
    """A joint model is the diffusion model's settings plus the classifier's network and weight."""
    return {**diffusion_settings(cfg, autoencoder_key, init_key), "classifier": _classifier_network(cfg, True)}


def settings_key(settings: dict, code: Optional[str] = None) -> str:
    """The key of `settings` as made by `code` (a fingerprint); code=None: by any code."""
    payload = json.dumps({"format": FORMAT_VERSION, **settings, **({"code": code} if code else {})}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def artifact_key(settings: dict) -> str:
    """The key an artifact of `settings` made by the code running now is stored under."""
    return settings_key(settings, code_fingerprint())


def file_digest(path: Path) -> str:
    """A file's identity by content, for artifacts derived from a given (not cached) file."""
    return sha256_file(path)[:16]


def parameter_count(path: Path) -> Optional[int]:
    """The number of numbers in a training checkpoint's EMA weights (None for other files): a
    record of what the entry is, beside its hash. Memory-mapped, so nothing is read twice."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file (a cached array): nothing to count
        return None
    weights = state.get("ema", {}).get("model") if isinstance(state, dict) else None
    return sum(t.numel() for t in weights.values()) if isinstance(weights, dict) else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _holder(path: Path) -> str:
    """Who holds a lock, as the holder wrote it down."""
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


@dataclass
class Entry:
    """A verified cache entry."""

    path: Path  # model.pt
    key: str
    record: dict


class ArtifactCache:
    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir).expanduser() / "artifacts"

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    @contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """The key's lock; says so when another process holds it (and which, when it said)."""
        folder = self.root / stage
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"Cannot create the artifact cache {folder} ({e.strerror}): set paths.cache_dir to a "
                            "writable folder.") from None
        lock, holder = FileLock(str(folder / f"{key}.lock")), folder / f"{key}.holder"
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for %s, which is making this %s (lock %s)", _holder(holder), stage, lock.lock_file)
            lock.acquire()
        try:
            with contextlib.suppress(OSError):
                holder.write_text(f"process {os.getpid()} on {socket.gethostname()}\n")
            yield
        finally:
            lock.release()

    def _verified(self, stage: str, key: str) -> Optional[Entry]:
        """The entry of `key` if it is complete and model.pt still has the hash recorded for it."""
        folder = self.folder(stage, key)
        try:
            record = json.loads((folder / "record.json").read_text())
        except (OSError, ValueError):
            return None  # absent, or a record from before hashes (its weights cannot be checked)
        expected = record.get("sha256")
        path = folder / "model.pt"
        if not expected or not path.is_file() or sha256_file(path) != expected:
            log.warning("the cached %s %s is damaged (its weights no longer match the hash recorded when they "
                        "were stored): ignoring it and making it anew", stage, folder)
            return None
        with contextlib.suppress(OSError):  # when it was last handed out: what `prune` goes by
            (folder / LAST_USED).touch()
        return Entry(path, key, record)

    def _same_settings(self, stage: str, settings: dict) -> list[Path]:
        """Entries made with these settings by any code, newest first."""
        loose = settings_key(settings)
        found = []
        for record_path in (self.root / stage).glob("*/record.json"):
            with contextlib.suppress(OSError, ValueError):
                if json.loads(record_path.read_text()).get("loose_key") == loose:
                    found.append(record_path.parent)
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def find(self, stage: str, settings: dict, other_code: bool = False) -> Optional[Entry]:
        """The verified entry made with `settings` by the code running now; with other_code,
        else the newest one made by other code. Says in one line when only other code made one."""
        entry = self._verified(stage, artifact_key(settings))
        if entry is not None:
            return entry
        others = self._same_settings(stage, settings)
        if other_code:
            for folder in others:
                entry = self._verified(stage, folder.name)
                if entry is not None:
                    log.info("train.reuse_other_code=true: reusing the %s %s made with these settings by other "
                             "code (fingerprint %s, now %s)", stage, folder, entry.record.get("code"),
                             code_fingerprint())
                    return entry
        elif others:
            log.info("the %s cached with these settings (%s) was made by other code (difflab's source changed "
                     "since): making it anew; train.reuse_other_code=true would reuse it", stage, others[0])
        return None

    def store(self, stage: str, settings: dict, checkpoint: Path, record: dict) -> Entry:
        """Copy a checkpoint in atomically, then write the record (with its hash) that marks the
        entry complete."""
        key = artifact_key(settings)
        folder = self.folder(stage, key)
        atomic_copy(checkpoint, folder / "model.pt")
        record = {**record, "settings": settings, "sha256": sha256_file(folder / "model.pt"),
                  "loose_key": settings_key(settings), "code": code_fingerprint()}
        parameters = parameter_count(folder / "model.pt")
        if parameters is not None:
            record["parameters"] = parameters
        atomic_write_json(folder / "record.json", record)
        return Entry(folder / "model.pt", key, record)


    def entries(self) -> list[StoredEntry]:
        """Every complete entry of every stage (folders without a record.json are being written)."""
        found = []
        for record_path in sorted(self.root.glob("*/*/record.json")):
            folder = record_path.parent
            with contextlib.suppress(OSError):
                created = record_path.stat().st_mtime
                used = (folder / LAST_USED).stat().st_mtime if (folder / LAST_USED).exists() else created
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                found.append(StoredEntry(folder.parent.name, folder.name, folder, size, created, max(used, created)))
        return found

    def prune(self, older_than_s: float, dry_run: bool = False) -> tuple[list[StoredEntry], list[StoredEntry]]:
        """Delete the entries not handed out for `older_than_s` seconds; (removed, kept because a
        process holds their lock: it is making or checking them now). A run that loaded an entry
        keeps its weights in memory, and one that will look it up again makes it anew."""
        cutoff = time.time() - older_than_s
        removed, busy = [], []
        for entry in self.entries():
            if entry.last_used >= cutoff:
                continue
            lock = FileLock(str(entry.folder.parent / f"{entry.key}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                busy.append(entry)
                continue
            try:
                if not dry_run:
                    (entry.folder / "record.json").unlink()  # first: the entry is no longer complete
                    shutil.rmtree(entry.folder)
                removed.append(entry)
            finally:
                lock.release()
        return removed, busy


@dataclass
class StoredEntry:
    """An entry as the cache holds it, for listing and pruning."""

    stage: str
    key: str
    folder: Path
    size: int  # bytes
    created: float  # seconds since the epoch
    last_used: float


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


TrainFn = Callable[[], tuple[Path, dict]]  # makes the artifact -> (its file, record to store)


def given_artifact(given: str, given_name: str, what: str) -> Artifact:
    """An artifact the user named by path, keyed by its content."""
    path = Path(given).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"The {what} file {path} given by {given_name} does not exist: point {given_name} "
                        "to a .pt file inside a run's checkpoints/ folder, or leave it out to train one.")
    return Artifact(path, f"file-{file_digest(path)}", "given", {})


def obtain(cache: ArtifactCache, stage: str, settings: dict, train: TrainFn, *, reuse: bool = True,
           other_code: bool = False, given: Optional[str] = None, given_name: str = "a path",
           what: Optional[str] = None, collective: bool = True, alone: bool = False,
           anew: str = "train.reuse=false trains anew") -> Artifact:
    """The artifact of `stage` for `settings`: the file `given` explicitly, else the cached one,
    else the result of `train()`, stored in the cache. The lookup and the training run under the
    key's file lock, so parallel jobs that need the same artifact train it once. Logs one line
    saying which of the three it did, naming the artifact `what` (default: the stage's name);
    `reuse=False` trains anew (and replaces the cached entry), and `anew` tells the user how to
    ask for that ("" where no setting does); `other_code` also reuses an entry made with the same
    settings by other code.

    Under torchrun every rank calls this and all take rank 0's branch: rank 0 alone takes the
    lock, looks and stores; `train()` runs on every rank (DDP training needs them all) or, with
    collective=False, on rank 0 alone; every rank returns what rank 0 stored. `alone=True` is
    for a call this process makes on its own (rank 0's evaluation, say): no other rank takes
    part, and the file lock alone orders it with other processes."""
    what = what or stage
    if given:
        artifact = given_artifact(given, given_name, what)
        log.info("using the %s given by %s=%s", what, given_name, artifact.path)
        return artifact
    key = artifact_key(settings)
    decides = alone or dist.is_main()
    share = (lambda make: make()) if alone else dist.from_main
    with cache.lock(stage, key) if decides else contextlib.nullcontext():
        cached = share(lambda: cache.find(stage, settings, other_code) if reuse else None)
        if cached is not None:
            by = f" by {cached.record['run_dir']}" if cached.record.get("run_dir") else ""
            log.info("reusing the %s made with these settings%s (%s)%s", what, by, cached.path, anew and f"; {anew}")
            return Artifact(cached.path, cached.key, "cache", cached.record)
        log.info("no %s made with these settings in the artifact cache yet: making it now (key %s)", what, key)
        checkpoint, record = train() if collective or decides else (None, {})
        stored = share(lambda: cache.store(stage, settings, checkpoint, record))
        log.info("stored the %s in the artifact cache: %s", what, stored.path)
        return Artifact(stored.path, stored.key, "trained", record)
