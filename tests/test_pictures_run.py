"""The pictures a run leaves beside its samples: one PNG per sample (sample.save_png), real
images of each class beside generated ones, and a real image at increasing noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_py, tiny_overrides
from PIL import Image

from difflab.api import _compose
from difflab.diffusion.spacing import index_spacing, spacing_of
from difflab.pictures import save_real_vs_generated
from difflab.sampling import schedule_points
from difflab.trained import build_process


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
    with Image.open(run_dir / "schedule.png") as img:
        assert img.width > 300


def test_real_vs_generated_without_labels(tmp_path):
    real, generated = torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.full((4, 3, 8, 8), 200, dtype=torch.uint8)
    save_real_vs_generated(real, None, generated, None, tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as img:
        assert img.mode == "RGB" and img.width > img.height


def test_the_schedule_plot_places_the_sampler_steps_on_the_curve():
    cfg = _compose(["objective=ddpm", "schedule.T=50", "sampler=ddim", "sampler.steps=5"])
    process = build_process(cfg)
    t, curve, steps_t, steps = schedule_points(process, cfg.sampler)
    assert len(t) == 50 and np.all(np.diff(curve) < 0)  # log-SNR falls from data to noise
    indices = index_spacing(spacing_of(process, cfg.sampler.spacing), 50, 5)
    assert np.allclose(steps_t, np.array(indices) / 49, atol=1e-6)  # each step sits at its own index
    assert np.allclose(np.interp(steps_t, t, curve), steps, atol=1e-4)
