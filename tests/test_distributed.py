"""Training under torchrun (DistributedDataParallel) on the CPU with the gloo backend: one DDP
step equals one single-process step on the whole batch, a 2-process run.py writes one run folder
and resumes, and what cannot run distributed says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from conftest import REPO, tiny_overrides
from difflab.config import TrainConfig
from difflab.errors import UserError
from difflab.models import build_unet
from difflab.train.loop import StepBatches, Trainer

BATCH = 8


def _trainer(tmp: Path) -> Trainer:
    """A seeded tiny UNet (with attention and up/down-sampling) and the real Trainer, fp32."""
    torch.manual_seed(0)
    net = build_unet(OmegaConf.merge(OmegaConf.load(REPO / "conf/unet/tiny.yaml"), {"attention_resolutions": [8]}),
                     in_channels=1, image_size=16, num_classes=3)
    for param in net.parameters():  # no zero-initialised layers: every weight gets a gradient
        torch.nn.init.normal_(param, std=0.05)
    cfg = OmegaConf.structured(TrainConfig(max_steps=10, lr=1e-3, warmup_steps=0, precision="fp32", grad_clip=1.0,
                                           progress=False))
    cfg.ema.decay, cfg.ema.warmup = 0.9, False
    return Trainer(net, cfg, tmp, torch.device("cpu"))


def _batch() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, 1, 16, 16, generator=gen), torch.randint(0, 1000, (BATCH,), generator=gen),
            torch.randint(0, 3, (BATCH,), generator=gen), torch.randn(BATCH, 1, 16, 16, generator=gen))


def _loss(model, batch) -> torch.Tensor:
    """Deterministic (no sampled t or noise), so only the gradient averaging can differ."""
    x, t, y, target = batch
    return (model(x, t, y) - target).pow(2).mean()


def _one_step(trainer: Trainer, batch) -> dict:
    trainer._train_step(_loss, batch)
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    return {"model": trainer.model.state_dict(), "ema": trainer.ema.model.state_dict(), "grad": grads}


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = _trainer(Path(out) / f"ckpt{rank}")
        half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        torch.save(_one_step(trainer, tuple(b[half] for b in _batch())), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_step_on_half_batches_equals_one_step_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _one_step(_trainer(tmp_path / "single"), _batch())
    start = _trainer(tmp_path / "start").model.state_dict()
    for part in ("model", "ema", "grad"):
        for name, expected in single[part].items():
            assert torch.equal(ranks[0][part][name], ranks[1][part][name]), f"{part}.{name} differs between ranks"
            # Gradients agree to fp32 rounding of the differently ordered batch sums (1e-5 of each
            # tensor's scale; a missed or unaveraged all-reduce is off by 100% or 2x). Adam's first
            # step is lr * g / (|g| + eps), which magnifies that rounding for the rare |g| ~ eps,
            # so weights are held to 1% of one step (lr = 1e-3).
            tol = {"rtol": 1e-4, "atol": 1e-5 * float(expected.abs().max())} if part == "grad" else {"rtol": 0, "atol": 1e-5}
            torch.testing.assert_close(ranks[0][part][name], expected, **tol,
                                       msg=lambda m, k=f"{part}.{name}": f"{k}: {m}")
    moved = [name for name, w in single["model"].items() if not torch.equal(w, start[name])]
    assert len(moved) == len(start)  # the step moved every weight, so the comparison means something


def test_batches_are_split_across_ranks_without_overlap(monkeypatch) -> None:
    from difflab.train import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    parts = []
    for r in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(StepBatches(40, 8, seed=3))
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    whole = StepBatches(40, 8, seed=3)
    for step in (0, 4, 5, 11):  # within and across epochs
        a, b = parts[0].indices(step), parts[1].indices(step)
        assert len(a) == len(b) == 4 and not set(a.tolist()) & set(b.tolist())
        assert torch.equal(torch.cat([a, b]), whole.indices(step))


def test_batch_size_must_split_over_ranks(monkeypatch) -> None:
    from difflab.train import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(UserError, match="train.batch_size=8 does not split evenly over 3 processes"):
        StepBatches(40, 8, seed=0)


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "run.py"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_torchrun_trains_writes_one_run_folder_and_resumes(tmp_path: Path, shapes_dir: Path) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = [*tiny_overrides(shapes_dir, cache), f"hydra.run.dir={run_dir}"]
    first = torchrun(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["trained"] and metrics["steps"] == 6
    assert all(torch.isfinite(torch.tensor(v)) for v in (metrics["final_loss"], metrics["best_val_loss"]))
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "samples" / "samples.npz").is_file()
    log = (run_dir / "train.log").read_text()
    assert log.count("training it on 2 processes") == 1  # rank 0 alone logs to the file
    assert log.count("wrote 8 samples") == 1
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["cache", "run"]  # no second folder from rank 1
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 6 and "module." not in next(iter(state["model"]))  # the bare model, not the DDP wrapper

    resumed = torchrun(*args, "train.resume=auto", "train.max_steps=9")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 9 and metrics["resumed_from"].endswith("last.pt")


@pytest.mark.slow
@pytest.mark.parametrize("extra,message", [
    (["train.batch_size=7"], "train.batch_size=7 does not split evenly over 2 processes"),
    (["mode=joint"], "mode=joint does not run under torchrun"),
    (["-m", "seed=0,1"], "a sweep (-m) cannot run under torchrun"),
])
def test_torchrun_refuses_what_it_cannot_do(tmp_path: Path, shapes_dir: Path, extra: list[str], message: str) -> None:
    result = torchrun(*tiny_overrides(shapes_dir, tmp_path / "cache"), f"hydra.run.dir={tmp_path / 'run'}", *extra)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.slow
def test_torchrun_latent_diffusion_uses_the_cached_autoencoder(tmp_path: Path, shapes_dir: Path) -> None:
    """The autoencoder is made once in one process; under torchrun rank 0 encodes the latent cache
    while the other waits, then both train the latent model."""
    from conftest import run_py
    from test_latent_run import AE

    base = [*tiny_overrides(shapes_dir, tmp_path / "cache"), *AE, "autoencoder=kl"]
    refused = torchrun(*base, f"hydra.run.dir={tmp_path / 'refused'}")
    assert refused.returncode != 0 and "cannot be trained under torchrun" in refused.stderr
    made = run_py(*base, "mode=reconstruction", f"hydra.run.dir={tmp_path / 'ae'}")
    assert made.returncode == 0, made.stderr[-3000:]
    result = torchrun(*base, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["autoencoder_source"] == "cache" and metrics["trained"] and metrics["steps"] == 6
    assert (tmp_path / "run" / "samples" / "samples.npz").is_file()
