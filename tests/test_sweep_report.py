"""The sweep report answers the question: the best job by the sweep's metric (not the training
loss a guidance-scale sweep's jobs share), comparison.html as one self-contained page (a row per
job, every picture there), and the Optuna sweeper optimising the same metric."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from conftest import read_metrics, run_py, tiny_overrides
from PIL import Image

from difflab.sweep.compare import write_comparison
from difflab.sweep.metric import choose_metric, objective, optuna_direction


class Page(HTMLParser):
    """What a reader of comparison.html sees: the rows of the jobs table, the answer, the images,
    and anything that would need the network."""

    def __init__(self, text: str):
        super().__init__()
        self.rows, self.images, self.external, self.answer = [], [], [], ""
        self._row = self._cell = self._in_answer = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and self._row is None:
            self._row = {"class": attrs.get("class") or "", "cells": []}
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "p" and attrs.get("class") == "answer":
            self._in_answer = True
        for name in ("href", "src"):
            if tag in ("link", "script") and attrs.get(name):
                self.external.append(attrs[name])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row["cells"].append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "p":
            self._in_answer = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._in_answer:
            self.answer += data


def read_page(folder: Path) -> Page:
    page = Page((folder / "comparison.html").read_text(encoding="utf-8"))
    assert not page.external  # no stylesheet or script from anywhere
    for src in page.images:  # each picture is in the page (or a file that exists beside it)
        if src.startswith("data:image/png;base64,"):
            with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
                assert img.width > 10 and img.height > 10
        else:
            assert (folder / src).is_file(), src
    return page


def fake_sweep(root: Path, jobs: list[dict], metric: str | None = None) -> Path:
    """A guidance-scale sweep as its jobs leave it: one shared model, so one final_loss."""
    for i, metrics in enumerate(jobs):
        job = root / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- guidance.scale={i}\n")
        if metric:
            (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"sweep": {"metric": metric}}))
        (job / "samples").mkdir()
        Image.new("L", (40, 20), 30 * i).save(job / "samples" / "grid.png")
        (job / "metrics.json").write_text(json.dumps({"status": "completed", "final_loss": 0.1, "val_loss": 0.2,
                                                      **metrics}))
    return root


JOBS = [{"fd_classifier": 9.0, "fd_classifier_se": 0.2, "class_accuracy": 0.5, "class_accuracy_se": 0.01},
        {"fd_classifier": 4.0, "fd_classifier_se": 0.2, "class_accuracy": 0.9, "class_accuracy_se": 0.01},
        {"fd_classifier": 6.0, "fd_classifier_se": 0.2, "class_accuracy": 0.95, "class_accuracy_se": 0.01}]


def test_the_best_job_is_chosen_by_the_evaluation_metric_not_the_shared_loss(tmp_path):
    write_comparison([fake_sweep(tmp_path, JOBS)])
    md = (tmp_path / "comparison.md").read_text()
    assert "Best job by fd_classifier (lower is better, sweep.metric=auto): **1: guidance.scale=1** (4 ± 0.2)." in md
    page = read_page(tmp_path)
    header, *rows = page.rows
    assert [r["cells"][0] for r in rows] == ["0", "1", "2"]  # a row per job
    assert [r["cells"][0] for r in rows if "best" in r["class"]] == ["1"]
    assert "Best job by fd_classifier" in page.answer and "1: guidance.scale=1" in page.answer
    assert len(page.images) == 1 + 3  # the plots, then every job's samples


def test_sweep_metric_chooses_the_metric_and_its_direction(tmp_path):
    """The jobs ran with sweep.metric=class_accuracy: higher is better, so job 2 wins."""
    write_comparison([fake_sweep(tmp_path, JOBS, metric="class_accuracy")])
    md = (tmp_path / "comparison.md").read_text()
    assert "Best job by class_accuracy (higher is better, sweep.metric=class_accuracy): **2: guidance.scale=2**" in md
    assert [r["cells"][0] for r in read_page(tmp_path).rows if "best" in r["class"]] == ["2"]


def test_a_sweep_without_an_answer_says_so(tmp_path):
    write_comparison([fake_sweep(tmp_path, [{}, {}])])  # no evaluation, one shared loss
    assert "Best job by val_loss (lower is better, sweep.metric=auto): none, the completed jobs do not differ" \
        in (tmp_path / "comparison.md").read_text()
    assert not [r for r in read_page(tmp_path).rows if "best" in r["class"]]


def test_the_run_returns_the_sweep_metric():
    metrics = {"final_loss": 0.3, "best_val_loss": 0.2, "fd_classifier": 7.0}
    assert objective(metrics, "auto") == 7.0 and objective(metrics, "best_val_loss") == 0.2
    assert objective({"final_loss": 0.3}, "auto") == 0.3 and objective({}, "fd_inception") is None
    assert choose_metric("auto", [{"fd_classifier": 1.0}, {"val_loss": 2.0}]) == "fd_classifier"
    assert optuna_direction("class_accuracy") == "maximize" and optuna_direction("auto") == "minimize"


EVAL = ["eval.num_samples=12", "eval.classifier_steps=5", "eval.batch_size=8", "eval.bootstrap=10",
        "eval.extractors=[classifier]", "sample.gif=false", "train.threads=1"]


@pytest.mark.slow
def test_a_guidance_sweep_is_answered_by_its_evaluation(tmp_path, shapes_dir):
    sweep_dir = tmp_path / "sweep"
    proc = run_py("-m", "+sweep=guidance_scale", "guidance.scale=0,4", *tiny_overrides(shapes_dir, tmp_path / "cache"),
                  *EVAL, "sweep.metric=fd_classifier", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [read_metrics(sweep_dir / str(i)) for i in range(2)]
    assert jobs[0]["final_loss"] == jobs[1]["final_loss"]  # one trained model: the loss cannot answer
    best = min(range(2), key=lambda i: jobs[i]["fd_classifier"])
    page = read_page(sweep_dir)
    assert [r["cells"][0] for r in page.rows[1:]] == ["0", "1"]
    assert page.answer.startswith("Best job by fd_classifier (lower is better, sweep.metric=fd_classifier): ")
    named = page.answer.split(": ", 1)[1]  # the winner, or a tie that starts with the best
    assert named.removeprefix("no winner, tie between ").startswith(f"{best}: guidance.scale=")
    assert len(page.images) == 3 and all(src.startswith("data:image/png") for src in page.images)


@pytest.mark.slow
def test_optuna_minimises_the_sweep_metric(tmp_path, shapes_dir):
    """A 2-trial study: its best value is the lowest best_val_loss of the two jobs."""
    sweep_dir = tmp_path / "study"
    proc = run_py("-m", "+sweep=optuna", "hydra.sweeper.n_trials=2", "sweep.metric=best_val_loss",
                  "train.lr=interval(1e-3,3e-3)", *tiny_overrides(shapes_dir, tmp_path / "cache"), "train.threads=1",
                  "sample.gif=false", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Directions: ['minimize']" in proc.stdout + proc.stderr
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    losses = [read_metrics(sweep_dir / str(i))["best_val_loss"] for i in range(2)]
    assert result["best_value"] == pytest.approx(min(losses))
    assert "Best job by best_val_loss" in (sweep_dir / "comparison.md").read_text()


def test_a_metric_without_a_direction_is_one_sentence(tmp_path, shapes_dir):
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "sweep.metric=steps", f"hydra.run.dir={tmp_path}/r")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "sweep.metric=steps is not a metric whose better direction is known" in proc.stderr
