"""Progress: a named bar on a terminal, plain periodic lines elsewhere; every long stage of a run
reports it (a tiny latent run with its evaluation, its output captured as a SLURM .out file is)."""

from __future__ import annotations

import logging

import pytest
from conftest import TINY_AE, run_py, tiny_overrides

from difflab import progress as progress_module
from difflab.progress import progress

AE = ["autoencoder=kl", *TINY_AE]


def test_plain_lines_off_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="difflab.progress"):
        with progress("sample", 4, tty=False, unit="img") as bar:
            for _ in range(4):
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("sample: 1/4 img (25%)") and "left" in lines[0]
    assert lines[-1].startswith("sample: 4/4 img (100%)") and all("\r" not in line for line in lines)


def test_a_named_bar_on_a_terminal(capsys):
    with progress("eval-classifier", 3, tty=True) as bar:
        bar.update(3)
    err = capsys.readouterr().err
    assert "eval-classifier:" in err and "/3 [" in err and "\r" in err  # a bar, redrawn in place


def test_disabled_shows_nothing(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="difflab.progress"):
        for tty in (True, False):
            with progress("train", 3, enabled=False, tty=tty) as bar:
                bar.update(3)
    assert capsys.readouterr().err == "" and not caplog.records


@pytest.mark.slow
def test_every_long_stage_of_a_run_reports_progress_without_bar_lines(shapes_dir, tmp_path):
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), *AE, "train.progress=true", "eval.num_samples=8",
                  "eval.classifier_steps=5", "eval.batch_size=8", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr  # as a scheduler's .out file gets both
    for stage in ("autoencoder: 8/8 step", "encode latents: ", "diffusion: 6/6 step", "eval-classifier: 5/5 step"):
        assert stage in output, stage
    assert "\r" not in output
