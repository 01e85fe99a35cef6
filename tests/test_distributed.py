"""Training with several processes (torchrun, DistributedDataParallel): 2 processes on the CPU
with the gloo backend, as on a machine without GPUs."""

from __future__ import annotations

import math
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_AE, read_metrics, run_py, tiny_overrides
from omegaconf import OmegaConf

from difflab import distributed as dist
from difflab.config import TrainConfig
from difflab.models import build_unet
from difflab.train.loop import StepBatches, Trainer

DATA, GLOBAL_BATCH, STEPS = 16, 8, 2


def test_ranks_split_every_global_batch_without_overlap():
    whole = StepBatches(100, 32, seed=3)
    ranks = [StepBatches(100, 32, seed=3, rank=r, world_size=4) for r in range(4)]
    for step in range(6):  # two epochs of 3 batches
        slices = [b.indices(step) for b in ranks]
        assert all(len(s) == 8 for s in slices)
        assert torch.equal(torch.cat(slices), whole.indices(step))


# ---- one DDP step = one step on the whole batch -------------------------------------------------

def _problem() -> tuple[torch.nn.Module, Callable]:
    """A small UNet and a loss with no randomness in it (MSE of the output at fixed t against a
    fixed target), so only the batches and the gradient averaging decide the weights. In float64:
    in float32, AdamW's first step g / (|g| + eps) turns the rounding differences of gradients
    near eps (summed in another order over two half batches) into differences of ~1e-3 of a step,
    more than a tolerance should allow."""
    gen = torch.Generator().manual_seed(0)
    x, target = torch.randn(2, DATA, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 50, (DATA,), generator=gen)
    y = torch.randint(0, 2, (DATA,), generator=gen)
    unet = OmegaConf.create({"channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
                             "head_channels": 16, "dropout": 0.0, "norm_groups": 8})
    torch.manual_seed(0)
    net = build_unet(unet, in_channels=1, image_size=8, num_classes=2).double()
    return net, lambda model, idx: F.mse_loss(model(x[idx], t[idx], y[idx]), target[idx])


def _fit(ckpt_dir: Path, distributed: bool, accum: int = 1) -> Trainer:
    net, loss = _problem()
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {
        "max_steps": STEPS, "grad_accum_steps": accum, "lr": 1e-3, "warmup_steps": 1, "precision": "fp32", "grad_clip": 0.5, "log_every": 1,
        "checkpoint_every": STEPS, "progress": False, "ema": {"decay": 0.9, "warmup": False, "decays": [0.5]}})
    trainer = Trainer(net, cfg, ckpt_dir, torch.device("cpu"), extra_state={"config": {}}, distributed=distributed)
    batches = trainer.step_batches(DATA, GLOBAL_BATCH)
    trainer.fit(loss, batches.indices, GLOBAL_BATCH)
    return trainer


def _state(trainer: Trainer) -> dict:
    """What must agree: weights, the last step's gradients, EMA copies and the logged losses."""
    return {"model": trainer.model.state_dict(),
            "grad": {n: p.grad for n, p in trainer.model.named_parameters()},
            "ema": trainer.ema.model.state_dict(),
            "ema_0.5": trainer.ema_copies[0.5].model.state_dict(),
            "loss": trainer.loss_history}


def _rank_fits(rank: int, world: int, port: int, out: Path, accum: int) -> None:
    """One torchrun rank, set up as torchrun does (env://), fitting in its own checkpoint folder."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1: two processes on two cores
    dist.init()
    try:
        torch.save(_state(_fit(out / f"ckpt_rank{rank}", distributed=True, accum=accum)), out / f"rank{rank}.pt")
    finally:
        dist.teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_training(state: dict, whole: dict) -> None:
    for part in ("model", "grad", "ema", "ema_0.5"):
        for name, expected in whole[part].items():
            torch.testing.assert_close(state[part][name], expected, rtol=1e-9, atol=1e-12, msg=f"{part} {name}")
    assert [s for s, _ in state["loss"]] == [s for s, _ in whole["loss"]]
    for (_, loss), (_, expected) in zip(state["loss"], whole["loss"]):
        assert loss == pytest.approx(expected, rel=1e-6)  # means of parts (logged losses add up in float32)


def test_accumulated_micro_batches_equal_one_step_on_the_whole_batch(tmp_path):
    """train.grad_accum_steps=4: each step's batch in 4 micro-batches, one after another, gives
    the weights, gradients, EMAs and logged losses of whole-batch steps."""
    whole = _state(_fit(tmp_path / "whole", distributed=False))
    initial = _problem()[0].state_dict()
    assert all(not torch.equal(whole["model"][n], initial[n]) for n, p in whole["grad"].items() if p.abs().sum() > 0)
    _assert_same_training(_state(_fit(tmp_path / "accum", distributed=False, accum=4)), whole)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_steps_on_half_batches_equal_steps_on_the_whole_batch(tmp_path, accum):
    """2 processes, each on its half of every batch (accum=2: in two micro-batches, all-reduced
    once), reach the single process's whole-batch training."""
    torch.multiprocessing.spawn(_rank_fits, args=(2, _free_port(), tmp_path, accum), nprocs=2)
    single = _state(_fit(tmp_path / "single", distributed=False))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    initial = _problem()[0].state_dict()
    assert all(not torch.equal(single["model"][n], initial[n]) for n, p in single["grad"].items() if p.abs().sum() > 0)
    for part in ("model", "grad", "ema", "ema_0.5"):
        for name in single[part]:
            assert torch.equal(ranks[0][part][name], ranks[1][part][name]), (part, name)  # the ranks agree exactly
    _assert_same_training(ranks[0], single)
    assert [s for s, _ in ranks[0]["loss"]] == [1, 2]
    # rank 0 alone writes, and its checkpoint is a single process's (no DDP wrapper in the keys)
    assert not (tmp_path / "ckpt_rank1").exists()
    ddp_ckpt = torch.load(tmp_path / "ckpt_rank0" / "last.pt", weights_only=True)
    single_ckpt = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    assert ddp_ckpt.keys() == single_ckpt.keys() and ddp_ckpt["model"].keys() == single_ckpt["model"].keys()


# ---- torchrun run.py end to end -----------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, shapes_dir) -> Path:
    """`torchrun --nproc_per_node=2 run.py <tiny>` with Hydra's own run folder name."""
    base = tmp_path_factory.mktemp("ddp")
    proc = run_py(*tiny_overrides(shapes_dir, base / "cache"), cwd=base, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((base / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # both ranks named the same folder
    return runs[0]


def _assert_resumes_to_the_same_weights(finished: Path, overrides: list[str], resumed: Path) -> None:
    """A torchrun run resumed from the step-3 checkpoint of a finished 6-step one ends with its
    weights and EMA weights, bit for bit."""
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(finished / "checkpoints" / "step_00000003.pt", resumed / "checkpoints" / "last.pt")
    proc = run_py(*overrides, "train.resume=auto", f"hydra.run.dir={resumed}", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(finished / "checkpoints" / "step_00000006.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        state_a, state_b = (a[key], b[key]) if key == "model" else (a[key]["model"], b[key]["model"])
        for name, tensor in state_a.items():
            assert torch.equal(tensor, state_b[name]), (key, name)


@pytest.mark.slow
def test_torchrun_trains_in_one_run_folder_written_by_rank_0(ddp_run):
    from difflab.trained import load_diffusion_model

    for rel in [".hydra/config.yaml", "checkpoints/last.pt", "checkpoints/best.pt", "checkpoints/step_00000003.pt",
                "metrics.json", "samples/samples.npz", "samples/grid.png", "loss_curve.png", "train.log"]:
        assert (ddp_run / rel).is_file(), rel
    m = read_metrics(ddp_run)
    assert m["status"] == "completed" and m["trained"] is True and m["steps"] == 6
    assert math.isfinite(m["final_loss"]) and m["final_loss"] > 0
    assert (ddp_run / "train.log").read_text().count("step 6 loss") == 1  # one log, rank 0's
    writers = {f.name.rsplit(".", 2)[1] for f in (ddp_run / "tb").glob("events.out.tfevents.*")}
    assert len(writers) == 1  # TensorBoard files of one process id
    load_diffusion_model(str(ddp_run / "checkpoints" / "last.pt"), torch.device("cpu"))  # a single process's format


@pytest.mark.slow
def test_torchrun_resumes_exactly_and_continues(ddp_run, shapes_dir, tmp_path):
    """Killed after its step-3 checkpoint and resumed, a torchrun run ends with the weights of
    the uninterrupted one (every rank's randomness is a function of the step); the finished run
    continues to a larger train.max_steps from its last step."""
    tiny = tiny_overrides(shapes_dir, tmp_path / "cache")
    _assert_resumes_to_the_same_weights(ddp_run, tiny, tmp_path / "resumed")

    proc = run_py(*tiny, "train.max_steps=8", "train.resume=auto", f"hydra.run.dir={ddp_run}", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(ddp_run)
    assert m["steps"] == 8 and m["resumed_from"] == str(ddp_run / "checkpoints" / "last.pt")
    assert "at step 6" in (ddp_run / "train.log").read_text()
    assert (ddp_run / "samples" / "samples.npz").is_file()


@pytest.mark.slow
def test_torchrun_latent_diffusion_trains_autoencoder_and_model_together(shapes_dir, tmp_path):
    """Two DDP trainings in one run: a VQ autoencoder whose discriminator joins at step 2 (so
    DDP must allow parameters without gradients), then the diffusion model on the latents rank 0
    encoded alone and stored for the others."""
    run_dir = tmp_path / "run"
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "autoencoder=vq", "autoencoder.channels=16",
                  "autoencoder.train.max_steps=4", "autoencoder.train.batch_size=8", "autoencoder.train.warmup_steps=1",
                  "autoencoder.discriminator.enabled=true", "autoencoder.discriminator.start=2",
                  "train.max_steps=4", f"hydra.run.dir={run_dir}", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(run_dir)
    assert m["autoencoder_source"] == "trained" and m["trained"] is True and m["steps"] == 4
    assert (run_dir / "autoencoder" / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "samples" / "samples.npz").is_file()
    assert len(list((tmp_path / "cache" / "artifacts" / "latents").glob("*/model.pt"))) == 1


@pytest.mark.slow
def test_torchrun_trains_the_guidance_classifier_the_plan_adds(shapes_dir, tmp_path):
    """guidance=classifier with none cached: both processes train the classifier the plan adds,
    then the diffusion model's samples are guided by it, and rank 0 alone evaluates them (its
    evaluation classifier and held-out data obtained without the other process)."""
    run_dir = tmp_path / "run"
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "guidance=classifier", "guidance.scale=2",
                  "train.max_steps=4", "classifier.max_steps=4", "eval.num_samples=8", "eval.classifier_steps=4",
                  "eval.extractors=[classifier]", f"hydra.run.dir={run_dir}", nproc=2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(run_dir)
    assert m["classifier_source"] == "trained" and m["trained"] is True
    assert torch.load(run_dir / "classifier" / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert (run_dir / "classifier_guided_samples" / "samples.npz").is_file()
    assert m["fd_classifier"] > 0 and 0 <= m["class_accuracy"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("objective, extra", [
    ("edm", ["guidance=cfg", "guidance.scale=2", "conditioning=class_tokens"]),
    ("flow", ["conditioning=text", 'dataset.captions.templates=["a {name}","the {name} shape"]', "guidance=cfg",
              "autoencoder=kl", *TINY_AE]),
], ids=["edm-class_tokens", "flow-text-latent"])
def test_torchrun_trains_and_resumes_each_objective(objective, extra, shapes_dir, tmp_path):
    """The edm and flow objectives under 2 processes, conditioned through cross-attention (class
    tokens; text prompts on an autoencoder's latents): each rank draws its own half of the noise
    levels and captions, and a run resumed from its step-3 checkpoint ends with the same weights."""
    tiny = [*tiny_overrides(shapes_dir, tmp_path / "cache", objective), *extra]
    whole = tmp_path / "whole"
    proc = run_py(*tiny, f"hydra.run.dir={whole}", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(whole)
    assert m["objective"] == objective and m["steps"] == 6 and math.isfinite(m["final_loss"])
    assert (whole / "samples" / "samples.npz").is_file()
    _assert_resumes_to_the_same_weights(whole, tiny, tmp_path / "resumed")


@pytest.mark.slow
@pytest.mark.parametrize("args, sentence", [
    (["train.batch_size=7"], "error: train.batch_size=7 is the global batch and does not split evenly over the 2 "
                             "torchrun processes: use a multiple of 2."),
    (["mode=sample", "ckpt=none.pt"], "error: mode=sample trains nothing"),
    (["+sweep=samplers"], "error: A sweep (-m or a named sweep) cannot run inside torchrun"),
])
def test_torchrun_refuses_with_one_sentence(args, sentence, shapes_dir, tmp_path):
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), *args, cwd=tmp_path, nproc=2)
    assert proc.returncode != 0
    assert sentence in proc.stderr, proc.stderr[-3000:]
