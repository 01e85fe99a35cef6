"""`difflab cache list` and `difflab cache prune`: through run.py as a user types them, on a cache
made by a tiny run (so its entries are real ones), with entries aged by setting their times."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import run_py, tiny_overrides
from filelock import FileLock

from difflab.artifacts import ArtifactCache

pytestmark = pytest.mark.slow
DAY = 86400


@pytest.fixture()
def cache(shapes_dir, tmp_path):
    """A cache holding two tiny runs' diffusion models (6 and 4 training steps)."""
    root = tmp_path / "cache"
    for steps in (6, 4):
        proc = run_py(*tiny_overrides(shapes_dir, root), f"train.max_steps={steps}", "sample.num_images=0",
                      f"hydra.run.dir={tmp_path / f'run{steps}'}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _model(cache, steps: int = 6):
    return next(e for e in ArtifactCache(cache).entries()
                if json.loads((e.folder / "record.json").read_text())["settings"]["train"]["max_steps"] == steps)


def _age(entry, days: float) -> None:
    then = time.time() - days * DAY
    for name in ("record.json", "last_used"):
        path = entry.folder / name
        if path.exists():
            os.utime(path, (then, then))


def test_list_shows_every_entry_with_its_size(cache):
    entries = ArtifactCache(cache).entries()
    assert [e.stage for e in entries] == ["diffusion", "diffusion"] and all(e.size > 0 for e in entries)
    proc = run_py("cache", "list", f"paths.cache_dir={cache}")
    assert proc.returncode == 0, proc.stderr
    for e in entries:
        assert e.key in proc.stdout
    assert "diffusion: 2 entries" in proc.stdout and "total" in proc.stdout


def test_prune_removes_only_entries_unused_for_that_long_and_a_run_finds_them_gone(cache, shapes_dir, tmp_path):
    model = _model(cache)
    _age(model, 40)
    dry = run_py("cache", "prune", "--older-than", "30d", "--dry-run", f"paths.cache_dir={cache}")
    assert dry.returncode == 0 and "would remove 1 entries" in dry.stdout and model.folder.is_dir()
    proc = run_py("cache", "prune", "--older-than", "30d", f"paths.cache_dir={cache}")
    assert proc.returncode == 0, proc.stderr
    assert f"removed diffusion/{model.key}" in proc.stdout and not model.folder.exists()
    assert [e.key for e in ArtifactCache(cache).entries()] == [_model(cache, 4).key]  # made today: kept
    again = run_py(*tiny_overrides(shapes_dir, cache), "sample.num_images=0", f"hydra.run.dir={tmp_path / 'again'}")
    assert again.returncode == 0 and (model.folder / "model.pt").is_file()  # trained anew under the same key


def test_an_entry_in_use_is_kept_and_handing_one_out_renews_it(cache, shapes_dir, tmp_path):
    model = _model(cache)
    _age(model, 40)
    with FileLock(str(model.folder.parent / f"{model.key}.lock")):  # as a run that is checking it holds it
        proc = run_py("cache", "prune", "--older-than", "30d", f"paths.cache_dir={cache}")
    assert proc.returncode == 0 and "a process holds its lock" in proc.stdout and model.folder.is_dir()
    reuse = run_py(*tiny_overrides(shapes_dir, cache), "sample.num_images=0", f"hydra.run.dir={tmp_path / 'reuse'}")
    assert reuse.returncode == 0, reuse.stderr[-3000:]
    renewed = next(e for e in ArtifactCache(cache).entries() if e.key == model.key)
    assert renewed.last_used > time.time() - DAY  # the run took it from the cache: no longer old
    assert run_py("cache", "prune", "--older-than", "30d", f"paths.cache_dir={cache}").returncode == 0
    assert model.folder.is_dir()


@pytest.mark.parametrize("args, message", [
    (["prune", "--older-than", "soon"], "--older-than soon is not an age: write a number and a unit, e.g. 30d"),
    (["list", "seed=3"], "difflab cache takes no seed=3: only paths.cache_dir=DIR"),
])
def test_bad_cache_commands_are_one_sentence(args, message, tmp_path):
    proc = run_py("cache", *args, f"paths.cache_dir={tmp_path}")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
