"""Distillation: progressive distillation's round, consistency distillation's target, and mode=distill end to end
(its plan, its cached student, which mode=sample samples at its own step count)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_AE, read_metrics, run_py, tiny_overrides

from difflab.diffusion.distillation import (ConsistencyProcess, consistency_coefficients, consistency_target,
                                            progressive_target, smallest_ve)
from difflab.diffusion.flow import FlowProcess

FLOW = "flow"


def _distill(shapes_dir, cache, *extra):
    return [*tiny_overrides(shapes_dir, cache, FLOW), "mode=distill", "distill.steps=2", "distill.teacher_steps=8",
            "distill.steps_per_round=3", "train.threads=1", *extra]


@pytest.fixture(scope="module")
def teacher(shapes_dir, cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    r = run_py(*tiny_overrides(shapes_dir, cache, FLOW), "train.threads=1", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    return read_metrics(run)["checkpoint"]


def test_progressive_target_is_the_x0_of_one_ddim_step_onto_the_two_step_result():
    g = torch.Generator().manual_seed(0)
    z_t, z_s = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    a_t, s_t = torch.tensor([0.3, 0.0, 0.6], dtype=torch.float64), torch.tensor([0.7, 1.0, 0.4], dtype=torch.float64)
    a_s, s_s = torch.tensor([0.6, 0.5, 1.0], dtype=torch.float64), torch.tensor([0.4, 0.5, 0.0], dtype=torch.float64)
    x = progressive_target(z_t, z_s, a_t, s_t, a_s, s_s)
    view = lambda v: v.float().view(-1, 1, 1, 1)  # noqa: E731
    eps = (z_t - view(a_t) * x) / view(s_t)
    assert torch.allclose(view(a_s) * x + view(s_s) * eps, z_s, atol=1e-5)  # one DDIM step with x lands on z_s


def test_consistency_target_equals_its_formula():
    process = FlowProcess("uniform", 0.0, 1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 4, 4, generator=g)
    level_next, level_n = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.7, 0.3, 0.2])
    next_coeffs = process.alpha_sigma(level_next)
    n_coeffs = (torch.tensor([0.3, 0.7, 1.0], dtype=torch.float64), torch.tensor([0.7, 0.3, 0.0], dtype=torch.float64))
    teacher = lambda x, level: 0.5 * x  # noqa: E731
    ema = lambda x, level: 0.25 * x + level.view(-1, 1, 1, 1)  # noqa: E731
    target = consistency_target(ema, teacher, x, level_next, level_n, next_coeffs, n_coeffs)
    for i in range(3):
        a1, s1 = float(next_coeffs[0][i]), float(next_coeffs[1][i])
        a0, s0 = float(n_coeffs[0][i]), float(n_coeffs[1][i])
        x0 = 0.5 * x[i]
        x_hat = a0 * x0 + s0 * (x[i] - a1 * x0) / s1  # the teacher's DDIM step t_{n+1} -> t_n
        expected = x_hat if s0 == 0 else 0.25 * x_hat + level_n[i]  # f_ema(x_hat, t_n); f is the identity at clean data
        assert torch.allclose(target[i], expected, atol=1e-5)


def test_consistency_function_is_the_identity_at_the_smallest_level_and_the_x0_estimate_at_pure_noise():
    process = FlowProcess("uniform", 0.0, 1.0)
    ve_min = smallest_ve(process)
    c_skip, c_out = consistency_coefficients(torch.tensor([ve_min, float("inf")], dtype=torch.float64), ve_min)
    assert c_skip.tolist() == [1.0, 0.0] and c_out.tolist() == [0.0, 1.0]
    student = ConsistencyProcess(process, ve_min)
    x, out = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    lowest = process.index_level(torch.zeros(2, dtype=torch.long))
    alpha = float(process.alpha_sigma(lowest)[0][0])
    assert torch.allclose(student.to_x0_eps(out, x, lowest)[0], x / alpha, atol=1e-5)
    noise = torch.ones(2)  # t = 1: pure noise, f = the flow's x0 estimate x - v
    assert torch.allclose(student.to_x0_eps(out, x, noise)[0], x - out, atol=1e-5)


def test_one_progressive_round_matches_two_teacher_steps_better_than_the_teacher_initialised_student(
        teacher, shapes_dir, cache, tmp_path):
    from hydra import compose, initialize_config_dir

    from difflab.cli import CONF_DIR
    from difflab.compress.distill import DistillStage, with_method_defaults
    from difflab.train.loop import StepBatches
    from difflab.trained import load_diffusion_model

    overrides = _distill(shapes_dir, cache, "distill.steps=1", "distill.teacher_steps=2", "distill.steps_per_round=40",
                         "distill.lr=2e-3", "distill.batch_size=8")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = with_method_defaults(compose(config_name="config", overrides=overrides))  # as the plan resolves it
    model = load_diffusion_model(teacher, torch.device("cpu"))
    torch.manual_seed(0)
    torch.nn.init.normal_(model.net.out[-1].weight, std=0.05)  # a teacher whose two steps differ from one
    stage = DistillStage(cfg, tmp_path, torch.device("cpu"), model, "teacher")
    batch = stage.batch(0, StepBatches(len(stage.train_data), 8, 0))
    loss = stage.progressive_loss(model.net, 1, 1.0)

    def mismatch(net) -> float:
        torch.manual_seed(0)  # the same levels and noise for both students
        with torch.no_grad():
            return float(loss(net, batch))

    before = mismatch(model.net)
    trainer, _ = stage._round(copy.deepcopy(model.net).train(), 1, loss, tmp_path / "checkpoints", [])
    after = mismatch(trainer.ema.model)
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_distill_end_to_end_and_the_student_samples_at_its_step_count(teacher, shapes_dir, cache, tmp_path):
    args = _distill(shapes_dir, cache, f"ckpt={teacher}")
    plan = run_py(*args, "dry_run=true")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "teacher  given" in plan.stdout and "8 -> 4 -> 2 steps" in plan.stdout
    r = run_py(*args, f"hydra.run.dir={tmp_path / 'distill'}")
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_metrics(tmp_path / "distill")
    assert m["stage"] == "distill" and [r["steps"] for r in m["distill_rounds"]] == [4, 2]
    assert m["sampled_with"]["steps"] == 2 and m["sampled_with"]["sampler"] == "ddim"
    plan_json = json.loads((tmp_path / "distill" / "plan.json").read_text())
    assert [s["name"] for s in plan_json["steps"]][:2] == ["teacher", "distill"]
    student = m["checkpoint"]
    state = torch.load(student, map_location="cpu", weights_only=True)
    assert state["distilled"]["steps"] == 2 and state["distilled"]["teacher_key"] == m["teacher_key"]

    again = run_py(*args, f"hydra.run.dir={tmp_path / 'again'}")  # the student comes from the cache
    assert again.returncode == 0 and read_metrics(tmp_path / "again")["trained"] is False

    s = run_py(*tiny_overrides(shapes_dir, cache, FLOW), "mode=sample", f"ckpt={student}",
               f"hydra.run.dir={tmp_path / 'sample'}")  # no sampler named: the student's own
    assert s.returncode == 0, s.stderr[-3000:]
    assert read_metrics(tmp_path / "sample")["sampled_with"] | {"steps": 2, "sampler": "ddim"} == \
        read_metrics(tmp_path / "sample")["sampled_with"]


@pytest.mark.slow
def test_consistency_distillation_of_a_guided_latent_teacher_trained_first(shapes_dir, cache, tmp_path):
    args = _distill(shapes_dir, cache, "distill.method=consistency", "autoencoder=kl", *TINY_AE, "guidance=cfg",
                    "guidance.p_uncond=0.2", "guidance.scale=2")
    r = run_py(*args, f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_metrics(tmp_path)
    assert m["teacher_source"] == "trained" and m["sampled_with"]["sampler"] == "consistency"
    assert m["sampled_with"]["guidance"] == "none"  # the scale is in the student
    state = torch.load(m["checkpoint"], map_location="cpu", weights_only=True)
    assert state["distilled"]["guidance_scale"] == 2 and state["autoencoder"] is not None


def test_a_null_distill_setting_takes_its_methods_default_and_names_the_same_student_as_spelled_out(
        teacher, shapes_dir, cache):
    base = [*tiny_overrides(shapes_dir, cache, FLOW), "mode=distill", f"ckpt={teacher}", "distill.steps=4",
            "dry_run=true"]
    plans = {}
    for name, extra in {"progressive": [], "spelled_out": ["distill.teacher_steps=16", "distill.lr=5e-4"],
                        "consistency": ["distill.method=consistency"]}.items():
        r = run_py(*base, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        plans[name] = r.stdout
    assert "progressive: 16 -> 8 -> 4 steps" in plans["progressive"]
    assert "consistency: 64 -> 4 steps" in plans["consistency"]

    def student_key(plan: str) -> str:
        return next(line.split()[2] for line in plan.splitlines() if line.startswith("distill "))

    assert student_key(plans["progressive"]) == student_key(plans["spelled_out"]) != student_key(plans["consistency"])


@pytest.mark.parametrize("setting, words", [("distill.steps=3", "distill.steps=3 is not a student step count"),
                                            ("distill.teacher_steps=12", "does not halve down")])
def test_a_bad_distill_setting_is_one_sentence(shapes_dir, cache, setting, words):
    r = run_py(*_distill(shapes_dir, cache, setting), "dry_run=true")
    assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
