"""The training loop's parts: EMA, LR schedule, batches, early stopping, the NaN guard and
atomic checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from difflab.checkpoint import atomic_save, load_checkpoint
from difflab.config import TrainConfig
from difflab.errors import TrainingInterrupted, UserError
from difflab.train.ema import EMA
from difflab.train.loop import EarlyStopper, StepBatches, Trainer, lr_lambda, split_batch


def test_ema_formula_start_and_warmup():
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.9, update_every=1, start=2, warmup=False)
    model.weight.data.fill_(1.0)
    ema.update(model, step=1)  # before start: a plain copy
    assert ema.model.weight.item() == 1.0
    model.weight.data.fill_(3.0)
    ema.update(model, step=3)
    assert ema.model.weight.item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.0)  # 1 - 1^(-3/4)
    warm.num_updates = 99
    assert warm.current_decay() == pytest.approx(1 - 100 ** -0.75)
    warm.num_updates = 10**9
    assert warm.current_decay() == 0.999


def test_ema_update_every():
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.5, update_every=2, warmup=False)
    before = ema.model.weight.item()
    model.weight.data.add_(1.0)
    ema.update(model, step=1)
    assert ema.model.weight.item() == before
    ema.update(model, step=2)
    assert ema.model.weight.item() == pytest.approx(0.5 * before + 0.5 * model.weight.item())


def test_lr_warmup_then_cosine():
    f = lr_lambda(warmup=10, total=110, schedule="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert lr_lambda(10, 110, "constant", 0.1)(80) == 1.0


def test_batches_are_a_function_of_the_step():
    a, b = StepBatches(100, 32, seed=3), StepBatches(100, 32, seed=3)
    epoch = torch.cat([a.indices(s) for s in range(3)])
    assert len(set(epoch.tolist())) == 96  # no repeats within an epoch
    assert torch.equal(b.indices(4), a.indices(4)) and torch.equal(b.indices(1), a.indices(1))
    assert not torch.equal(a.indices(0), a.indices(3))  # a new permutation each epoch
    with pytest.raises(UserError, match="fewer than train.batch_size=32: lower train.batch_size"):
        StepBatches(10, 32, seed=0)
    with pytest.raises(UserError, match="fewer than classifier.batch_size=32: lower classifier.batch_size"):
        StepBatches(10, 32, seed=0, key="classifier.batch_size")  # the stage's own setting is named


def test_split_batch_into_micro_batches():
    x, y = torch.arange(12).reshape(6, 2), torch.arange(6)
    parts = split_batch((x, y, 7), 3)
    assert len(parts) == 3 and all(p[2] == 7 for p in parts)  # non-tensors go to every part
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert split_batch(x, 1)[0] is x
    with pytest.raises(ValueError, match="does not split into 4"):
        split_batch(x, 4)


def test_early_stopping_uses_mean_of_the_differences():
    stopper = EarlyStopper(threshold=0.01, window=4)
    assert not any(stopper.should_stop(v) for v in (1.0, 0.9, 0.8))
    assert not stopper.should_stop(0.7)  # mean |diff| = 0.1
    stopper = EarlyStopper(threshold=0.01, window=4)
    results = [stopper.should_stop(v) for v in (0.5, 0.505, 0.5, 0.505)]
    assert results == [False, False, False, True]  # 3 diffs of 0.005, divided by 3 (not 4)
    # differences 0.01, 0.01, 0.0025: their mean 0.0075 is above 0.0065, so no stop; the seed's
    # division by the window (4) would give 0.0056 and stop too early
    stopper = EarlyStopper(threshold=0.0065, window=4)
    assert not [stopper.should_stop(v) for v in (0.5, 0.51, 0.5, 0.5025)][-1]


def _trainer(tmp_path: Path, **overrides) -> Trainer:
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"progress": False, "log_every": 1,
                                                              "checkpoint_every": 2, **overrides})
    torch.manual_seed(0)
    return Trainer(nn.Linear(2, 1), cfg, tmp_path / "ckpt", torch.device("cpu"), extra_state={"config": {}})


def test_loss_falls_on_a_toy_problem(tmp_path):
    trainer = _trainer(tmp_path, max_steps=200, lr=0.05, warmup_steps=1)
    x = torch.randn(256, 2)
    target = x @ torch.tensor([[2.0], [-1.0]])
    loss = lambda model, idx: ((model(x[idx]) - target[idx]) ** 2).mean()  # noqa: E731
    batches = StepBatches(256, 32, seed=0)
    result = trainer.fit(loss, batches.indices, 32)
    assert result.step == 200
    assert result.loss_history[-1][1] < 0.01 * result.loss_history[0][1]
    assert (tmp_path / "ckpt" / "last.pt").is_file()


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, max_steps=10, lr=0.01)
    x = torch.randn(8, 2)

    def loss(model, step):
        value = model(x).pow(2).mean()
        return value * float("nan") if step >= 5 else value

    with pytest.raises(UserError, match="step 6.*train.resume=auto"):
        trainer.fit(loss, lambda s: s, 8)
    good = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert good["step"] == 4
    assert all(torch.isfinite(v).all() for v in good["model"].values())


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"config": {}, "step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"config": {}, "step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(bad)


def test_precision_resolution(monkeypatch):
    import difflab.train.loop as loop

    cpu = torch.device("cpu")
    assert loop.resolve_precision("fp32", cpu) is None
    assert loop.resolve_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert loop.resolve_precision("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    assert loop.resolve_precision("auto", cpu) is None
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        loop.resolve_precision("fp16", cpu)


def test_ema_copies_follow_their_own_decays_and_resume(tmp_path):
    """train.ema.decays: each extra copy equals an EMA run alone with its decay, and a trainer
    resumed from a checkpoint continues every copy."""
    x = torch.randn(64, 2)
    batches = StepBatches(64, 16, seed=0)
    ema_cfg = {"decay": 0.9, "decays": [0.5, 0.9, 0.99], "warmup": False}
    full = _trainer(tmp_path / "full", max_steps=6, ema=ema_cfg)
    assert sorted(full.ema_copies) == [0.5, 0.99]  # the main decay is not kept twice
    alone = {d: EMA(full.model, d, warmup=False) for d in (0.5, 0.99)}
    steps_done = []

    def loss(model, idx):  # sees the weights of the previous step: feed them to the lone EMAs
        if steps_done:
            for ema in alone.values():
                ema.update(model, len(steps_done))
        steps_done.append(1)
        return model(x[idx]).pow(2).mean()

    full.fit(loss, batches.indices, 16)
    for ema in alone.values():
        ema.update(full.model, 6)
    plain = lambda model, idx: model(x[idx]).pow(2).mean()  # noqa: E731
    _trainer(tmp_path / "half", max_steps=3, ema=ema_cfg).fit(plain, batches.indices, 16)
    resumed = _trainer(tmp_path / "half", max_steps=6, ema=ema_cfg)
    resumed.maybe_resume("auto")
    assert resumed.step == 3
    resumed.fit(plain, batches.indices, 16)
    for decay, ema in alone.items():
        for a, b, c in zip(ema.model.parameters(), full.ema_copies[decay].model.parameters(),
                           resumed.ema_copies[decay].model.parameters()):
            assert torch.equal(a, b) and torch.equal(b, c)
    assert not torch.equal(full.ema_copies[0.5].model.weight, full.ema_copies[0.99].model.weight)


def test_a_run_resumed_between_log_lines_reports_the_uninterrupted_loss(tmp_path):
    """The loss window since the last log line is in the checkpoint: stopped after step 5 of 6
    (log every 4) and resumed, the final loss is the mean over steps 5 and 6, as uninterrupted."""
    import signal

    x = torch.randn(64, 2)
    batches = StepBatches(64, 16, seed=0)
    settings = {"max_steps": 6, "log_every": 4, "lr_schedule": "constant", "warmup_steps": 0}
    plain = lambda model, idx: model(x[idx]).pow(2).mean()  # noqa: E731
    whole = _trainer(tmp_path / "whole", **settings).fit(plain, batches.indices, 16)

    def stopped_after_5(model, idx):
        if len(batches_seen) == 4:  # the 5th step: as if Ctrl-C arrived during it
            os.kill(os.getpid(), signal.SIGINT)
        batches_seen.append(idx)
        return plain(model, idx)

    batches_seen: list = []
    with pytest.raises(TrainingInterrupted):
        _trainer(tmp_path / "stopped", **settings).fit(stopped_after_5, batches.indices, 16)
    resumed = _trainer(tmp_path / "stopped", **settings)
    assert resumed.maybe_resume("auto") and resumed.step == 5
    result = resumed.fit(plain, batches.indices, 16)
    assert result.final_loss == whole.final_loss


def test_resume_auto_falls_back_to_the_newest_loadable_checkpoint(tmp_path, caplog):
    import logging

    x = torch.randn(8, 2)
    loss = lambda model, step: model(x).pow(2).mean()  # noqa: E731
    _trainer(tmp_path, max_steps=6, checkpoint_every=2, keep_checkpoints=2).fit(loss, lambda s: s, 8)
    ckpt = tmp_path / "ckpt"
    for name in ("last.pt", "step_00000006.pt"):  # killed mid-write, or a disk error
        (ckpt / name).write_bytes((ckpt / name).read_bytes()[:100])
    resumed = _trainer(tmp_path, max_steps=6, checkpoint_every=2)
    with caplog.at_level(logging.WARNING, logger="difflab"):
        assert resumed.maybe_resume("auto") == str(ckpt / "step_00000004.pt")
    assert resumed.step == 4 and "skips" in caplog.text and "last.pt" in caplog.text
    (ckpt / "step_00000004.pt").write_bytes(b"")
    with pytest.raises(UserError, match="no loadable checkpoint"):
        _trainer(tmp_path, max_steps=6).maybe_resume("auto")


def test_a_write_killed_earlier_leaves_no_temp_file_for_good(tmp_path):
    stale = tmp_path / "ckpt" / ".last.pt.x1y2.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    _trainer(tmp_path, max_steps=2)
    assert not stale.exists()


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path):
    atomic_save({"config": {}, "format": 99}, tmp_path / "new.pt")
    with pytest.raises(UserError, match="checkpoint format 99, newer than"):
        load_checkpoint(tmp_path / "new.pt")


def test_nan_without_any_checkpoint_says_so(tmp_path):
    trainer = _trainer(tmp_path, max_steps=10, lr=0.01, checkpoint_every=100)
    x = torch.randn(8, 2)
    with pytest.raises(UserError, match=r"no checkpoint was written before it\): train.lr=0.01 is the likely cause"):
        trainer.fit(lambda model, step: model(x).pow(2).mean() * float("nan"), lambda s: s, 8)


@pytest.mark.parametrize("best_metric, best_step", [("fd", 4), ("val_loss", 6)])
def test_best_pt_follows_train_best_metric(best_metric, best_step, tmp_path):
    """An evaluation every 2 steps scoring step 4 best: best.pt is step 4's when train.best_metric
    names the evaluation, the lowest validation loss's (the last step's here) otherwise; a resumed
    trainer keeps the best score."""
    trainer = _trainer(tmp_path, max_steps=6, lr=0.05, warmup_steps=1, val_every=2, best_metric=best_metric)
    x = torch.randn(64, 2)
    loss = lambda model, idx: (model(x[idx]) ** 2).mean()  # noqa: E731
    scores = {2: 3.0, 4: 1.0, 6: 2.0}
    trainer.fit(loss, StepBatches(64, 16, seed=0).indices, 16, val_fn=lambda model: 1.0 / trainer.step,
                eval_fn=lambda model, step: scores[step], eval_every=2)
    best = load_checkpoint(tmp_path / "ckpt" / "best.pt", "best")
    assert best["step"] == best_step
    resumed = _trainer(tmp_path, max_steps=6, best_metric=best_metric)
    resumed.maybe_resume("auto")
    assert resumed.best_score == (1.0 if best_metric == "fd" else None)
