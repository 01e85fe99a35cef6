"""Pictures a person looks at: sample grids (one row per class), the denoising GIF, the loss
curve, real images beside generated ones, and one image noised at increasing levels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from difflab.checkpoint import atomic_write
from difflab.diffusion.process import parse_band

EMPTY = 64  # the grey of a grid slot no sample fills (white would outweigh the samples)


@dataclass
class Grid:
    """A sample grid and what each of its rows shows."""

    image: Tensor  # uint8 C,H,W
    rows: list[str]


def class_grid(images: Tensor, labels: Optional[Tensor], per_row: int = 10, max_rows: int = 10,
               names: Optional[Sequence[str]] = None) -> Grid:
    """One row per class with up to `per_row` of its images, as wide as the most images a class
    has; with more classes than `max_rows`, one image of each class (a 10 x 10 grid of 100 classes).
    Without labels: the first images, as many columns as there are up to `per_row`."""
    name = (lambda c: names[c] if names is not None and 0 <= c < len(names) else str(c))
    if labels is None:
        shown = images[: per_row * max_rows]
        cols = min(per_row, len(shown))
        return Grid(make_grid(shown, nrow=cols, padding=2, pad_value=255), [""] * -(-len(shown) // cols))
    classes = labels.unique().tolist()
    if len(classes) > max_rows:  # one of each class, row after row
        classes = classes[: per_row * max_rows]
        firsts = torch.stack([images[labels == c][0] for c in classes])
        cols = min(per_row, len(classes))
        rows = [f"{name(classes[i])}-{name(classes[min(i + cols, len(classes)) - 1])}" for i in range(0, len(classes), cols)]
        return Grid(_filled_grid(firsts, cols), rows)
    cols = min(per_row, max(int((labels == c).sum()) for c in classes))
    chosen = []
    for c in classes:
        mine = images[labels == c][:cols]
        chosen.append(torch.cat([mine, torch.full((cols - len(mine), *mine.shape[1:]), EMPTY, dtype=mine.dtype)]))
    return Grid(make_grid(torch.cat(chosen), nrow=cols, padding=2, pad_value=255), [name(c) for c in classes])


def _filled_grid(images: Tensor, cols: int) -> Tensor:
    fill = torch.full((-len(images) % cols, *images.shape[1:]), EMPTY, dtype=images.dtype)
    return make_grid(torch.cat([images, fill]), nrow=cols, padding=2, pad_value=255)


def class_rows(images: Tensor, labels: Optional[Tensor], per_row: int = 10, max_rows: int = 10) -> Tensor:
    """class_grid's picture alone (TensorBoard's image cards)."""
    return class_grid(images, labels, per_row, max_rows).image


def _margin(rows: Sequence[str]) -> int:
    """Pixels the longest row name needs at the left of a grid (0 without names)."""
    if not any(rows):
        return 0
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    return 8 + max(int(draw.textlength(r, font=ImageFont.load_default())) for r in rows)


def save_grid(grid: Grid, path: str | Path, min_size: int = 256, margin: Optional[int] = None) -> None:
    """The grid enlarged (nearest) to at least `min_size`, each row's name in a margin at its left
    (`margin` pixels wide, or as wide as the longest name needs)."""
    img = _named_rows(_enlarged(grid.image, min_size), grid.rows, _margin(grid.rows) if margin is None else margin)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def _named_rows(img: Image.Image, rows: Sequence[str], margin: int) -> Image.Image:
    """`img` with each row's name in a margin `margin` pixels wide at its left."""
    if not margin:
        return img
    font = ImageFont.load_default()
    labelled = Image.new(img.mode, (img.width + margin, img.height), color=255 if img.mode == "L" else (255,) * 3)
    labelled.paste(img, (margin, 0))
    draw, row_height = ImageDraw.Draw(labelled), img.height / len(rows)
    for i, row in enumerate(rows):
        draw.text((4, int((i + 0.5) * row_height) - 5), row, fill=0 if img.mode == "L" else (0, 0, 0), font=font)
    return labelled


def _enlarged(grid: Tensor, min_size: int) -> Image.Image:
    img = Image.fromarray(rearrange(grid, "c h w -> h w c").squeeze(-1).cpu().numpy())
    scale = max(1, -(-min_size // max(img.size)))  # ceil
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_png(grid: Tensor, path: str | Path, min_size: int = 256) -> None:
    """Write a uint8 C,H,W grid; small grids are enlarged (nearest) so they are readable."""
    img = _enlarged(grid, min_size)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def save_pairs(top: Tensor, bottom: Tensor, path: str | Path, per_row: int = 8) -> None:
    """Pairs of uint8 images, each `top` image above its `bottom` one, `per_row` pairs a row."""
    per_row = min(per_row, len(top))
    blank = torch.full((-len(top) % per_row, *top.shape[1:]), 128, dtype=top.dtype)  # fills the last row
    top, bottom = torch.cat([top, blank]), torch.cat([bottom, blank])
    rows = [half[start:start + per_row] for start in range(0, len(top), per_row) for half in (top, bottom)]
    save_png(make_grid(torch.cat(rows), nrow=per_row, padding=2, pad_value=128), path)


def save_denoising(frames: Sequence[Grid], folder: str | Path, gif_path: str | Path, duration_ms: int = 120) -> None:
    """Each frame is a grid (x_t above the predicted x0, rows named); writes frame_XXX.png files
    and an animated GIF whose last frame (the result) is held longer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pil, margin = [], max(_margin(frame.rows) for frame in frames)  # one width: GIF frames are one size
    for i, frame in enumerate(frames):
        save_grid(frame, folder / f"frame_{i:03d}.png", min_size=1024, margin=margin)
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


def _with_header(img: Image.Image, header: Sequence[tuple[str, float]], height: int = 16) -> Image.Image:
    """`img` under a strip of titles, each centred at its fraction of the width."""
    white = 255 if img.mode == "L" else (255,) * 3
    out = Image.new(img.mode, (img.width, img.height + height), color=white)
    out.paste(img, (0, height))
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    for text, at in header:
        draw.text((int(at * img.width - draw.textlength(text, font=font) / 2), 2), text,
                  fill=0 if img.mode == "L" else (0, 0, 0), font=font)
    return out


def _labelled_rows(rows: Tensor, names: Sequence[str], header: Sequence[tuple[str, float]], path: str | Path,
                   min_size: int = 512) -> None:
    """rows (R, K, C, H, W) as a grid, each row's name at its left, the header over the columns
    (at fractions of the grid's width)."""
    grid = Grid(make_grid(rearrange(rows, "r k c h w -> (r k) c h w"), nrow=rows.shape[1], padding=2, pad_value=255),
                list(names))
    margin = _margin(grid.rows)
    labelled = _named_rows(_enlarged(grid.image, min_size), grid.rows, margin)
    shift = margin / labelled.width
    labelled = _with_header(labelled, [(text, shift + at * (1 - shift)) for text, at in header])
    atomic_write(path, lambda f: labelled.save(f, format="PNG"))


def save_real_vs_generated(real: Tensor, real_labels: Optional[Tensor], generated: Tensor,
                           labels: Optional[Tensor], path: str | Path, per_class: int = 6,
                           names: Optional[Sequence[str]] = None) -> None:
    """One row per generated class: `per_class` real images of the class, a gap, then as many
    generated ones (uint8 N,C,H,W); without labels, a row of real images and one of generated."""
    blank = torch.full((1, *generated.shape[1:]), 255, dtype=generated.dtype)

    def first(images: Tensor, n: int) -> Tensor:  # n images, grey slots where the class has fewer
        return torch.cat([images[:n], torch.full((max(0, n - len(images)), *generated.shape[1:]), EMPTY,
                                                 dtype=generated.dtype)])

    if labels is None or real_labels is None:
        k = min(2 * per_class, len(generated))
        rows = torch.stack([torch.cat([first(real, k), blank]), torch.cat([first(generated, k), blank])])
        return _labelled_rows(rows, ["real", "generated"], [], path)
    classes = labels.unique().tolist()[:10]
    name = (lambda c: names[c] if names is not None and 0 <= c < len(names) else str(c))
    rows = torch.stack([torch.cat([first(real[real_labels == c], per_class), blank,
                                   first(generated[labels == c], per_class)]) for c in classes])
    half = per_class / (2 * per_class + 1)
    _labelled_rows(rows, [name(c) for c in classes], [("real", half / 2), ("generated", 1 - half / 2)], path)


def save_noising_strip(frames: Tensor, levels: Sequence[str], names: Sequence[str], path: str | Path) -> None:
    """frames (R, L, C, H, W) uint8: each row one image at increasing noise, columns named by `levels`."""
    step = 1 / len(levels)
    _labelled_rows(frames, names, [(text, (i + 0.5) * step) for i, text in enumerate(levels)], path, min_size=768)
