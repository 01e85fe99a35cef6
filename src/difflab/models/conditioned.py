"""A UNet whose condition enters through cross-attention: the denoiser's y, class ids
(conditioning=class_tokens) or prompt token ids (conditioning=text), becomes the context sequence
its cross-attention blocks read. The network keeps the (x, t, y) call of every other denoiser, so
objectives, samplers, guidance and the training loop see no difference; y=None is the null
condition (the null class, or the empty prompt).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from difflab.models.text_encoder import ClipTextEncoder, LearnedTextEncoder, WordTokenizer
from difflab.models.unet import UNet, build_unet

CROSS_ATTENTION_CONDITIONINGS = ("class_tokens", "text")


class ClassTokens(nn.Module):
    """A class as a sequence of `length` learned tokens; index num_classes is the null class."""

    def __init__(self, num_classes: int, width: int, length: int = 1):
        super().__init__()
        self.num_classes, self.length = num_classes, length
        self.embed = nn.Embedding(num_classes + 1, length * width)

    def forward(self, y: Tensor) -> tuple[Tensor, None]:
        return self.embed(y).unflatten(1, (self.length, -1)), None


class ConditionedUNet(nn.Module):
    """The UNet and the encoder of its condition as one module (one optimizer, EMA and checkpoint)."""

    def __init__(self, unet: UNet, condition: nn.Module, num_classes: int = 0):
        super().__init__()
        self.unet, self.condition, self.num_classes = unet, condition, num_classes
        tokenizer = getattr(condition, "tokenizer", None)
        # the empty prompt's ids: what y=None and classifier-free guidance's unconditional half read
        self.register_buffer("null_prompt", tokenizer([""]) if tokenizer else None, persistent=False)

    @property
    def text(self) -> bool:
        return self.null_prompt is not None

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Prompt token ids, the y of a text-conditioned network."""
        if not self.text:
            raise ValueError("this network is conditioned on classes, not prompts")
        return self.condition.tokenizer(prompts).to(self.null_prompt.device)

    def null_condition(self) -> Optional[Tensor]:
        """One example's null y where it is not the class index num_classes: the empty prompt's ids."""
        return self.null_prompt

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        if y is None:
            y = (self.null_prompt.expand(len(x), -1) if self.text else
                 torch.full((len(x),), self.num_classes, dtype=torch.long, device=x.device))
        context, mask = self.condition(y)
        return self.unet(x, t, None, context, mask)


def cross_attention_sizes(unet_cfg, conditioning: str) -> list[int]:
    """The feature-map sizes with cross-attention besides the middle: unet.cross_attention_resolutions,
    null = the self-attention sizes."""
    given = unet_cfg.get("cross_attention_resolutions")
    if given is not None:
        return list(given)
    return list(unet_cfg.attention_resolutions) if conditioning in CROSS_ATTENTION_CONDITIONINGS else []


def build_conditioned_unet(unet_cfg, text_cfg, conditioning: str, in_channels: int, image_size: int,
                           num_classes: int, vocabulary: Optional[Sequence[str]] = None) -> ConditionedUNet:
    """The UNet with cross-attention and its condition's encoder: class tokens, the learned text
    encoder over `vocabulary` (the training captions' words), or CLIP."""
    width = unet_cfg.context_dim
    unet = build_unet(unet_cfg, in_channels, image_size, 0, cross_attention_sizes(unet_cfg, conditioning))
    if conditioning == "class_tokens":
        return ConditionedUNet(unet, ClassTokens(num_classes, width), num_classes)
    if text_cfg.name == "clip":
        encoder: nn.Module = ClipTextEncoder(text_cfg.pretrained, width, text_cfg.max_length, text_cfg.freeze)
    else:
        if vocabulary is None:
            raise ValueError("the learned text encoder needs its vocabulary")
        encoder = LearnedTextEncoder(WordTokenizer(vocabulary, text_cfg.max_length), width, text_cfg.layers,
                                     text_cfg.heads)
    return ConditionedUNet(unet, encoder)
