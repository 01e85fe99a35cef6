"""The trackers of the logger group, as real libraries (wandb offline, mlflow on its local store,
TensorBoard event files, the csv files): after a tiny run that evaluates during training, what each
one logged is read back through its own files or API; a tiny sweep groups its jobs; a wrong logger
or a missing package is one sentence before any work."""

from __future__ import annotations

import csv
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from conftest import run_py, tiny_overrides

pytestmark = pytest.mark.slow

ALL = "logger=[tensorboard,csv,wandb,mlflow]"
EVAL_EVERY = ["eval.every=3", "eval.every_samples=8", "eval.num_samples=8", "eval.classifier_steps=5",
              "eval.batch_size=8", "eval.extractors=[classifier]", "eval.bootstrap=0", "eval.memorisation=0",
              "train.best_metric=fd", "train.threads=1"]


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        yield


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, shapes_dir, offline) -> Path:
    """A tiny training run logged to every tracker, measured every 3 steps, best.pt by FD."""
    base = tmp_path_factory.mktemp("trackers")
    run_dir = base / "run"
    proc = run_py(*tiny_overrides(shapes_dir, base / "cache"), *EVAL_EVERY, ALL, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def csv_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(run_dir / "scalars.csv") as f:
        for row in csv.DictReader(f):
            curves.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
    return curves


def wandb_records(path: Path):
    """The records of a .wandb file (LevelDB's log format: 32 KiB blocks of checksummed chunks,
    after a 7-byte W&B header), parsed with wandb's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_wandb_offline_run_holds_the_config_scalars_and_final_metrics(tracked):
    files = list((tracked / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    config, history, summary = {}, [], {}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in record.summary.update})
    assert config["train"]["max_steps"] == 6 and config["dataset"]["name"] == "folder"
    assert [h["step"] for h in history if "train/loss" in h] == [2, 4, 6]
    assert [h["step"] for h in history if "val/fd_classifier" in h] == [3, 6]
    assert any("samples/grid/path" in h for h in history)  # the sample grid, as a wandb.Image
    assert summary["final_loss"] > 0 and summary["steps"] == 6


def test_mlflow_search_runs_reads_the_run_back(tracked):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tracked / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["difflab"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["params.train.max_steps"] == "6"
    assert run["params.dataset.name"] == "folder"
    assert run["metrics.train/loss"] > 0 and run["metrics.final/final_loss"] == pytest.approx(run["metrics.train/loss"])
    history = mlflow.MlflowClient().get_metric_history(run["run_id"], "val/fd_classifier")
    assert [m.step for m in history] == [3, 6]
    artifacts = Path(run["artifact_uri"])
    assert (artifacts / "config.yaml").is_file() and list((artifacts / "samples" / "grid").glob("*.png"))


def test_csv_holds_every_curve_and_the_final_metrics(tracked):
    curves = csv_curves(tracked)
    assert [s for s, _ in curves["train/loss"]] == [2, 4, 6]
    assert [s for s, _ in curves["val/loss"]] == [3, 6]
    with open(tracked / "final_metrics.csv") as f:
        final = {row["metric"]: float(row["value"]) for row in csv.DictReader(f)}
    assert final["steps"] == 6 and final["final_loss"] == pytest.approx(curves["train/loss"][-1][1], rel=1e-6)


def test_eval_every_writes_a_curve_and_best_pt_follows_the_metric(tracked):
    fd = csv_curves(tracked)["val/fd_classifier"]
    assert [s for s, _ in fd] == [3, 6] and all(v > 0 for _, v in fd)
    best = torch.load(tracked / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    best_step, best_fd = min(fd, key=lambda p: p[1])
    assert best["step"] == best_step and best["best_score"] == pytest.approx(best_fd, rel=1e-5)


def test_tensorboard_a_researcher_reads(tracked):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(tracked / "tb"))
    mux.Reload()
    assert list(mux.Runs()) == ["."]
    tags = mux.GetAccumulator(".").Tags()
    scalars = tags["scalars"]
    assert sorted({t.split("/")[0] for t in scalars})[0] == "train"  # the training curves come first
    assert not [t for t in scalars if t.startswith(("final/", "eval/", "schedule/"))]
    assert {"data/real", "samples/grid", "samples/denoising"} <= set(tags["images"])
    assert len(mux.GetAccumulator(".").Images("samples/denoising")) == 3  # one per frame
    text = mux.PluginRunToTagToContent("text")["."]
    assert "config/text_summary" in text and "provenance/text_summary" in text
    config = mux.GetAccumulator(".").Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_steps: 6" in config
    content = mux.PluginRunToTagToContent("hparams")["."]
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    columns = dict(start.session_start_info.hparams)
    assert columns["train.max_steps"].number_value == 6 and columns["dataset"].string_value == "folder"
    assert not [k for k in columns if k.startswith(("paths", "dataset.root", "ckpt"))]
    assert not [k for k, v in columns.items() if os.sep in v.string_value]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"train/loss", "val/best_loss", "val/final/fd_classifier"} <= metrics
    assert set(metrics) <= set(scalars)  # each is the last value of a curve, no card of its own


def test_a_sweep_groups_its_jobs(tmp_path, shapes_dir, offline):
    """Two jobs sampling one model: TensorBoard names each by its setting, wandb groups them by the
    sweep folder, mlflow holds them as children of one parent run in the sweep's experiment."""
    import mlflow

    sweep_dir = tmp_path / "sweep"
    proc = run_py("-m", *tiny_overrides(shapes_dir, tmp_path / "cache"), "sampler.steps=3,5", "train.threads=1",
                  "logger=[tensorboard,wandb,mlflow]", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(sweep_dir))
    mux.Reload()
    assert sorted(r for r in mux.Runs() if "/tb/" in r) == ["0/tb/sampler.steps=3", "1/tb/sampler.steps=5"]
    group = "/".join(sweep_dir.parts[-2:])
    for job in ("0", "1"):
        record = next(r for r in wandb_records(next((sweep_dir / job / "wandb").glob("offline-run-*/run-*.wandb")))
                      if r.WhichOneof("record_type") == "run")
        assert record.run.run_group == group
    mlflow.set_tracking_uri(f"sqlite:///{sweep_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[group])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parents) == 1 and len(children) == 2
    assert set(children["tags.mlflow.parentRunId"]) == {parents.iloc[0]["run_id"]}
    assert sorted(children["tags.mlflow.runName"]) == ["sampler.steps=3", "sampler.steps=5"]


def test_a_logger_that_is_no_option_is_one_sentence(tmp_path, shapes_dir):
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "logger=[csv,foo]",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: logger=foo is not an option: choose one of csv, mlflow, "
                                                    "tensorboard, wandb.")
    assert not (tmp_path / "run").exists()


@pytest.fixture
def plan_of(tmp_path, shapes_dir):
    """overrides -> the plan of the run they compose (build_plan: every check before any work)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from difflab.cli import CONF_DIR
    from difflab.plan import build_plan

    def plan(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
            cfg = compose(config_name="config", overrides=[*tiny_overrides(shapes_dir, tmp_path / "cache"), *overrides])
        GlobalHydra.instance().clear()
        return build_plan(cfg, tmp_path / "run")

    return plan


@pytest.mark.parametrize("override, message", [
    ("+logger.neptune={}", "logger.neptune is not a tracker: choose some of tensorboard, wandb, mlflow, csv, "
                           "e.g. logger=[tensorboard,csv]."),
    ("train.best_metric=fd", "train.best_metric=fd is measured by the evaluation during training, which "
                             "eval.every=0 leaves off: add e.g. eval.every=500, or train.best_metric=val_loss."),
    ("mode=classifier eval.every=5", "eval.every=5 measures a diffusion model while it trains, and mode=classifier "
                                     "trains none: leave eval.every out (or 0)."),
])
def test_a_wrong_tracker_setting_is_one_sentence(override, message, plan_of):
    from difflab.errors import UserError

    with pytest.raises(UserError) as e:
        plan_of(*override.split())
    assert str(e.value) == message


def test_a_missing_package_names_its_extra(plan_of, monkeypatch):
    """wandb made unimportable (sys.modules['wandb'] = None: how Python marks a blocked import)."""
    from difflab.errors import UserError

    steps = [step.name for step in plan_of("logger=[tensorboard,wandb,mlflow]", "eval.every=3").steps]
    assert "evaluate during training" in steps  # with the packages there, the plan goes on
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(UserError) as e:
        plan_of("logger=[tensorboard,wandb]")
    assert str(e.value) == ("logger=wandb needs the wandb package, which is not installed: pip install "
                            "'difflab[wandb]', or choose another logger.")


def test_a_run_name_of_many_settings_stays_a_valid_folder_name():
    """A tracker's folder is named by the run: a name too long for the file system keeps its start
    and a hash of the whole, so two long names that differ only at the end stay apart."""
    from difflab.sweep.hparams import MAX_NAME, bounded_name

    assert bounded_name("sampler.steps=3") == "sampler.steps=3"
    long_a, long_b = "x=1," * 100 + "seed=0", "x=1," * 100 + "seed=1"
    assert len(bounded_name(long_a).encode()) <= MAX_NAME
    assert bounded_name(long_a).startswith("x=1,x=1,") and bounded_name(long_a) != bounded_name(long_b)
