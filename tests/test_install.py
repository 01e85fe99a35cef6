"""difflab as pip installs it: the wheel carries conf/ and sweeps/, and `python -m difflab`, the
`difflab` console script and a user's own config folder work from a folder that holds no clone."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import pytest
from conftest import REPO, read_metrics, run_py, tiny_overrides
from omegaconf import OmegaConf

# What a build must not take from the clone: a stale build/lib would put deleted files in the wheel.
NOT_BUILT = {".git", ".venv", "build", "outputs", "multirun", ".pytest_cache", "data"}


def _source_copy(target: Path) -> Path:
    """The clone's files, symlinks kept as symlinks (conf/ and sweeps/ reach the package through them), so the build
    neither reads nor leaves build/ and *.egg-info in the clone."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        skip = NOT_BUILT if Path(folder) == REPO else set()
        return [n for n in names if n in skip or n == "__pycache__" or n.endswith(".egg-info")]

    shutil.copytree(REPO, target, symlinks=True, ignore=ignore)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    src = _source_copy(base / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(base / "dist")], check=True, capture_output=True, timeout=300)
    return next((base / "dist").glob("difflab-*.whl"))


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed on its own (the venv's difflab, an editable install of a clone, is shadowed by it)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return target


@pytest.fixture
def installed(site, tmp_path) -> Callable[..., subprocess.CompletedProcess]:
    """Run a command with the installed difflab in a folder of its own, as a user without a clone does."""
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    env.pop("PYTEST_CURRENT_TEST", None)
    (tmp_path / "elsewhere").mkdir()

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True,
                              timeout=300)

    return run


def _tiny(shapes_dir: Path, cache_dir: Path) -> list[str]:
    return [*tiny_overrides(shapes_dir, cache_dir), "train.threads=1"]


def test_the_wheel_holds_every_config_and_named_sweep(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("conf", "sweeps"):
        files = {f"difflab/{folder}/{p.relative_to(REPO / folder).as_posix()}" for p in (REPO / folder).rglob("*.yaml")}
        assert files and files <= names, sorted(files - names)
    assert "difflab/__main__.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "difflab = difflab.cli:main" in entry_points


@pytest.mark.slow
def test_python_m_difflab_runs_from_the_installed_package(installed, site, shapes_dir, tmp_path):
    where = installed(sys.executable, "-c", "import difflab.cli; print(difflab.__file__, difflab.cli.CONF_DIR)")
    assert where.returncode == 0, where.stderr[-3000:]
    package, conf = where.stdout.split()
    assert Path(package).is_relative_to(site) and Path(conf) == site / "difflab" / "conf"
    run_dir = tmp_path / "run"
    proc = installed(sys.executable, "-m", "difflab", *_tiny(shapes_dir, tmp_path / "cache"),
                     f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(run_dir)["status"] == "completed"
    sources = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.config_sources
    assert next(s.path for s in sources if s.provider == "main") == str(site / "difflab" / "conf")


@pytest.mark.slow
def test_the_console_script_runs_a_sweep(installed, site, shapes_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = installed(str(site / "bin" / "difflab"), "-m", *_tiny(shapes_dir, tmp_path / "cache"),
                     "sample.num_images=4,8", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep_dir / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["sample.num_images"], r["status"]) for r in rows] == [("4", "completed"), ("8", "completed")]
    assert "2 completed" in (sweep_dir / "comparison.md").read_text()


@pytest.mark.slow
def test_installed_and_clone_plan_the_same_named_sweep(installed, shapes_dir, tmp_path):
    """The wheel's configs, named sweeps and code are the clone's: the same plan, artifact keys included."""
    args = [*_tiny(shapes_dir, tmp_path / "cache"), "+sweep=schedules", "dry_run=true"]
    wheel_plan = installed(sys.executable, "-m", "difflab", *args)
    clone_plan = run_py(*args, cwd=tmp_path / "elsewhere")
    assert wheel_plan.returncode == clone_plan.returncode == 0, wheel_plan.stderr[-3000:] + clone_plan.stderr[-3000:]
    assert wheel_plan.stdout.count("diffusion model") == 3 and wheel_plan.stdout == clone_plan.stdout


def _user_config_dir(root: Path, shapes_dir: Path) -> Path:
    """A user's own options: a dataset (folder.yaml with the shapes' values) and a sampler."""
    (root / "dataset").mkdir(parents=True)
    (root / "sampler").mkdir()
    dataset = OmegaConf.load(REPO / "conf" / "dataset" / "folder.yaml")
    dataset.merge_with({"root": str(shapes_dir), "image_size": 16, "channels": 1, "val_size": 8})
    OmegaConf.save(dataset, root / "dataset" / "shapes.yaml")
    (root / "sampler" / "my_ddim.yaml").write_text("defaults:\n  - sampler_schema\n  - _self_\n"
                                                   "name: ddim\nsteps: 4\neta: 0.5\n")
    return root


@pytest.mark.slow
def test_a_users_config_folder_joins_the_search_path(installed, shapes_dir, tmp_path):
    user = _user_config_dir(tmp_path / "my_conf", shapes_dir)
    args = [o for o in _tiny(shapes_dir, tmp_path / "cache") if not o.startswith(("dataset", "sampler"))]
    run_dir = tmp_path / "run"
    proc = installed(sys.executable, "-m", "difflab", "--config-dir", str(user), *args, "dataset=shapes",
                     "sampler=my_ddim", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert (cfg.dataset.root, cfg.dataset.image_size, cfg.sampler.name, cfg.sampler.eta) == (
        str(shapes_dir), 16, "ddim", 0.5)
    assert read_metrics(run_dir)["status"] == "completed"
    plan = installed(sys.executable, "-m", "difflab", f"hydra.searchpath=[file://{user}]", *args, "dataset=shapes",
                     "sampler=my_ddim", "dry_run=true")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "1x16x16" in plan.stdout and "ddim (4 NFE)" in plan.stdout, plan.stdout
    missing = installed(sys.executable, "-m", "difflab", "--config-dir", str(tmp_path / "nowhere"), *args)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: --config-dir {tmp_path / 'nowhere'} is not a folder: name the folder that holds your own config "
        "groups (DIR/dataset/my.yaml for dataset=my)."]
