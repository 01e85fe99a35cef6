"""Structured config schemas, registered in Hydra's ConfigStore.

Every YAML under conf/ names one of these schemas first in its defaults list, so a wrong
key, type or option fails when Hydra composes the config, before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from difflab.diffusion.flow import T_SAMPLINGS
from difflab.diffusion.samplers import SAMPLERS
from difflab.diffusion.schedules import SCHEDULES
from difflab.diffusion.spacing import SPACINGS
from difflab.metric_names import metric_direction


@dataclass
class AugmentationConfig:
    hflip: bool = False
    crop_padding: int = 0  # random crop back to image_size after zero-padding; 0 = off


@dataclass
class CaptionsConfig:
    """Captions of a labelled data set for conditioning=text, made from its class names: one
    template drawn per example per step. {name} is the class name, and on MNIST {digit} (3) and
    {word} (three). A folder with a metadata.jsonl or metadata.csv takes its captions from there."""

    templates: List[str] = field(default_factory=list)


@dataclass
class DatasetConfig:
    name: str = MISSING  # mnist | fashion_mnist | cifar10 | cifar100 | folder
    root: str = "${paths.data_dir}"
    image_size: int = 28
    channels: int = 1
    num_classes: int = 10  # 0 = unlabelled (a folder without class sub-folders)
    val_size: int = 1000  # held-out images for the validation loss
    download: bool = True
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)


@dataclass
class DiscriminatorConfig:
    enabled: bool = False  # the optional adversarial term (PatchGAN, hinge loss)
    channels: int = 64
    num_layers: int = 2  # stride-2 levels; 2 suits 28-32 px images, 3 is pix2pix's 70x70 patches
    weight: float = 0.5  # disc_weight, times the adaptive weight
    start: int = 0  # disc_start: the step from which the adversarial term and the discriminator train


@dataclass
class AutoencoderTrainConfig:
    """The autoencoder's own training length and optimiser settings; null = the train.* value.
    Everything else (precision, EMA, grad clip, logging, checkpoints, resume, reuse) is train.*."""

    max_steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None


@dataclass
class AutoencoderConfig:
    name: str = "none"  # none | kl | vq
    channels: int = 32
    channel_mults: List[int] = field(default_factory=lambda: [1, 2, 2])  # down-sampling 2^(len - 1)
    num_res_blocks: int = 1
    attention: bool = True  # an attention block in the middle, at the latent resolution
    norm_groups: int = 8
    latent_channels: int = 2  # vq: the codebook vectors' dimension; latent=vector: the channels of the map it is read from
    latent: str = "spatial"  # spatial (a C x h x w map) | vector (kl: one flat latent_dim vector, for unet=mlp)
    latent_dim: int = 128  # latent=vector: the vector's length
    kl_weight: float = 1e-6  # kl
    codebook_size: int = 256  # vq
    commitment: float = 0.25  # vq: beta
    codebook_ema: float = 0.99  # vq: EMA decay of the codebook updates; 0 = learn it by the codebook loss
    restart_dead_codes: bool = True  # vq: move unused codes onto encoder outputs
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)


@dataclass
class UNetConfig:
    name: str = MISSING
    channels: int = 64
    channel_mults: List[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: List[int] = field(default_factory=lambda: [7])  # feature-map sizes
    head_channels: int = 64
    dropout: float = 0.0
    norm_groups: int = 32
    # conditioning=class_tokens|text: feature-map sizes with cross-attention over the condition's tokens,
    # besides the middle, which always has it; null = the attention_resolutions
    cross_attention_resolutions: Optional[List[int]] = None
    context_dim: int = 64  # width of the context tokens the cross-attention reads


@dataclass
class ConditioningConfig:
    name: str = "class"  # class (added label embedding) | class_tokens (the class as tokens, cross-attention) | text


@dataclass
class TextEncoderConfig:
    name: str = "learned"  # learned (word vocabulary + small transformer, trained with the denoiser) | clip
    pretrained: Optional[str] = None  # clip: a local folder or a Hugging Face hub name already in its cache
    freeze: bool = True  # clip: keep its weights (and cache each prompt's hidden states)
    max_length: int = 16  # tokens per prompt, the start token included
    layers: int = 2  # learned
    heads: int = 4  # learned


@dataclass
class ScheduleConfig:
    name: str = MISSING  # linear | cosine | dns
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008
    dns_offset: Optional[float] = 5.0  # null = T (the seed's variant)
    zero_terminal_snr: bool = False


@dataclass
class SamplerConfig:
    name: str = MISSING  # ddpm | ddim | euler | heun | dpmpp_2m | unipc
    steps: Optional[int] = None  # null = every step of the objective's index grid (DDPM: its T)
    spacing: Optional[str] = None  # trailing | leading | linspace | karras | logsnr; null = the objective's usual
    rho: float = 7.0  # karras spacing
    eta: float = 0.0  # ddim / euler: 0 deterministic, 1 as noisy as DDPM
    s_churn: float = 0.0  # heun: EDM's stochastic churn; 0 = deterministic
    s_tmin: float = 0.0  # heun: churn only where sigma / alpha is within [s_tmin, s_tmax]
    s_tmax: Optional[float] = None  # null = no upper bound
    s_noise: float = 1.0
    clip_x0: bool = True


@dataclass
class GuidanceConfig:
    name: str = "none"  # auto | none | classifier | cfg (auto: cfg where the model takes it, else none; plan.py)
    scale: float = 0.0
    p_uncond: float = 0.1


@dataclass
class ModeConfig:
    name: str = MISSING  # diffusion | sample


@dataclass
class ObjectiveConfig:
    """What every objective has; each objective's own settings are in its schema below."""

    name: str = MISSING  # ddpm | edm | flow
    loss: str = "l2"  # l2 | l1
    class_conditional: bool = True  # learn p(x | y) when the data set has classes


@dataclass
class DDPMObjectiveConfig(ObjectiveConfig):
    """DDPM on the schedule group's betas."""

    prediction: str = "eps"  # eps | x0 | v
    min_snr_gamma: Optional[float] = None  # e.g. 5.0; null = unweighted


@dataclass
class EDMObjectiveConfig(ObjectiveConfig):
    """Karras et al. 2022: preconditioned denoiser, log-normal training sigmas."""

    sigma_data: float = 0.5
    P_mean: float = -1.2  # ln(sigma) ~ N(P_mean, P_std^2) in training
    P_std: float = 1.2
    sigma_min: float = 0.002  # the range sampling spans
    sigma_max: float = 80.0


@dataclass
class FlowObjectiveConfig(ObjectiveConfig):
    """Rectified flow: x_t = (1 - t) x0 + t eps, velocity target."""

    t_sampling: str = "logit_normal"  # logit_normal (SD3) | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0


OBJECTIVE_SCHEMAS = {"ddpm": DDPMObjectiveConfig, "edm": EDMObjectiveConfig, "flow": FlowObjectiveConfig}


@dataclass
class EMAConfig:
    decay: float = 0.999
    update_every: int = 1
    start: int = 0  # before this step the EMA is a plain copy of the weights
    warmup: bool = True  # decay_k = min(decay, 1 - (1 + k)^(-3/4)) as in diffusers
    decays: List[float] = field(default_factory=list)  # extra EMA copies kept, sampled and evaluated besides `decay`
    # Post-hoc EMA (EDM2): two power-function EMA profiles and their snapshots every
    # snapshot_every steps, from which any EMA length is reconstructed after training (train/ema.py).
    posthoc: bool = False
    sigma_rels: List[float] = field(default_factory=lambda: [0.05, 0.10])  # the two tracked profiles' widths
    snapshot_every: int = 100
    sigma_rel: Optional[float] = None  # sample the EMA of this width, reconstructed (needs posthoc); null = `decay`


@dataclass
class EarlyStopConfig:
    enabled: bool = False
    threshold: float = 3e-4
    window: int = 10


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 128  # images per optimizer step (under torchrun: over all processes together)
    grad_accum_steps: int = 1  # micro-batches one step's batch is computed in, one after another: less memory, same step
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    gradient_checkpointing: bool = False  # recompute the UNet's block activations in the backward: less memory, ~1/3 more compute
    channels_last: bool = True  # oneDNN/cuDNN convolutions run faster on NHWC maps, with no reorders
    threads: Optional[int] = None  # torch intra-op threads; null = torch's default
    ema: EMAConfig = field(default_factory=EMAConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    log_every: int = 50
    val_every: int = 500
    val_batches: int = 4
    image_every: int = 1000  # sample grid to TensorBoard; 0 = off
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # periodic step_*.pt files kept besides last.pt and best.pt
    resume: Optional[str] = None  # null | auto | PATH
    reuse: bool = True  # take the model from the artifact cache when one was trained with the same settings
    reuse_other_code: bool = False  # ... even when difflab's model, diffusion, training or data code has changed since
    init_from: Optional[str] = None  # a checkpoint whose EMA weights the stage's networks start from (fresh optimizer, step 0)
    progress: bool = True
    best_metric: str = "val_loss"  # what picks best.pt: val_loss | fd | class_accuracy (the last two need eval.every)


@dataclass
class ClassifierConfig:
    """The noise-aware classifier p(y | x_t, t) of classifier guidance: an encoder-half UNet.

    mode=classifier (and a guidance=classifier run looking it up in the artifact cache) trains it
    with the train block, except for its own max_steps, batch_size and lr below; mode=joint trains
    it beside the diffusion model with the train block and loss = diffusion + weight * CE.
    """

    channels: int = 32
    channel_mults: List[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    attention_resolutions: List[int] = field(default_factory=list)
    head_channels: int = 32
    dropout: float = 0.0
    norm_groups: int = 32
    max_steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    weight: float = 1.0  # mode=joint: classifier_weight in loss = diffusion + weight * classifier
    accuracy_bands: int = 10  # accuracy reported per band of t (0..T split evenly)


@dataclass
class SampleConfig:
    num_images: int = 100
    batch_size: int = 250
    labels: Any = "balanced"  # balanced | uniform | [3, 3, 7]
    prompts: Optional[List[str]] = None  # conditioning=text: the prompts, repeated to num_images; null = from labels
    gif: bool = True
    gif_images: int = 10
    gif_frames: int = 25
    save_png: bool = False  # also one PNG per sample: samples/images/<index>_<label>.png


@dataclass
class EditConfig:
    """mode=edit: SDEdit image-to-image and inpainting of given images with a trained model."""

    images: Optional[str] = None  # a folder of images or a samples.npz (images N,H,W,C uint8; labels N)
    strength: float = 0.6  # the share of the sampler's steps the inputs are noised back by; 1 = from pure noise
    labels: Any = None  # one class id for all, or one per image; null = the .npz's labels (or none: unconditional)
    prompts: Optional[List[str]] = None  # conditioning=text: one prompt for all, or one per image
    mask: Optional[str] = None  # a mask image for all inputs, or a folder of one per input (white = regenerate)
    resample: int = 1  # inpainting: times each step is taken (RePaint's resampling); 1 = none
    batch_size: int = 250


@dataclass
class EvalConfig:
    num_samples: int = 500  # samples measured at the end of training and by mode=evaluate; 0 = none
    batch_size: int = 250  # images per feature-extractor batch
    extractors: List[str] = field(default_factory=lambda: ["inception", "classifier"])
    inception_weights: Optional[str] = None  # null = torch's hub cache; missing = Inception metrics skipped
    classifier_steps: int = 1000  # training of the data set's evaluation classifier (once, then cached)
    classifier_batch_size: int = 128
    bootstrap: int = 50  # replicates of the bootstrap standard errors of FD and KID; 0 = no errors
    memorisation: int = 500  # samples whose nearest training image is looked up (memorisation check); 0 = none
    every: int = 0  # measure during training every N steps (and at its end), to every tracker; 0 = off
    every_samples: int = 64  # samples each measurement during training draws (always the same seeds)


@dataclass
class SweepConfig:
    # The metric that picks a sweep's best job and that run.py returns to Hydra's sweeper (optuna):
    # auto = the evaluation's FD when measured, else the held-out loss (sweep/metric.py).
    metric: str = "auto"


@dataclass
class DistillConfig:
    """mode=distill: a few-step student of a trained model (docs/compression.md)."""

    method: str = "progressive"  # progressive (Salimans & Ho 2022) | consistency (Song et al. 2023)
    steps: int = 4  # the student's sampling steps: 1, 2, 4 or 8
    # teacher_steps, lr and ema_decay: null = the method's (compress/distill.py): progressive 16, 5e-4, 0.995;
    # consistency 64, 1e-4, 0.95. teacher_steps: progressive, the first round's teacher DDIM steps (steps x 2^rounds);
    # consistency, its ODE grid.
    teacher_steps: Optional[int] = None
    steps_per_round: int = 800  # training steps of each halving round (consistency: of its one round)
    lr: Optional[float] = None
    batch_size: Optional[int] = None  # null = train.batch_size
    ema_decay: Optional[float] = None  # consistency's is CD's target network


@dataclass
class PruneConfig:
    """mode=prune: structured channel pruning of a trained UNet, then fine-tuning (docs/compression.md)."""

    amount: float = 0.3  # share of the channels removed, in (0, 1)
    finetune_steps: int = 1000  # fine-tuning steps from the original's EMA weights (at least 1)
    lr: float = 2e-4
    batch_size: Optional[int] = None  # null = train.batch_size
    teacher_weight: float = 1.0  # weight of the original network's outputs as a second target (0 = data loss alone)


@dataclass
class CompressConfig:
    quantize: Optional[str] = None  # mode=sample / evaluate: int8 | bf16 | fp32 (CPU); null = as trained (fp32)
    calibration_batches: int = 16  # int8: training batches, each noised at the sampler's levels, that set the scales
    compile: bool = True  # int8: torch.compile the converted graph (its int8 kernels); false runs it eagerly, slowly


@dataclass
class CkptConfig:
    model: Optional[str] = None  # `ckpt=PATH` on the command line is short for ckpt.model=PATH
    autoencoder: Optional[str] = None
    classifier: Optional[str] = None


@dataclass
class PathsConfig:
    data_dir: str = "${oc.env:DIFFLAB_DATA,${oc.env:HOME,.}/.cache/difflab/data}"
    cache_dir: str = "${oc.env:DIFFLAB_CACHE,${oc.env:HOME,.}/.cache/difflab}"


@dataclass
class Config:
    dataset: DatasetConfig = MISSING
    autoencoder: AutoencoderConfig = MISSING
    unet: UNetConfig = MISSING
    schedule: ScheduleConfig = MISSING
    sampler: SamplerConfig = MISSING
    guidance: GuidanceConfig = MISSING
    mode: ModeConfig = MISSING
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    objective: Any = MISSING  # one of OBJECTIVE_SCHEMAS, by the objective group
    train: TrainConfig = field(default_factory=TrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    logger: Dict[str, Any] = field(default_factory=dict)  # the trackers chosen in the logger group, by name
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dry_run: bool = False  # print the run plan (steps, sources, keys) and exit without doing any of it


GROUP_SCHEMAS = {
    "dataset": DatasetConfig,
    "autoencoder": AutoencoderConfig,
    "unet": UNetConfig,
    "schedule": ScheduleConfig,
    "sampler": SamplerConfig,
    "guidance": GuidanceConfig,
    "mode": ModeConfig,
    "conditioning": ConditioningConfig,
    "text_encoder": TextEncoderConfig,
}


CHOICES = {
    "dataset.name": ("mnist", "fashion_mnist", "cifar10", "cifar100", "folder"),
    "autoencoder.name": ("none", "kl", "vq"),
    "autoencoder.latent": ("spatial", "vector"),
    "schedule.name": tuple(SCHEDULES),
    "sampler.name": tuple(SAMPLERS),
    "sampler.spacing": (None, *SPACINGS),
    "objective.name": tuple(OBJECTIVE_SCHEMAS),
    "objective.t_sampling": T_SAMPLINGS,
    "guidance.name": ("auto", "none", "classifier", "cfg"),
    "conditioning.name": ("class", "class_tokens", "text"),
    "text_encoder.name": ("learned", "clip"),
    "mode.name": ("reconstruction", "diffusion", "classifier", "joint", "sample", "evaluate", "edit", "distill",
                  "prune"),
    "distill.method": ("progressive", "consistency"),
    "compress.quantize": (None, "int8", "bf16", "fp32"),
    "objective.prediction": ("eps", "x0", "v"),
    "objective.loss": ("l2", "l1"),
    "train.lr_schedule": ("cosine", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.best_metric": ("val_loss", "fd", "class_accuracy"),
}

EVAL_EXTRACTORS = ("inception", "classifier")
ABSENT = object()

@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take; a list setting's every element."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return "positive" if (self.low, self.low_open) == (0, True) else f"{self.low:g} or more"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, AT_LEAST_0, AT_LEAST_1 = Range(0, low_open=True), Range(0), Range(1)
FRACTION, BELOW_1 = Range(0, 1), Range(0, 1, high_open=True)
BETA = Range(0, 1, low_open=True, high_open=True)
MAX_SIGMA_REL = 0.28  # a power-function EMA (exponent gamma > 0) is narrower: sigma_rel^2 < 1/12
EMA_WIDTH = Range(0, MAX_SIGMA_REL, low_open=True, high_open=True)

# Every numeric setting's allowed values, checked at start (a null is allowed where the schema
# has Optional). The schema fixes the types; this fixes the ranges.
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**63 - 1),
    "dataset.image_size": POSITIVE, "dataset.channels": POSITIVE, "dataset.num_classes": AT_LEAST_0,
    "dataset.val_size": AT_LEAST_0, "dataset.augmentation.crop_padding": AT_LEAST_0,
    "autoencoder.channels": POSITIVE, "autoencoder.channel_mults": POSITIVE, "autoencoder.num_res_blocks": AT_LEAST_1,
    "autoencoder.norm_groups": POSITIVE, "autoencoder.latent_channels": POSITIVE, "autoencoder.latent_dim": POSITIVE,
    "autoencoder.kl_weight": AT_LEAST_0,
    "autoencoder.codebook_size": Range(2), "autoencoder.commitment": AT_LEAST_0, "autoencoder.codebook_ema": BELOW_1,
    "autoencoder.discriminator.channels": POSITIVE, "autoencoder.discriminator.num_layers": AT_LEAST_1,
    "autoencoder.discriminator.weight": AT_LEAST_0, "autoencoder.discriminator.start": AT_LEAST_0,
    "autoencoder.train.max_steps": POSITIVE, "autoencoder.train.batch_size": POSITIVE,
    "autoencoder.train.lr": POSITIVE, "autoencoder.train.warmup_steps": AT_LEAST_0,
    "unet.channels": POSITIVE, "unet.channel_mults": POSITIVE, "unet.num_res_blocks": AT_LEAST_1,
    "unet.attention_resolutions": POSITIVE, "unet.head_channels": POSITIVE, "unet.dropout": BELOW_1,
    "unet.norm_groups": POSITIVE, "unet.cross_attention_resolutions": POSITIVE, "unet.context_dim": POSITIVE,
    "text_encoder.max_length": Range(2), "text_encoder.layers": AT_LEAST_0, "text_encoder.heads": POSITIVE,
    "schedule.T": Range(2), "schedule.beta_start": BETA, "schedule.beta_end": BETA, "schedule.cosine_s": POSITIVE,
    "schedule.dns_offset": POSITIVE,
    "sampler.steps": AT_LEAST_1, "sampler.eta": FRACTION, "sampler.rho": POSITIVE, "sampler.s_churn": AT_LEAST_0,
    "sampler.s_tmin": AT_LEAST_0, "sampler.s_tmax": AT_LEAST_0, "sampler.s_noise": AT_LEAST_0,
    "guidance.scale": AT_LEAST_0, "guidance.p_uncond": BELOW_1,
    "objective.min_snr_gamma": POSITIVE, "objective.sigma_data": POSITIVE, "objective.P_std": POSITIVE,
    "objective.sigma_min": POSITIVE, "objective.sigma_max": POSITIVE, "objective.logit_std": POSITIVE,
    "objective.P_mean": Range(), "objective.logit_mean": Range(),  # any (finite) value
    "train.max_steps": POSITIVE, "train.batch_size": POSITIVE, "train.grad_accum_steps": POSITIVE,
    "train.lr": POSITIVE, "train.weight_decay": AT_LEAST_0, "train.betas": BELOW_1, "train.warmup_steps": AT_LEAST_0,
    "train.min_lr_ratio": FRACTION, "train.grad_clip": AT_LEAST_0, "train.threads": POSITIVE,
    "train.ema.decay": BELOW_1, "train.ema.update_every": POSITIVE, "train.ema.start": AT_LEAST_0,
    "train.ema.decays": BELOW_1, "train.ema.snapshot_every": POSITIVE,
    "train.ema.sigma_rels": EMA_WIDTH, "train.ema.sigma_rel": EMA_WIDTH,
    "train.early_stop.threshold": AT_LEAST_0, "train.early_stop.window": POSITIVE,
    "train.log_every": POSITIVE, "train.val_every": POSITIVE, "train.val_batches": POSITIVE,
    "train.image_every": AT_LEAST_0, "train.checkpoint_every": POSITIVE, "train.keep_checkpoints": AT_LEAST_0,
    "classifier.channels": POSITIVE, "classifier.channel_mults": POSITIVE, "classifier.num_res_blocks": AT_LEAST_1,
    "classifier.attention_resolutions": POSITIVE, "classifier.head_channels": POSITIVE, "classifier.dropout": BELOW_1,
    "classifier.norm_groups": POSITIVE, "classifier.max_steps": POSITIVE, "classifier.batch_size": POSITIVE,
    "classifier.lr": POSITIVE, "classifier.weight": AT_LEAST_0, "classifier.accuracy_bands": POSITIVE,
    "sample.num_images": AT_LEAST_0, "sample.batch_size": POSITIVE, "sample.gif_images": AT_LEAST_0,
    "sample.gif_frames": AT_LEAST_1,
    "edit.strength": Range(0, 1, low_open=True), "edit.resample": AT_LEAST_1, "edit.batch_size": POSITIVE,
    "eval.num_samples": AT_LEAST_0, "eval.batch_size": POSITIVE, "eval.classifier_steps": POSITIVE,
    "eval.classifier_batch_size": POSITIVE, "eval.bootstrap": AT_LEAST_0, "eval.memorisation": AT_LEAST_0,
    "eval.every": AT_LEAST_0, "eval.every_samples": Range(4),
    "distill.steps": AT_LEAST_1, "distill.teacher_steps": Range(2), "distill.steps_per_round": POSITIVE,
    "distill.lr": POSITIVE,
    "distill.batch_size": POSITIVE, "distill.ema_decay": BELOW_1,
    "prune.amount": Range(),  # (0, 1), checked with its own sentence (compress/prune.py)
    "prune.finetune_steps": POSITIVE, "prune.lr": POSITIVE, "prune.batch_size": POSITIVE,
    "prune.teacher_weight": AT_LEAST_0, "compress.calibration_batches": POSITIVE,
}
NONEMPTY = ("unet.channel_mults", "autoencoder.channel_mults", "classifier.channel_mults")


def check_ranges(cfg) -> None:
    """Every numeric setting within its RANGES entry; one sentence naming the key and the range."""
    from difflab.errors import UserError

    for key, allowed in RANGES.items():
        value = OmegaConf.select(cfg, key)
        values = [] if value is None else (list(value) if isinstance(value, ListConfig) else [value])
        for v in values:
            if not allowed.holds(v):
                what = f"{key}={value}" if len(values) == 1 and not isinstance(value, ListConfig) else \
                    f"{key}={list(value)} has {v}, but each element"
                raise UserError(f"{what} must be {allowed}: set it within that range.")
    for key in NONEMPTY:
        if not OmegaConf.select(cfg, key):
            raise UserError(f"{key}=[] leaves the network without levels: give at least one multiplier, e.g. [1, 2, 2].")


def _check_ema_lengths(ema, mode: str) -> None:
    """Post-hoc EMA needs two widths to reconstruct from, and a width to sample needs the snapshots
    of a training that kept them (check_ranges keeps each width where power-function EMAs exist)."""
    from difflab.errors import UserError

    if ema.posthoc and len(set(ema.sigma_rels)) < 2:
        raise UserError(f"train.ema.sigma_rels={list(ema.sigma_rels)} needs two different widths to reconstruct others "
                        "from: use e.g. [0.05, 0.10].")
    if ema.sigma_rel is not None and not ema.posthoc and mode not in ("sample", "evaluate", "edit"):
        raise UserError(f"train.ema.sigma_rel={ema.sigma_rel} is reconstructed from post-hoc EMA snapshots: add "
                        "train.ema.posthoc=true.")


def validate(cfg) -> None:
    """Checks the schema cannot express; raises UserError naming the key and the fix."""
    from difflab.errors import UserError

    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is not ABSENT and value not in allowed:  # an objective's key, under another objective
            raise UserError(f"{key}={value} is not an option: choose one of {', '.join(allowed)}.")
    check_ranges(cfg)
    if cfg.schedule.beta_start > cfg.schedule.beta_end:
        raise UserError(f"schedule.beta_start={cfg.schedule.beta_start} is above schedule.beta_end="
                        f"{cfg.schedule.beta_end}: the noise must grow over the steps, so swap them.")
    unknown = [name for name in cfg.eval.extractors if name not in EVAL_EXTRACTORS]
    if unknown:
        raise UserError(f"eval.extractors has {unknown[0]}, not an extractor: list some of {', '.join(EVAL_EXTRACTORS)}, e.g. eval.extractors=[classifier].")
    if cfg.eval.bootstrap == 1:
        raise UserError("eval.bootstrap=1 gives no spread to take a standard error of: use 0 (no errors) or e.g. 50.")
    if 0 < cfg.eval.num_samples < 4:
        raise UserError(f"eval.num_samples={cfg.eval.num_samples} must be 0 (no evaluation) or at least 4: use e.g. 500.")
    _check_ema_lengths(cfg.train.ema, cfg.mode.name)
    if cfg.sweep.metric != "auto" and metric_direction(cfg.sweep.metric) is None:
        raise UserError(f"sweep.metric={cfg.sweep.metric} is not a metric whose better direction is known: use auto, an "
                        "evaluation metric (fd_inception, fd_classifier, kid_classifier, class_accuracy) or val_loss.")
    if cfg.mode.name == "reconstruction" and cfg.autoencoder.name == "none":
        raise UserError("mode=reconstruction trains an autoencoder, but autoencoder=none: add autoencoder=kl or autoencoder=vq.")
    if cfg.ckpt.autoencoder and cfg.autoencoder.name == "none" and cfg.mode.name != "sample":
        raise UserError("ckpt.autoencoder is given but autoencoder=none: add the autoencoder=kl or autoencoder=vq it was trained as.")
    objective = cfg.objective
    if objective.name == "edm" and objective.sigma_min >= objective.sigma_max:
        raise UserError(f"objective.sigma_min={objective.sigma_min} must be below objective.sigma_max="
                        f"{objective.sigma_max}: sampling runs from sigma_max down to sigma_min.")
    validate_conditioning(cfg)
    if cfg.schedule.zero_terminal_snr and objective.name == "ddpm" and objective.prediction == "eps":
        raise UserError("schedule.zero_terminal_snr=true leaves x0 undefined at the last step for eps prediction: add objective.prediction=v.")


def conditioning_name(cfg) -> str:
    """How a config's condition enters its network (a config from before conditioning existed: class)."""
    return (cfg.get("conditioning") or {}).get("name") or "class"


def validate_conditioning(cfg) -> None:
    """Cross-attention has a context to read only when the conditioning makes one (the plan checks
    the rest of text conditioning: its captions, encoder and mode)."""
    from difflab.errors import UserError

    name, cross = conditioning_name(cfg), cfg.unet.cross_attention_resolutions
    if name == "class" and cross:
        raise UserError(f"unet.cross_attention_resolutions={list(cross)} need tokens to attend to, but conditioning=class "
                        "adds the label to the time embedding: add conditioning=class_tokens or conditioning=text.")


LOSS_ONLY_KEYS = ("loss", "class_conditional", "prediction", "min_snr_gamma")  # objective keys no noise level depends on


def objective_name(cfg) -> str:
    """The objective a config trains (a checkpoint's from before the objective group: ddpm)."""
    return cfg.objective.get("name") or "ddpm"


def level_meaning(cfg) -> dict:
    """What a network's noise conditioning means: the objective, and its schedule (DDPM) or
    sigma_data (EDM, whose inputs it scales). A classifier can guide a model only where they agree."""
    name = objective_name(cfg)
    if name == "ddpm":
        return {"objective": name, "schedule": OmegaConf.to_container(cfg.schedule, resolve=True)}
    if name == "edm":
        return {"objective": name, "sigma_data": cfg.objective.sigma_data}
    return {"objective": name}


def noise_settings(cfg) -> dict:
    """What fixes the noised inputs a network learns from: the level meaning, and the objective's
    training distribution of levels."""
    objective = OmegaConf.to_container(cfg.objective, resolve=True)
    return {**level_meaning(cfg), **{k: v for k, v in objective.items() if k not in (*LOSS_ONLY_KEYS, "name")}}


def classifier_train_config(cfg) -> DictConfig:
    """The train block with the noise-aware classifier's own steps, batch size and learning rate
    (what mode=classifier trains with)."""
    c = cfg.classifier
    return OmegaConf.merge(cfg.train, {"max_steps": c.max_steps, "batch_size": c.batch_size, "lr": c.lr})


def autoencoder_train_config(cfg) -> DictConfig:
    """train.* with the autoencoder's own non-null autoencoder.train.* values on top."""
    own = {k: v for k, v in OmegaConf.to_container(cfg.autoencoder.train).items() if v is not None}
    return OmegaConf.merge(cfg.train, own)


def autoencoder_batch_key(cfg) -> str:
    """The setting the autoencoder's training batch size comes from."""
    return "train.batch_size" if cfg.autoencoder.train.batch_size is None else "autoencoder.train.batch_size"


def _trained_batch_keys(cfg) -> list[str]:
    """The keys of the batch sizes a run may train with: its stage's, and its autoencoder's."""
    if cfg.mode.name in ("sample", "evaluate", "edit"):  # they train nothing
        return []
    keys = {"reconstruction": [], "classifier": ["classifier.batch_size"]}.get(cfg.mode.name, ["train.batch_size"])
    if cfg.autoencoder.name != "none":
        keys.append(autoencoder_batch_key(cfg))
    return keys


def validate_batch_splits(cfg, world_size: int) -> None:
    """Every batch the run may train with splits evenly: over the torchrun processes (each takes
    its slice of the global batch), then into train.grad_accum_steps micro-batches. Under
    torchrun the mode must also train something."""
    from difflab.errors import UserError

    if world_size > 1 and cfg.mode.name in ("sample", "evaluate", "edit"):
        raise UserError(f"mode={cfg.mode.name} trains nothing, so torchrun's extra processes would have nothing to do: "
                        "run it with `python run.py`.")
    accum = cfg.train.grad_accum_steps
    for key in _trained_batch_keys(cfg):
        value = OmegaConf.select(cfg, key)
        if value % (world_size * accum) == 0:
            continue
        if accum == 1:
            raise UserError(f"{key}={value} is the global batch and does not split evenly over the {world_size} "
                            f"torchrun processes: use a multiple of {world_size}.")
        over = f" on each of the {world_size} torchrun processes" if world_size > 1 else ""
        raise UserError(f"{key}={value} does not split into train.grad_accum_steps={accum} equal micro-batches{over}: "
                        f"use a multiple of {world_size * accum}, or another train.grad_accum_steps.")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, schema in OBJECTIVE_SCHEMAS.items():
        cs.store(group="objective", name=f"{name}_schema", node=schema)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)
