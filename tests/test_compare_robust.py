"""A comparison outlives damaged job folders: each damaged job is one row with status unreadable
and the reason, the other rows and every report file are as usual. A --out it cannot write to is
one `error:` sentence, and a sweep with a failed job exits 1 once its comparison is written."""

from __future__ import annotations

import shutil

import pytest
from conftest import tiny_overrides
from test_sweep import assert_report, compare, read_rows, sweep

pytestmark = pytest.mark.slow

# job folder -> (the file overwritten, its new bytes, what the job's error column says)
DAMAGED = {
    "cut": ("metrics.json", b'{"status": "completed", "final_loss": ', "metrics.json is not valid JSON"),
    "binary": ("metrics.json", b"\xff\xfe\x00\x81", "metrics.json is not UTF-8 text"),
    "list": ("metrics.json", b"[1, 2, 3]", "metrics.json holds a list, not an object"),
    "ema": ("metrics.json", b'{"status": "completed", "ema": [0.99]}', 'metrics.json has an "ema" entry'),
    "yaml": (".hydra/overrides.yaml", b"- train.lr=0.002\n- 'unclosed", ".hydra/overrides.yaml is not valid YAML"),
    "mapping": (".hydra/overrides.yaml", b"train.lr: 0.002\n", ".hydra/overrides.yaml holds an object, not a list"),
}


@pytest.fixture(scope="module")
def failed_sweep(tmp_path_factory, shapes_dir):
    """Two jobs in this process (Hydra's basic launcher), the second with a bad setting."""
    base = tmp_path_factory.mktemp("failed")
    proc = sweep(*tiny_overrides(shapes_dir, base / "cache"), "train.threads=1", "train.lr=2e-3,-1",
                 f"hydra.sweep.dir={base / 'sweep'}", returncode=1)
    return base / "sweep", proc


@pytest.fixture(scope="module")
def damaged_folder(failed_sweep, tmp_path_factory):
    """The sweep's two jobs, copies of the completed one with a damaged file each (DAMAGED), one
    with a broken .hydra/config.yaml (which a comparison does not read) and one whose sample
    grid and loss curve are garbage."""
    sweep_dir, _ = failed_sweep
    folder = tmp_path_factory.mktemp("damaged")
    for job in ("0", "1"):
        shutil.copytree(sweep_dir / job, folder / job)
    garbage = {**{job: [(file, content)] for job, (file, content, _) in DAMAGED.items()},
               "config": [(".hydra/config.yaml", b"train: [")],
               "pictures": [("samples/grid.png", b"not a png"), ("losses.csv", b"step,split\n3,train\n")]}
    for job, files in garbage.items():
        shutil.copytree(sweep_dir / "0", folder / job)
        for file, content in files:
            (folder / job / file).write_bytes(content)
    return folder


def test_a_sweep_with_a_failed_job_exits_1_after_its_comparison(failed_sweep):
    sweep_dir, proc = failed_sweep
    assert_report(sweep_dir)
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 jobs did not complete (1 failed);"), last
    assert f"{sweep_dir / 'comparison.md'} has their errors" in last
    assert f"hydra.sweep.dir={sweep_dir} train.resume=auto" in last
    assert [r["status"] for r in read_rows(sweep_dir)] == ["completed", "failed"]


def test_damaged_jobs_are_unreadable_rows_and_the_others_intact(failed_sweep, damaged_folder):
    sweep_dir, _ = failed_sweep
    proc = compare(damaged_folder)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_report(damaged_folder)
    rows = {r["job"]: r for r in read_rows(damaged_folder)}
    for job, (_, _, error) in DAMAGED.items():
        assert rows[job]["status"] == "unreadable"
        assert rows[job]["error"].startswith(error) and rows[job]["error"].endswith("train.resume=auto.")
        assert rows[job]["final_loss"] == ""
    original = {r["job"]: r for r in read_rows(sweep_dir)}
    assert rows["0"] == original["0"] and rows["1"] == original["1"]
    for job in ("config", "pictures"):
        assert {**rows[job], "job": "0"} == original["0"]
    for file in ("grid.png", "losses.csv"):
        assert f"pictures/{'samples/' if file == 'grid.png' else ''}{file} cannot be read" in proc.stderr
    table = (damaged_folder / "comparison.md").read_text()
    assert "3 completed, 1 failed, 6 unreadable." in table
    assert "| list | unreadable |" in table


@pytest.mark.parametrize("out", ["taken", "taken/comparison"], ids=["file", "under-a-file"])
def test_out_that_cannot_hold_the_comparison_is_one_error(failed_sweep, tmp_path, out):
    sweep_dir, _ = failed_sweep
    (tmp_path / "taken").write_text("")
    proc = compare(sweep_dir, "--out", tmp_path / out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "give a folder" in proc.stderr
