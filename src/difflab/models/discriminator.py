"""The optional adversarial term of the autoencoders (seed 002, taming-transformers / latent-
diffusion): a PatchGAN discriminator, the hinge loss, and the adaptive weight that balances the
generator's adversarial gradient against the reconstruction gradient at the decoder's last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """pix2pix's N-layer PatchGAN: 4x4 convs, stride 2 for `num_layers` levels, then two stride-1
    convs; one real/fake logit per overlapping patch rather than per image."""

    def __init__(self, in_channels: int, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for n in range(1, num_layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        for m in self.modules():  # the DCGAN initialisation taming uses
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float) -> Tensor:
    """lambda = ||grad_W nll|| / (||grad_W g|| + 1e-4), clamped to [0, 1e4], times disc_weight,
    with W the decoder's last layer: the adversarial gradient there is kept as large as the
    reconstruction gradient, whatever the scale of either loss."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight
