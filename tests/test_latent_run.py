"""Latent diffusion end to end: `python run.py` with autoencoder=kl|vq on tiny configs in
temporary folders; the autoencoder artifact (given, cached or trained first), the encode-once
latents, sampling a latent model, and bad ckpt.autoencoder input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TINY_AE, read_metrics, run_py, tiny_overrides

pytestmark = pytest.mark.slow

def _base(shapes_dir, cache) -> list[str]:
    return [*tiny_overrides(shapes_dir, cache), *TINY_AE]


def _assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def latent(tmp_path_factory, shapes_dir):
    """Two latent diffusion runs started together with nothing cached, differing only in a
    diffusion setting: one trains the autoencoder first, the other waits and takes it from the
    cache. Returns (base folder, the run that trained it, the run that reused it)."""
    base = tmp_path_factory.mktemp("latent")
    runs = {"a": [], "b": ["train.lr=5e-4"]}
    procs = [subprocess.Popen([sys.executable, str(REPO / "run.py"), *_base(shapes_dir, base / "cache"), "autoencoder=kl",
                               *extra, f"hydra.run.dir={base / name}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for name, extra in runs.items()]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    trained = [name for name in runs if read_metrics(base / name)["autoencoder_trained"]]
    assert len(trained) == 1, "the shared autoencoder must be trained exactly once"
    return base, base / trained[0], base / ({"a", "b"} - set(trained)).pop()


def test_latent_diffusion_trains_its_autoencoder_first_and_samples_images(latent):
    _, run_dir, _ = latent
    m = read_metrics(run_dir)
    assert m["autoencoder_source"] == "trained" and m["autoencoder_trained"] is True and m["trained"] is True
    assert m["latent_shape"] == [2, 4, 4] and m["latent_scale"] > 0
    log = (run_dir / "train.log").read_text()
    assert "no kl autoencoder made with these settings in the artifact cache yet: making it now" in log
    assert (run_dir / "autoencoder" / "reconstructions" / "reconstructions.png").is_file()
    assert (run_dir / "autoencoder" / "checkpoints" / "last.pt").is_file()
    data = np.load(run_dir / "samples" / "samples.npz")
    assert data["images"].shape == (8, 16, 16, 1) and data["images"].dtype == np.uint8  # decoded, as in pixel space
    assert (run_dir / "samples" / "grid.png").is_file() and (run_dir / "samples" / "denoising.gif").is_file()


def test_sample_mode_decodes_a_latent_model(latent, tmp_path):
    _, run_dir, _ = latent
    out = tmp_path / "sample"
    proc = run_py("mode=sample", f"ckpt={run_dir}/checkpoints/last.pt", "sample.num_images=6", "device=cpu",
                  "train.threads=1", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = np.load(out / "samples" / "samples.npz")["images"]
    assert images.shape == (6, 16, 16, 1) and images.dtype == np.uint8 and images.std() > 0


def test_cached_autoencoder_is_reused_and_a_changed_setting_trains_anew(latent, shapes_dir):
    base, first, second = latent
    m1, m2 = read_metrics(first), read_metrics(second)
    # another diffusion setting, the same autoencoder settings: the autoencoder came from the cache
    assert m2["autoencoder_source"] == "cache" and m2["autoencoder_trained"] is False
    assert m2["autoencoder_key"] == m1["autoencoder_key"] and m2["latent_scale"] == m1["latent_scale"]
    assert m2["trained"] is True and m2["artifact_key"] != m1["artifact_key"]
    assert not (second / "autoencoder").exists()
    assert "reusing the kl autoencoder made with these settings by" in (second / "train.log").read_text()
    latents = base / "cache" / "artifacts" / "latents"
    assert len(list(latents.glob("*/record.json"))) == 1  # both encoded the training set once, together
    # a changed autoencoder setting trains a new one, and with it a new diffusion model and latents
    third = base / "third"
    proc = run_py(*_base(shapes_dir, base / "cache"), "autoencoder=kl", "autoencoder.kl_weight=1e-5",
                  f"hydra.run.dir={third}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m3 = read_metrics(third)
    assert m3["autoencoder_trained"] is True and m3["autoencoder_key"] != m1["autoencoder_key"]
    assert m3["trained"] is True and m3["artifact_key"] != m1["artifact_key"]
    assert len(list(latents.glob("*/record.json"))) == 2


def test_reconstruction_mode_vq_with_discriminator_then_given_checkpoint(tmp_path, shapes_dir):
    run_dir = tmp_path / "recon"
    base = _base(shapes_dir, tmp_path / "cache")
    proc = run_py(*base, "mode=reconstruction", "autoencoder=vq", "autoencoder.discriminator.enabled=true",
                  "autoencoder.discriminator.start=4", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(run_dir)
    assert m["stage"] == "reconstruction" and m["trained"] is True and m["steps"] == 8
    assert 0 < m["reconstruction_mse"] < 1 and m["reconstruction_psnr"] > 0
    assert 0 < m["codebook_usage"] <= 1 and m["codebook_perplexity"] >= 1
    assert (run_dir / "reconstructions" / "reconstructions.png").is_file()
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert {"train/loss", "val/final/reconstruction_mse", "val/final/reconstruction_psnr",
            "val/final/codebook_usage"} <= set(acc.Tags()["scalars"])
    assert "reconstructions" in acc.Tags()["images"]
    # the same autoencoder given explicitly: measured again, not trained
    given = tmp_path / "given"
    proc = run_py(*base, "mode=reconstruction", "autoencoder=vq", f"ckpt.autoencoder={run_dir}/checkpoints/last.pt",
                  f"hydra.run.dir={given}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    g = read_metrics(given)
    assert g["autoencoder_source"] == "given" and g["trained"] is False
    assert g["reconstruction_mse"] == pytest.approx(m["reconstruction_mse"], rel=1e-5)
    assert "using the vq autoencoder given by ckpt.autoencoder=" in (given / "train.log").read_text()


def test_bad_ckpt_autoencoder(latent, tmp_path, shapes_dir):
    _, run_dir, _ = latent
    base = [*_base(shapes_dir, tmp_path / "cache"), "autoencoder=kl"]
    _assert_clean_error(run_py(*base, f"ckpt.autoencoder={tmp_path}/nope.pt", f"hydra.run.dir={tmp_path}/a"),
                        "error: The kl autoencoder file", "does not exist")
    _assert_clean_error(run_py(*base, f"ckpt.autoencoder={run_dir}/checkpoints/last.pt", f"hydra.run.dir={tmp_path}/b"),
                        "holds a 'diffusion' model, not a trained autoencoder")
    _assert_clean_error(run_py(*base, "autoencoder.latent_channels=3",
                               f"ckpt.autoencoder={run_dir}/autoencoder/checkpoints/last.pt", f"hydra.run.dir={tmp_path}/c"),
                        "2x4x4 latents", "make 3x4x4 latents")
