"""guidance=auto, the default, through run.py: classifier-free guidance where the model takes it
(trained, or to be trained, with a label or prompt it can drop), none elsewhere; the plan names
the choice and metrics.json records it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_shapes_folder, read_metrics, run_py, tiny_overrides

pytestmark = pytest.mark.slow


def _sample_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("sample "))


def _dry(*args: str) -> str:
    proc = run_py(*args, "dry_run=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _sample_line(proc.stdout)


@pytest.fixture(scope="module")
def unguided_ckpt(tmp_path_factory, shapes_dir):
    """A class-conditional model trained without label dropout (guidance=none)."""
    base = tmp_path_factory.mktemp("none")
    proc = run_py(*tiny_overrides(shapes_dir, base / "cache"), "guidance=none", "sample.num_images=0",
                  f"hydra.run.dir={base / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "run" / "checkpoints" / "last.pt"


def test_the_plan_chooses_by_what_the_model_will_be_trained_with(shapes_dir, tmp_path):
    base = tiny_overrides(shapes_dir, tmp_path / "cache")
    assert _dry(*base).endswith("guidance=cfg x1.5 (auto)")
    assert _dry(*base, "guidance.scale=3").endswith("guidance=cfg x3 (auto)")
    assert _dry(*base, "objective.class_conditional=false").endswith("guidance=none (auto)")
    assert _dry(*base, "guidance=none").endswith("guidance=none")
    flat = make_shapes_folder(tmp_path / "flat")
    for png in flat.rglob("*.png"):  # one folder of images: unlabelled
        png.rename(flat / f"{png.parent.name}_{png.name}")
    assert _dry(*tiny_overrides(flat, tmp_path / "cache")).endswith("guidance=none (auto)")


def test_a_default_run_trains_with_label_dropout_and_samples_guided(trained, unguided_ckpt, tmp_path):
    """The default run's model takes CFG; sampling it with the default equals guidance=cfg and differs from
    guidance=none; a model trained without label dropout samples unguided by default, and a checkpoint's
    record says what was used."""
    state = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    assert state["meta"]["label_dropout"] == pytest.approx(0.1)
    assert state["config"]["guidance"]["name"] == "cfg"
    assert read_metrics(trained)["sampled_with"]["guidance"] == "cfg"

    def sample(ckpt, *overrides):
        run_dir = tmp_path / str(len(list(tmp_path.iterdir())))
        proc = run_py("mode=sample", f"ckpt={ckpt}", "sampler.steps=5", "sample.num_images=4", "device=cpu",
                      "train.progress=false", *overrides, f"hydra.run.dir={run_dir}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return _sample_line(proc.stdout), np.load(run_dir / "samples" / "samples.npz")["images"], read_metrics(run_dir)

    line, auto, metrics = sample(trained / "checkpoints" / "last.pt")
    assert line.endswith("guidance=cfg x1.5 (auto)") and metrics["sampled_with"]["guidance"] == "cfg"
    _, explicit, _ = sample(trained / "checkpoints" / "last.pt", "guidance=cfg")
    _, unguided, _ = sample(trained / "checkpoints" / "last.pt", "guidance=none")
    assert np.array_equal(auto, explicit) and not np.array_equal(auto, unguided)

    line, _, metrics = sample(unguided_ckpt)
    assert line.endswith("guidance=none (auto)") and metrics["sampled_with"]["guidance"] == "none"


def test_the_api_guides_as_the_command_does(trained):
    import difflab

    pipe = difflab.load(trained)
    auto = pipe.sample(4, steps=5).images
    assert torch.equal(auto, pipe.sample(4, steps=5, guidance_scale=1.5).images)
    assert not torch.equal(auto, pipe.sample(4, steps=5, guidance_scale=0).images)
    assert pipe.sampling_config(4, steps=5).guidance.name == "cfg"
    assert pipe.sampling_config(4, steps=5, guidance_scale=0).guidance.name == "none"
