"""The training loop. It knows nothing of which stage it runs beyond the loss it is handed.

Everything a resumed run needs (model, EMA, optimizer, LR schedule, grad scaler, RNG states,
step, early-stopping window, best validation loss, loss history) goes into each checkpoint,
and batches are a pure function of the step, so a run killed and resumed reaches the same
weights as one that was never interrupted.

Under torchrun a Trainer built with distributed=True trains with the other ranks (see
difflab.distributed): the loss runs inside DistributedDataParallel, each rank takes its
slice of every global batch, and only rank 0 writes. Its checkpoints are those of one process
(the unwrapped model), so either kind of run resumes or samples from the other's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import difflab.distributed as dist
from difflab.checkpoint import CHECKPOINT_FORMAT, atomic_save, load_checkpoint
from difflab.errors import TrainingInterrupted, UserError
from difflab.models.layers import set_gradient_checkpointing
from difflab.progress import progress
from difflab.train.ema import EMA, PostHocEMA, extra_decays

log = logging.getLogger("difflab.train")

LossFn = Callable[[nn.Module, Any], Tensor]  # (model, batch) -> scalar loss
ValFn = Callable[[nn.Module], float]  # (eval model) -> validation loss
ImageFn = Callable[[nn.Module, int], None]  # (eval model, step) -> logs a sample grid
# (eval model, step) -> measures it (eval.every) and logs the metrics; returns the score best.pt is
# chosen by (train.best_metric; lower is better), or None when best.pt follows the validation loss
EvalFn = Callable[[nn.Module, int], Optional[float]]


class StepBatches:
    """Batch k of an endless stream of shuffled epochs, as a pure function of k (no state to
    save for resume). Each epoch is a fresh permutation seeded by (seed, epoch).

    With several ranks (DDP), batch_size is the global batch and rank r takes the r-th of
    world_size equal slices of it: together the ranks see each global batch once and no image
    twice per epoch (DistributedSampler's contract, still a pure function of the step)."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 key: str = "train.batch_size"):
        if size < batch_size:  # `key`: the setting the batch size came from, for the message
            raise UserError(f"The data set has {size} images, fewer than {key}={batch_size}: lower {key}.")
        if batch_size % world_size:  # config.validate_batch_splits names the key and the fix first
            raise ValueError(f"a batch of {batch_size} does not split over {world_size} ranks")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.per_epoch = size // batch_size
        self.rank_batch = batch_size // world_size
        self.rank_offset = rank * self.rank_batch
        self._epoch, self._perm = -1, torch.empty(0)

    def indices(self, step: int) -> Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=gen)
        start = pos * self.batch_size + self.rank_offset
        return self._perm[start:start + self.rank_batch]


def rank_step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one rank's randomness (noise, timesteps, label dropout, augmentation) at one
    step of a DDP run: different on every rank, and like the batches a pure function of the
    step, so a resumed run draws what the uninterrupted one would have without each rank's RNG
    state in the checkpoint."""
    digest = hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: what manual_seed takes


def split_batch(batch: Any, parts: int) -> list[Any]:
    """`batch` as `parts` equal micro-batches: tensors split along their first dimension, tuples
    and lists element by element, anything else (the step an autoencoder batch carries) given
    to every part."""
    if parts == 1:
        return [batch]
    if isinstance(batch, Tensor):
        if len(batch) % parts:  # config.validate_batch_splits names the key and the fix first
            raise ValueError(f"a batch of {len(batch)} does not split into {parts} equal micro-batches")
        return list(batch.chunk(parts))
    if isinstance(batch, (tuple, list)):
        return [type(batch)(items) for items in zip(*(split_batch(b, parts) for b in batch))]
    return [batch] * parts


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine annealing down to min_ratio * lr."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def cpu_has_native_bf16() -> bool:
    """bf16 matrix instructions (AVX512-BF16 or AMX): there bf16 autocast trains the default
    MNIST model ~1.3-1.6x faster with the same validation loss; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA device: use train.precision=bf16 or fp32 on the CPU.")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def compiled(model: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile(model), after checking what inductor needs on the CPU: a C++ compiler
    (without one, the first step would fail deep inside torch with a traceback)."""
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
        except ImportError:  # a torch whose inductor is laid out otherwise: let it report for itself
            pass
        except Exception:  # inductor's InvalidCxxCompiler
            raise UserError("train.compile=true on the CPU needs a C++ compiler (g++, or the one $CXX names) and "
                            "none works here: install one, or set train.compile=false.") from None
    return torch.compile(model)


class EarlyStopper:
    """Seed 001's criterion, corrected: keep the last `window` log-interval mean losses and stop
    when the mean absolute change between consecutive entries falls below the threshold."""

    def __init__(self, threshold: float, window: int, history: list[float] | None = None):
        self.threshold, self.window = threshold, max(2, window)
        self.history: list[float] = list(history or [])

    def should_stop(self, window_mean: float) -> bool:
        self.history = (self.history + [window_mean])[-self.window:]
        if len(self.history) < self.window:
            return False
        diffs = [abs(b - a) for a, b in zip(self.history, self.history[1:])]
        return sum(diffs) / len(diffs) < self.threshold


@contextlib.contextmanager
def stop_requests():
    """While training: Ctrl-C (SIGINT) or SIGTERM (a scheduler's pre-emption, torchrun passing
    one on) is noted in the yielded list, for the loop to stop after the step in progress and
    save it; a second one stops at once, as Python does by default."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield requested
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def note(signum, frame) -> None:
        if requested:
            restore()
            raise KeyboardInterrupt
        requested.append(signum)

    for s in previous:
        signal.signal(s, note)
    try:
        yield requested
    finally:
        restore()


@dataclass
class TrainResult:
    step: int
    final_loss: float
    best_val_loss: Optional[float]
    images_per_s: float
    wall_time_s: float
    early_stopped: bool
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: Optional[str] = None


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _LossModule(nn.Module):
    """A model and its loss as one module: DDP wraps this, so its forward covers every path the
    loss takes through the model (the joint and autoencoder losses call sub-modules directly,
    which a wrapped model alone would not see)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class Trainer:
    """Owns the optimisation state of one stage and its checkpoints in `ckpt_dir`.

    distributed=True: under torchrun, train together with the other ranks, each drawing its
    randomness from rank_step_seed(seed, rank, step); only rank 0 writes (`self.writes`).
    find_unused_parameters: for a loss that leaves some parameters out on some steps (DDP must
    then look for them; e.g. the discriminator before it starts)."""

    def __init__(self, model: nn.Module, cfg, ckpt_dir: Path, device: torch.device, writer=None,
                 extra_state: Optional[dict] = None, *, distributed: bool = False, seed: int = 0,
                 find_unused_parameters: bool = False, stage: str = "train"):
        self.cfg, self.device, self.writer, self.stage = cfg, device, writer, stage  # stage: the progress bar's name
        self.rank, self.world_size = (dist.rank(), dist.world_size()) if distributed else (0, 1)
        self.writes = self.rank == 0  # checkpoints, TensorBoard, validation and sample grids
        self.seed, self.find_unused_parameters = seed, find_unused_parameters
        self.model = model.to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ckpt_dir = Path(ckpt_dir)
        if self.writes:  # what a process killed mid-write left; its target is intact
            for stale in self.ckpt_dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        self.extra_state = extra_state or {}  # e.g. the config and shapes, for loading later
        # The fused kernel is one pass over the weights (CPU and CUDA): 5x faster than foreach
        # on the CPU for ddpm_cifar's 35.7M weights (16 vs 81 ms a step, measured on 2 cores).
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule, cfg.min_lr_ratio)
        )
        self.amp_dtype = resolve_precision(cfg.precision, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ema = EMA(self.model, cfg.ema.decay, cfg.ema.update_every, cfg.ema.start, cfg.ema.warmup)
        self.ema_copies = {d: EMA(self.model, d, cfg.ema.update_every, cfg.ema.start, cfg.ema.warmup)
                           for d in extra_decays(cfg.ema.decay, cfg.ema.decays)}
        self.posthoc = PostHocEMA(self.model, cfg.ema.sigma_rels, cfg.ema.snapshot_every, cfg.max_steps) \
            if cfg.ema.get("posthoc") else None
        if cfg.gradient_checkpointing:
            blocks = set_gradient_checkpointing(self.model)
            log.info("train.gradient_checkpointing: %d blocks recompute their activations in the backward%s", blocks,
                     "" if blocks else " (this network has none, so it trains as usual)")
        self.forward_model = compiled(self.model, device) if cfg.compile else self.model
        self.step = 0
        self.best_val: Optional[float] = None
        self.best_score: Optional[float] = None  # of train.best_metric, when an evaluation chooses best.pt
        self.loss_history: list[tuple[int, float]] = []
        self.val_history: list[tuple[int, float]] = []
        self.stopper = EarlyStopper(cfg.early_stop.threshold, cfg.early_stop.window)
        # The loss summed over the steps since the last log line: in the checkpoint, so a run resumed
        # between two log lines reports the mean over the same steps as an uninterrupted one.
        self.window_loss = torch.zeros((), device=device)
        self.window_steps = 0

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            **self.extra_state,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "ema_copies": {str(d): c.state_dict() for d, c in self.ema_copies.items()},
            **({"posthoc_ema": self.posthoc.state_dict()} if self.posthoc else {}),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(self.device),
            "best_val": self.best_val,
            "best_score": self.best_score,
            "early_stop": self.stopper.history,
            "loss_history": [list(p) for p in self.loss_history],
            "val_history": [list(p) for p in self.val_history],
            "window": {"loss_sum": float(self.window_loss), "steps": self.window_steps},
            "format": CHECKPOINT_FORMAT,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        for decay, ema_copy in self.ema_copies.items():
            ema_copy.load_state_dict(state["ema_copies"][str(decay)])
        if self.posthoc:
            self.posthoc.load_state_dict(state["posthoc_ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], self.device)
        self.step = int(state["step"])
        self.best_val = state["best_val"]
        self.best_score = state.get("best_score")  # checkpoints from before train.best_metric have none
        self.stopper.history = list(state["early_stop"])
        self.loss_history = [(int(s), float(v)) for s, v in state["loss_history"]]
        self.val_history = [(int(s), float(v)) for s, v in state["val_history"]]
        window = state.get("window", {"loss_sum": 0.0, "steps": 0})
        self.window_loss = torch.tensor(window["loss_sum"], device=self.device)
        self.window_steps = int(window["steps"])

    def save(self, name: str) -> None:
        if self.writes:
            atomic_save(self.state_dict(), self.ckpt_dir / name)

    def _save_periodic(self) -> None:
        if not self.writes:
            return
        self.save("last.pt")
        self.save(f"step_{self.step:08d}.pt")
        periodic = sorted(self.ckpt_dir.glob("step_*.pt"))
        for old in periodic[: max(0, len(periodic) - self.cfg.keep_checkpoints)]:
            old.unlink(missing_ok=True)

    def maybe_resume(self, resume: Optional[str]) -> Optional[str]:
        """`auto`: continue from this run's newest loadable checkpoint (last.pt, else the newest
        step_*.pt: a run killed while writing, or a disk error, can leave last.pt unreadable);
        a path: from that file. Under DDP every rank loads the same file (rank 0's RNG state
        included, which the per-step seeding then replaces), so all start from identical weights
        and EMAs."""
        if not resume:
            return None
        if resume == "auto":
            found = self._newest_loadable()
            if found is None:
                log.info("train.resume=auto: no checkpoint in %s yet, starting from step 0", self.ckpt_dir)
                return None
            path, state = found
        else:
            path = Path(resume).expanduser()
            state = load_checkpoint(path, "checkpoint to resume from (train.resume)")
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"The checkpoint {path} does not match this run's model or stage ({type(e).__name__}): resume with the config it was trained with.") from None
        log.info("resumed from %s at step %d", path, self.step)
        return str(path)

    def _newest_loadable(self) -> Optional[tuple[Path, dict]]:
        candidates = [self.ckpt_dir / "last.pt", *sorted(self.ckpt_dir.glob("step_*.pt"), reverse=True)]
        candidates = [p for p in candidates if p.is_file()]
        for i, path in enumerate(candidates):
            try:
                state = load_checkpoint(path, "checkpoint to resume from")
            except UserError as e:
                later = f"; trying {candidates[i + 1].name}" if i + 1 < len(candidates) else ""
                log.warning("train.resume=auto skips %s%s (%s)", path, later, e)
                continue
            return path, state
        if candidates:
            raise UserError(f"train.resume=auto found no loadable checkpoint in {self.ckpt_dir} (all of "
                            f"{', '.join(p.name for p in candidates)} are damaged): start a new run folder, or give "
                            "train.resume=PATH of another run's checkpoint.")
        return None

    # ---- the loop ----------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step_batches(self, size: int, batch_size: int, key: str = "train.batch_size") -> StepBatches:
        """The batches of a data set of `size` items, this rank's slices of global batches."""
        return StepBatches(size, batch_size, self.seed, self.rank, self.world_size, key)

    def _objective(self, loss_fn: LossFn) -> Callable[[Any], Tensor]:
        """batch -> loss; under DDP through DistributedDataParallel, which averages the gradients
        over the ranks in backward (and starts every rank from rank 0's weights)."""
        if self.world_size == 1:
            return lambda batch: loss_fn(self.forward_model, batch)
        # gradient_as_bucket_view: the .grad tensors are views into DDP's all-reduce buckets, so
        # the gradients are not held twice (2 gloo processes here: 549 -> 561 img/s, within noise)
        return DistributedDataParallel(_LossModule(self.forward_model, loss_fn),
                                       device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=self.find_unused_parameters, gradient_as_bucket_view=True)

    def _seed_step(self) -> None:
        if self.world_size > 1:
            torch.manual_seed(rank_step_seed(self.seed, self.rank, self.step))

    def _across_ranks(self, value: Tensor) -> float:
        """A scalar averaged over the ranks training together (its own value on one process)."""
        return float(dist.mean_over_ranks(value) if self.world_size > 1 else value)

    def _train_step(self, objective: Callable[[Any], Tensor], batch: Any) -> tuple[Tensor, Tensor]:
        """One optimizer step on `batch`, computed in train.grad_accum_steps micro-batches: each
        one's mean loss, divided by their number, adds its share of the whole batch's gradient."""
        micro_batches = split_batch(batch, self.cfg.grad_accum_steps)
        self.opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=self.device)
        for i, micro in enumerate(micro_batches):
            # Under DDP only the last micro-batch's backward all-reduces; the others accumulate locally.
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last or self.world_size == 1 else objective.no_sync():
                with self._autocast():
                    loss = objective(micro) / len(micro_batches)
                self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        )
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        for ema_copy in self.ema_copies.values():
            ema_copy.update(self.model, self.step)
        if self.posthoc:
            self.posthoc.update(self.model, self.step)
        return step_loss, grad_norm.detach()

    def _save_stopped(self, signals: list[int]) -> None:
        """Save the step just finished as last.pt and stop with TrainingInterrupted."""
        self.save("last.pt")
        why = signal.Signals(signals[0]).name if signals else "another torchrun process's signal"
        log.warning("%s: training stopped after step %d, saved in %s", why, self.step, self.ckpt_dir / "last.pt")
        raise TrainingInterrupted(self.step, self.ckpt_dir / "last.pt")

    def _stop_now(self, requested: bool) -> bool:
        """Whether to stop after this step: on a request, at once on one process; under DDP all
        ranks decide together at log intervals (one more all-reduce there), so none waits alone."""
        if self.world_size == 1:
            return requested
        if self.step % self.cfg.log_every:
            return False
        return self._across_ranks(torch.tensor(float(requested), device=self.device)) > 0

    def _check_finite(self, value: float) -> None:
        if math.isfinite(value):
            return
        kept = self.ckpt_dir / "last.pt"
        if kept.is_file():
            where = f"the last good checkpoint is kept in {kept}"
            then = ", then resume with train.resume=auto"
        else:
            where, then = "no checkpoint was written before it", ""
        clip = "lower train.grad_clip" if self.cfg.grad_clip > 0 else "set train.grad_clip=1.0"
        raise UserError(f"The training loss became {value} at step {self.step} ({where}): train.lr={self.cfg.lr:g} is the "
                        f"likely cause, so lower it (or {clip}){then}.")

    def _keep_best(self, score: float) -> None:
        if self.best_score is None or score < self.best_score:
            self.best_score = score
            self.save("best.pt")

    def _scalar(self, tag: str, value: float) -> None:
        if self.writer is not None and self.writes:
            self.writer.add_scalar(tag, value, self.step)

    def fit(self, loss_fn: LossFn, get_batch: Callable[[int], Any], batch_size: int,
            val_fn: Optional[ValFn] = None, image_fn: Optional[ImageFn] = None, eval_fn: Optional[EvalFn] = None,
            eval_every: int = 0) -> TrainResult:
        """eval_fn, every eval_every steps and at the end: the evaluation, which chooses best.pt
        unless train.best_metric=val_loss (then the validation loss does, as without one)."""
        cfg = self.cfg
        best_by_val = eval_fn is None or cfg.get("best_metric", "val_loss") == "val_loss"
        start_step, t_start = self.step, time.perf_counter()
        window_t0, last_loss, early = time.perf_counter(), float("nan"), False
        timed_steps = 0  # steps since window_t0, for images/s
        self.model.train()
        objective = self._objective(loss_fn)
        if cfg.grad_accum_steps > 1 and self.writes:
            log.info("train.grad_accum_steps=%d: each step's batch of %d in micro-batches of %d%s", cfg.grad_accum_steps,
                     batch_size, batch_size // (self.world_size * cfg.grad_accum_steps),
                     f" per process ({self.world_size} processes)" if self.world_size > 1 else "")
        bar_on = bool(cfg.progress and self.writes)
        with progress(self.stage, cfg.max_steps, bar_on, initial=self.step, unit="step") as bar, stop_requests() as stop:
            while self.step < cfg.max_steps:
                self._seed_step()
                loss, grad_norm = self._train_step(objective, get_batch(self.step))
                self.window_loss += loss
                self.window_steps += 1
                timed_steps += 1
                bar.update(1)
                at_end = self.step == cfg.max_steps
                if self.step % cfg.log_every == 0 or at_end:
                    last_loss = self._across_ranks(self.window_loss) / self.window_steps  # the one host sync per interval
                    self._check_finite(last_loss)
                    ips = timed_steps * batch_size / (time.perf_counter() - window_t0)
                    self.loss_history.append((self.step, last_loss))
                    self._scalar("train/loss", last_loss)
                    self._scalar("train/lr", self.sched.get_last_lr()[0])
                    self._scalar("train/grad_norm", float(grad_norm))
                    self._scalar("train/images_per_s", ips)
                    self._scalar("train/ema_decay", self.ema.current_decay())
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ips:.0f}")
                    log.info("step %d loss %.5f lr %.2e grad_norm %.3f images/s %.1f", self.step, last_loss,
                             self.sched.get_last_lr()[0], float(grad_norm), ips)
                    early = cfg.early_stop.enabled and self.stopper.should_stop(last_loss)
                    self.window_loss.zero_()
                    self.window_steps, timed_steps, window_t0 = 0, 0, time.perf_counter()
                if val_fn is not None and self.writes and (self.step % cfg.val_every == 0 or at_end or early):
                    val = val_fn(self.ema.model)
                    self.val_history.append((self.step, val))
                    self._scalar("val/loss", val)
                    log.info("step %d validation loss (EMA weights) %.5f", self.step, val)
                    if self.best_val is None or val < self.best_val:
                        self.best_val = val
                        if best_by_val:
                            self.save("best.pt")
                evaluates = eval_fn is not None and self.writes and eval_every
                if evaluates and (self.step % eval_every == 0 or at_end or early):
                    score = eval_fn(self.ema.model, self.step)
                    self.model.train()
                    if score is not None and not best_by_val:
                        self._keep_best(score)
                if image_fn is not None and self.writes and cfg.image_every and (self.step % cfg.image_every == 0 or at_end):
                    image_fn(self.ema.model, self.step)
                    self.model.train()
                if self.step % cfg.checkpoint_every == 0 or at_end or early:
                    # every step since the last log line, so no checkpoint saves weights a NaN step left
                    self._check_finite(self._across_ranks(self.window_loss))
                    self._save_periodic()
                if early:
                    log.info("early stopping at step %d: mean loss change below %g over the last %d intervals",
                             self.step, cfg.early_stop.threshold, cfg.early_stop.window)
                    break
                if self._stop_now(bool(stop)):
                    bar.close()
                    self._save_stopped(stop)
        elapsed = time.perf_counter() - t_start
        trained = self.step - start_step
        return TrainResult(
            step=self.step, final_loss=self.loss_history[-1][1] if self.loss_history else last_loss, best_val_loss=self.best_val,
            images_per_s=trained * batch_size / elapsed if trained else 0.0, wall_time_s=elapsed,
            early_stopped=early, loss_history=list(self.loss_history),
        )
