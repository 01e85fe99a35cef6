"""The artifact cache never hands back a model the code would not make, nor a damaged file; the
one atomic writer leaves the old file when a process dies before its rename."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflab import artifacts
from difflab.artifacts import Artifact, ArtifactCache, obtain

SETTINGS = {"dataset": {"name": "mnist"}, "seed": 0}


def _made(tmp_path: Path, value: float):
    """A train callback writing a tiny checkpoint; counts its calls."""
    calls = []

    def train():
        calls.append(1)
        path = tmp_path / f"made{len(calls)}.pt"
        torch.save({"config": {}, "w": torch.full((3,), value)}, path)
        return path, {"metrics": {"value": value}}

    return train, calls


def test_a_cached_artifact_is_reused_only_by_the_same_code(tmp_path, monkeypatch, caplog):
    cache = ArtifactCache(tmp_path / "cache")
    train, calls = _made(tmp_path, 1.0)
    monkeypatch.setattr(artifacts, "code_fingerprint", lambda: "code-a")
    first = obtain(cache, "diffusion", SETTINGS, train)
    assert first.source == "trained" and obtain(cache, "diffusion", SETTINGS, train).source == "cache"
    assert len(calls) == 1

    monkeypatch.setattr(artifacts, "code_fingerprint", lambda: "code-b")  # the loss or the network was edited
    with caplog.at_level(logging.INFO, logger="difflab"):
        second = obtain(cache, "diffusion", SETTINGS, train)
    assert second.source == "trained" and second.key != first.key and len(calls) == 2
    assert "was made by other code" in caplog.text

    monkeypatch.setattr(artifacts, "code_fingerprint", lambda: "code-c")
    looser = obtain(cache, "diffusion", SETTINGS, train, other_code=True)
    assert looser.source == "cache" and looser.key == second.key  # the newest made by other code
    assert len(calls) == 2


@pytest.mark.parametrize("damage", ["flipped byte", "another model"])
def test_a_damaged_cache_entry_is_made_anew(tmp_path, caplog, damage):
    cache = ArtifactCache(tmp_path / "cache")
    train, calls = _made(tmp_path, 2.0)
    stored = obtain(cache, "classifier", SETTINGS, train)
    if damage == "another model":  # a valid checkpoint put in its place
        torch.save({"config": {}, "w": torch.zeros(3)}, stored.path)
    else:  # as a bad disk or a partial copy leaves it
        with open(stored.path, "r+b") as f:
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING, logger="difflab"):
        again = obtain(cache, "classifier", SETTINGS, train)
    assert again.source == "trained" and len(calls) == 2 and "is damaged" in caplog.text
    assert torch.load(again.path, weights_only=True)["w"].tolist() == [2.0] * 3


def test_an_entry_without_its_record_is_not_reused(tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    train, calls = _made(tmp_path, 3.0)
    stored = obtain(cache, "diffusion", SETTINGS, train)
    (stored.path.parent / "record.json").unlink()  # a store killed before its last write
    assert obtain(cache, "diffusion", SETTINGS, train).source == "trained" and len(calls) == 2


def test_the_fingerprint_follows_the_code_that_determines_models(tmp_path, monkeypatch):
    import difflab

    package = tmp_path / "difflab"
    shutil.copytree(Path(difflab.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__", "*.so"))

    def fingerprint() -> str:
        monkeypatch.setattr(artifacts, "__file__", str(package / "artifacts.py"))
        artifacts.code_fingerprint.cache_clear()
        try:
            return artifacts.code_fingerprint()
        finally:
            artifacts.code_fingerprint.cache_clear()

    before = fingerprint()
    (package / "sweep" / "compare.py").write_text("# reports only\n")  # no model depends on it
    assert fingerprint() == before
    loss = package / "diffusion" / "process.py"
    loss.write_text(loss.read_text() + "\n# an edited loss\n")
    assert fingerprint() != before


def test_atomic_write_killed_before_its_rename_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old\n")
    script = (
        "import os, signal, sys\n"
        "from difflab.checkpoint import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'new, not yet renamed')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_write({str(target)!r}, write)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert target.read_text() == "old\n"


def test_given_artifacts_are_keyed_by_content(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"config": {}}, path)
    given = obtain(ArtifactCache(tmp_path), "autoencoder", SETTINGS, lambda: pytest.fail("trained"), given=str(path))
    assert isinstance(given, Artifact) and given.source == "given" and given.key.startswith("file-")


def test_a_run_waiting_for_another_says_for_whom(tmp_path, caplog):
    script = (
        "import sys, time\n"
        "from difflab.artifacts import ArtifactCache\n"
        f"with ArtifactCache({str(tmp_path / 'cache')!r}).lock('diffusion', 'k'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(2)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with caplog.at_level(logging.INFO, logger="difflab"):
        with ArtifactCache(tmp_path / "cache").lock("diffusion", "k"):
            pass
    holder.wait(timeout=30)
    assert f"waiting for process {holder.pid} on " in caplog.text and "making this diffusion" in caplog.text


def test_the_record_holds_the_hash_and_the_parameter_count(tmp_path):
    import json

    cache = ArtifactCache(tmp_path / "cache")
    path = tmp_path / "trained.pt"
    torch.save({"config": {}, "ema": {"model": {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(4)}}}, path)
    model = obtain(cache, "diffusion", SETTINGS, lambda: (path, {}))
    record = json.loads((model.path.parent / "record.json").read_text())
    assert record["parameters"] == 16 and record["sha256"] == artifacts.sha256_file(model.path)
    train, _ = _made(tmp_path, 1.0)  # not a training checkpoint: nothing to count
    other = obtain(cache, "latents", SETTINGS, train)
    assert "parameters" not in json.loads((other.path.parent / "record.json").read_text())
