"""The run plan: what a run will do, in which order, and where each thing it needs comes from,
decided from the composed config before any data is read or anything trained.

`build_plan` runs every check that needs no data (settings, combinations, checkpoint files and
their kinds, sampler steps, labels, guidance against what the model is or will be trained
with), so a mistake is one sentence within seconds, and lists the steps: each prerequisite
(autoencoder, classifier, evaluation classifier) and the stage's own model, with its source
(given | cache | train | resume | run) and artifact key. The `obtain_*` functions then make
each prerequisite real (the given file, the cached one, or a training now) as the runner
reaches it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from difflab.artifacts import (Artifact, ArtifactCache, artifact_key, autoencoder_settings, classifier_settings,
                               diffusion_settings, file_digest, given_artifact, joint_settings, obtain)
from difflab.checkpoint import load_checkpoint
from difflab.compress.distill import (check_distill, distill_settings, round_steps, student_sampling_cfg,
                                      with_method_defaults, with_student_sampler)
from difflab.compress.prune import check_prune, prune_settings
from difflab.config import (Config, autoencoder_train_config, classifier_train_config, conditioning_name, level_meaning,
                            objective_name, validate, validate_batch_splits)
from difflab.data import dataset_classes, default_prompts, text_vocabulary
from difflab.diffusion import nfe
from difflab.diffusion.editing import start_step
from difflab.diffusion.spacing import INDEX_SPACINGS, spacing_of
from difflab.edit import check_no_prompts, edit_labels, edit_nfe, edit_prompts, read_edit_inputs
from difflab.errors import UserError
from difflab.evaluate.extractors import DOWNLOAD as INCEPTION_DOWNLOAD
from difflab.evaluate.extractors import find_inception_weights, inception_url
from difflab.evaluate.feature_classifier import STAGE as EVAL_CLASSIFIER_STAGE
from difflab.evaluate.feature_classifier import classifier_settings as eval_classifier_settings
from difflab.export_format import given_model_artifact, read_model_state
from difflab.models import build_classifier
from difflab.models.autoencoder import build_autoencoder
from difflab.models.text_encoder import clip_files, require_transformers
from difflab.sampling import sampler_steps
from difflab.trackers import check_trackers, stage_trackers
from difflab.train.makers import train_classifier, train_diffusion
from difflab.train.reconstruction import train_autoencoder
from difflab.trained import (CLASSIFIER_STAGES, LatentSpace, build_denoiser_net, build_process, check_autoencoder,
                             classifier_from_state, dims, init_weights, load_classifier, load_latent_space)

log = logging.getLogger("difflab")

TRAINING_MODES = ("reconstruction", "diffusion", "classifier", "joint")
DIFFUSION_MODES = ("diffusion", "joint")
LOADING_MODES = ("sample", "evaluate", "edit")
INIT_PARTS = {"reconstruction": "autoencoder", "diffusion": "unet", "joint": "unet", "classifier": "classifier"}


@dataclass
class Step:
    name: str
    source: str  # given | cache | train | resume | run (made by the run's own training) | new | download
    key: Optional[str] = None  # artifact key
    steps: Optional[int] = None  # training steps, or sampler steps
    detail: str = ""


@dataclass
class Plan:
    mode: str
    steps: list[Step] = field(default_factory=list)
    config: Optional[DictConfig] = field(default=None, repr=False)  # what the run carries out: guidance=auto decided

    def to_json(self) -> dict:
        return {"mode": self.mode, "steps": [dataclasses.asdict(s) for s in self.steps]}

    def needs(self, step: str, source: str) -> bool:
        return any(s.name == step and s.source == source for s in self.steps)

    def table(self) -> str:
        rows = [("step", "source", "key", "steps", "detail")]
        rows += [(s.name, s.source, s.key or "-", "-" if s.steps is None else str(s.steps), s.detail) for s in self.steps]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


@dataclass
class ModelFacts:
    """What sampling needs to know of the diffusion model, before it exists."""

    cfg: DictConfig  # the config it is (or will be) trained with
    num_classes: int
    label_dropout: float
    shape: tuple[int, int, int]  # what it denoises
    autoencoder_key: Optional[str]
    joint: bool
    meta: dict = field(default_factory=dict)  # a text model's: its default prompts (per class, or captions)

    @property
    def text(self) -> bool:
        return conditioning_name(self.cfg) == "text"


def model_facts(state: dict) -> ModelFacts:
    """What a diffusion checkpoint's state (or an export's) tells the checks of sampling about its model."""
    meta, ae = state["meta"], state.get("autoencoder")
    ae_key = (ae.get("key") or ae["identity"]) if ae else None
    return ModelFacts(OmegaConf.create(state["config"]), meta["num_classes"], meta["label_dropout"],
                      tuple(meta["shape"]), ae_key, state["stage"] == "joint", meta)


def with_guidance(cfg: DictConfig, model: Optional[ModelFacts] = None) -> DictConfig:
    """cfg with guidance=auto decided: classifier-free guidance (at its scale) for a model that takes it, one
    trained with label dropout (`model`, a given checkpoint's facts) or, for a model still to be trained, one
    that will be conditioned on labels or prompts (it then trains with label dropout); else none."""
    if cfg.guidance.name != "auto":
        return cfg
    if model is not None:
        takes = model.label_dropout > 0
    else:
        takes = cfg.mode.name in (*DIFFUSION_MODES, "distill", "prune") and (
            conditioning_name(cfg) == "text" or (cfg.objective.class_conditional and dataset_classes(cfg.dataset) > 0))
    return OmegaConf.merge(cfg, {"guidance": {"name": "cfg"} if takes else {"name": "none", "scale": 0.0}})


# ---------------------------------------------------------------- checks of the config alone

def check_known_keys(cfg: DictConfig) -> None:
    """A top-level key added with `+` that no setting of difflab's has is refused, not ignored."""
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = [k for k in cfg.keys() if k not in known]
    if unknown:
        raise UserError(f"`{unknown[0]}` is not a setting of difflab (added with +{unknown[0]}=...): remove it or fix "
                        "its spelling; `python run.py --cfg job` lists every setting.")


def check_finite(cfg: DictConfig) -> None:
    """Every float setting is a finite number: nan or inf would train or sample garbage silently."""
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, float) and not math.isfinite(node):
            raise UserError(f"{path}={node} is not a finite number: give it a finite value.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def check_cache_dir(cfg: DictConfig) -> None:
    """paths.cache_dir is a folder difflab can write in, or can be made."""
    folder = Path(cfg.paths.cache_dir).expanduser()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"paths.cache_dir={folder} cannot be a folder ({existing} is a file): set paths.cache_dir to a "
                        "writable folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"paths.cache_dir={folder} is not writable ({existing} is not): set paths.cache_dir to a "
                        "writable folder, e.g. paths.cache_dir=~/.cache/difflab.")


def _check_labels(spec: Any, num_classes: int) -> None:
    if spec in ("balanced", "uniform"):
        return
    if isinstance(spec, (list, tuple, ListConfig)):
        values = list(spec)
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            if num_classes == 0:
                raise UserError(f"sample.labels={values} asks for classes, but the model is unconditional: "
                                "leave sample.labels out, or train a class-conditional model.")
            if min(values) >= 0 and max(values) < num_classes:
                return
        raise UserError(f"sample.labels={values} must be non-empty class ids in 0..{max(num_classes - 1, 0)}: fix the list.")
    raise UserError(f"sample.labels={spec!r} is not understood: use balanced, uniform or a list such as [3,3,7].")


def _check_sampler(cfg: DictConfig, model_cfg: DictConfig) -> int:
    """The sampler's step count on the model's process; a UserError for steps it cannot take."""
    s, process = cfg.sampler, build_process(model_cfg)
    try:
        return sampler_steps(process, s)
    except ValueError as e:
        if process.name == "ddpm" and spacing_of(process, s.spacing) in INDEX_SPACINGS:
            raise UserError(f"sampler.steps={s.steps} must be between 1 and the model's schedule.T="
                            f"{model_cfg.schedule.T}: use e.g. sampler.steps=50 (null = every step).") from None
        raise UserError(str(e)) from None


def check_vector_latent(cfg: DictConfig) -> None:
    """A vector latent comes from a KL-VAE and, having no map to convolve over, is denoised by the MLP."""
    ae = cfg.autoencoder
    if cfg.mode.name in LOADING_MODES:  # a loaded model brings its own autoencoder and network
        return
    if cfg.unet.name == "mlp" and conditioning_name(cfg) != "class":
        raise UserError(f"unet=mlp embeds a class label only, but conditioning={conditioning_name(cfg)} needs the UNet's "
                        "cross-attention: use conditioning=class, or a UNet (e.g. unet=small).")
    if ae.latent != "vector":
        return
    if ae.name != "kl":
        made = "makes no latent" if ae.name == "none" else "quantises a map of codes"
        raise UserError(f"autoencoder.latent=vector is a KL-VAE's flat latent, but autoencoder={ae.name} {made}: add "
                        "autoencoder=kl, or leave autoencoder.latent=spatial.")
    if cfg.mode.name in DIFFUSION_MODES and cfg.unet.name != "mlp":
        raise UserError(f"unet={cfg.unet.name} convolves over a feature map, but autoencoder.latent=vector makes a "
                        f"{ae.latent_dim}-number vector with none: add unet=mlp.")


def _load_kind(path: str, setting: str, kinds: tuple[str, ...], what: str, fix: str) -> dict:
    state = load_checkpoint(path, f"checkpoint given by {setting}")
    if state.get("stage") not in kinds:
        raise UserError(f"{setting}={path} holds a {state.get('stage')!r} model, not {what}: {fix}.")
    return state


# ---------------------------------------------------------------- what the model will be

def _prerequisite_cfg(cfg: DictConfig) -> DictConfig:
    """The config a prerequisite trains with: train.init_from names the run's own stage's start."""
    return OmegaConf.merge(cfg, {"train": {"init_from": None}})


def _image_shape(cfg: DictConfig) -> tuple[int, int, int]:
    return cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size


def _denoised_shape(cfg: DictConfig) -> tuple[int, int, int]:
    if cfg.autoencoder.name == "none":
        return _image_shape(cfg)
    return tuple(build_autoencoder(cfg.autoencoder, cfg.dataset.channels, cfg.dataset.image_size).latent_shape)


def _stage_network(cfg: DictConfig, part: str) -> torch.nn.Module:
    """The network of `part` this run's stage builds, on the meta device (shapes, no memory)."""
    with torch.device("meta"):
        if part == "autoencoder":
            return build_autoencoder(cfg.autoencoder, cfg.dataset.channels, cfg.dataset.image_size)
        shape, classes = _denoised_shape(cfg), dataset_classes(cfg.dataset)
        if part == "classifier":
            return build_classifier(cfg.classifier, shape[0], shape[1], classes)
        return build_denoiser_net(cfg, shape, classes if cfg.objective.class_conditional else 0, text_vocabulary(cfg))


def init_key(cfg: DictConfig) -> Optional[str]:
    """The key train.init_from enters the stage's artifact key with, after checking that the
    checkpoint holds the stage's networks in this run's shapes."""
    path = cfg.train.init_from
    if not path:
        return None
    part = INIT_PARTS.get(cfg.mode.name)
    if part is None:
        raise UserError(f"train.init_from is given but mode={cfg.mode.name} trains nothing: leave it out.")
    state = load_checkpoint(path, "checkpoint to initialise from (train.init_from)")
    source = f"train.init_from={path}"
    init_weights(_stage_network(cfg, part), state, part, source)
    if cfg.mode.name == "joint" and state.get("stage") == "joint":
        init_weights(_stage_network(cfg, "classifier"), state, "classifier", source)
    return f"file-{file_digest(Path(path).expanduser())}"


def resumes_training(cfg: DictConfig, run_dir: Optional[Path]) -> bool:
    """Whether this run continues a training: resume=auto with no checkpoint in this folder starts
    afresh (e.g. a re-run sweep job that had reused a model), so it may reuse a cached one."""
    resume = cfg.train.resume
    if not resume:
        return False
    if resume != "auto":
        if not Path(resume).expanduser().is_file():
            raise UserError(f"train.resume={resume} does not exist: give the checkpoints/last.pt of the run to "
                            "continue, or train.resume=auto with hydra.run.dir=<its folder>.")
        return True
    return run_dir is not None and (run_dir / "checkpoints" / "last.pt").is_file()


def _trained_source(cache: ArtifactCache, stage: str, settings: dict, cfg: DictConfig, resumes: bool = False) -> tuple[str, str]:
    """(source, key) of an artifact the run obtains: resumed, cached, or trained now."""
    key = artifact_key(settings)
    if resumes:
        return "resume", key
    if cfg.train.reuse:
        entry = cache.find(stage, settings, cfg.train.reuse_other_code)
        if entry is not None:
            return "cache", entry.key
    return "train", key


class PlanBuilder:
    """Adds each step in the order the run takes it, checking what that step needs."""

    def __init__(self, cfg: DictConfig, run_dir: Optional[Path]):
        self.cfg, self.run_dir = cfg, run_dir
        self.guidance_asked = cfg.guidance.name  # auto, before with_guidance decides it
        self.cache = ArtifactCache(cfg.paths.cache_dir)
        self.plan = Plan(cfg.mode.name)

    def add(self, *args, **kwargs) -> None:
        self.plan.steps.append(Step(*args, **kwargs))

    def autoencoder(self, main: bool) -> str:
        """The autoencoder step; its key."""
        cfg = self.cfg if main else _prerequisite_cfg(self.cfg)
        steps = autoencoder_train_config(cfg).max_steps
        if cfg.ckpt.autoencoder:
            artifact = given_artifact(cfg.ckpt.autoencoder, "ckpt.autoencoder", f"{cfg.autoencoder.name} autoencoder")
            check_autoencoder(load_checkpoint(artifact.path, "autoencoder checkpoint (ckpt.autoencoder)"),
                              artifact.path, cfg, "ckpt.autoencoder")
            self.add("autoencoder", "given", artifact.key, None, str(artifact.path))
            return artifact.key
        settings = autoencoder_settings(cfg, init_key(cfg) if main else None)
        resumes = main and resumes_training(cfg, self.run_dir)
        source, key = _trained_source(self.cache, "autoencoder", settings, cfg, resumes)
        self.add("autoencoder", source, key, steps, f"{cfg.autoencoder.name}, {dims(_denoised_shape(cfg))} latents")
        return key

    def classifier(self) -> None:
        """The noise-aware classifier mode=classifier trains (after its autoencoder, in latent space)."""
        cfg = self.cfg
        ae_key = self.autoencoder(main=False) if cfg.autoencoder.name != "none" else None
        if dataset_classes(cfg.dataset) < 2:
            raise UserError("mode=classifier needs a data set with at least 2 classes: use a labelled data set "
                            "(a folder needs one sub-folder per class).")
        settings = classifier_settings(cfg, ae_key, init_key(cfg))
        source, key = _trained_source(self.cache, "classifier", settings, cfg, resumes_training(cfg, self.run_dir))
        self.add("classifier", source, key, cfg.classifier.max_steps, "noise-aware")

    def model(self, name: Optional[str] = None) -> ModelFacts:
        """The diffusion model step of a training run, or the given model of sample/evaluate."""
        cfg = self.cfg
        if cfg.mode.name in LOADING_MODES:
            return self.given_model()
        text = conditioning_name(cfg) == "text"
        num_classes = dataset_classes(cfg.dataset) if cfg.objective.class_conditional and not text else 0
        meta = check_conditioning(cfg, num_classes)
        dropout = cfg.guidance.p_uncond if cfg.guidance.name == "cfg" and (num_classes or text) else 0.0
        ae_key = self.autoencoder(main=False) if cfg.autoencoder.name != "none" else None
        joint = cfg.mode.name == "joint"
        if joint and dataset_classes(cfg.dataset) < 2:
            raise UserError("mode=joint trains a classifier beside the model and needs a data set with at least 2 "
                            "classes: use a labelled data set (a folder needs one sub-folder per class).")
        settings = (joint_settings if joint else diffusion_settings)(cfg, ae_key, init_key(cfg))
        source, key = _trained_source(self.cache, cfg.mode.name, settings, cfg, resumes_training(cfg, self.run_dir))
        objective = objective_name(cfg)
        objective += f" ({cfg.schedule.name} schedule)" if objective == "ddpm" else ""
        condition = f"text ({cfg.text_encoder.name} encoder)" if text else f"{num_classes} classes"
        if conditioning_name(cfg) == "class_tokens":
            condition += " as tokens"
        detail = f"{cfg.unet.name} unet, {dims(_denoised_shape(cfg))}, {condition}, {objective}"
        if cfg.train.init_from:
            detail += f", from {cfg.train.init_from}"
        self.add(name or ("joint model" if joint else "diffusion model"), source, key, cfg.train.max_steps, detail)
        return ModelFacts(cfg, num_classes, dropout, _denoised_shape(cfg), ae_key, joint, meta)

    def given_model(self, name: str = "diffusion model") -> ModelFacts:
        cfg = self.cfg
        if not cfg.ckpt.model:
            raise UserError(f"mode={cfg.mode.name} needs a trained model: add ckpt=<run folder>/checkpoints/last.pt.")
        state, path = read_model_state(cfg.ckpt.model)
        artifact = given_model_artifact(path)
        self.add(name, "given", artifact.key, None, str(artifact.path))
        return model_facts(state)

    def teacher(self, name: str = "teacher") -> ModelFacts:
        """The model mode=distill distils (or mode=prune prunes): ckpt.model, else the diffusion model of these
        settings (cached or trained now)."""
        if self.cfg.ckpt.model:
            return self.given_model(name)
        cfg, self.cfg = self.cfg, teacher_cfg(self.cfg)
        try:
            return self.model(name)
        finally:
            self.cfg = cfg

    def derived(self, stage: str, settings: dict, steps: int, detail: str) -> None:
        """A model made from the one before it (a distilled student, a pruned network): cached or made now."""
        found = self.cache.find(stage, settings, self.cfg.train.reuse_other_code) if self.cfg.train.reuse else None
        self.add(stage, "cache" if found else "train", found.key if found else artifact_key(settings), steps, detail)

    def guidance(self, model: ModelFacts) -> None:
        """Guidance against the model, and the classifier of classifier guidance."""
        cfg = self.cfg
        if model.text and cfg.guidance.name == "classifier":
            raise UserError("guidance=classifier steers towards class labels, but the model is conditioned on prompts: "
                            "use guidance=cfg (the empty prompt is its null condition) or guidance=none.")
        if cfg.guidance.name == "cfg" and model.label_dropout <= 0:
            why = ("it was trained without label dropout" if cfg.mode.name in LOADING_MODES else
                   "the model would train without label dropout" +
                   (" (it is unconditional)" if not model.num_classes and not model.text else ""))
            raise UserError(f"guidance=cfg needs a model trained with label dropout and {why}: train it with "
                            "guidance=cfg guidance.p_uncond=0.1 on a labelled data set, or sample with guidance=none.")
        if cfg.guidance.name != "classifier":
            return
        if cfg.ckpt.classifier:
            state = _load_kind(cfg.ckpt.classifier, "ckpt.classifier", CLASSIFIER_STAGES, "a classifier",
                               "pass the checkpoints/last.pt of a mode=classifier or mode=joint run")
            trained = OmegaConf.create(state["config"])
            if level_meaning(trained) != level_meaning(model.cfg):
                raise UserError(f"The classifier {cfg.ckpt.classifier} reads noise levels of {_levels(trained)} but the "
                                f"model's are of {_levels(model.cfg)}: use a classifier trained with the model's objective "
                                "and schedule (or leave ckpt.classifier out and one is trained).")
            if tuple(state["meta"]["shape"]) != tuple(model.shape):
                raise UserError(f"The classifier {cfg.ckpt.classifier} reads inputs of shape {tuple(state['meta']['shape'])} "
                                f"but the model denoises {tuple(model.shape)}: use a classifier trained on the same data "
                                "(and autoencoder).")
            artifact = given_artifact(cfg.ckpt.classifier, "ckpt.classifier", "classifier")
            self.add("classifier", "given", artifact.key, None, str(artifact.path))
            return
        if model.joint:
            self.add("classifier", "run" if cfg.mode.name == "joint" else "given", None, None,
                     "trained with the model (joint)")
            return
        lookup = classifier_lookup_cfg(cfg, model.cfg)
        if dataset_classes(lookup.dataset) < 2:
            raise UserError("guidance=classifier needs a classifier of at least 2 classes and the model's data set has "
                            "fewer: use a labelled data set, or guidance=none.")
        source, key = _trained_source(self.cache, "classifier", classifier_settings(lookup, model.autoencoder_key), lookup)
        self.add("classifier", source, key, classifier_train_config(lookup).max_steps,
                 "noise-aware, for classifier guidance" + (" (mode=classifier settings)" if source == "train" else ""))

    def editing(self, model: ModelFacts) -> None:
        """mode=edit: its images, masks and labels read and checked against the model."""
        cfg, e = self.cfg, self.cfg.edit
        steps = _check_sampler(cfg, model.cfg)
        inputs = read_edit_inputs(e)
        n, found, wanted = len(inputs.images), tuple(inputs.images.shape[1:]), _image_shape(model.cfg)
        if found != wanted:
            raise UserError(f"edit.images={e.images} holds {dims(found)} images (channels x height x width) but the model "
                            f"makes {dims(wanted)} ones: give images of the model's size and channels.")
        if model.text:
            edit_prompts(e.prompts, e.labels, n, model.meta, inputs.file_labels)
        else:
            check_no_prompts(e.prompts, model.num_classes)
            classes = model.num_classes or (dataset_classes(model.cfg.dataset) if cfg.guidance.name == "classifier" else 0)
            edit_labels(e.labels, n, classes, inputs.file_labels)
        taken = steps - start_step(steps, e.strength)
        what = "inpainting" + (f", each step taken {e.resample} times" if e.resample > 1 else "") if e.mask else "SDEdit"
        self.add("edit", "new", None, taken, f"{n} images, {what}, strength {e.strength:g} ({taken} of {steps} "
                 f"{cfg.sampler.name} steps, {edit_nfe(cfg.sampler.name, taken, e.resample if e.mask else 1)} NFE)")

    def sampling(self, model: ModelFacts) -> None:
        cfg = self.cfg
        classes = model.num_classes or (dataset_classes(model.cfg.dataset) if cfg.guidance.name == "classifier" else 0)
        prompts = cfg.sample.get("prompts")
        if prompts is not None and not model.text:
            raise UserError("sample.prompts asks for prompts, but the model is conditioned on "
                            f"{'classes' if model.num_classes else 'nothing'}: use sample.labels, or train with conditioning=text.")
        if prompts is not None and (not list(prompts) or not all(isinstance(p, str) for p in prompts)):
            raise UserError(f"sample.prompts={list(prompts)} must be a non-empty list of strings: e.g. "
                            "sample.prompts='[\"a handwritten seven\", \"the digit 3\"]'.")
        if model.text:
            classes = len(model.meta.get("class_prompts") or [])
        _check_labels(cfg.sample.labels, classes)
        steps = _check_sampler(cfg, model.cfg)
        if cfg.mode.name in DIFFUSION_MODES and cfg.train.ema.decays:
            self.add("ema copies", "run", None, None, ", ".join(map(str, cfg.train.ema.decays)))
        if cfg.train.ema.sigma_rel is not None:
            self.add("post-hoc ema", "run", None, None, f"sigma_rel={cfg.train.ema.sigma_rel}, reconstructed from the "
                     "snapshots")
        if cfg.sample.num_images > 0:
            guided = f"guidance={cfg.guidance.name}" + (f" x{cfg.guidance.scale:g}" if cfg.guidance.name != "none" else "")
            self.add("sample", "new", None, steps, f"{cfg.sample.num_images} images, {cfg.sampler.name} "
                     f"({nfe(cfg.sampler.name, steps)} NFE), {guided}" + (" (auto)" if self.guidance_asked == "auto" else ""))
        if cfg.eval.num_samples > 0 and cfg.mode.name != "sample":
            data_cfg = OmegaConf.merge(model.cfg, {"paths": cfg.paths, "eval": cfg.eval})
            if "classifier" in cfg.eval.extractors and dataset_classes(data_cfg.dataset) > 0:
                settings = eval_classifier_settings(data_cfg)
                key = artifact_key(settings)
                found = self.cache.find(EVAL_CLASSIFIER_STAGE, settings)
                self.add("evaluation classifier", "cache" if found else "train", key, settings["steps"],
                         f"{data_cfg.dataset.name}, feature extractor of fd_classifier")
            self.inception_weights()
            self.add("evaluate", "new", None, steps, f"{cfg.eval.num_samples} samples, {', '.join(cfg.eval.extractors)}")

    def inception_weights(self) -> None:
        """eval.inception_weights=download: fetched at the start of the run, so an offline machine says so before
        anything trains."""
        if "inception" in self.cfg.eval.extractors and self.cfg.eval.inception_weights == INCEPTION_DOWNLOAD:
            found, _ = find_inception_weights(INCEPTION_DOWNLOAD)
            self.add("inception weights", "cache" if found else "download", None, None, str(found or inception_url()))

    def evaluation_during_training(self) -> None:
        """eval.every: the evaluation while the diffusion model trains, and what train.best_metric needs of it."""
        cfg, best = self.cfg, self.cfg.train.best_metric
        if best != "val_loss" and not cfg.eval.every:
            raise UserError(f"train.best_metric={best} is measured by the evaluation during training, which "
                            "eval.every=0 leaves off: add e.g. eval.every=500, or train.best_metric=val_loss.")
        if not cfg.eval.every:
            return
        if cfg.mode.name not in DIFFUSION_MODES:
            raise UserError(f"eval.every={cfg.eval.every} measures a diffusion model while it trains, and mode="
                            f"{cfg.mode.name} trains none: leave eval.every out (or 0).")
        if best == "class_accuracy" and ("classifier" not in cfg.eval.extractors or dataset_classes(cfg.dataset) < 2):
            raise UserError("train.best_metric=class_accuracy needs the evaluation classifier of a labelled data set: "
                            "keep classifier in eval.extractors and use a data set with classes, or "
                            "train.best_metric=fd.")
        self.add("evaluate during training", "run", None, None,
                 f"every {cfg.eval.every} steps, {cfg.eval.every_samples} samples, best.pt by {best}")


def check_conditioning(cfg: DictConfig, num_classes: int) -> dict:
    """What the conditioning of the model a run trains needs, checked without reading an image: class
    tokens need classes; text needs captions (a readable metadata file naming the folder's images, or
    templates the class names fill) and, for CLIP, transformers and the weights. Returns the
    default prompts a text model will sample, as its checkpoint's meta will say."""
    name = conditioning_name(cfg)
    if name == "class_tokens" and num_classes == 0:
        raise UserError("conditioning=class_tokens feeds the class to the network, but the data set has no classes "
                        "(or objective.class_conditional=false): use a labelled data set, or conditioning=class.")
    if name != "text":
        return {}
    if cfg.mode.name == "joint":
        raise UserError("mode=joint trains a classifier of the labels beside the model, but conditioning=text conditions "
                        "it on prompts: use mode=diffusion.")
    if cfg.text_encoder.name == "clip" and not cfg.text_encoder.pretrained:
        raise UserError("text_encoder=clip needs its weights: add text_encoder.pretrained=/folder/of/clip or a Hugging "
                        "Face hub name in the local cache, e.g. openai/clip-vit-base-patch32.")
    if cfg.text_encoder.name == "clip":
        require_transformers()
        clip_files(cfg.text_encoder.pretrained)
    return default_prompts(cfg.dataset)


def _levels(cfg: DictConfig) -> str:
    """The noise levels a config's networks read, in words."""
    meaning = level_meaning(cfg)
    if meaning["objective"] == "ddpm":
        return f"objective=ddpm with schedule={cfg.schedule.name} (T={cfg.schedule.T})"
    return f"objective={meaning['objective']}" + (f" (sigma_data={meaning['sigma_data']})" if "sigma_data" in meaning else "")


def classifier_lookup_cfg(cfg: DictConfig, model_cfg: DictConfig) -> DictConfig:
    """The config of the classifier that guides a model: the model's data, schedule and training,
    with this run's classifier settings and seed (what `mode=classifier` with them trains)."""
    return _prerequisite_cfg(OmegaConf.merge(model_cfg, {"classifier": cfg.classifier, "seed": cfg.seed,
                                                         "paths": cfg.paths, "mode": {"name": "classifier"}}))


def teacher_cfg(cfg: DictConfig) -> DictConfig:
    """The config mode=distill's teacher trains with: what mode=diffusion with these settings trains (and caches)."""
    return OmegaConf.merge(cfg, {"mode": {"name": "diffusion"}, "train": {"resume": None}})


def check_quantize(cfg: DictConfig) -> None:
    """compress.quantize is for sampling, and int8 for the CPU."""
    q = cfg.compress.quantize
    if q is None:
        return
    if cfg.mode.name not in (*LOADING_MODES, "diffusion"):
        raise UserError(f"compress.quantize={q} applies to a trained model's sampling: use it with mode=sample, "
                        "mode=evaluate or mode=diffusion.")
    on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if on_cuda and q == "int8":
        raise UserError("compress.quantize=int8 runs on the CPU's int8 kernels (x86 oneDNN), not on a GPU: add "
                        "device=cpu, or use compress.quantize=bf16 on the GPU.")


def obtain_teacher(cfg: DictConfig, run_dir: Path, device: torch.device) -> tuple[Artifact, dict]:
    """mode=distill's teacher, or mode=prune's original (ckpt.model, the cached diffusion model of these settings,
    or one trained now in run_dir/teacher), and what metrics.json says about it."""
    if cfg.ckpt.model:
        artifact = given_artifact(cfg.ckpt.model, "ckpt", "teacher")
        return artifact, {"teacher_source": "given", "teacher_key": artifact.key,
                          "teacher_checkpoint": str(artifact.path)}
    tcfg = teacher_cfg(cfg)
    latent, latent_record = obtain_latent_space(tcfg, run_dir, device) if cfg.autoencoder.name != "none" else (None, {})
    writer = stage_trackers(tcfg, run_dir / "teacher")
    artifact = obtain(ArtifactCache(cfg.paths.cache_dir), "diffusion",
                      diffusion_settings(tcfg, latent_record.get("autoencoder_key"), init_key(tcfg)),
                      lambda: train_diffusion(tcfg, run_dir / "teacher", device, writer, latent),
                      reuse=cfg.train.reuse, other_code=cfg.train.reuse_other_code, what="teacher diffusion model")
    writer.close()
    return artifact, {**latent_record, "teacher_source": artifact.source, "teacher_key": artifact.key,
                      "teacher_checkpoint": str(artifact.path)}


def build_plan(cfg: DictConfig, run_dir: Optional[Path], world_size: int = 1,
               given: Optional[ModelFacts] = None) -> Plan:
    """Check the config and list the run's steps; a UserError names the first mistake. `given`: the model of
    mode=sample when it is already loaded (the Python API's), so that its sampling is checked as the command's is."""
    check_known_keys(cfg)
    cfg = with_student_sampler(cfg)  # a student samples as it was distilled (the runner does the same)
    check_finite(cfg)
    validate(cfg)
    check_cache_dir(cfg)
    validate_batch_splits(cfg, world_size)
    check_trackers(cfg)
    check_vector_latent(cfg)
    builder = PlanBuilder(cfg, run_dir)
    mode = cfg.mode.name
    if not (given is not None or (cfg.ckpt.model and mode in (*LOADING_MODES, "distill", "prune"))):
        builder.cfg = cfg = with_guidance(cfg)  # from what the model will be trained with; a given one's below
    if mode == "evaluate" and cfg.eval.num_samples <= 0:
        raise UserError(f"mode=evaluate with eval.num_samples={cfg.eval.num_samples} has nothing to measure: add e.g. "
                        "eval.num_samples=2000.")
    if mode not in DIFFUSION_MODES:
        builder.evaluation_during_training()  # refuses eval.every where nothing diffuses
    check_quantize(cfg)
    if mode == "reconstruction":
        builder.autoencoder(main=True)
    elif mode == "classifier":
        builder.classifier()
    elif mode == "distill":
        model = builder.teacher()
        builder.cfg = cfg = with_method_defaults(with_guidance(cfg, model))
        builder.guidance(model)
        check_distill(cfg, build_process(model.cfg).index_count)
        builder.derived("distill", distill_settings(cfg, builder.plan.steps[-1].key), cfg.distill.steps_per_round *
                        len(round_steps(cfg.distill)), f"{cfg.distill.method}: {cfg.distill.teacher_steps} -> " +
                        " -> ".join(map(str, round_steps(cfg.distill))) + " steps")
        builder.cfg = student_sampling_cfg(cfg)
        builder.sampling(model)
    elif mode == "prune":
        check_prune(cfg)
        model = builder.teacher("original")
        builder.cfg = cfg = with_guidance(cfg, model)
        builder.derived("prune", prune_settings(cfg, builder.plan.steps[-1].key), cfg.prune.finetune_steps,
                        f"{cfg.prune.amount:.0%} of the UNet's channels, then fine-tuned")
        builder.sampling(model)
    else:
        model = given or builder.model()
        builder.cfg = cfg = with_guidance(cfg, model)
        if mode in DIFFUSION_MODES:
            builder.evaluation_during_training()
        builder.guidance(model)
        if mode == "edit":
            builder.editing(model)
        else:
            builder.sampling(model)
    builder.plan.config = cfg
    return builder.plan


# ---------------------------------------------------------------- obtaining what the plan lists

def obtain_autoencoder(cfg: DictConfig, stage_dir: Path, device: torch.device, main: bool = False) -> Artifact:
    """ckpt.autoencoder when given, else the cached autoencoder of these settings, else one
    trained now in stage_dir (and cached)."""
    if not main:
        cfg = _prerequisite_cfg(cfg)
    resumes = main and resumes_training(cfg, stage_dir)
    return obtain(ArtifactCache(cfg.paths.cache_dir), "autoencoder",
                  autoencoder_settings(cfg, init_key(cfg) if main else None),
                  lambda: train_autoencoder(cfg, stage_dir, device), reuse=cfg.train.reuse and not resumes,
                  other_code=cfg.train.reuse_other_code, given=cfg.ckpt.autoencoder, given_name="ckpt.autoencoder",
                  what=f"{cfg.autoencoder.name} autoencoder")


def load_artifact_latent_space(artifact: Artifact, cfg: DictConfig, device: torch.device) -> LatentSpace:
    name = "ckpt.autoencoder" if artifact.source == "given" else "the cached autoencoder"
    return load_latent_space(artifact.path, cfg, device, name, artifact.key, file_digest(artifact.path))


def obtain_latent_space(cfg: DictConfig, run_dir: Path, device: torch.device) -> tuple[LatentSpace, dict]:
    """The latent space of a latent run, and what its metrics.json says about it."""
    artifact = obtain_autoencoder(cfg, run_dir / "autoencoder", device)
    space = load_artifact_latent_space(artifact, cfg, device)
    record = {"autoencoder_source": artifact.source, "autoencoder_trained": artifact.trained,
              "autoencoder_key": artifact.key, "autoencoder_checkpoint": str(artifact.path),
              "latent_shape": list(space.shape), "latent_scale": space.scale}
    return space, record


def obtain_guidance_classifier(cfg: DictConfig, model_cfg: DictConfig, latent: Optional[LatentSpace], run_dir: Path,
                               device: torch.device, own: Optional[str] = None,
                               given: Optional[dict] = None) -> tuple[Optional[torch.nn.Module], dict]:
    """The classifier of guidance=classifier for a model trained with `model_cfg` in `latent`
    space: ckpt.classifier, else the model's own (`own`: a joint model trained now; `given`: the
    state of the joint model ckpt.model names, checkpoint or export), else the cached one
    trained by mode=classifier with the model's data and schedule, else one trained now in
    run_dir/classifier with those settings (and cached). (None, {}) for other guidance. Under
    torchrun every rank calls it: a classifier trained now trains on all of them."""
    if cfg.guidance.name != "classifier":
        return None, {}
    if cfg.ckpt.classifier:
        path, record = cfg.ckpt.classifier, {"classifier_source": "given"}
    elif own:
        path, record = own, {"classifier_source": "run"}
    elif given is not None and given["stage"] == "joint":  # a joint model carries its classifier
        record = {"classifier_source": "given", "classifier_checkpoint": str(Path(cfg.ckpt.model).expanduser().resolve())}
        return classifier_from_state(given, device)[0], record
    else:
        lookup = classifier_lookup_cfg(cfg, model_cfg)
        settings = classifier_settings(lookup, latent.key if latent else None)
        artifact = obtain(ArtifactCache(cfg.paths.cache_dir), "classifier", settings,
                          lambda: train_classifier(lookup, run_dir / "classifier", device, latent),
                          reuse=lookup.train.reuse, other_code=lookup.train.reuse_other_code,
                          what="noise-aware classifier for classifier guidance")
        path, record = str(artifact.path), {"classifier_source": artifact.source, "classifier_key": artifact.key}
    record["classifier_checkpoint"] = str(Path(path).expanduser().resolve())
    classifier, _, _ = load_classifier(path, device)
    return classifier, record
