"""mode=edit: SDEdit from part way down any sampler's grid and inpainting (RePaint), for every
objective, in pixel and latent space; its inputs (a folder, a samples.npz, masks) and the one
sentence each mistake in them is, before any work; end to end through run.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_AE, read_metrics, run_py, tiny_overrides
from PIL import Image

from difflab.api import _compose
from difflab.data import to_model_range, to_uint8
from difflab.data.edit_inputs import read_edit_images
from difflab.diffusion.editing import EditTask, start_step
from difflab.diffusion.samplers import SAMPLERS
from difflab.edit import EditInputs, edit_images
from difflab.errors import UserError
from difflab.models.autoencoder import build_autoencoder
from difflab.plan import build_plan
from difflab.sampling import generate, sample_images
from difflab.sweep.compare import collect
from difflab.trained import DiffusionModel, LatentSpace, build_denoiser_net, build_process

CPU = torch.device("cpu")
N = 4


def _cfg(shapes_dir: Path, tmp: Path, *overrides: str, objective: str = "ddpm"):
    return _compose([*tiny_overrides(shapes_dir, tmp / "cache", objective), "mode=edit", "sample.gif=false",
                     "edit.batch_size=4", "sample.batch_size=4", *overrides])


def _model(cfg, latent: bool = False) -> DiffusionModel:
    """An untrained network is enough for what the sampler does with the inputs: the tests compare
    runs of one network with one another, not with data."""
    torch.manual_seed(0)
    space = None
    if latent:
        ae = build_autoencoder(cfg.autoencoder, 1, 16).eval()
        space = LatentSpace(ae, {}, (1, 16, 16), 1.0, "test", "test")
    shape = space.shape if space else (1, 16, 16)
    return DiffusionModel(build_denoiser_net(cfg, shape, 2).eval(), build_process(cfg), cfg, shape, 2, False, space)


def _images(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 1, 16, 16), dtype=np.uint8))


def _half_mask(n: int = N) -> torch.Tensor:
    mask = torch.zeros(n, 1, 16, 16)
    mask[..., 8:] = 1  # regenerate the right half
    return mask


@pytest.mark.parametrize("objective", ["ddpm", "edm", "flow"])
def test_strength_0_returns_the_input(shapes_dir, tmp_path, objective):
    cfg = _cfg(shapes_dir, tmp_path, "edit.strength=0", "edit.labels=1", objective=objective)
    images = _images()
    out = edit_images(_model(cfg), cfg, EditInputs(images, None, None), CPU)
    assert torch.equal(out.images, images)


def test_strength_0_in_latent_space_is_the_autoencoders_reconstruction(shapes_dir, tmp_path):
    cfg = _cfg(shapes_dir, tmp_path, "edit.strength=0", "edit.labels=1", "autoencoder=kl", *TINY_AE)
    model, images = _model(cfg, latent=True), _images()
    out = edit_images(model, cfg, EditInputs(images, None, None), CPU)
    reconstruction = to_uint8(model.decode(model.to_model_space(to_model_range(images))))
    assert torch.equal(out.images, reconstruction)


@pytest.mark.parametrize("objective, sampler", [("ddpm", "ddpm"), ("edm", "heun"), ("flow", "dpmpp_2m")])
def test_strength_1_is_sampling_from_noise_with_the_same_generator(shapes_dir, tmp_path, objective, sampler):
    cfg = _cfg(shapes_dir, tmp_path, "edit.strength=1", f"sampler={sampler}", "sampler.steps=4",
               "edit.labels=[0,1,1,0]", objective=objective)
    model = _model(cfg)
    edited = edit_images(model, cfg, EditInputs(_images(), None, None), CPU)
    sampled = sample_images(model, cfg, N, [0, 1, 1, 0], CPU)
    assert torch.equal(edited.images, sampled.images)
    assert edited.labels.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - {"euler"}))  # euler is ddim
def test_inpainting_keeps_the_known_region_in_every_sampler(shapes_dir, tmp_path, sampler):
    """The step hook alone (no pasting afterwards) leaves the unmasked pixels as given."""
    cfg = _cfg(shapes_dir, tmp_path, f"sampler={sampler}", "sampler.steps=4")
    model, images, mask = _model(cfg), _images(), _half_mask()
    x_in = to_model_range(images)
    out = generate(lambda y: model.denoiser(y, cfg.guidance, True), model.process, model.shape,
                   torch.zeros(N, dtype=torch.long), N, cfg.sampler, N, CPU, 0, edit=EditTask(x_in, 0.8, mask))
    known = ~mask.bool().expand_as(images)
    assert torch.equal(out.images[known], images[known])
    assert not torch.equal(out.images[~known], images[~known])


@pytest.mark.parametrize("objective", ["ddpm", "edm", "flow"])
def test_repaint_resampling_keeps_the_known_region_and_changes_the_rest(shapes_dir, tmp_path, objective):
    cfg = _cfg(shapes_dir, tmp_path, "edit.strength=1", "edit.labels=0", "sampler=ddpm", "sampler.steps=3",
               objective=objective)
    model, images, mask = _model(cfg), _images(), _half_mask()
    plain = edit_images(model, cfg, EditInputs(images, mask, None), CPU)
    cfg.edit.resample = 3
    calls = []
    net = model.net
    model.net = lambda *a: calls.append(1) or net(*a)
    resampled = edit_images(model, cfg, EditInputs(images, mask, None), CPU)
    known = ~mask.bool().expand_as(images)
    assert torch.equal(resampled.images[known], images[known])
    assert not torch.equal(resampled.images, plain.images)
    assert len(calls) == 3 + 2 * 2  # 3 steps, each but the last taken 2 more times


def test_latent_inpainting_masks_on_the_latent_grid_and_keeps_the_known_pixels(shapes_dir, tmp_path):
    cfg = _cfg(shapes_dir, tmp_path, "edit.strength=0.5", "edit.labels=0", "autoencoder=kl", *TINY_AE)
    model, images, mask = _model(cfg, latent=True), _images(), _half_mask()
    assert model.latent.mask_to_latent(mask).shape == (N, 1, *model.shape[1:])
    assert model.latent.mask_to_latent(mask)[0, 0, 0].tolist() == [0, 0, 1, 1]  # 16 px -> 4 cells, right half
    out = edit_images(model, cfg, EditInputs(images, mask, None), CPU)
    known = ~mask.bool().expand_as(images)
    assert torch.equal(out.images[known], images[known])


def test_start_step_takes_the_strengths_share_of_the_steps():
    assert [start_step(20, s) for s in (0.0, 0.01, 0.2, 0.6, 1.0)] == [20, 19, 16, 8, 0]


# ---------------------------------------------------------------- inputs and their mistakes

def _edit(trained: Path, *overrides: str) -> list[str]:
    return [*tiny_overrides(Path("/nonexistent"), trained.parent / "cache"), "mode=edit",
            f"ckpt={trained / 'checkpoints' / 'last.pt'}", *overrides]


def _folder(root: Path, images: np.ndarray, mode: str = "L") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).convert(mode).save(root / f"{i:02d}.png")
    return root


def _plan_error(args: list[str]) -> str:
    with pytest.raises(UserError) as info:
        build_plan(_compose(args), None)
    message = str(info.value)
    assert "\n" not in message and message.endswith("."), message  # one sentence
    return message


@pytest.mark.slow
def test_mistakes_in_the_inputs_are_one_sentence_before_any_work(trained, tmp_path):
    npz = trained / "samples" / "samples.npz"
    images = np.load(npz)["images"][..., 0]
    good = _folder(tmp_path / "good", images[:3])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("not images")
    masks = _folder(tmp_path / "masks", np.zeros((2, 16, 16), np.uint8))
    cases = [
        ([], "mode=edit needs images"),
        (["edit.images=/nonexistent/folder"], "edit.images=/nonexistent/folder does not exist"),
        ([f"edit.images={tmp_path / 'broken'}"], "is not a readable image"),
        ([f"edit.images={tmp_path / 'notes.txt'}"], "is neither a folder nor an .npz file"),
        ([f"edit.images={good}", "edit.labels=1", f"edit.mask={masks}"], "holds 2 masks for 3 images"),
        ([f"edit.images={good}", "edit.labels=1", "edit.strength=0"], "edit.strength=0.0 must be in (0, 1]"),
        ([f"edit.images={good}", "edit.labels=1", "edit.strength=1.5"], "edit.strength=1.5 must be in (0, 1]"),
        ([f"edit.images={good}", "edit.labels=[0,1]"], "edit.labels has 2 labels for 3 images"),
        ([f"edit.images={good}", "edit.labels=7"], "edit.labels=[7] has a class outside 0..1"),
        ([f"edit.images={good}"], "each edited image needs a class"),
        ([f"edit.images={_folder(tmp_path / 'rgb', images[:2], 'RGB')}", "edit.labels=0"],
         "holds 3x16x16 images (channels x height x width) but the model makes 1x16x16 ones"),
        ([f"edit.images={_folder(tmp_path / 'big', np.zeros((2, 20, 20), np.uint8))}", "edit.labels=0"],
         "holds 1x20x20 images"),
        ([f"edit.images={good}", "edit.labels=0", "mode=sample"], None),  # not an edit: edit.* is not read
    ]
    for overrides, needle in cases:
        if needle is None:
            build_plan(_compose(_edit(trained, *overrides)), None)
            continue
        assert needle in _plan_error(_edit(trained, *overrides)), (overrides, needle)


@pytest.mark.slow
def test_edit_of_an_npz_and_of_a_folder_through_run_py(trained, tmp_path):
    npz = trained / "samples" / "samples.npz"
    source = np.load(npz)
    run_dir = tmp_path / "npz"
    proc = run_py(*_edit(trained, f"edit.images={npz}", "edit.strength=0.2", f"hydra.run.dir={run_dir}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    edited = np.load(run_dir / "edits" / "edited.npz")
    assert edited["images"].shape == source["images"].shape and edited["images"].dtype == np.uint8
    assert edited["labels"].tolist() == source["labels"].tolist()  # the .npz's labels, kept in order
    distance = ((edited["images"][:, None].astype(float) - source["images"][None].astype(float)) ** 2).sum((2, 3, 4))
    assert distance.argmin(1).tolist() == list(range(len(distance)))  # each edit is nearest its own input
    assert (run_dir / "edits" / "before_after.png").is_file()
    metrics = read_metrics(run_dir)
    assert metrics["stage"] == "edit" and metrics["edited_with"]["steps_taken"] == 1

    folder = _folder(tmp_path / "inputs", source["images"][:3, ..., 0])
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(16)[None, :] >= 8, 255, 0).astype(np.uint8).repeat(16, 0)).save(mask)
    run_dir = tmp_path / "folder"
    proc = run_py(*_edit(trained, f"edit.images={folder}", "edit.labels=[1,0,1]", f"edit.mask={mask}",
                         "edit.resample=2", "edit.strength=1", f"hydra.run.dir={run_dir}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    edited = np.load(run_dir / "edits" / "edited.npz")
    assert edited["labels"].tolist() == [1, 0, 1]
    assert np.array_equal(edited["images"][:, :, :8], source["images"][:3, :, :8])  # the kept left half
    assert read_metrics(run_dir)["edited_with"]["nfe"] == 5 + 4  # 5 steps, each but the last taken twice


@pytest.mark.slow
def test_a_mistake_through_run_py_is_one_line(trained, tmp_path):
    proc = run_py(*_edit(trained, "edit.images=/nonexistent/x.npz", f"hydra.run.dir={tmp_path / 'run'}"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: edit.images=/nonexistent/x.npz does not exist: give a "
                                                    "folder of images or a samples.npz file.")
    assert not (tmp_path / "run" / "edits").exists()


@pytest.mark.slow
def test_strength_sweep_compares_the_before_after_grids(trained, tmp_path):
    sweep_dir = tmp_path / "sweep"
    npz = trained / "samples" / "samples.npz"
    proc = run_py("-m", "+sweep=edit_strength", *_edit(trained, f"edit.images={npz}", "edit.strength=0.2,1.0",
                                                       f"hydra.sweep.dir={sweep_dir}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = collect([sweep_dir])
    assert [r.settings["edit.strength"] for r in jobs] == ["0.2", "1.0"]
    assert [r.grid for r in jobs] == [sweep_dir / job / "edits" / "before_after.png" for job in ("0", "1")]
    assert Image.open(sweep_dir / "comparison_samples.png").size[0] > 2 * 256


def test_npz_inputs_are_read_without_pickle_and_checked(tmp_path):
    images = np.arange(2 * 16 * 16, dtype=np.uint8).reshape(2, 16, 16, 1)
    np.savez(tmp_path / "good.npz", images=images, labels=np.array([1, 0]))
    read, labels = read_edit_images(str(tmp_path / "good.npz"))
    assert read.shape == (2, 1, 16, 16) and torch.equal(read[1, 0], torch.from_numpy(images[1, ..., 0]))
    assert labels.tolist() == [1, 0]
    np.savez(tmp_path / "floats.npz", images=images.astype(np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    (tmp_path / "objects.npz").write_bytes((tmp_path / "objects.npy").read_bytes())
    np.save(tmp_path / "plain.npy", images)
    (tmp_path / "plain.npz").write_bytes((tmp_path / "plain.npy").read_bytes())
    for name, needle in [("floats.npz", "has no `images` array of uint8"), ("objects.npz", "is not a readable .npz"),
                         ("plain.npz", "is not a readable .npz")]:
        with pytest.raises(UserError, match=needle):
            read_edit_images(str(tmp_path / name))
