"""Seed 004's simplified latent diffusion: a KL-VAE whose latent is one flat vector
(autoencoder.latent=vector) and the residual MLP denoiser (unet=mlp) that diffuses it; shapes, the
encode/decode round trip, the MLP's conditioning, the runs through run.py (joint training with
classifier guidance, a separately trained guidance classifier, mode=sample), and the combinations
that make no sense stopping with one sentence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_AE, read_metrics, run_py, tiny_overrides
from omegaconf import OmegaConf

from difflab.artifacts import autoencoder_settings
from difflab.config import AutoencoderConfig, ClassifierConfig, DatasetConfig, TrainConfig
from difflab.models import build_classifier
from difflab.models.autoencoder import KLAutoencoder, VectorKLAutoencoder, build_autoencoder
from difflab.models.layers import ModelConfigError
from difflab.models.mlp import MLPClassifier, MLPDenoiser
from difflab.trained import LatentSpace

VECTOR = ["autoencoder=kl", "autoencoder.latent=vector", "autoencoder.latent_dim=16", "unet=mlp", "unet.channels=32",
          "unet.num_res_blocks=2"]


def _tiny(shapes_dir, cache) -> list[str]:
    return [o for o in tiny_overrides(shapes_dir, cache) if o != "unet=tiny"]  # each test names its denoiser


def _vector_ae(**kw) -> VectorKLAutoencoder:
    cfg = OmegaConf.structured(AutoencoderConfig(name="kl", latent="vector", latent_channels=4, channels=16, **kw))
    return build_autoencoder(cfg, 3, 32)


def test_vector_autoencoder_shapes():
    torch.manual_seed(0)
    ae = _vector_ae(latent_dim=128)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert isinstance(ae, VectorKLAutoencoder) and ae.latent_shape == (128, 1, 1)
    z = ae.encode(x)
    assert z.shape == (3, 128, 1, 1)
    assert ae.decode(z).shape == x.shape
    out = ae(x)
    assert out.reconstruction.shape == x.shape and out.regularizer.ndim == 0 and out.regularizer >= 0
    q = ae.posterior(x)
    assert q.mean.shape == q.std.shape == (3, 128, 1, 1)


def test_vector_latent_space_round_trip():
    """The latent space scales the vector as it scales a map, and decodes exactly what the autoencoder decodes."""
    torch.manual_seed(0)
    ae = _vector_ae(latent_dim=16).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    space = LatentSpace(ae.eval(), {}, (3, 32, 32), scale=2.0, identity="i", key="k")
    with torch.no_grad():
        z = space.encode(x)
        assert torch.allclose(z, 2.0 * ae.encode(x), atol=1e-6)  # the scale applies to the vector as to a map
        assert torch.allclose(space.decode(z), ae.decode(ae.encode(x)), atol=1e-5)


def test_spatial_autoencoders_and_old_checkpoints_are_unchanged():
    """A config without `latent` (a checkpoint from before vector latents) builds the map autoencoder, and a
    spatial autoencoder's artifact key holds no vector settings (so cached autoencoders keep their keys)."""
    old = OmegaConf.to_container(OmegaConf.structured(AutoencoderConfig(name="kl")))
    old.pop("latent"), old.pop("latent_dim")
    ae = build_autoencoder(OmegaConf.create(old), 1, 28)
    assert type(ae) is KLAutoencoder and ae.latent_shape == (2, 7, 7)
    cfg = OmegaConf.create({"dataset": OmegaConf.structured(DatasetConfig(name="mnist", root="/data")), "seed": 0,
                            "autoencoder": OmegaConf.structured(AutoencoderConfig(name="kl")),
                            "train": OmegaConf.structured(TrainConfig)})
    assert "latent" not in autoencoder_settings(cfg)["autoencoder"]
    cfg.autoencoder.latent = "vector"
    assert autoencoder_settings(cfg)["autoencoder"]["latent_dim"] == 128
    with pytest.raises(ModelConfigError, match="autoencoder.latent=vector is a KL-VAE's latent"):
        build_autoencoder(OmegaConf.structured(AutoencoderConfig(name="vq", latent="vector")), 3, 32)


def test_mlp_denoiser_conditioning():
    torch.manual_seed(0)
    net = MLPDenoiser((16, 1, 1), width=32, num_blocks=2, num_classes=3)
    for layer in (net.out, *(block.fc2 for block in net.trunk.blocks)):  # zero at the start: the blocks are identities
        torch.nn.init.normal_(layer.weight, std=0.2)
    x, t = torch.randn(4, 16, 1, 1), torch.tensor([3, 3, 3, 3])
    a, b = net(x, t, torch.tensor([0, 0, 0, 0])), net(x, t, torch.tensor([1, 1, 1, 1]))
    assert a.shape == x.shape and not torch.allclose(a, b)  # the class changes the prediction
    assert torch.allclose(net(x, t, None), net(x, t, torch.full((4,), 3)))  # y=None is the null class
    assert not torch.allclose(net(x, t, None), net(x, torch.tensor([40, 40, 40, 40]), None))  # and so does t
    uncond = MLPDenoiser((16, 1, 1), width=32, num_blocks=2)
    assert uncond.class_embed is None
    with pytest.raises(ValueError, match="num_classes=0"):
        uncond(x, t, torch.zeros(4, dtype=torch.long))
    assert torch.count_nonzero(MLPDenoiser((16, 1, 1), 32, 2)(x, t)) == 0  # zero-initialised output, as the UNet's


def test_a_vector_latent_gets_an_mlp_classifier():
    classifier = build_classifier(OmegaConf.structured(ClassifierConfig(channels=32)), 16, 1, 5)
    assert isinstance(classifier, MLPClassifier)
    assert classifier(torch.randn(2, 16, 1, 1), torch.tensor([0, 9])).shape == (2, 5)


@pytest.mark.slow
def test_vector_latent_diffusion_end_to_end(shapes_dir, cache, tmp_path):
    """Joint training (MLP + MLP classifier) with classifier-guided samples; a diffusion model guided by a
    classifier trained for it; mode=sample decoding the vector latents of the trained model."""
    base = [*_tiny(shapes_dir, cache), *TINY_AE, *VECTOR]
    joint = tmp_path / "joint"
    proc = run_py(*base, "mode=joint", f"hydra.run.dir={joint}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(joint)
    assert m["latent_shape"] == [16, 1, 1] and m["autoencoder_trained"] and m["classifier_source"] == "run"
    assert np.load(joint / "samples" / "samples.npz")["images"].shape == (8, 16, 16, 1)
    assert (joint / "classifier_guided_samples").is_dir()

    guided = tmp_path / "guided"
    proc = run_py(*base, "guidance=classifier", f"hydra.run.dir={guided}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(guided)
    assert m["autoencoder_source"] == "cache" and m["classifier_source"] == "trained"
    assert "mlp network" in (guided / "train.log").read_text()

    sampled = tmp_path / "sampled"
    proc = run_py("mode=sample", f"ckpt={guided / 'checkpoints' / 'last.pt'}", "sampler.steps=4", "sample.num_images=6",
                  "sample.batch_size=3", "sample.gif_images=0", "device=cpu", f"paths.cache_dir={cache}",
                  f"hydra.run.dir={sampled}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = np.load(sampled / "samples" / "samples.npz")["images"]
    assert images.shape == (6, 16, 16, 1) and images.dtype == np.uint8


@pytest.mark.slow
@pytest.mark.parametrize("overrides, needle", [
    (["autoencoder=vq", "autoencoder.latent=vector", "unet=mlp"],
     "autoencoder.latent=vector is a KL-VAE's flat latent, but autoencoder=vq quantises a map of codes: add autoencoder=kl"),
    (["autoencoder.latent=vector", "unet=mlp"],
     "autoencoder.latent=vector is a KL-VAE's flat latent, but autoencoder=none makes no latent: add autoencoder=kl"),
    (["autoencoder=kl", "autoencoder.latent=vector", "unet=tiny"],
     "unet=tiny convolves over a feature map, but autoencoder.latent=vector makes a 128-number vector with none: add unet=mlp."),
    (["autoencoder=kl", "autoencoder.latent=flat"], "autoencoder.latent=flat is not an option: choose one of spatial, vector."),
])
def test_bad_combinations_stop_with_one_sentence(shapes_dir, tmp_path, overrides, needle):
    run_dir = tmp_path / "run"
    proc = run_py(*_tiny(shapes_dir, tmp_path / "cache"), *overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, proc.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists() and not (tmp_path / "cache" / "artifacts").exists()
