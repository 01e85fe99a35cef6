"""The edm and flow objectives through run.py as a user types them: training whose loss falls,
samples that decode, exact resume, sampling a checkpoint with another sampler, both guidance
kinds, latent models, and a classifier of another objective refused at start. Their formulas
first; under torchrun in test_distributed.py."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_py, tiny_overrides

from difflab.diffusion import EDMProcess, FlowProcess

OBJECTIVES = ["edm", "flow"]


def test_edm_preconditioning_and_loss_are_the_papers():
    p = EDMProcess(sigma_data=0.5)
    sigma = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float64)
    like = torch.zeros(4, 1, 1, 1)
    c_skip, c_out, c_in = (c.flatten().double() for c in p.preconditioning(sigma, like))
    sd = 0.5
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-6, atol=0)
    torch.testing.assert_close(c_out, sigma * sd / (sigma**2 + sd**2).sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(c_in, 1 / (sigma**2 + sd**2).sqrt(), rtol=1e-6, atol=0)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2  # lambda(sigma) on ||D - x0||^2 ...
    torch.testing.assert_close(weight * c_out**2, torch.ones(4, dtype=torch.float64), rtol=1e-6, atol=0)
    # ... so the unweighted loss on F against its target is the weighted loss on D: check it
    x0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    out = torch.randn(4, 3, 2, 2)
    x = p.add_noise(x0, noise, sigma)
    d, _ = p.to_x0_eps(out, x, sigma)
    on_f = (out - p.target(x0, noise, sigma)).square().flatten(1).mean(1)
    on_d = weight.float() * (d - x0).square().flatten(1).mean(1)
    torch.testing.assert_close(on_f, on_d, rtol=1e-4, atol=1e-6)
    x_in, cond = p.net_inputs(x, sigma)
    torch.testing.assert_close(cond, 1000 * sigma.float().log() / 4)
    # training sigmas: ln(sigma) ~ N(P_mean, P_std^2)
    logs = p.draw_levels(200_000, generator=torch.Generator().manual_seed(0)).log()
    assert abs(float(logs.mean()) + 1.2) < 0.01 and abs(float(logs.std()) - 1.2) < 0.01


def test_flow_interpolant_target_and_estimates():
    p = FlowProcess("uniform")
    t = torch.tensor([0.0, 0.25, 0.9, 1.0])
    x0, noise = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    x = p.add_noise(x0, noise, t)
    torch.testing.assert_close(x, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise)
    v = p.target(x0, noise, t)
    torch.testing.assert_close(v, noise - x0)
    x0_hat, eps_hat = p.to_x0_eps(v, x, t)  # the exact velocity gives back both ends
    torch.testing.assert_close(x0_hat, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-5, atol=1e-5)
    assert float(p.draw_levels(100_000, generator=torch.Generator().manual_seed(0)).mean()) == pytest.approx(0.5, abs=0.01)
    logit = FlowProcess("logit_normal").draw_levels(100_000, generator=torch.Generator().manual_seed(0))
    assert abs(float(torch.logit(logit).std()) - 1.0) < 0.01


def _losses(run_dir) -> list[float]:
    with open(run_dir / "losses.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f) if row["split"] == "train"]


@pytest.fixture(scope="module", params=OBJECTIVES)
def trained(request, tmp_path_factory, shapes_dir):
    base = tmp_path_factory.mktemp(request.param)
    run_dir = base / "train"
    proc = run_py(*tiny_overrides(shapes_dir, base / "cache", request.param), "train.max_steps=30",
                  "train.checkpoint_every=3", "train.log_every=1", "sampler=heun", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, run_dir, base


def test_training_falls_and_samples_decode(trained):
    objective, run_dir, _ = trained
    losses = _losses(run_dir)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    metrics = read_metrics(run_dir)
    assert metrics["objective"] == objective and "alpha_bar_T" not in metrics
    assert metrics["sampled_with"]["nfe"] == 2 * 5 - 1 and metrics["sampled_with"]["sampler"] == "heun"
    images = np.load(run_dir / "samples" / "samples.npz")["images"]
    assert images.shape == (8, 16, 16, 1) and images.dtype == np.uint8 and images.std() > 10


def test_resume_is_exact(trained, shapes_dir, tmp_path):
    objective, run_dir, base = trained
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "step_00000027.pt", resumed / "checkpoints" / "last.pt")
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache", objective), "train.max_steps=30",
                  "train.checkpoint_every=3", "train.log_every=1", "sampler=heun", "train.resume=auto",
                  f"hydra.run.dir={resumed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 30
    for name, tensor in a["ema"]["model"].items():
        assert torch.equal(tensor, b["ema"]["model"][name]), name


@pytest.mark.parametrize("sampler", ["ddpm", "unipc"])
def test_a_checkpoint_samples_with_any_sampler_and_cfg(trained, tmp_path, sampler):
    _, run_dir, _ = trained
    out = tmp_path / "sampled"
    proc = run_py("mode=sample", f"ckpt={run_dir}/checkpoints/last.pt", "sample.num_images=4", f"sampler={sampler}",
                  "sampler.steps=4", "sampler.spacing=logsnr", "device=cpu", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(out)["sampled_with"]["spacing"] == "logsnr"
    assert np.load(out / "samples" / "samples.npz")["images"].shape[0] == 4


@pytest.mark.parametrize("objective,band", [("edm", "sigma="), ("flow", "t=0.")])
def test_classifier_guidance_trains_the_classifier_on_the_objectives_levels(objective, band, tmp_path, shapes_dir):
    joint = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache", objective), "mode=joint",
                   "guidance=classifier", "guidance.scale=2", f"hydra.run.dir={tmp_path}")
    assert joint.returncode == 0, joint.stderr[-3000:]
    bands = read_metrics(tmp_path)["classifier_accuracy_by_t"]
    assert "t=0" in bands and sum(k.startswith(band) and ".." in k for k in bands) == 10, bands
    assert (tmp_path / "classifier_guided_samples" / "samples.npz").is_file()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_classifier_free_guidance_trains_and_samples(objective, tmp_path, shapes_dir):
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache", objective), "guidance=cfg",
                  "guidance.scale=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(tmp_path)["sampled_with"]["guidance_scale"] == 3


@pytest.mark.parametrize("trained", ["edm"], indirect=True)
def test_a_classifier_of_another_objective_is_refused_at_start(trained, tmp_path, shapes_dir):
    objective, run_dir, _ = trained
    classifier = tmp_path / "classifier"
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "mode=classifier", f"hydra.run.dir={classifier}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "guided"
    proc = run_py("mode=sample", f"ckpt={run_dir}/checkpoints/last.pt", "guidance=classifier", "guidance.scale=1",
                  f"ckpt.classifier={classifier}/checkpoints/last.pt", "device=cpu", f"hydra.run.dir={out}")
    assert proc.returncode == 2
    assert f"reads noise levels of objective=ddpm with schedule=linear (T=50) but the model's are of objective={objective}" \
        in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "samples").exists()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_latent_models_train_and_decode_for_each_objective(objective, tmp_path, shapes_dir):
    """A KL autoencoder, then the objective's model on its latents: samples decode to images."""
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache", objective), "autoencoder=kl",
                  "autoencoder.channels=16", "autoencoder.train.max_steps=8", "autoencoder.train.batch_size=8",
                  "autoencoder.train.warmup_steps=2", "train.max_steps=12", "train.log_every=1", "sampler=dpmpp_2m",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(tmp_path / "run")
    assert m["objective"] == objective and m["autoencoder_source"] == "trained" and m["steps"] == 12
    losses = _losses(tmp_path / "run")
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    images = np.load(tmp_path / "run" / "samples" / "samples.npz")["images"]
    assert images.shape == (8, 16, 16, 1) and images.dtype == np.uint8 and images.std() > 1


def test_a_setting_of_another_objective_is_one_sentence(tmp_path):
    proc = run_py("objective=flow", "objective.prediction=v", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: objective.prediction is a setting of objective=ddpm, not of objective=flow: "
                                   "add objective=ddpm, or leave objective.prediction out.")


def test_a_schedule_on_the_command_line_means_ddpm_and_is_refused_beside_another_objective(tmp_path):
    def plan(*args):
        proc = run_py(*args, "dry_run=true", f"paths.cache_dir={tmp_path}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return next(line for line in proc.stdout.splitlines() if line.startswith("diffusion model"))

    assert plan().endswith(", flow")  # the default objective
    assert plan("schedule=cosine").endswith(", ddpm (cosine schedule)")
    assert plan("objective.prediction=eps").endswith(", ddpm (linear schedule)")
    sweep = run_py("-m", "schedule=linear,dns", "dry_run=true", f"paths.cache_dir={tmp_path}")
    assert sweep.returncode == 0 and sweep.stdout.count("ddpm (") == 2, sweep.stderr[-3000:]
    proc = run_py("objective=edm", "schedule=cosine", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr.strip() == ("error: schedule=cosine sets the noise schedule of objective=ddpm, which objective=edm "
                                   "does not use: add objective=ddpm, or leave schedule=cosine out.")
