"""mode=classifier, mode=joint and guided sampling end to end: `python run.py` on tiny configs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import nhwc_convolutions, plan_sources, read_metrics, run_py, tiny_overrides

from difflab.trained import load_classifier

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, shapes_dir, cache):
    """A classifier trained long enough to read the two shapes when they are clean."""
    run_dir = tmp_path_factory.mktemp("clf") / "run"
    proc = run_py(*tiny_overrides(shapes_dir, cache), "mode=classifier", "classifier.max_steps=60",
                  "classifier.lr=3e-3", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_classifier_mode_reports_accuracy_by_band_of_t(classifier_run):
    m = read_metrics(classifier_run)
    assert m["stage"] == "classifier" and m["trained"] is True and m["steps"] == 60
    by_t = m["classifier_accuracy_by_t"]
    assert "t=0" in by_t and len(by_t) == 1 + 10
    assert all(0 <= v <= 1 for v in by_t.values())
    assert m["classifier_accuracy_clean"] >= 0.9  # ring vs square, clean
    assert by_t["45-49"] < m["classifier_accuracy_clean"]  # nearly pure noise reads worse
    assert (classifier_run / "classifier_accuracy.png").is_file()
    state = torch.load(classifier_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["stage"] == "classifier"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(classifier_run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert len(acc.Scalars("classifier/accuracy_by_t")) == 10


def test_a_loaded_classifier_guides_in_the_layout_it_was_trained_in(classifier_run):
    """Trained channels_last, its gradient for guidance is 1.5x faster on NHWC weights (2 CPU cores), and the same."""
    classifier, _, _ = load_classifier(classifier_run / "checkpoints" / "last.pt", torch.device("cpu"))
    assert all(nhwc_convolutions(classifier))
    plain = copy.deepcopy(classifier).to(memory_format=torch.contiguous_format)
    x, t = torch.randn(4, 1, 16, 16), torch.rand(4)
    gradients = [torch.autograd.grad(net(x.requires_grad_(True), t).logsumexp(1).sum(), x)[0] for net in (classifier, plain)]
    torch.testing.assert_close(*gradients, atol=1e-5, rtol=1e-5)


def test_guided_sampling_finds_the_cached_classifier(classifier_run, shapes_dir, cache, tmp_path):
    """guidance=classifier in a diffusion run takes the classifier mode=classifier trained."""
    proc = run_py(*tiny_overrides(shapes_dir, cache), "classifier.max_steps=60", "classifier.lr=3e-3",
                  "guidance=classifier", "guidance.scale=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(tmp_path)["classifier_source"] == "cache"
    for folder in ("samples", "classifier_guided_samples"):
        data = np.load(tmp_path / folder / "samples.npz")
        assert data["images"].shape == (8, 16, 16, 1)
        assert sorted(np.bincount(data["labels"]).tolist()) == [4, 4]
    assert (tmp_path / "classifier_guided_samples" / "grid.png").is_file()
    assert 0 <= read_metrics(tmp_path)["sample_class_accuracy_t0"] <= 1


def test_joint_trains_both_and_a_scale_sweep_reuses_it(shapes_dir, cache, tmp_path):
    first, second = tmp_path / "joint", tmp_path / "joint_scale5"
    proc = run_py(*tiny_overrides(shapes_dir, cache), "mode=joint", f"hydra.run.dir={first}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(first)
    assert m["stage"] == "joint" and m["trained"] is True
    assert "t=0" in m["classifier_accuracy_by_t"]
    assert (first / "classifier_guided_samples" / "grid.png").is_file()  # joint samples with guidance
    state = torch.load(first / "checkpoints" / "last.pt", weights_only=True)
    assert any(k.startswith("classifier.") for k in state["ema"]["model"])
    assert any(k.startswith("unet.") for k in state["ema"]["model"])

    proc = run_py(*tiny_overrides(shapes_dir, cache), "mode=joint", "guidance.scale=5", f"hydra.run.dir={second}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(second)["trained"] is False  # the scale is a sampling-only setting
    assert not (second / "checkpoints").exists()

    # a joint checkpoint carries its classifier into mode=sample
    out = tmp_path / "sample"
    proc = run_py(*tiny_overrides(shapes_dir, cache), "mode=sample", f"ckpt={first}/checkpoints/last.pt",
                  "guidance=classifier", "sample.labels=[1,1,0]", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(out / "classifier_guided_samples" / "samples.npz")["labels"].tolist()[:3] == [1, 1, 0]


def test_guidance_without_a_classifier_trains_one_first(shapes_dir, tmp_path):
    """No classifier given, in the run or cached: the plan adds its training (mode=classifier's
    settings) before sampling, and a second run finds both models cached."""
    base = [*tiny_overrides(shapes_dir, tmp_path / "cache"), "guidance=classifier", "guidance.scale=2"]
    dry = run_py(*base, "dry_run=true")
    assert dry.returncode == 0, dry.stderr[-3000:]
    rows = plan_sources(dry.stdout)
    assert rows["classifier"] == "train" and rows["diffusion model"] == "train"
    first = tmp_path / "first"
    proc = run_py(*base, f"hydra.run.dir={first}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(first)
    assert m["classifier_source"] == "trained" and m["classifier_key"]
    assert (first / "classifier" / "checkpoints" / "last.pt").is_file()
    assert (first / "classifier_guided_samples" / "grid.png").is_file()
    steps = [s["name"] for s in json.loads((first / "plan.json").read_text())["steps"]]
    assert steps.index("classifier") < steps.index("sample")
    dry = run_py(*base, "dry_run=true")
    assert plan_sources(dry.stdout) == {**rows, "classifier": "cache", "diffusion model": "cache"}


def test_ckpt_classifier_must_be_a_classifier(shapes_dir, classifier_run, tmp_path):
    diffusion_ckpt = tmp_path / "d"
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "sample.num_images=0",
                  f"hydra.run.dir={diffusion_ckpt}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "mode=sample", "guidance=classifier",
                  f"ckpt={diffusion_ckpt}/checkpoints/last.pt", f"ckpt.classifier={diffusion_ckpt}/checkpoints/last.pt",
                  f"hydra.run.dir={tmp_path / 's'}")
    assert proc.returncode == 2 and "not a classifier" in proc.stderr
    # the real classifier, passed explicitly, works
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "mode=sample", "guidance=classifier",
                  f"ckpt={diffusion_ckpt}/checkpoints/last.pt", f"ckpt.classifier={classifier_run}/checkpoints/last.pt",
                  f"hydra.run.dir={tmp_path / 's2'}")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_classifier_needs_labelled_data(tmp_path):
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(12):
        Image.fromarray(np.full((16, 16), i * 20, np.uint8)).save(flat / f"{i}.png")
    proc = run_py(*tiny_overrides(flat, tmp_path / "cache"), "mode=classifier", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "at least 2 classes" in proc.stderr


def test_joint_in_latent_space_guides_with_a_latent_classifier(shapes_dir, tmp_path):
    """With an autoencoder, the classifier reads (scaled) latents: trained, guided and scored there."""
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "mode=joint", "autoencoder=kl",
                  "autoencoder.channels=16", "autoencoder.train.max_steps=4", "autoencoder.train.batch_size=8",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(tmp_path / "run")
    assert m["stage"] == "joint" and m["latent_shape"] == [2, 4, 4]
    assert 0 <= m["sample_class_accuracy_t0"] <= 1
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["ema"]["model"]["classifier.conv_in.weight"].shape[1] == 2  # latent channels in
    assert np.load(tmp_path / "run" / "classifier_guided_samples" / "samples.npz")["images"].shape == (8, 16, 16, 1)
