"""Exponential moving average of a model's weights; sampling uses the EMA copy.

Extra copies with other decays (train.ema.decays) follow the same weights in the same run, so
comparing decays needs one training instead of one per decay. Post-hoc EMA goes further: two
power-function profiles and their snapshots give any EMA width after training, by least squares.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def extra_decays(main: float, decays) -> list[float]:
    """The decays kept besides the main EMA: each listed one once, the main one left out."""
    return sorted({float(d) for d in decays} - {float(main)})


class EMA:
    """ema = d * ema + (1 - d) * theta every `update_every` steps, a plain copy before `start`.

    With `warmup`, d_k = min(decay, 1 - (1 + k)^(-3/4)) for the k-th update after `start`
    (diffusers' warm-up), so a short run is not dominated by its random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, update_every: int = 1, start: int = 0, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema.decay must be in [0, 1), got {decay}: use e.g. 0.999.")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.update_every, self.start, self.warmup = decay, max(1, update_every), start, warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, 1 - (1 + self.num_updates) ** -0.75)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after the optimizer step that produced `step` (1-based)."""
        if step % self.update_every:
            return
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if step <= self.start:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1 - self.current_decay())
            self.num_updates += 1
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


# ---- post-hoc EMA (Karras et al. 2024, EDM2 training/phema.py) ------------------------------
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA whose relative width is `sigma_rel`:
    the largest real root of sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))."""
    t = sigma_rel ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


class PowerEMA:
    """ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1): the
    average of the weights of steps 1..t weighted by step^gamma, the same shape at every t."""

    def __init__(self, model: nn.Module, sigma_rel: float):
        self.sigma_rel, self.gamma = float(sigma_rel), sigma_rel_to_gamma(sigma_rel)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        beta = (1 - 1 / step) ** (self.gamma + 1)
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


class PostHocEMA:
    """Power-function EMA profiles (train.ema.sigma_rels) and their snapshots every `every`
    steps and at `last_step`, from which `reconstruct` makes an EMA of any width afterwards.
    The snapshots live in the checkpoint (CPU, fp32), so they resume and are cached with it."""

    def __init__(self, model: nn.Module, sigma_rels, every: int, last_step: int):
        self.profiles = [PowerEMA(model, s) for s in sigma_rels]
        self.every, self.last_step = every, last_step
        self.snapshots: list[dict] = []  # {"step", "sigma_rel", "model": state dict}

    def update(self, model: nn.Module, step: int) -> None:
        for profile in self.profiles:
            profile.update(model, step)
        if step % self.every == 0 or step == self.last_step:
            self.snapshots += [{"step": step, "sigma_rel": p.sigma_rel,
                                "model": {k: v.detach().float().cpu().clone() for k, v in p.model.state_dict().items()}}
                               for p in self.profiles]

    def state_dict(self) -> dict:
        return {"profiles": {str(p.sigma_rel): p.model.state_dict() for p in self.profiles}, "snapshots": self.snapshots}

    def load_state_dict(self, state: dict) -> None:
        for profile in self.profiles:
            profile.model.load_state_dict(state["profiles"][str(profile.sigma_rel)])
        self.snapshots = list(state["snapshots"])


def _correlation(a_step, a_gamma, b_step, b_gamma):
    """The inner products of power-function EMA profiles (continuous time): EDM2's
    power_function_correlation, broadcast over the arrays."""
    ratio = a_step / b_step
    exponent = np.where(a_step < b_step, b_gamma, -a_gamma)
    return (a_gamma + 1) * (b_gamma + 1) * ratio ** exponent / ((a_gamma + b_gamma + 1) * np.maximum(a_step, b_step))


def posthoc_coefficients(steps, gammas, step: float, gamma: float) -> np.ndarray:
    """Least-squares weights of the snapshots (at `steps`, exponents `gammas`) whose sum best
    matches the profile of exponent `gamma` at `step` (EDM2's solve_posthoc_coefficients)."""
    steps, gammas = np.float64(steps).reshape(-1, 1), np.float64(gammas).reshape(-1, 1)
    a = _correlation(steps, gammas, steps.T, gammas.T)
    b = _correlation(steps, gammas, np.float64([[step]]), np.float64([[gamma]]))
    coefficients = np.linalg.lstsq(a, b, rcond=None)[0][:, 0]
    # Each snapshot averages the weights (its weights over the steps sum to 1), so must their
    # combination: the continuous-time fit misses 1 by ~5e-4 on a short run, and that share of the
    # whole weights is 100x the gap between two profiles (measured in tests/test_posthoc_ema.py).
    return coefficients / coefficients.sum()


def reconstruct(snapshots: list[dict], sigma_rel: float, use=None) -> dict:
    """The EMA weights of width `sigma_rel` at the last snapshot's step, as the least-squares
    combination of the snapshots (those of the profiles in `use` only, when given)."""
    chosen = [s for s in snapshots if use is None or s["sigma_rel"] in use]
    if not chosen:
        raise ValueError("no post-hoc EMA snapshots to reconstruct from: train with train.ema.posthoc=true.")
    coefficients = posthoc_coefficients([s["step"] for s in chosen], [sigma_rel_to_gamma(s["sigma_rel"]) for s in chosen],
                                        max(s["step"] for s in chosen), sigma_rel_to_gamma(sigma_rel))
    out = {}
    for key, first in chosen[0]["model"].items():
        if first.is_floating_point():
            out[key] = sum(float(c) * s["model"][key].double() for c, s in zip(coefficients, chosen)).to(first.dtype)
        else:  # counters and other integer buffers: the latest snapshot's
            out[key] = chosen[-1]["model"][key]
    return out
