"""The pictures a run leaves beside its samples: one PNG per sample (sample.save_png), real
images of each class beside generated ones, and a real image at increasing noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_py, tiny_overrides
from PIL import Image

from difflab.pictures import save_real_vs_generated


@pytest.mark.slow
def test_a_run_writes_each_sample_and_the_data_pictures(tmp_path, shapes_dir):
    run_dir = tmp_path / "run"
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "train.threads=1", "sample.save_png=true",
                  "sample.gif=false", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = np.load(run_dir / "samples" / "samples.npz")
    names = ["ring", "square"]  # the folder's classes, in order
    files = sorted((run_dir / "samples" / "images").iterdir())
    assert [p.name for p in files] == [f"{i:05d}_{names[label]}.png" for i, label in enumerate(samples["labels"])]
    for path, image in zip(files, samples["images"]):
        assert np.array_equal(np.asarray(Image.open(path)), image[..., 0])  # the sample itself, 1 channel
    with Image.open(run_dir / "samples" / "real_vs_generated.png") as img:
        assert img.width > 2 * img.height > 100  # two class rows of 6 real + 6 generated images
    with Image.open(run_dir / "samples" / "forward_noising.png") as img:
        assert img.width > 3 * img.height > 100  # two rows of 8 noise levels


def test_real_vs_generated_without_labels(tmp_path):
    real, generated = torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.full((4, 3, 8, 8), 200, dtype=torch.uint8)
    save_real_vs_generated(real, None, generated, None, tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as img:
        assert img.mode == "RGB" and img.width > img.height
