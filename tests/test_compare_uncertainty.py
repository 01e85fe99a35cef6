"""The comparison weighs evaluation metrics by their bootstrap standard errors (K_se): the table
shows "value ± se", the CSV keeps K_se as a column, and a job is only named best at a metric when
the runner-up is at least twice their combined standard error behind; otherwise it is a tie."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from difflab.sweep.compare import JobResult, metric_direction, verdict_line, winner, write_comparison


def fake_sweep(root: Path, jobs: list[dict]) -> Path:
    """A sweep folder whose job i ran with train.lr=lr_i and recorded jobs[i] (plus status and
    final_loss) in its metrics.json, as a finished job leaves them."""
    for i, metrics in enumerate(jobs):
        job = root / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- train.lr={i + 1}e-3\n- train.threads=1\n")
        (job / "metrics.json").write_text(json.dumps({"status": "completed", "final_loss": 0.1 + i / 100,
                                                      "wall_time_s": 3.0, **metrics}))
    return root


def compare(root: Path, jobs: list[dict]) -> tuple[str, list[dict]]:
    """comparison.md's text and comparison.csv's rows of the fake sweep."""
    write_comparison([fake_sweep(root, jobs)])
    with open(root / "comparison.csv") as f:
        return (root / "comparison.md").read_text(encoding="utf-8"), list(csv.DictReader(f))


def job(name: str, **metrics) -> JobResult:
    return JobResult(name, Path(name), "completed", {}, metrics)


def test_jobs_within_twice_their_combined_error_are_a_tie(tmp_path):
    table, _ = compare(tmp_path, [{"fd_classifier": 10.0, "fd_classifier_se": 0.5},
                                  {"fd_classifier": 10.5, "fd_classifier_se": 0.5}])
    assert "Lowest fd_classifier" not in table
    assert ("fd_classifier: no winner, tie between **0: train.lr=1e-3** (10 ± 0.5) and **1: train.lr=2e-3** "
            "(10.5 ± 0.5): they differ by less than twice their combined standard error.") in table


def test_jobs_far_apart_name_the_winner_in_each_direction(tmp_path):
    table, _ = compare(tmp_path, [{"fd_classifier": 20.0, "fd_classifier_se": 0.1,
                                   "class_accuracy": 0.9, "class_accuracy_se": 0.01},
                                  {"fd_classifier": 10.0, "fd_classifier_se": 0.1,
                                   "class_accuracy": 0.5, "class_accuracy_se": 0.01}])
    assert "Lowest fd_classifier: **1: train.lr=2e-3** (10 ± 0.1)." in table
    assert "Highest class_accuracy: **0: train.lr=1e-3** (0.9 ± 0.01)." in table
    assert "no winner" not in table


def test_table_shows_errors_in_cells_and_csv_keeps_them_as_columns(tmp_path):
    table, rows = compare(tmp_path, [{"fd_classifier": 0.83123, "fd_classifier_se": 0.02134},
                                     {"fd_classifier": 1.5, "fd_classifier_se": 0.03}])
    header = next(line for line in table.splitlines() if line.startswith("| job |"))
    assert "| fd_classifier |" in header and "fd_classifier_se" not in header
    assert "| 0.8312 ± 0.021 |" in table and "| 1.5 ± 0.03 |" in table
    assert [float(r["fd_classifier_se"]) for r in rows] == [0.02134, 0.03]
    assert [float(r["fd_classifier"]) for r in rows] == [0.83123, 1.5]
    with Image.open(tmp_path / "comparison.png") as img:  # the fd_classifier panel, with its error bars
        assert img.width > 300 and img.height > 100


def test_metric_without_errors_still_names_a_best_job_saying_so(tmp_path):
    table, rows = compare(tmp_path, [{"fd_classifier": 12.3}, {"fd_classifier": 15.0}])
    assert "Lowest fd_classifier: **0: train.lr=1e-3** (12.3) (no standard errors recorded)." in table
    assert "±" not in table and "fd_classifier_se" not in rows[0]


def test_real_metrics_and_spreads_get_no_verdict_line(tmp_path):
    table, _ = compare(tmp_path, [{"real_fd_classifier": 1.0, "kid_std": 0.1, "fd_classifier": 2.0},
                                  {"real_fd_classifier": 2.0, "kid_std": 0.3, "fd_classifier": 2.0}])
    assert "real_fd_classifier:" not in table and "kid_std:" not in table
    assert "fd_classifier:" not in table  # equal, and no errors to weigh: nothing to choose between


@pytest.mark.parametrize("key, direction", [
    ("fd_classifier", "lower"), ("fid", "lower"), ("kid_classifier", "lower"), ("real_fd_classifier", "lower"),
    ("class_accuracy", "higher"), ("precision_classifier", "higher"), ("recall", "higher"),
    ("inception_score", "higher"), ("fd_classifier_se", None), ("kid_std", None), ("final_loss", "lower"),
    ("steps", None)])
def test_metric_direction(key, direction):
    assert metric_direction(key) == direction


def test_a_tie_lists_every_job_within_twice_the_combined_error_of_the_best():
    results = [job("far", recall=0.5, recall_se=0.01), job("best", recall=0.9, recall_se=0.02),
               job("near", recall=0.87, recall_se=0.02), job("wide", recall=0.7, recall_se=0.2)]
    verdict = winner(results, "recall")
    assert verdict.best.name == "best" and not verdict.separated
    assert [r.name for r in verdict.tied] == ["near", "wide"]
    assert verdict_line(verdict, "recall", []) == (
        "recall: no winner, tie between **best** (0.9 ± 0.02), **near** (0.87 ± 0.02) and **wide** (0.7 ± 0.2): "
        "each of the others differs from the first by less than twice their combined standard error.")


def test_winner_needs_two_completed_jobs_and_every_jobs_error():
    failed = JobResult("failed", Path("failed"), "failed", {}, {"fid": 1.0, "fid_se": 0.1})
    assert winner([job("a", fid=5.0, fid_se=0.1), failed], "fid") is None
    assert winner([job("a", fid=5.0), job("b", fid=6.0)], "steps") is None
    verdict = winner([job("a", fid=5.0, fid_se=0.1), job("b", fid=9.0)], "fid")
    assert (verdict.best.name, verdict.separated, verdict.unjudged) == (
        "a", False, "standard errors recorded for only some jobs")
    separated = winner([job("a", fid=5.0, fid_se=0.1), job("b", fid=5.3, fid_se=0.1)], "fid")
    assert (separated.best.name, separated.tied, separated.separated) == ("a", [], True)  # 0.3 >= 2 * 0.141


def test_ema_copies_of_one_training_are_weighed_by_their_paired_error(tmp_path):
    """Copies scored on the same held-out draws: a difference far inside their combined errors is still
    real when the paired error of the difference is small, and not when it is not."""
    def ema_job(paired: float) -> dict:
        copies = {"0.99": {"samples": "samples/ema_0.99", "val_loss": 0.100, "val_loss_se": 0.01},
                  "0.999": {"samples": "samples", "val_loss": 0.104, "val_loss_se": 0.01}}
        copies["0.99"]["val_loss_paired_se"] = {"0.999": paired}
        copies["0.999"]["val_loss_paired_se"] = {"0.99": paired}
        return {"ema": copies}

    table, _ = compare(tmp_path / "paired", [ema_job(0.001)])
    assert "Best job by val_loss (lower is better, sweep.metric=auto): **0 ema=0.99: train.ema.decay=0.99** " \
           "(0.1 ± 0.01)." in table
    table, _ = compare(tmp_path / "noisy", [ema_job(0.005)])
    assert "no winner, tie between **0 ema=0.99: train.ema.decay=0.99** (0.1 ± 0.01) and **0 ema=0.999: " \
           "train.ema.decay=0.999** (0.104 ± 0.01)" in table
