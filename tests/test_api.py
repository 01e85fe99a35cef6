"""The Python API (difflab.load(...).sample(...), encode/decode, difflab.run) and `difflab export`, on tiny models
trained end to end: the API draws what `python run.py mode=sample` writes, and an export loads back with no pickle."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_AE, nhwc_convolutions, run_py, tiny_overrides
from omegaconf import OmegaConf

import difflab
from difflab.errors import UserError
from difflab.trained import in_trained_layout

pytestmark = pytest.mark.slow

EXPORT_FILES = {"model.safetensors", "config.json", "README.md"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_dir, cache):
    """A class-conditional pixel model trained with label dropout, so classifier-free guidance applies."""
    run_dir = tmp_path_factory.mktemp("api") / "train"
    proc = run_py(*tiny_overrides(shapes_dir, cache), "guidance=cfg", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def pipe(trained):
    return difflab.load(trained, device="cpu")


@pytest.fixture(scope="module")
def latent(tmp_path_factory, shapes_dir, cache):
    run_dir = tmp_path_factory.mktemp("api_latent") / "train"
    proc = run_py(*tiny_overrides(shapes_dir, cache), *TINY_AE, "autoencoder=kl", "guidance=none",  # no label dropout
                  f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ": " in message


def _assert_clean_error(proc, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: "), proc.stderr[-3000:]
    assert _one_sentence(proc.stderr.strip()) and needle in proc.stderr, proc.stderr


@pytest.mark.parametrize("settings, api", [
    ([], {}),  # the defaults of mode=sample: conf/'s sampler, balanced labels, no guidance
    (["sample.labels=[1,1,0]", "sampler=ddpm", "sampler.steps=4", "guidance=cfg", "guidance.scale=2", "seed=3"],
     {"labels": [1, 1, 0], "sampler": "ddpm", "steps": 4, "guidance_scale": 2, "seed": 3}),
], ids=["defaults", "settings"])
def test_the_api_draws_what_mode_sample_writes(trained, pipe, tmp_path, settings, api):
    out = tmp_path / "sample"
    proc = run_py("mode=sample", f"ckpt={trained}/checkpoints/last.pt", "sample.num_images=6", *settings, "device=cpu",
                  f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = np.load(out / "samples" / "samples.npz")
    samples = pipe.sample(6, **api)
    assert samples.images.dtype == torch.uint8 and samples.images.shape == (6, 1, 16, 16)
    assert np.array_equal(samples.images.permute(0, 2, 3, 1).numpy(), written["images"])
    assert samples.labels.tolist() == written["labels"].tolist()


def test_labels_steps_sampler_seed_and_guidance_take_effect(pipe):
    base = pipe.sample(4, steps=3)
    assert torch.equal(pipe.sample(4, steps=3).images, base.images)  # the same settings, the same images
    assert base.labels.tolist() == [0, 0, 1, 1]  # balanced
    assert pipe.sample(4, labels=1, steps=3).labels.tolist() == [1, 1, 1, 1]
    assert pipe.sample(5, labels=[0, 1], steps=3).labels.tolist() == [0, 1, 0, 1, 0]
    for changed in [{"steps": 5}, {"sampler": "heun"}, {"seed": 1}, {"guidance_scale": 3.0},
                    {"overrides": ["sampler.eta=1"]}]:
        assert not torch.equal(pipe.sample(4, **{"steps": 3, **changed}).images, base.images), changed
    pictures = base.to_pil()
    assert len(pictures) == 4 and pictures[0].size == (16, 16) and pictures[0].mode == "L"
    assert np.array_equal(np.asarray(pictures[2]), base.images[2, 0].numpy())


def _forbid_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an export must load without pickle")

    for owner, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(owner, name, refuse)


def test_an_export_holds_no_pickle_and_samples_as_the_checkpoint(trained, pipe, tmp_path, monkeypatch):
    out = tmp_path / "exported"
    proc = run_py("export", f"ckpt={trained}", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    card = (out / "README.md").read_text()
    for fact in ["folder", "ddpm", "unet=tiny", "6 steps", "best_val_loss", "label", f"difflab.load('{out}')"]:
        assert fact in card, fact
    with monkeypatch.context() as patched:
        _forbid_pickle(patched)
        exported = difflab.load(out, device="cpu")
    assert exported.latent_shape is None and exported.num_classes == 2
    for settings in [{}, {"labels": 1, "sampler": "ddim", "steps": 4, "guidance_scale": 2.0, "seed": 5}]:
        assert torch.equal(exported.sample(5, **settings).images, pipe.sample(5, **settings).images)


@pytest.mark.parametrize("given", ["export", "run folder"])
def test_mode_sample_reads_an_export_or_a_run_folder_as_the_checkpoint(trained, tmp_path, given):
    if given == "export":
        ckpt = tmp_path / "exported"
        assert run_py("export", f"ckpt={trained}", f"out={ckpt}").returncode == 0
    else:
        ckpt = trained
    written = {}
    for name, path in [("given", ckpt), ("checkpoint", trained / "checkpoints" / "last.pt")]:
        out = tmp_path / name
        proc = run_py("mode=sample", f"ckpt={path}", "sample.num_images=4", "guidance=cfg", "guidance.scale=2",
                      "device=cpu", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        written[name] = np.load(out / "samples" / "samples.npz")["images"]
    assert np.array_equal(written["given"], written["checkpoint"])
    metrics = json.loads((tmp_path / "given" / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(ckpt.resolve() if given == "export" else trained / "checkpoints" / "last.pt")


def test_an_earlier_export_is_overwritten_file_by_file_and_checked_when_loaded(trained, latent, tmp_path):
    out = tmp_path / "exported"
    difflab.export(latent, out)
    assert {p.name for p in out.iterdir()} == EXPORT_FILES | {"autoencoder.safetensors"}
    (out / "notes.txt").write_text("mine")
    difflab.export(trained / "checkpoints" / "last.pt", out)  # a pixel model over the latent one
    assert {p.name for p in out.iterdir()} == EXPORT_FILES | {"notes.txt"}  # its autoencoder gone, the notes kept
    assert difflab.load(out, device="cpu").latent_shape is None
    damaged = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(damaged[:-8])
    with pytest.raises(UserError, match="damaged or half-written"):
        difflab.load(out)


def test_a_latent_model_encodes_decodes_and_exports(latent, tmp_path, monkeypatch):
    pipe = difflab.load(latent / "checkpoints" / "last.pt", device="cpu")
    assert pipe.image_shape == (1, 16, 16) and pipe.latent_shape == (2, 4, 4)
    images = pipe.sample(3).images
    latents = pipe.encode(images)
    assert latents.shape == (3, 2, 4, 4) and latents.dtype == torch.float32
    decoded = pipe.decode(latents)
    assert decoded.shape == (3, 1, 16, 16) and decoded.dtype == torch.uint8
    with pytest.raises(UserError, match="uint8"):
        pipe.encode(images.float())
    with pytest.raises(UserError, match="N,2,4,4"):
        pipe.decode(latents[:, :1])
    out = difflab.export(latent, tmp_path / "exported")
    with monkeypatch.context() as patched:
        _forbid_pickle(patched)
        exported = difflab.load(out, device="cpu")
    assert torch.equal(exported.sample(3).images, images)
    assert torch.equal(exported.decode(latents), decoded)


def test_run_returns_the_completed_run_in_the_folder_hydra_names(trained, shapes_dir, cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = difflab.run([*tiny_overrides(shapes_dir, cache), "guidance=cfg", "sample.num_images=4"], quiet=True)
    assert run.dir.parent.parent == tmp_path.resolve() / "outputs" and (run.dir / "samples" / "samples.npz").is_file()
    assert run.metrics["status"] == "completed" and run.metrics["num_images"] == 4
    assert run.metrics["trained"] is False  # the fixture's model, from the artifact cache that metrics.json names
    cached = difflab.load(run.dir, device="cpu")
    assert torch.equal(cached.sample(2).images, difflab.load(trained, device="cpu").sample(2).images)
    with pytest.raises(UserError, match="train.max_stepz is not a setting") as wrong:
        difflab.run(["train.max_stepz=5"], quiet=True)
    assert _one_sentence(str(wrong.value))


def _export_command(monkeypatch, capsys, *args: str):
    """`difflab export ARGS` through the console script's main, in this process: its exit status and stderr."""
    from difflab.cli import main

    monkeypatch.setattr(sys, "argv", ["difflab", "export", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return subprocess.CompletedProcess(args, exited.value.code, "", capsys.readouterr().err)


@pytest.mark.parametrize("stage", ["autoencoder", "classifier"])
def test_exporting_another_kind_of_model_is_one_sentence(tmp_path, monkeypatch, capsys, stage):
    ckpt = tmp_path / "last.pt"
    torch.save({"config": {}, "stage": stage, "meta": {}}, ckpt)
    _assert_clean_error(_export_command(monkeypatch, capsys, f"ckpt={ckpt}", f"out={tmp_path}/out"),
                        f"holds a '{stage}' model")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_one_sentence(trained, pipe, latent, tmp_path, monkeypatch, capsys):
    _assert_clean_error(run_py("export", f"ckpt={tmp_path}/nope.pt", f"out={tmp_path}/out"), "does not exist")
    _assert_clean_error(_export_command(monkeypatch, capsys, f"ckpt={trained}"), "out= is missing")
    _assert_clean_error(_export_command(monkeypatch, capsys, f"ckpt={trained}", f"out={trained}"),
                        "already holds files and no earlier export")
    mistakes = [
        (lambda: difflab.load(tmp_path / "nope.pt"), "does not exist"),
        (lambda: difflab.load(tmp_path), "neither checkpoints/last.pt nor a metrics.json"),
        (lambda: pipe.sample(2, labels=[5]), "sample.labels=[5] must be"),
        (lambda: pipe.sample(2, overrides=["guidance=classifier"]), "Classifier guidance"),
        (lambda: pipe.sample(0), "at least one image"),
        (lambda: pipe.encode(torch.zeros(1, 1, 16, 16, dtype=torch.uint8)), "pixel space"),
        (lambda: difflab.load(latent, device="cpu").sample(2, guidance_scale=2.0), "label dropout"),
    ]
    for mistake, needle in mistakes:
        with pytest.raises(UserError) as e:
            mistake()
        assert needle in str(e.value) and _one_sentence(str(e.value)), str(e.value)


def test_a_loaded_network_samples_in_the_layout_it_was_trained_in(pipe):
    """Trained channels_last (the default), the loaded network's convolutions hold NHWC weights, so they write NHWC
    maps; it computes what the same network in NCHW computes, and a network trained in NCHW stays NCHW."""
    net = pipe.model.net
    assert nhwc_convolutions(net) and all(nhwc_convolutions(net))
    plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    assert not any(nhwc_convolutions(in_trained_layout(plain, OmegaConf.create({"train": {"channels_last": False}}))))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *pipe.model.shape, generator=g)
    inputs = (*pipe.model.process.net_inputs(x, pipe.model.process.draw_levels(4, torch.device("cpu"))),
              torch.tensor([0, 1, 0, 1]))
    with torch.no_grad():
        torch.testing.assert_close(net(*inputs), plain(*inputs), atol=1e-5, rtol=1e-5)


def test_a_latent_models_autoencoder_loads_in_the_layout_it_was_trained_in(latent):
    autoencoder = difflab.load(latent, device="cpu").model.latent.autoencoder
    assert nhwc_convolutions(autoencoder) and all(nhwc_convolutions(autoencoder))
