"""End to end: `python run.py` as a user types it, in temporary folders, on tiny configs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, read_metrics, run_py, tiny_overrides
from PIL import Image

pytestmark = pytest.mark.slow


def test_training_run_writes_every_file(trained):
    for rel in [".hydra/config.yaml", ".hydra/overrides.yaml", "checkpoints/last.pt", "checkpoints/best.pt",
                "checkpoints/step_00000003.pt", "checkpoints/step_00000006.pt", "samples/samples.npz",
                "samples/grid.png", "samples/denoising.gif", "samples/denoising/frame_000.png",
                "loss_curve.png", "train.log", "metrics.json"]:
        assert (trained / rel).is_file(), rel
    assert list((trained / "tb").glob("events.out.tfevents.*"))
    m = read_metrics(trained)
    assert m["steps"] == 6
    assert np.isfinite(m["final_loss"]) and m["final_loss"] > 0
    assert m["train_images_per_s"] > 0 and m["wall_time_s"] > 0 and m["num_params"] > 1000
    assert 0 < m["alpha_bar_T"] < 1
    assert m["best_val_loss"] is not None
    log = (trained / "train.log").read_text()
    assert "step 6 loss" in log and "alpha_bar_T" in log
    gif = Image.open(trained / "samples" / "denoising.gif")
    assert gif.n_frames >= 3


def test_tensorboard_has_scalars_and_images(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "val/loss"} <= scalars
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    # every train.image_every=3 steps, and at the end the grid of the samples drawn after
    # training (once: the trainer does not draw a second grid for the last step)
    assert [e.step for e in acc.Images("samples/grid")] == [3, 6]
    assert not [t for t in scalars if t.startswith(("final/", "eval/"))]  # the final metrics are in HParams only


def test_hparams_view_is_in_the_runs_own_folder(trained):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(trained / "tb"))
    mux.Reload()
    assert list(mux.Runs()) == ["."]  # no stray sub-run
    content = mux.PluginRunToTagToContent("hparams")["."]
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["train.max_steps"].number_value == 6
    assert start.session_start_info.hparams["dataset"].string_value == "folder"


def test_samples_npz_format(trained):
    data = np.load(trained / "samples" / "samples.npz")
    assert data["images"].shape == (8, 16, 16, 1) and data["images"].dtype == np.uint8
    assert data["labels"].dtype == np.int64
    assert sorted(np.bincount(data["labels"]).tolist()) == [4, 4]  # balanced over the 2 classes


def test_sample_mode_reads_checkpoint(trained, tmp_path):
    out = tmp_path / "sample"
    proc = run_py("mode=sample", f"ckpt={trained}/checkpoints/last.pt", "sample.num_images=6",
                  "sample.labels=[1,1,0]", "sampler=ddpm", "sampler.steps=4", "device=cpu",
                  f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(out / "samples" / "samples.npz")
    assert data["images"].shape == (6, 16, 16, 1)
    assert data["labels"].tolist() == [1, 1, 0, 1, 1, 0]
    assert (out / "samples" / "grid.png").is_file()
    m = read_metrics(out)
    assert m["num_images"] == 6
    assert m["sampled_with"] == {"sampler": "ddpm", "steps": 4, "spacing": "trailing", "nfe": 4, "eta": 0.0,
                                 "guidance": "cfg", "guidance_scale": 1.5, "seed": 0, "labels": [1, 1, 0]}  # auto
    about = m["provenance"]
    assert about["torch"] == torch.__version__ and about["device"] == "cpu" and len(about["code_fingerprint"]) == 16
    assert "mode=sample" in about["command"] and len(about.get("git_commit", "x" * 40)) == 40
    # the same command gives the same images
    again = tmp_path / "again"
    run_py("mode=sample", f"ckpt={trained}/checkpoints/last.pt", "sample.num_images=6", "sample.labels=[1,1,0]",
           "sampler=ddpm", "sampler.steps=4", "device=cpu", f"hydra.run.dir={again}")
    assert np.array_equal(np.load(again / "samples" / "samples.npz")["images"], data["images"])


def test_resume_reaches_the_same_weights(trained, tmp_path, shapes_dir):
    """A run killed right after its step-3 checkpoint, resumed with train.resume=auto, ends
    with exactly the weights of the uninterrupted 6-step run."""
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(trained / "checkpoints" / "step_00000003.pt", resumed / "checkpoints" / "last.pt")
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "train.resume=auto",
                  f"hydra.run.dir={resumed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in (resumed / "train.log").read_text()
    a = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in ("model",):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), name
    for name, tensor in a["ema"]["model"].items():
        assert torch.equal(tensor, b["ema"]["model"][name]), name
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_the_step_and_resumes_to_the_same_weights(tmp_path, shapes_dir, signum):
    """Ctrl-C (or a scheduler's SIGTERM) mid-training: the step in progress finishes, last.pt holds it, run.py says how to
    continue (exit 130) and metrics.json says interrupted; resumed, the run ends with exactly the
    weights of one never interrupted."""
    tiny = [*tiny_overrides(shapes_dir, tmp_path / "cache"), "train.max_steps=300", "train.val_every=300",
            "train.image_every=0", "train.checkpoint_every=300", "train.reuse=false"]
    stopped = tmp_path / "stopped"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *tiny, f"hydra.run.dir={stopped}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = stopped / "train.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "step 4 loss" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr[-3000:]
    step = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 4 <= step < 300
    assert f"interrupted after step {step}" in stderr and f"train.resume=auto hydra.run.dir={stopped}" in stderr
    assert "Traceback" not in stderr
    assert read_metrics(stopped)["status"] == "interrupted"

    assert run_py(*tiny, "train.resume=auto", f"hydra.run.dir={stopped}").returncode == 0
    whole = tmp_path / "whole"
    assert run_py(*tiny, f"hydra.run.dir={whole}").returncode == 0
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (stopped, whole))
    assert a["step"] == b["step"] == 300 and read_metrics(stopped)["status"] == "completed"
    for name, tensor in b["model"].items():
        assert torch.equal(a["model"][name], tensor), name
    for name, tensor in b["ema"]["model"].items():
        assert torch.equal(a["ema"]["model"][name], tensor), name


def _ctrl_c_reaches_it() -> None:
    """As in a terminal: a test runner started in the background (nohup, `cmd &` in a script)
    ignores SIGINT, its children inherit that, and Python then installs no Ctrl-C handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_sampling_keeps_the_training_record_and_says_how_to_sample(tmp_path, shapes_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *tiny_overrides(shapes_dir, tmp_path / "cache"),
                             "sample.num_images=20000", "sample.batch_size=50", "sampler=ddpm", "sampler.steps=50",
                             f"hydra.run.dir={run_dir}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, preexec_fn=_ctrl_c_reaches_it)
    log, deadline = run_dir / "train.log", time.monotonic() + 120
    while not (log.is_file() and "stored the diffusion model" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not finish"
        time.sleep(0.05)
    time.sleep(1)  # now sampling
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "sampling was interrupted" in stderr and "mode=sample ckpt=" in stderr
    m = read_metrics(run_dir)
    assert m["status"] == "interrupted" and m["steps"] == 6 and m["final_loss"] > 0


def _assert_clean_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


def test_unknown_option_fails_at_start(tmp_path):
    _assert_clean_error(run_py("schedule=quadratic", f"hydra.run.dir={tmp_path}"), "quadratic")


def test_wrong_type_fails_at_start(tmp_path):
    _assert_clean_error(run_py("train.max_steps=lots", f"hydra.run.dir={tmp_path}"), "lots")


def test_unknown_key_fails_at_start(tmp_path):
    _assert_clean_error(run_py("train.max_stepz=5", f"hydra.run.dir={tmp_path}"), "max_stepz")


def test_bad_value_fails_with_one_sentence(tmp_path):
    _assert_clean_error(run_py("objective.prediction=noise", f"hydra.run.dir={tmp_path}"),
                        "error: objective.prediction=noise is not an option")


def test_missing_checkpoint(tmp_path):
    _assert_clean_error(run_py("mode=sample", f"ckpt={tmp_path}/nope.pt", f"hydra.run.dir={tmp_path}/out"),
                        "does not exist")


def test_sample_without_checkpoint(tmp_path):
    _assert_clean_error(run_py("mode=sample", f"hydra.run.dir={tmp_path}/out"), "ckpt=")


def test_empty_image_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_clean_error(run_py("dataset=folder", f"dataset.root={tmp_path}/empty", f"paths.cache_dir={tmp_path}/c",
                               f"hydra.run.dir={tmp_path}/out"), "error:")


def test_sampling_only_change_reuses_the_trained_model(tmp_path, shapes_dir):
    """Same training settings, another sampler: no training, the cached model is used (asserted
    from the run's own metrics.json and log); a changed training setting trains anew."""
    base = tiny_overrides(shapes_dir, tmp_path / "cache")
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    assert run_py(*base, f"hydra.run.dir={first}").returncode == 0
    proc = run_py(*base, "sampler=ddpm", "sampler.steps=3", f"hydra.run.dir={second}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1, m2 = read_metrics(first), read_metrics(second)
    assert m1["trained"] is True and m2["trained"] is False
    assert m2["artifact_key"] == m1["artifact_key"] and m2["final_loss"] == m1["final_loss"]
    assert not (second / "checkpoints").exists()
    assert "reusing the diffusion model" in (second / "train.log").read_text()
    assert (second / "samples" / "samples.npz").is_file()
    assert run_py(*base, "train.lr=5e-4", f"hydra.run.dir={third}").returncode == 0
    assert read_metrics(third)["trained"] is True and read_metrics(third)["artifact_key"] != m1["artifact_key"]


def test_concurrent_runs_train_a_shared_model_once(tmp_path, shapes_dir):
    import subprocess
    import sys

    from conftest import REPO

    base = tiny_overrides(shapes_dir, tmp_path / "cache")
    procs = [subprocess.Popen([sys.executable, str(REPO / "run.py"), *base, f"sample.num_images={n}",
                               f"hydra.run.dir={tmp_path / str(n)}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for n in (4, 6)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    trained = [read_metrics(tmp_path / str(n))["trained"] for n in (4, 6)]
    assert sorted(trained) == [False, True]


def test_gradient_accumulation_trains_a_model_of_its_own(trained, shapes_dir, tmp_path):
    """train.grad_accum_steps=2 trains the tiny run in two micro-batches a step. They draw other
    noise than whole batches, so the artifact cache keeps that model apart from the whole-batch
    one, whose key stays the one models had before the option existed."""
    from omegaconf import OmegaConf

    from difflab.artifacts import train_settings
    from difflab.config import TrainConfig

    run_dir = tmp_path / "accum"
    proc = run_py(*tiny_overrides(shapes_dir, trained.parent / "cache"), "train.grad_accum_steps=2",
                  f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m, whole = read_metrics(run_dir), read_metrics(trained)
    assert m["trained"] is True and m["steps"] == 6 and np.isfinite(m["final_loss"])
    assert m["artifact_key"] != whole["artifact_key"]
    assert (run_dir / "samples" / "samples.npz").is_file()
    assert "grad_accum_steps" not in train_settings(OmegaConf.structured(TrainConfig))


def test_gradient_checkpointing_trains_the_same_model(trained, shapes_dir, tmp_path):
    """train.gradient_checkpointing=true recomputes activations in the backward and ends with
    the very same run (losses equal to the bit), so it keeps the artifact key."""
    run_dir = tmp_path / "checkpointed"
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "train.gradient_checkpointing=true",
                  f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m, plain = read_metrics(run_dir), read_metrics(trained)
    assert m["trained"] is True and m["artifact_key"] == plain["artifact_key"]
    assert m["final_loss"] == plain["final_loss"] and m["best_val_loss"] == plain["best_val_loss"]
    assert "blocks recompute their activations" in (run_dir / "train.log").read_text()


@pytest.mark.parametrize("args, sentence", [
    (["train.grad_accum_steps=3"], "error: train.batch_size=8 does not split into train.grad_accum_steps=3 equal "
                                   "micro-batches: use a multiple of 3, or another train.grad_accum_steps."),
    (["mode=classifier", "classifier.batch_size=6", "train.grad_accum_steps=4"],
     "error: classifier.batch_size=6 does not split into train.grad_accum_steps=4"),
    (["train.grad_accum_steps=0"], "error: train.grad_accum_steps=0 must be positive"),
])
def test_gradient_accumulation_refuses_uneven_micro_batches(args, sentence, shapes_dir, tmp_path):
    _assert_clean_error(run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), *args,
                               f"hydra.run.dir={tmp_path / 'run'}"), sentence)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor needs a C++ compiler")
def test_torch_compile_trains_as_eager_does(tmp_path, shapes_dir):
    """train.compile=true (torch.compile; inductor's C++ on the CPU) trains the model eager mode
    does, to float rounding, and so keeps its artifact key."""
    runs = {}
    for compile_ in ("false", "true"):
        run_dir = tmp_path / f"compile_{compile_}"
        proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "train.precision=fp32", "train.reuse=false",
                      f"train.compile={compile_}", f"hydra.run.dir={run_dir}", timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[compile_] = read_metrics(run_dir)
    eager, compiled = runs["false"], runs["true"]
    assert compiled["trained"] is True and compiled["artifact_key"] == eager["artifact_key"]
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-4)
    assert compiled["best_val_loss"] == pytest.approx(eager["best_val_loss"], rel=1e-4)


def test_torch_compile_without_a_cpp_compiler_is_one_sentence(tmp_path, shapes_dir, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-difflab")
    _assert_clean_error(run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "train.compile=true",
                               f"hydra.run.dir={tmp_path / 'run'}"),
                        "error: train.compile=true on the CPU needs a C++ compiler")


def test_bf16_autocast_and_channels_last_train_on_cpu(tmp_path, shapes_dir):
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "train.precision=bf16", "train.channels_last=true",
                  "objective.prediction=eps", "objective.loss=l1", "schedule=dns", "sampler=dpmpp_2m",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(tmp_path / "run")
    assert m["steps"] == 6 and np.isfinite(m["final_loss"])
