"""Turn a noise-prediction network into the Denoiser the samplers drive.

Label or prompt conditioning, classifier-free guidance (one batched pass of 2B), classifier guidance
(gradients through the classifier only, in fp32) and x0 clipping all live here, so every
sampler gets them alike; the process supplies the network's inputs at a level (its
preconditioning) and turns the output into (x0_hat, eps_hat), so every objective does too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from difflab.diffusion.process import NoiseProcess, per_example

Net = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]  # (network input, noise conditioning, y) -> output
Classifier = Callable[[Tensor, Tensor], Tensor]  # (network input, noise conditioning) -> logits

GUIDANCES = ("none", "classifier", "cfg")


@dataclass
class GuidedDenoiser:
    net: Net
    process: NoiseProcess
    y: Optional[Tensor] = None  # labels of the batch being sampled; None = unconditional
    null_class: Optional[int] = None  # index of the "no label" class for classifier-free guidance
    null_y: Optional[Tensor] = None  # (1, ...) the null condition where y is not a class id: the empty prompt's tokens
    cfg_scale: float = 1.0  # w in eps_u + w (eps_c - eps_u); 1 = plain conditional
    classifier: Optional[Classifier] = None
    classifier_scale: float = 0.0
    clip_x0: bool = True

    def _predict(self, x: Tensor, level: Tensor) -> Tensor:
        x_in, cond = self.process.net_inputs(x, level)
        if self.y is None or self.cfg_scale == 1.0:
            return self.net(x_in, cond, self.y)
        null = torch.full_like(self.y, self.null_class) if self.null_y is None else self.null_y.expand_as(self.y)
        out_c, out_u = self.net(torch.cat([x_in, x_in]), torch.cat([cond, cond]), torch.cat([self.y, null])).chunk(2)
        return out_u + self.cfg_scale * (out_c - out_u)

    def guide_mean(self, x: Tensor, level: Tensor) -> Optional[Tensor]:
        """scale * grad_x log p(y | x_t), or None without classifier guidance."""
        if self.classifier is None or self.classifier_scale == 0.0 or self.y is None:
            return None
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            x_in = x.detach().float().requires_grad_(True)
            log_probs = torch.log_softmax(self.classifier(*self.process.net_inputs(x_in, level)).float(), dim=-1)
            selected = log_probs[torch.arange(len(x_in), device=x.device), self.y].sum()
            return self.classifier_scale * torch.autograd.grad(selected, x_in)[0]

    def __call__(self, x: Tensor, level: Tensor, *, shift_eps: bool = True) -> tuple[Tensor, Tensor]:
        x0, eps = self.process.to_x0_eps(self._predict(x, level).float(), x, level)
        grad = self.guide_mean(x, level) if shift_eps else None
        if grad is not None:  # ODE samplers: the score shifts by grad, so eps' = eps - sigma * grad
            alpha, sigma = (per_example(v, x) for v in self.process.alpha_sigma(level))
            eps = eps - sigma * grad
            x0 = torch.where(alpha > 0, (x - sigma * eps) / alpha.clamp(min=1e-30), x0)  # pure noise: x0 unmoved
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = self.process.eps_from_x0(x0, x, level)
        return x0, eps
