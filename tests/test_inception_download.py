"""eval.inception_weights=download: the weights land in torch's hub cache only when they are Inception's, and an
offline machine says so in one sentence before anything trains."""

from __future__ import annotations

import pytest
import torch
from conftest import run_py, tiny_overrides

from difflab.errors import UserError
from difflab.evaluate.extractors import INCEPTION_FILE, download_inception_weights, find_inception_weights


@pytest.fixture
def hub(tmp_path, monkeypatch):
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(before)


def _weights(path, fc_shape=(1008, 2048)):
    torch.save({"fc.weight": torch.zeros(fc_shape)}, path)
    return path


def test_download_puts_inception_weights_in_the_hub_cache_once(hub, tmp_path):
    source = _weights(tmp_path / "mirror.pth")
    assert find_inception_weights("download")[0] is None
    path = download_inception_weights(source.as_uri())
    assert path == hub / INCEPTION_FILE and path.read_bytes() == source.read_bytes()
    assert find_inception_weights("download") == (path, "")
    assert download_inception_weights("file:///nowhere/at/all.pth") == path  # cached: not fetched again
    assert sorted(p.name for p in hub.iterdir()) == [INCEPTION_FILE]


@pytest.mark.parametrize("case", ["foreign file", "unreachable"])
def test_a_failed_download_is_one_sentence_and_leaves_nothing(hub, tmp_path, case):
    url = _weights(tmp_path / "other.pth", (10, 10)).as_uri() if case == "foreign file" else "file:///nowhere/x.pth"
    with pytest.raises(UserError) as e:
        download_inception_weights(url)
    message = str(e.value)
    assert "\n" not in message and message.endswith(".") and "eval.inception_weights=PATH" in message
    assert not hub.exists() or not any(hub.iterdir())


@pytest.mark.slow
def test_an_offline_run_stops_before_training(shapes_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DIFFLAB_INCEPTION_URL", "file:///nowhere/weights.pth")  # as unreachable as the internet here
    settings = [*tiny_overrides(shapes_dir, tmp_path / "cache"), "eval.num_samples=4", "eval.inception_weights=download"]
    dry = run_py(*settings, "dry_run=true", f"hydra.run.dir={tmp_path / 'dry'}")
    assert dry.returncode == 0 and "inception weights" in dry.stdout and "download" in dry.stdout, dry.stderr[-2000:]
    proc = run_py(*settings, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: eval.inception_weights=download could not fetch")
    assert not (tmp_path / "run" / "checkpoints").exists()
