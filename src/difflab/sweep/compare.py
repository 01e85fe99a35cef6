"""The comparison of a sweep's jobs, written into the sweep folder when a multirun ends (the
Hydra callback in sweep/callback.py) or rebuilt and merged across sweeps and single runs with

    python -m difflab.sweep.compare DIR [DIR ...] [--out FOLDER] [--metric NAME]

Files: comparison.csv (one row per job: swept settings, status, every scalar of metrics.json,
error), comparison.md (first the answer: the best job by the sweep's metric, sweep.metric; then
the best job at each loss and evaluation metric, the table, the pictures), comparison.html (the
same on one self-contained page, its table sortable), comparison.png (each metric against the
swept setting, and all jobs' loss curves
overlaid) and comparison_samples.png (each job's sample grid side by side;
mode=edit's before/after grid). An evaluation metric
K with a bootstrap standard error K_se is shown as "value ± se" and with error bars, and a job is
only called best at it when the runner-up is at least twice the standard error of their difference behind
(their combined errors; for the EMA copies of one training, scored on the same draws, the paired error).
A job that trained several EMA copies (train.ema.decays) gives one row per decay. A job whose
metrics.json or .hydra/overrides.yaml cannot be read is one row with status unreadable and the
reason in its error column, so it costs the comparison only that row; a damaged picture or loss
curve of a job is left out of the pictures with a warning.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import yaml
from PIL import Image, ImageDraw, ImageFont

from difflab.artifacts import OBSERVATION_KEYS
from difflab.checkpoint import atomic_write, atomic_write_text
from difflab.errors import UserError
from difflab.pictures import save_figure
from difflab.sweep.html import Cell, Picture, Row, write_page
from difflab.sweep.metric import AUTO, choose_metric, is_number, metric_direction

FILES = ("comparison.md", "comparison.csv", "comparison.png", "comparison_samples.png", "comparison.html")
# Overrides that never change a job's result, so they are not settings a comparison shows.
IGNORED_KEYS = {f"train.{k}" for k in OBSERVATION_KEYS} | {"device"}
IGNORED_PREFIXES = ("hydra.", "paths.")
PATH_METRICS = ("checkpoint", "resumed_from", "samples")  # in the CSV, too long for the table
MAIN_EMA_ONLY = ("best_val_loss",)  # tracked during training for the main EMA copy alone
NOT_FINISHED = "no result recorded (killed or still running): re-run the sweep with train.resume=auto"
UNREADABLE = "unreadable"  # a job whose metrics.json or .hydra/overrides.yaml is damaged
STATUSES = ("completed", "failed", "interrupted", "incomplete", UNREADABLE)
REDO = "delete it and re-run the job with train.resume=auto"  # the fix for a damaged job file
DAMAGED = (OSError, ValueError, KeyError, TypeError)  # what reading a damaged picture or curve raises
SE_SUFFIX = "_se"  # metric K's bootstrap standard error is recorded as K_se
PAIRED_LOSS_SE = "val_loss_paired_se"  # an EMA copy's {other decay: SE of the val_loss difference} (same images)
LOSSES = ("final_loss", "val_loss", "best_val_loss")  # each gets its "Lowest" line; no standard errors to weigh
JOB_PICTURES = ("edits/before_after.png",)  # a job's picture where it has no samples/grid.png
SEPARATION = 2  # a difference of this many combined standard errors (about a 95% test) names a winner

log = logging.getLogger("difflab")
T = TypeVar("T")


@dataclass
class JobResult:
    name: str
    run_dir: Path
    status: str  # one of STATUSES
    settings: dict[str, str]
    metrics: dict = field(default_factory=dict)  # scalars only
    error: str = ""
    samples_dir: Optional[Path] = None
    paired_se: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> other job -> SE of the difference

    @property
    def grid(self) -> Optional[Path]:
        """The job's picture: its sample grid, else the first of JOB_PICTURES it has (mode=edit's before/after)."""
        paths = [self.samples_dir / "grid.png"] if self.samples_dir else []
        return next((p for p in [*paths, *(self.run_dir / name for name in JOB_PICTURES)] if p.is_file()), None)


# ---- reading runs -------------------------------------------------------------------------
def is_run(folder: Path) -> bool:
    return (folder / ".hydra" / "overrides.yaml").is_file() or (folder / "metrics.json").is_file()


def _job_order(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def find_runs(folder: Path) -> list[Path]:
    """The folder itself when it is a run, else its job folders in job order."""
    if is_run(folder):
        return [folder]
    return sorted((p for p in folder.iterdir() if p.is_dir() and is_run(p)), key=_job_order)


class Unreadable(Exception):
    """A damaged job file; the message names the file, what is wrong with it and the fix."""


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON ({e.msg} at line {e.lineno})") from e


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = f"{e.problem} at line {mark.line + 1}" if mark else str(e).splitlines()[0]
        raise ValueError(f"is not valid YAML ({problem})") from e


def _kind(value: Any) -> str:
    """JSON's (and YAML's) name for the type of a parsed value."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _load(run_dir: Path, name: str, parse: Callable[[str], Any], expected: type) -> Any:
    """The job file `name` parsed, an empty `expected` when the job has none; Unreadable when it
    cannot be read, does not parse, or holds another kind of value than `expected`."""
    path = run_dir / name
    if not path.is_file():
        return expected()
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except OSError as e:
        problem = f"cannot be read ({e.strerror})"
    except ValueError as e:  # the parsers' syntax errors
        problem = str(e)
    else:
        if isinstance(value, expected):
            return value
        problem = f"holds {_kind(value)}, not {_kind(expected())}"
    raise Unreadable(f"{name} {problem}: {REDO}.")


def read_settings(run_dir: Path) -> dict[str, str]:
    """The job's command-line overrides as key -> value, without bookkeeping keys."""
    overrides = _load(run_dir, ".hydra/overrides.yaml", _parse_yaml, list)
    settings = {}
    for item in overrides:
        key, _, value = str(item).lstrip("+~").partition("=")
        if key not in IGNORED_KEYS and not key.startswith(IGNORED_PREFIXES):
            settings[key] = value
    return settings


def _status(metrics: dict) -> str:
    """Runs record their status; an older run without one is complete once wall_time_s is in."""
    status = metrics.get("status") or ("completed" if "wall_time_s" in metrics else "incomplete")
    if not isinstance(status, str):
        raise Unreadable(f'metrics.json has a "status" that is not a string: {REDO}.')
    return "incomplete" if status == "started" else status


def _ema_copies(metrics: dict) -> dict:
    """decay -> the entry of each extra EMA copy, whose "samples" folder the comparison shows."""
    copies = metrics.get("ema") or {}
    if isinstance(copies, dict) and all(isinstance(c, dict) and isinstance(c.get("samples"), str)
                                        for c in copies.values()):
        return copies
    raise Unreadable(f'metrics.json has an "ema" entry that is not {{decay: {{"samples": folder, ...}}}}: {REDO}.')


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if k not in ("status", "error") and (v is None or isinstance(v, (int, float, str, bool)))}


def read_job(run_dir: Path, name: str) -> list[JobResult]:
    """One result per job, or one per EMA decay for a job that kept several EMA copies; a job
    whose files are damaged is one unreadable result saying why, so the others still compare."""
    try:
        settings = read_settings(run_dir)
        metrics = _load(run_dir, "metrics.json", _parse_json, dict)
        status, copies = _status(metrics), _ema_copies(metrics)
    except Unreadable as e:
        return [JobResult(name, run_dir, UNREADABLE, {}, error=str(e))]
    error = metrics.get("error") or (NOT_FINISHED if status == "incomplete" else "")
    base = JobResult(name, run_dir, status, settings, _scalars(metrics), error, run_dir / "samples")
    if not copies:
        return [base]
    shared = {k: v for k, v in base.metrics.items() if k not in MAIN_EMA_ONLY}

    def copy_name(decay: str) -> str:
        return f"{name} ema={decay}"

    return [JobResult(copy_name(decay), run_dir, status, {**base.settings, "train.ema.decay": decay},
                      {**shared, **_scalars(entry)}, error, run_dir / entry["samples"],
                      {"val_loss": {copy_name(other): se for other, se in (entry.get(PAIRED_LOSS_SE) or {}).items()}})
            for decay, entry in copies.items()]


def short_names(folders: list[Path]) -> list[str]:
    """The shortest trailing parts of the paths that tell the folders apart."""
    parts = [folder.resolve().parts for folder in folders]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(folder) for folder in folders]


def collect(folders: list[Path]) -> list[JobResult]:
    """Every job of every folder (a sweep or a single run); names carry the folder's short name
    when several folders are merged."""
    results = []
    for folder, short in zip(folders, short_names(folders)):
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder: pass sweep folders (multirun/<date>/<time>) or run folders.")
        runs = find_runs(folder)
        if not runs:
            raise UserError(f"{folder} holds no runs (no .hydra/ or metrics.json in it or its sub-folders): pass a sweep or run folder.")
        for run_dir in runs:
            name = run_dir.name if len(folders) == 1 else short if run_dir == folder else f"{short}/{run_dir.name}"
            results.extend(read_job(run_dir, name))
    return results


def swept_keys(results: list[JobResult]) -> list[str]:
    """Settings whose value differs between jobs, in the order they first appear; an unreadable
    job's settings are unknown rather than different, so it does not count."""
    known = [r for r in results if r.status != UNREADABLE]
    keys = list(dict.fromkeys(k for r in known for k in r.settings))
    return [k for k in keys if len({r.settings.get(k, "") for r in known}) > 1]


def metric_columns(results: list[JobResult]) -> list[str]:
    keys = sorted({k for r in results for k in r.metrics} - {"final_loss", "wall_time_s"})
    return [k for k in ("final_loss",) if any(k in r.metrics for r in results)] + keys + \
        [k for k in ("wall_time_s",) if any(k in r.metrics for r in results)]


# ---- tables -------------------------------------------------------------------------------
def write_csv(results: list[JobResult], swept: list[str], metrics: list[str], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["job", "status", *swept, *metrics, "error"])
    for r in results:
        writer.writerow([r.name, r.status, *(r.settings.get(k, "") for k in swept),
                         *("" if r.metrics.get(k) is None else r.metrics[k] for k in metrics), r.error])
    atomic_write_text(path, text.getvalue())


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def standard_error(r: JobResult, metric: str) -> Optional[float]:
    """The job's recorded standard error of `metric`; None when it has none, or one that is not a
    finite number >= 0, so a damaged K_se never makes a difference look certain."""
    se = r.metrics.get(metric + SE_SUFFIX)
    return float(se) if is_number(se) and se >= 0 else None


def _value_text(r: JobResult, metric: str) -> str:
    """The job's `metric` as a table cell, "value ± se" where its standard error is recorded."""
    value, se = r.metrics.get(metric), standard_error(r, metric)
    return f"{_cell(value)} ± {se:.2g}" if is_number(value) and se is not None else _cell(value)


def without_errors(metrics: list[str]) -> list[str]:
    """The metrics less the standard errors of metrics among them: those are shown with their
    metric (as "value ± se", as error bars) rather than as metrics of their own."""
    return [m for m in metrics if not (m.endswith(SE_SUFFIX) and m.removesuffix(SE_SUFFIX) in metrics)]


def _settings_text(r: JobResult, swept: list[str], sep: str = ", ") -> str:
    return sep.join(f"{k}={r.settings[k]}" for k in swept if k in r.settings)


def _label(r: JobResult, swept: list[str]) -> str:
    shown = _settings_text(r, swept)
    return f"{r.name}: {shown}" if shown else r.name


def _best(results: list[JobResult], metric: str) -> Optional[JobResult]:
    done = [r for r in results if r.status == "completed" and is_number(r.metrics.get(metric))]
    if len({r.metrics[metric] for r in done}) < 2:
        return None  # nothing to choose between
    return min(done, key=lambda r: r.metrics[metric])


def _completed_with(results: list[JobResult], metric: str) -> list[JobResult]:
    return [r for r in results if r.status == "completed" and r.metrics.get(metric) is not None]


# ---- the best job at an evaluation metric ---------------------------------------------------
@dataclass
class Verdict:
    """The best completed job at a metric and whether it is better by more than chance."""
    best: JobResult
    tied: list[JobResult]  # the other jobs within SEPARATION combined standard errors of the best
    separated: bool  # standard errors are recorded and no other job is that close: the best wins
    unjudged: str = ""  # why the difference cannot be weighed (standard errors missing), else ""


def difference_se(a: JobResult, b: JobResult, metric: str) -> float:
    """The standard error of a's `metric` minus b's: the paired one where both were measured on the same
    draws (the EMA copies of one training), else their standard errors combined."""
    paired = a.paired_se.get(metric, {}).get(b.name)
    if is_number(paired) and paired >= 0:
        return float(paired)
    return math.hypot(standard_error(a, metric), standard_error(b, metric))


def _tied_with(best: JobResult, other: JobResult, metric: str) -> bool:
    """Whether the two jobs' values differ by less than SEPARATION times the standard error of their
    difference (or not at all), so neither can be called the better one."""
    difference = abs(best.metrics[metric] - other.metrics[metric])
    return difference == 0 or difference < SEPARATION * difference_se(best, other, metric)


def winner(results: list[JobResult], metric: str) -> Optional[Verdict]:
    """The verdict on the completed jobs' `metric`: a job is tied with the best when it lies within
    twice their combined standard error of it, and the best is only separated when none is. None
    when the metric has no direction or fewer than two completed jobs have it, or when, without
    standard errors to weigh, all their values are equal."""
    direction = metric_direction(metric)
    ranked = sorted((r for r in results if r.status == "completed" and is_number(r.metrics.get(metric))),
                    key=lambda r: r.metrics[metric], reverse=direction == "higher")
    if direction is None or len(ranked) < 2:
        return None
    best, others = ranked[0], ranked[1:]
    recorded = sum(standard_error(r, metric) is not None for r in ranked)
    if recorded < len(ranked):
        if len({r.metrics[metric] for r in ranked}) == 1:
            return None  # nothing to choose between
        why = "standard errors recorded for only some jobs" if recorded else "no standard errors recorded"
        return Verdict(best, [], False, why)
    tied = [r for r in others if _tied_with(best, r, metric)]
    return Verdict(best, tied, not tied)


def verdict_line(verdict: Verdict, metric: str, swept: list[str]) -> str:
    """The comparison.md line on the best job at `metric`; a tie names every job that the best
    cannot be told apart from rather than a winner."""
    best = verdict.best
    word = "Lowest" if metric_direction(metric) == "lower" else "Highest"
    if verdict.unjudged:
        return f"{word} {metric}: **{_label(best, swept)}** ({_value_text(best, metric)}) ({verdict.unjudged})."
    if verdict.separated:
        return f"{word} {metric}: **{_label(best, swept)}** ({_value_text(best, metric)})."
    names = [f"**{_label(r, swept)}** ({_value_text(r, metric)})" for r in [best, *verdict.tied]]
    why = ("they differ by less than twice their combined standard error" if len(names) == 2 else
           "each of the others differs from the first by less than twice their combined standard error")
    return f"{metric}: no winner, tie between {', '.join(names[:-1])} and {names[-1]}: {why}."


@dataclass
class Answer:
    """Which job the sweep's metric (sweep.metric) picks: the question a sweep asks."""
    asked: str  # sweep.metric as given (auto or a metric's name)
    metric: Optional[str]  # the metric it means for these jobs; None when no completed job recorded it
    verdict: Optional[Verdict]  # None: nothing to choose between (fewer than two values, or all equal)


def answer(results: list[JobResult], asked: str = AUTO) -> Answer:
    metric = choose_metric(asked, [r.metrics for r in results if r.status == "completed"])
    return Answer(asked, metric, winner(results, metric) if metric else None)


def answer_line(a: Answer, swept: list[str]) -> str:
    """The comparison's first sentence: the best job by the sweep's metric, or why there is none."""
    if a.metric is None:
        return (f"Best job: none, no completed job recorded sweep.metric={a.asked}: turn the evaluation on "
                "(eval.num_samples) or choose a recorded metric with sweep.metric=NAME.")
    head = f"Best job by {a.metric} ({metric_direction(a.metric)} is better, sweep.metric={a.asked})"
    if a.verdict is None:
        return f"{head}: none, the completed jobs do not differ at it (or fewer than two have it)."
    best, line = a.verdict.best, verdict_line(a.verdict, a.metric, swept)
    if a.verdict.separated or a.verdict.unjudged:
        unjudged = f" ({a.verdict.unjudged})" if a.verdict.unjudged else ""
        return f"{head}: **{_label(best, swept)}** ({_value_text(best, a.metric)}){unjudged}."
    return f"{head}: {line.removeprefix(a.metric + ': ')}"


def sweep_metric(results: list[JobResult]) -> str:
    """The sweep.metric the jobs ran with (their .hydra/config.yaml), auto for runs without one."""
    for r in results:
        try:
            config = _load(r.run_dir, ".hydra/config.yaml", _parse_yaml, dict)
        except Unreadable:
            continue
        asked = (config.get("sweep") or {}).get("metric")
        if isinstance(asked, str):
            return asked
    return AUTO


def _verdict_lines(results: list[JobResult], swept: list[str], metrics: list[str]) -> list[str]:
    """A verdict line for each evaluation metric of the generated samples; the real_* ones score
    the real images, the same in every job, so there is no best job at them."""
    verdicts = {m: winner(results, m) for m in metrics if not m.startswith("real_") and m not in LOSSES}
    return [verdict_line(v, m, swept) for m, v in verdicts.items() if v is not None]


def table_columns(results: list[JobResult], metrics: list[str]) -> tuple[list[str], list[str]]:
    """The metrics a table shows (those that differ between jobs, without their standard
    errors, which go with them as "value ± se"), and the "m=value" texts of those equal in all."""
    metrics = [m for m in without_errors(metrics) if m not in PATH_METRICS]
    done = {m: _completed_with(results, m) for m in metrics}
    same = {m: jobs[0] for m, jobs in done.items() if len({r.metrics[m] for r in jobs}) == 1}
    shown = [m for m in metrics if m not in same or m in ("final_loss", "wall_time_s") or len(results) == 1]
    return shown, [f"{m}={_value_text(r, m)}" for m, r in same.items() if m not in shown]


def _status_counts(results: list[JobResult]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "."


def write_markdown(results: list[JobResult], swept: list[str], metrics: list[str], path: Path,
                   sources: list[Path], the_answer: Answer) -> None:
    """The answer first (the best job by the sweep's metric), then a line per loss and evaluation
    metric, then the table of the metrics that differ between jobs; those equal in all are listed once."""
    shown, common = table_columns(results, metrics)
    columns = ["job", "status", *swept, *shown, "error"]
    lines = [f"# Comparison of {len(results)} jobs", "",
             "Sources: " + ", ".join(f"`{s}`" for s in sources), "", answer_line(the_answer, swept), "",
             _status_counts(results)]
    if common:
        lines.append("Same in every completed job: " + ", ".join(common) + ".")
    for metric in LOSSES:
        best = _best(results, metric)
        if best is not None:
            lines.append(f"Lowest {metric}: **{_label(best, swept)}** ({best.metrics[metric]:.4g}).")
    lines += _verdict_lines(results, swept, metrics)
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        cells = [_cell(c) for c in (r.name, r.status, *(r.settings.get(k, "") for k in swept))]
        cells += [*(_value_text(r, k) for k in shown), _cell(r.error)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![metrics against the swept settings, loss curves](comparison.png)", "",
              "![each job's samples](comparison_samples.png)", ""]
    atomic_write_text(path, "\n".join(lines))


# ---- pictures -----------------------------------------------------------------------------
def _as_float(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _x_axis(results: list[JobResult], swept: list[str]) -> tuple[list[JobResult], list[str], str]:
    """Jobs in plotting order with their tick labels: by value for one numeric setting."""
    if len(swept) == 1:
        key = swept[0]
        values = [_as_float(r.settings.get(key, "")) for r in results]
        order = sorted(results, key=lambda r: _as_float(r.settings[key])) if None not in values else results
        return order, [r.settings.get(key, "") for r in order], key
    return results, [_settings_text(r, swept, "\n") or r.name for r in results], "job"


def _read_or_skip(path: Path, read: Callable[[Path], T]) -> Optional[T]:
    """`read(path)`, or None with a warning when the file is damaged: a job's broken picture or
    curve leaves only itself out of the comparison's pictures."""
    try:
        return read(path)
    except DAMAGED as e:
        log.warning("%s cannot be read (%s: %s), so the comparison's pictures leave it out: restore it, or re-run "
                    "its job to write it again.", path, type(e).__name__, e)
        return None


def losses_file(r: JobResult) -> Optional[Path]:
    """The job's losses.csv; for a job that reused a cached model, the one of the run that
    trained it (named in the cache entry's record)."""
    own = r.run_dir / "losses.csv"
    if own.is_file():
        return own
    record = Path(str(r.metrics.get("checkpoint"))).parent / "record.json"
    if r.metrics.get("checkpoint") and record.is_file():
        trained_in = _read_or_skip(record, lambda p: Path(json.loads(p.read_text())["run_dir"]) / "losses.csv")
        return trained_in if trained_in and trained_in.is_file() else None
    return None


def read_losses(path: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            curves.setdefault(row["split"], []).append((int(row["step"]), float(row["loss"])))
    return curves


def _error_bars(jobs: list[JobResult], metric: str) -> Optional[list[float]]:
    """± the jobs' standard errors of `metric` (NaN, no bar, for a job without one); None, no
    bars at all, when none has one."""
    errors = [standard_error(r, metric) for r in jobs]
    return None if errors.count(None) == len(errors) else [math.nan if e is None else e for e in errors]


def write_plot(results: list[JobResult], swept: list[str], metrics: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order, ticks, xlabel = _x_axis(results, swept)
    plotted = [m for m in without_errors(metrics)
               if len({r.metrics[m] for r in order if r.status == "completed" and is_number(r.metrics.get(m))}) > 1]
    cols = 3
    rows = -(-(len(plotted) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    axes = axes.ravel()
    positions = range(len(order))
    for ax, metric in zip(axes, plotted):
        xs, jobs = zip(*((i, r) for i, r in zip(positions, order)
                         if r.status == "completed" and is_number(r.metrics.get(metric))))
        ax.errorbar(xs, [r.metrics[metric] for r in jobs], yerr=_error_bars(list(jobs), metric), fmt="o-", capsize=3)
        for i, r in zip(positions, order):
            if r.status != "completed":
                ax.axvline(i, color="red", alpha=0.3, linestyle=":")
        ax.set_title(metric, fontsize=10)
        ax.set_xticks(list(positions), ticks, fontsize=8, rotation=30 if len(order) > 6 else 0)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, alpha=0.3)
    curves_ax = axes[len(plotted)]
    sharing: dict[Path, list[JobResult]] = {}  # jobs that reused one model share its curve
    for r in results:
        if (source := losses_file(r)) is not None:
            sharing.setdefault(source, []).append(r)
    for source, jobs in sharing.items():
        curves = _read_or_skip(source, read_losses) or {}
        more = f" (+{len(jobs) - 1} sharing its model)" if len(jobs) > 1 else ""
        if "train" in curves:
            line, = curves_ax.plot(*zip(*curves["train"]), label=_label(jobs[0], swept) + more)
            if "val" in curves:
                curves_ax.plot(*zip(*curves["val"]), "--", color=line.get_color(), alpha=0.7)
    if curves_ax.lines:
        curves_ax.set_yscale("log")
        curves_ax.legend(fontsize=7)
    curves_ax.set_title("loss curves (train; dashed: validation)" if curves_ax.lines else
                        "loss curves: none found", fontsize=10)
    curves_ax.set_xlabel("step", fontsize=8)
    curves_ax.grid(True, alpha=0.3)
    for ax in axes[len(plotted) + 1:]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def _fit(img: Image.Image, width: int) -> Image.Image:
    """Scale to `width` (nearest when enlarging, so pixels stay sharp)."""
    height = max(1, round(img.height * width / img.width))
    return img.resize((width, height), Image.NEAREST if width >= img.width else Image.LANCZOS)


def write_samples_grid(results: list[JobResult], swept: list[str], path: Path, per_row: int = 5,
                       tile: int = 256) -> None:
    """Each job's samples/grid.png scaled to one width, captioned, side by side."""
    caption, pad = 30, 8
    grids = [_read_or_skip(r.grid, lambda p: _fit(Image.open(p).convert("RGB"), tile)) if r.grid else None
             for r in results]
    cell = max([g.height for g in grids if g is not None] + [tile // 2])
    cols = min(per_row, len(results))
    rows = -(-len(results) // cols)
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, rows * (cell + caption + pad) + pad), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=11)
    for i, (r, grid) in enumerate(zip(results, grids)):
        x, y = pad + (i % cols) * (tile + pad), pad + (i // cols) * (cell + caption + pad)
        draw.text((x, y), _label(r, swept)[:44], fill="black", font=font)
        draw.text((x, y + 13), "" if r.status == "completed" else r.status, fill="red", font=font)
        if grid is not None:
            sheet.paste(grid, (x, y + caption))
        else:
            draw.rectangle([x, y + caption, x + tile, y + caption + cell], fill=(225, 225, 225))
            draw.text((x + 8, y + caption + cell // 2), "no samples", fill="black", font=font)
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))


def _marks(r: JobResult, the_answer: Answer) -> list[str]:
    verdict = the_answer.verdict
    marks = [] if r.status == "completed" else [r.status]
    if verdict is not None and r is verdict.best and (verdict.separated or verdict.unjudged):
        marks.append("best")
    elif verdict is not None and (r is verdict.best or r in verdict.tied):
        marks.append("tied")
    return marks


def write_html(results: list[JobResult], swept: list[str], metrics: list[str], path: Path, sources: list[Path],
               the_answer: Answer, plot: Path) -> None:
    """comparison.html: the answer, the table (sortable; the best job, or the tied ones, marked),
    the plots and every job's sample grid, all in the one file."""
    shown, common = table_columns(results, metrics)
    rows = []
    for r in results:
        number = (lambda k: float(r.metrics[k]) if is_number(r.metrics.get(k)) else None)
        setting = (lambda k: _as_float(r.settings.get(k, "")))
        cells = [Cell(r.name), Cell(r.status), *(Cell(r.settings.get(k, ""), setting(k)) for k in swept),
                 *(Cell(_value_text(r, k), number(k)) for k in shown), Cell(r.error)]
        rows.append(Row(cells, _marks(r, the_answer)))
    paragraphs = ["Sources: " + ", ".join(f"`{s}`" for s in sources), _status_counts(results)]
    if common:
        paragraphs.append("Same in every completed job: " + ", ".join(common) + ".")
    paragraphs += _verdict_lines(results, swept, metrics)
    samples = [Picture(_label(r, swept) + ("" if r.status == "completed" else f" ({r.status})"), r.grid, "no samples")
               for r in results]
    write_page(path, f"Comparison of {len(results)} jobs", answer_line(the_answer, swept), paragraphs,
               ["job", "status", *swept, *shown, "error"], rows, [Picture("metrics and loss curves", plot)], samples)


def write_comparison(folders: list[Path], out: Optional[Path] = None,
                     metric: Optional[str] = None) -> tuple[list[JobResult], list[Path]]:
    """Write the comparison files into `out` (default: the first folder), the best job chosen by
    `metric` (default: the sweep.metric the jobs ran with); returns the jobs compared and the files."""
    folders = [Path(f).expanduser() for f in folders]
    results = collect(folders)
    asked = metric or sweep_metric(results)
    if asked != AUTO and metric_direction(asked) is None:
        raise UserError(f"{asked} is not a metric whose better direction is known: use auto, an evaluation metric "
                        "(fd_inception, fd_classifier, kid_classifier, class_accuracy) or val_loss.")
    the_answer = answer(results, asked)
    out = Path(out).expanduser() if out is not None else folders[0]
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the comparison (one that is missing is created).")
    swept, metrics = swept_keys(results), metric_columns(results)
    paths = [out / name for name in FILES]
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_markdown(results, swept, metrics, paths[0], folders, the_answer)
        write_csv(results, swept, metrics, paths[1])
        write_plot(results, swept, metrics, paths[2])
        write_samples_grid(results, swept, paths[3])
        write_html(results, swept, metrics, paths[4], folders, the_answer, paths[2])
    except OSError as e:
        raise UserError(f"The comparison cannot be written into {out} ({e.strerror or e}): give a folder you can "
                        "write to with --out.") from e
    return results, paths


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m difflab.sweep.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="sweep folders (multirun/<date>/<time>) or run folders")
    parser.add_argument("--out", type=Path, default=None, help="where to write the comparison (default: the first folder)")
    parser.add_argument("--metric", default=None, help="the metric that picks the best job (default: the jobs' "
                        "sweep.metric, auto: the evaluation's FD when measured, else the held-out loss)")
    args = parser.parse_args(argv)
    try:
        _, paths = write_comparison(args.folders, args.out, args.metric)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
