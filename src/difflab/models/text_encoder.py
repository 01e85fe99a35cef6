"""Prompts to context tokens: a tokenizer (prompt -> fixed-length token ids) and an encoder (ids ->
(B, L, width) tokens and the mask of the real ones) that the UNet's cross-attention reads.

`learned` is offline and small: a word-level vocabulary of the training captions (kept in the
checkpoint as a plain list of words) and a transformer trained with the denoiser. `clip` is a
pretrained CLIP text model through `transformers`, frozen by default, whose hidden states are
computed once per distinct prompt and kept (a data set's captions are a few hundred at most).
Every prompt starts with a start token, so the empty prompt, the null condition of
classifier-free guidance, is one real token and never an all-masked row.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from difflab.errors import UserError

PAD, UNKNOWN, START = "<pad>", "<unk>", "<start>"
SPECIAL = (PAD, UNKNOWN, START)
WORDS = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: "A handwritten 7!" -> a, handwritten, 7, !"""
    return WORDS.findall(text.lower())


class WordTokenizer:
    """Word-level ids: <pad>=0, <unk>=1, <start>=2, then the vocabulary's words; a prompt is
    <start> + its words (unknown ones as <unk>), cut or padded to max_length."""

    pad_id = 0

    def __init__(self, vocabulary: Sequence[str], max_length: int):
        if list(vocabulary[:len(SPECIAL)]) != list(SPECIAL):
            raise ValueError(f"a vocabulary starts with {SPECIAL}")
        self.vocabulary, self.max_length = list(vocabulary), max_length
        self.index = {w: i for i, w in enumerate(self.vocabulary)}

    @classmethod
    def from_captions(cls, captions: Sequence[str], max_length: int) -> WordTokenizer:
        return cls([*SPECIAL, *sorted({w for c in captions for w in words(c)})], max_length)

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = [self.index[START], *(self.index.get(w, self.index[UNKNOWN]) for w in words(prompt))]
            tokens = tokens[:self.max_length]
            ids[row, :len(tokens)] = torch.tensor(tokens)
        return ids

    def mask(self, ids: Tensor) -> Tensor:
        return ids != self.pad_id


class LearnedTextEncoder(nn.Module):
    """Token and position embeddings, a pre-norm transformer encoder over the real tokens, a final LayerNorm."""

    def __init__(self, tokenizer: WordTokenizer, width: int, layers: int, heads: int):
        super().__init__()
        if width % heads:
            raise UserError(f"text_encoder.heads={heads} does not divide unet.context_dim={width}: use a divisor of it.")
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(len(tokenizer.vocabulary), width)
        self.position = nn.Parameter(torch.randn(tokenizer.max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.tokenizer.mask(ids)
        h = self.embed(ids) + self.position[: ids.shape[1]]
        return self.norm(self.transformer(h, src_key_padding_mask=~mask)), mask


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("text_encoder=clip needs the transformers package: pip install 'difflab[text]'.") from None
    return transformers


def clip_files(pretrained: str) -> Path:
    """The local folder of a CLIP text model: the folder given, or the Hugging Face cache's copy of
    the hub name; a UserError when neither holds one (nothing is downloaded)."""
    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserError(f"text_encoder.pretrained={pretrained} is a folder without a config.json: point it to a "
                            "folder written by CLIPTextModel.save_pretrained (with its tokenizer).")
        return folder
    require_transformers()
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(pretrained, "config.json")
    if not isinstance(found, str):
        raise UserError(f"text_encoder.pretrained={pretrained} is neither a local folder nor in the Hugging Face cache: "
                        f"download it first (huggingface-cli download {pretrained}) or give a local folder.")
    return Path(found).parent


@functools.lru_cache(maxsize=2)
def load_clip(pretrained: str):
    """(text model, tokenizer) of a CLIP folder or cached hub name, loaded once per process."""
    transformers = require_transformers()
    folder = clip_files(pretrained)
    try:
        with torch.device("cpu"):  # real weights even inside the plan's meta-device shape checks (this is cached)
            model = transformers.CLIPTextModel.from_pretrained(folder)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"text_encoder.pretrained={pretrained} could not be loaded as a CLIP text model and tokenizer "
                        f"({str(e).splitlines()[0]}): give a folder with both.") from None
    return model.eval().requires_grad_(False), tokenizer


class ClipTokenizer:
    """CLIP's BPE ids padded to max_length; a token is real up to and including the first end token."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = min(max_length, tokenizer.model_max_length)
        self.pad_id, self.end_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    def mask(self, ids: Tensor) -> Tensor:
        end = ids == self.end_id
        return (end.cumsum(1) - end.long()) == 0  # no end token before this position


class ClipTextEncoder(nn.Module):
    """CLIP's last hidden states, projected to the UNet's context width by a trained linear layer.
    Frozen (the default), the CLIP model stays out of this module's parameters, checkpoints and
    EMA copies, and each distinct prompt's hidden states are computed once (`_hidden`)."""

    def __init__(self, pretrained: str, width: int, max_length: int, freeze: bool = True):
        super().__init__()
        model, tokenizer = load_clip(pretrained)
        self.pretrained, self.freeze = pretrained, freeze
        self.tokenizer = ClipTokenizer(tokenizer, min(max_length, model.config.max_position_embeddings))
        if not freeze:
            self.model = type(model).from_pretrained(clip_files(pretrained))  # its own trainable copy
        self.proj = nn.Linear(model.config.hidden_size, width)

    def _run(self, model, ids: Tensor, mask: Tensor) -> Tensor:
        return model(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.tokenizer.mask(ids)
        if not self.freeze:
            hidden = self._run(self.model, ids, mask)
        else:
            distinct, inverse = torch.unique(ids.cpu(), dim=0, return_inverse=True)
            hidden = torch.stack([_hidden(self.pretrained, tuple(row.tolist())) for row in distinct])[inverse]
        return self.proj(hidden.to(ids.device, self.proj.weight.dtype)), mask


@functools.lru_cache(maxsize=65536)
def _hidden(pretrained: str, ids: tuple[int, ...]) -> Tensor:
    """The frozen CLIP model's hidden states of one prompt's ids, (L, hidden), on the CPU."""
    model, tokenizer = load_clip(pretrained)
    row = torch.tensor([ids])
    mask = ClipTokenizer(tokenizer, len(ids)).mask(row)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return model(input_ids=row, attention_mask=mask.long()).last_hidden_state[0].float()
