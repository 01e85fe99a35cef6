"""Pictures a person looks at: sample grids (one row per class), the denoising GIF and the
loss curve."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from difflab.checkpoint import atomic_write
from difflab.diffusion.process import parse_band


def class_rows(images: Tensor, labels: Optional[Tensor], per_row: int = 10, max_rows: int = 10) -> Tensor:
    """Up to `per_row` images of each class, one class per row (uint8 N,C,H,W in, grid out).
    Without labels: the first per_row * max_rows images."""
    if labels is None:
        return make_grid(images[: per_row * max_rows], nrow=per_row, padding=2, pad_value=255)
    rows = []
    for c in labels.unique().tolist()[:max_rows]:
        chosen = images[labels == c][:per_row]
        pad = per_row - len(chosen)
        if pad:
            chosen = torch.cat([chosen, torch.full((pad, *chosen.shape[1:]), 255, dtype=chosen.dtype)])
        rows.append(chosen)
    return make_grid(torch.cat(rows), nrow=per_row, padding=2, pad_value=255)


def save_png(grid: Tensor, path: str | Path, min_size: int = 256) -> None:
    """Write a uint8 C,H,W grid; small grids are enlarged (nearest) so they are readable."""
    img = Image.fromarray(rearrange(grid, "c h w -> h w c").squeeze(-1).cpu().numpy())
    scale = max(1, -(-min_size // max(img.size)))  # ceil
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def save_pairs(top: Tensor, bottom: Tensor, path: str | Path, per_row: int = 8) -> None:
    """Pairs of uint8 images, each `top` image above its `bottom` one, `per_row` pairs a row."""
    per_row = min(per_row, len(top))
    blank = torch.full((-len(top) % per_row, *top.shape[1:]), 128, dtype=top.dtype)  # fills the last row
    top, bottom = torch.cat([top, blank]), torch.cat([bottom, blank])
    rows = [half[start:start + per_row] for start in range(0, len(top), per_row) for half in (top, bottom)]
    save_png(make_grid(torch.cat(rows), nrow=per_row, padding=2, pad_value=128), path)


def save_denoising(frames: Sequence[Tensor], folder: str | Path, gif_path: str | Path, duration_ms: int = 120) -> None:
    """Each frame is a uint8 C,H,W grid; writes frame_XXX.png files and an animated GIF whose
    last frame (the result) is held longer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pil = []
    for i, frame in enumerate(frames):
        save_png(frame, folder / f"frame_{i:03d}.png", min_size=1024)
        pil.append(Image.open(folder / f"frame_{i:03d}.png").convert("P"))
    durations = [duration_ms] * (len(pil) - 1) + [duration_ms * 15]
    atomic_write(gif_path, lambda f: pil[0].save(f, format="GIF", save_all=True, append_images=pil[1:],
                                                 duration=durations, loop=0))


def save_figure(fig, path: str | Path) -> None:
    """A matplotlib figure to `path`, in the format its suffix names, and closed."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix[1:]))
    plt.close(fig)


def save_loss_curve(history: Sequence[tuple[int, float]], path: str | Path,
                    val_history: Sequence[tuple[int, float]] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if history:
        steps, losses = zip(*history)
        ax.plot(steps, losses, label="train")
    if val_history:
        steps, losses = zip(*val_history)
        ax.plot(steps, losses, "o-", label="validation (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_accuracy_curve(by_band: dict[str, float], path: str | Path) -> None:
    """The noise-aware classifier's held-out accuracy against the noise level (process.level_bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = {parse_band(b): a for b, a in by_band.items() if b != "t=0"}
    name = next(iter(bands))[0] if bands else "t"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([(lo * hi) ** 0.5 if name == "sigma" else (lo + hi) / 2 for _, lo, hi in bands], list(bands.values()), "o-")
    if name == "sigma":
        ax.set_xscale("log")
    ax.set_xlabel(f"noise level {name} (band centre)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
