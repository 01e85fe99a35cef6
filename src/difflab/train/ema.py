"""Exponential moving average of a model's weights; sampling uses the EMA copy.

Extra copies with other decays (train.ema.decays) follow the same weights in the same run, so
comparing decays needs one training instead of one per decay.
"""

from __future__ import annotations

import copy

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
