"""Sweeps end to end: `python run.py -m ...` as a user types it, on tiny jobs in temporary
folders; the comparison they end with, failed and killed jobs, named sweeps, launchers, the
compare command, and EMA copies that make an EMA sweep one training run."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_metrics, run_py, tiny_overrides
from PIL import Image

pytestmark = pytest.mark.slow


def read_rows(sweep_dir) -> list[dict]:
    with open(sweep_dir / "comparison.csv") as f:
        return list(csv.DictReader(f))


def assert_report(sweep_dir) -> None:
    for name in ("comparison.md", "comparison.csv", "comparison.png", "comparison_samples.png"):
        assert (sweep_dir / name).is_file(), name
    for name in ("comparison.png", "comparison_samples.png"):
        with Image.open(sweep_dir / name) as img:
            assert img.width > 300 and img.height > 100


def sweep(*args: str, timeout: int = 300, returncode: int = 0) -> subprocess.CompletedProcess:
    """`python run.py -m ARGS`; a sweep exits 1 when a job did not complete."""
    proc = run_py("-m", *args, timeout=timeout)
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def schedule_sweep(tmp_path_factory, shapes_dir):
    """The card's example: one job per noise schedule."""
    base = tmp_path_factory.mktemp("schedules")
    args = (*tiny_overrides(shapes_dir, base / "cache"), "train.threads=1", "schedule=linear,cosine,dns")
    sweep(*args, f"hydra.sweep.dir={base / 'sweep'}")
    return base / "sweep", args


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory, shapes_dir):
    """Two jobs through the submitit path run locally, the second with a bad setting."""
    base = tmp_path_factory.mktemp("failing")
    sweep(*tiny_overrides(shapes_dir, base / "cache"), "hydra/launcher=slurm_local", "train.lr=2e-3,-1",
          f"hydra.sweep.dir={base / 'sweep'}", returncode=1)
    return base / "sweep"


def test_multirun_ends_with_a_comparison_of_its_jobs(schedule_sweep):
    sweep_dir, _ = schedule_sweep
    assert_report(sweep_dir)
    rows = read_rows(sweep_dir)
    assert [(r["job"], r["schedule"], r["status"]) for r in rows] == [
        ("0", "linear", "completed"), ("1", "cosine", "completed"), ("2", "dns", "completed")]
    for row in rows:
        metrics = read_metrics(sweep_dir / row["job"])
        assert float(row["final_loss"]) == pytest.approx(metrics["final_loss"])
        assert float(row["wall_time_s"]) == pytest.approx(metrics["wall_time_s"])
        assert float(row["alpha_bar_T"]) == pytest.approx(metrics["alpha_bar_T"])
    assert len({r["artifact_key"] for r in rows}) == 3  # the schedule is a training setting
    table = (sweep_dir / "comparison.md").read_text()
    assert "3 completed" in table and "| 2 | completed | dns |" in table


def test_tensorboard_shows_every_job_with_its_settings(schedule_sweep):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    sweep_dir, _ = schedule_sweep
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(sweep_dir))
    mux.Reload()
    runs = [f"{job}/tb/schedule={schedule}" for job, schedule in enumerate(["linear", "cosine", "dns"])]
    assert sorted(mux.Runs()) == runs  # each named by its swept setting; no stray hparams runs
    for run, schedule in zip(runs, ["linear", "cosine", "dns"]):
        content = mux.PluginRunToTagToContent("hparams")[run]
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        assert start.session_start_info.hparams["schedule"].string_value == schedule
        assert not [k for k in start.session_start_info.hparams if k.startswith("paths")]
        assert mux.Scalars(run, "train/loss")[-1].value > 0  # the HParams metric: the curve's last value


def test_rerun_with_resume_finishes_only_what_is_missing(schedule_sweep, tmp_path):
    """Job 2 killed right after its step-3 checkpoint: the same command with train.resume=auto
    leaves the completed jobs alone and resumes job 2."""
    sweep_dir, args = schedule_sweep
    again = tmp_path / "sweep"
    shutil.copytree(sweep_dir, again)
    killed = again / "2"
    shutil.copy(killed / "checkpoints" / "step_00000003.pt", killed / "checkpoints" / "last.pt")
    (killed / "metrics.json").write_text(json.dumps({"status": "started"}))
    shutil.rmtree(killed / "samples")
    done = {job: (again / job / "metrics.json").read_text() for job in ("0", "1")}
    rows = read_rows(sweep_dir)

    sweep(*args, f"hydra.sweep.dir={again}", "train.resume=auto")
    for job, text in done.items():
        assert (again / job / "metrics.json").read_text() == text
        assert "skipped" in (again / job / "train.log").read_text()
    assert "resumed from" in (killed / "train.log").read_text()
    resumed = read_metrics(killed)
    assert resumed["status"] == "completed" and resumed["steps"] == 6
    assert resumed["final_loss"] == pytest.approx(float(rows[2]["final_loss"]))
    assert (killed / "samples" / "grid.png").is_file()
    assert [r["status"] for r in read_rows(again)] == ["completed"] * 3


def test_a_failed_job_is_reported_and_the_sweep_completes(failing_sweep):
    assert_report(failing_sweep)
    ok, failed = read_rows(failing_sweep)
    assert (ok["train.lr"], ok["status"], ok["error"]) == ("0.002", "completed", "")
    assert float(ok["final_loss"]) > 0
    assert (failed["train.lr"], failed["status"]) == ("-1", "failed")
    assert "train.lr=-1.0 must be positive" in failed["error"]
    assert read_metrics(failing_sweep / "1")["status"] == "failed"
    assert "1 completed, 1 failed" in (failing_sweep / "comparison.md").read_text()


def compare(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "difflab.sweep.compare", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_compare_merges_sweeps(schedule_sweep, failing_sweep, tmp_path):
    sweep_dir, _ = schedule_sweep
    proc = compare(sweep_dir, failing_sweep, "--out", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr
    assert_report(tmp_path / "merged")
    rows = read_rows(tmp_path / "merged")
    sources = [r["job"].rsplit("/", 1) for r in rows]  # <the sweep's short name>/<job>
    assert [job for _, job in sources] == ["0", "1", "2", "0", "1"]
    assert sources[0][0] == sources[2][0] != sources[3][0] == sources[4][0]
    assert [r["schedule"] for r in rows] == ["linear", "cosine", "dns", "", ""]
    assert [r["train.lr"] for r in rows] == ["", "", "", "0.002", "-1"]
    assert [r["status"] for r in rows] == ["completed"] * 4 + ["failed"]


def test_compare_rejects_a_folder_without_runs(tmp_path):
    proc = compare(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and "holds no runs" in proc.stderr


def test_guidance_sweep_in_parallel_trains_once(tmp_path, shapes_dir):
    """The named sweep, its 5 jobs two at a time (joblib): one job trains, the others wait for
    it and reuse its model."""
    sweep_dir = tmp_path / "sweep"
    sweep("+sweep=guidance_scale", "hydra/launcher=parallel", *tiny_overrides(shapes_dir, tmp_path / "cache"),
          f"hydra.sweep.dir={sweep_dir}")
    rows = read_rows(sweep_dir)
    assert [r["guidance.scale"] for r in rows] == ["0", "1", "2", "3", "5"]
    assert all(r["status"] == "completed" for r in rows)
    metrics = [read_metrics(sweep_dir / r["job"]) for r in rows]
    assert sorted(m["trained"] for m in metrics) == [False] * 4 + [True]
    assert len({m["artifact_key"] for m in metrics}) == 1
    assert all((sweep_dir / r["job"] / "samples" / "grid.png").is_file() for r in rows)


LATENT = ["autoencoder=kl", "autoencoder.channels=16", "autoencoder.train.max_steps=8",
          "autoencoder.train.batch_size=8", "autoencoder.train.warmup_steps=2"]


@pytest.mark.parametrize("kind", [[], ["mode=joint"], LATENT], ids=["pixel", "joint", "latent"])
def test_ema_decay_sweep_is_one_training(tmp_path, shapes_dir, kind):
    """Every training mode: pixel and latent, diffusion and joint (whose copies hold the classifier too)."""
    sweep_dir = tmp_path / "sweep"
    sweep("train.ema.decays=[0.99,0.995,0.999,0.9995]", *tiny_overrides(shapes_dir, tmp_path / "cache"), *kind,
          "train.threads=1",
          "train.ema.warmup=false", f"hydra.sweep.dir={sweep_dir}")
    assert [p.name for p in sweep_dir.iterdir() if p.is_dir()] == ["0"]
    metrics = read_metrics(sweep_dir / "0")
    assert metrics["trained"] is True
    decays = ["0.99", "0.995", "0.999", "0.9995"]  # 0.995 is the main copy (conf/config.yaml)
    rows = read_rows(sweep_dir)
    assert [r["train.ema.decay"] for r in rows] == decays
    assert len({r["val_loss"] for r in rows}) == 4 and len({r["final_loss"] for r in rows}) == 1
    copies = metrics["ema"]  # the copies are scored on the same draws: a difference's paired error is the smaller
    for decay, other in zip(decays, decays[1:]):
        paired = copies[decay]["val_loss_paired_se"][other]
        assert 0 < paired < math.hypot(copies[decay]["val_loss_se"], copies[other]["val_loss_se"])
        assert paired == pytest.approx(copies[other]["val_loss_paired_se"][decay])
    for decay in ("0.99", "0.999", "0.9995"):
        assert (sweep_dir / "0" / "samples" / f"ema_{decay}" / "grid.png").is_file()
    state = torch.load(sweep_dir / "0" / "checkpoints" / "last.pt", weights_only=True)
    assert sorted(state["ema_copies"]) == ["0.99", "0.999", "0.9995"]
