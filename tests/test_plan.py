"""The run plan through run.py as a user types it: mistakes stop before any work with one
sentence, dry_run=true prints the plan and writes nothing, every step's source is the one the
run then takes, and train.init_from starts a stage from a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, plan_sources, read_metrics, run_py, tiny_overrides

pytestmark = pytest.mark.slow

AE = ["autoencoder=kl", "autoencoder.channels=16", "autoencoder.train.max_steps=8", "autoencoder.train.batch_size=8",
      "autoencoder.train.warmup_steps=2", "train.threads=1"]


def _assert_stops_at_start(proc, run_dir, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, proc.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists()  # nothing was trained
    assert "step 1 " not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def diffusion_ckpt(tmp_path_factory, shapes_dir):
    """A tiny trained diffusion model (its cache included)."""
    base = tmp_path_factory.mktemp("plan")
    run_dir = base / "trained"
    proc = run_py(*tiny_overrides(shapes_dir, base / "cache"), "sample.num_images=0", "guidance=none",
                  f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / "last.pt"


@pytest.mark.parametrize("overrides, needle", [
    (["sampler.steps=0"], "sampler.steps=0 must be 1 or more"),
    (["sampler.steps=5000"], "sampler.steps=5000 must be between 1 and the model's schedule.T=50"),
    (["guidance=cfg", "guidance.p_uncond=0"], "guidance=cfg needs a model trained with label dropout"),
    (["guidance=cfg", "objective.class_conditional=false"], "(it is unconditional)"),
    (["sample.labels=[0,7]"], "sample.labels=[0, 7] must be non-empty class ids in 0..1"),
    (["sample.labels=seven"], "sample.labels='seven' is not understood"),
    (["sample.labels=[-1]"], "sample.labels=[-1] must be non-empty class ids in 0..1"),
    (["sample.labels={a:1}"], "sample.labels={'a': 1} is not understood"),
    (["guidance=classifier", "guidance.scale=nan"], "guidance.scale=nan is not a finite number"),
    (["train.lr=inf"], "train.lr=inf is not a finite number"),
    (["+experimnt=typo"], "`experimnt` is not a setting of difflab"),
    (["train.init_from=/nonexistent/last.pt"], "does not exist"),
    (["train.resume=/nonexistent/last.pt"], "train.resume=/nonexistent/last.pt does not exist"),
    (["mode=evaluate", "ckpt=/nonexistent/last.pt", "eval.num_samples=8"], "does not exist"),
    (["mode=sample"], "mode=sample needs a trained model"),
    (["objective.min_snr_gamma=-1"], "objective.min_snr_gamma=-1.0 must be positive"),
    (["unet.channel_mults=[]"], "unet.channel_mults=[] leaves the network without levels"),
    (["schedule.beta_end=2"], "schedule.beta_end=2.0 must be in (0, 1)"),
    (["schedule.T=1"], "schedule.T=1 must be 2 or more"),
    (["train.ema.decays=[0.9,1.5]"], "has 1.5, but each element must be in [0, 1)"),
])
def test_mistakes_stop_before_any_work(shapes_dir, tmp_path, overrides, needle):
    run_dir = tmp_path / "run"
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), *overrides, f"hydra.run.dir={run_dir}")
    _assert_stops_at_start(proc, run_dir, needle)


def test_output_and_cache_folders_that_cannot_be_folders_are_refused(shapes_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    run_dir = tmp_path / "run"
    cases = [([f"hydra.run.dir={blocker}"], f"hydra.run.dir={blocker} is a file, not a folder"),
             ([f"paths.cache_dir={blocker / 'cache'}", f"hydra.run.dir={run_dir}"], "cannot be a folder")]
    for overrides, needle in cases:
        proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), *overrides)
        _assert_stops_at_start(proc, run_dir, needle)


def test_guidance_needs_classes_before_training(tmp_path):
    from conftest import make_shapes_folder

    flat = make_shapes_folder(tmp_path / "shapes")
    for png in flat.rglob("*.png"):  # one folder of images: unlabelled
        png.rename(flat / f"{png.parent.name}_{png.name}")
    run_dir = tmp_path / "run"
    proc = run_py(*tiny_overrides(flat, tmp_path / "cache"), "guidance=classifier", f"hydra.run.dir={run_dir}")
    _assert_stops_at_start(proc, run_dir, "guidance=classifier needs a classifier of at least 2 classes")


def test_checkpoints_of_the_wrong_kind_are_refused_at_start(diffusion_ckpt, shapes_dir, tmp_path):
    base = tiny_overrides(shapes_dir, tmp_path / "cache")
    cases = [
        ([*AE, f"ckpt.autoencoder={diffusion_ckpt}"], "holds a 'diffusion' model, not a trained autoencoder"),
        (["guidance=classifier", f"ckpt.classifier={diffusion_ckpt}"], "holds a 'diffusion' model, not a classifier"),
        (["mode=joint", f"train.init_from={REPO / 'pyproject.toml'}"], "could not be read"),
        (["mode=sample", f"ckpt={diffusion_ckpt}", "guidance=cfg"], "it was trained without label dropout"),
        (["mode=sample", f"ckpt={diffusion_ckpt}", "sampler.steps=51"], "must be between 1 and the model's schedule.T=50"),
    ]
    for i, (overrides, needle) in enumerate(cases):
        run_dir = tmp_path / str(i)
        _assert_stops_at_start(run_py(*base, *overrides, f"hydra.run.dir={run_dir}"), run_dir, needle)


def test_dry_run_lists_every_step_and_then_finds_them_cached(shapes_dir, tmp_path):
    """A latent joint run with classifier guidance: the plan before anything exists, the run,
    then the plan again with its prerequisites in the cache."""
    args = [*tiny_overrides(shapes_dir, tmp_path / "cache"), *AE, "mode=joint", "guidance=classifier",
            "guidance.scale=2", "eval.num_samples=8", "eval.classifier_steps=4", "eval.extractors=[classifier]"]
    dry = run_py(*args, "dry_run=true", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert plan_sources(dry.stdout) == {"autoencoder": "train", "joint model": "train", "classifier": "run",
                                        "sample": "new", "evaluation classifier": "train", "evaluate": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, no cache, nothing
    run_dir = tmp_path / "run"
    proc = run_py(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert [s["name"] for s in plan["steps"]] == ["autoencoder", "joint model", "classifier", "sample",
                                                  "evaluation classifier", "evaluate"]
    assert plan["steps"][1]["key"] == read_metrics(run_dir)["artifact_key"]
    assert plan["steps"][0]["key"] == read_metrics(run_dir)["autoencoder_key"]
    again = run_py(*args, "dry_run=true", cwd=tmp_path)
    assert plan_sources(again.stdout) == {"autoencoder": "cache", "joint model": "cache", "classifier": "run",
                                          "sample": "new", "evaluation classifier": "cache", "evaluate": "new"}


def test_dry_run_of_a_sweep_prints_each_job(shapes_dir, tmp_path):
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "-m", "schedule=linear,cosine", "dry_run=true",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("diffusion model") == 2 and "job 1:" in proc.stdout
    assert not (tmp_path / "multirun").exists()


def test_init_from_starts_the_joint_stage_from_the_diffusion_model(diffusion_ckpt, shapes_dir, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from difflab.cli import CONF_DIR
    from difflab.train.classifier_stages import JointStage
    from difflab.train.loop import StepBatches
    from difflab.train.stages import DiffusionStage
    from difflab.trained import load_diffusion_model

    overrides = [*tiny_overrides(shapes_dir, tmp_path / "cache"), "mode=joint", f"train.init_from={diffusion_ckpt}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    stage = JointStage(cfg, tmp_path, torch.device("cpu"))
    teacher = load_diffusion_model(diffusion_ckpt, torch.device("cpu"))
    batch = stage.batch(0, StepBatches(len(stage.train_data), 8, 0))
    losses = []
    for net in (stage.joint.unet, teacher.net):
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(float(DiffusionStage.loss(stage, net, batch)))
    assert losses[0] == losses[1]  # the joint stage's first diffusion loss is the checkpoint's
    fresh = JointStage(OmegaConf.merge(cfg, {"train": {"init_from": None}}), tmp_path, torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        assert float(DiffusionStage.loss(fresh, fresh.joint.unet, batch)) != losses[0]

    run_dir, plain = tmp_path / "joint", tmp_path / "plain"
    proc = run_py(*overrides, "sample.num_images=0", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_py(*overrides[:-1], "sample.num_images=0", f"hydra.run.dir={plain}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m, p = read_metrics(run_dir), read_metrics(plain)
    assert m["init_from"] == str(diffusion_ckpt) and m["trained"] is True
    assert m["artifact_key"] != p["artifact_key"]  # the source enters the key


def test_init_from_of_another_shape_is_refused(diffusion_ckpt, shapes_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "mode=joint", "unet.channels=8",
                  f"train.init_from={diffusion_ckpt}", f"hydra.run.dir={run_dir}")
    _assert_stops_at_start(proc, run_dir, "its unet weight time_embed.mlp.0.weight has shape [64, 16], but this run's network has shape [32, 8]")
