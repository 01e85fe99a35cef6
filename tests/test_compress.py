"""Quantised and pruned networks: close to the original on fixed inputs, checkpoints that load with
weights_only=True, mode=prune and compress.quantize end to end, and their one-sentence refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics, run_py, tiny_overrides
from omegaconf import OmegaConf

from difflab.checkpoint import atomic_save
from difflab.compress.prune import prune_unet, with_teacher_outputs
from difflab.compress.quantize import Autocast, compile_for_sampling, quantize_int8
from difflab.models import build_unet, count_parameters
from difflab.models.widths import network_widths, resize_to
from difflab.runner import sampled_counts
from difflab.trained import load_diffusion_model

UNET = OmegaConf.create({"channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
                         "head_channels": 16, "dropout": 0.0, "norm_groups": 8})


def _net_and_inputs(n: int = 8):
    torch.manual_seed(0)
    net = build_unet(UNET, 1, 16, 2).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    inputs = (torch.randn(n, 1, 16, 16), torch.rand(n) * 1000, torch.randint(0, 3, (n,)))
    return net, inputs


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def test_bf16_and_int8_stay_within_tolerance_of_fp32():
    net, inputs = _net_and_inputs()
    with torch.no_grad():
        ref = net(*inputs)
        bf16 = _relative_error(Autocast(net, torch.bfloat16)(*inputs), ref)
        calibration = [(torch.randn(8, 1, 16, 16), torch.rand(8) * 1000, torch.randint(0, 3, (8,))) for _ in range(4)]
        int8 = _relative_error(quantize_int8(net, calibration + [inputs], 2, compile=False)(*inputs), ref)
    assert bf16 < 0.02, bf16  # tolerance: 2% relative L2 error for bf16, 5% for int8
    assert int8 < 0.05, int8


def test_int8_quantises_every_convolution():
    """The 1x1 skips, the attention's projections and Upsample's phase convolutions too, not only nn.Conv2d modules:
    each convolution of the converted graph reads a dequantised int8 activation."""
    net, inputs = _net_and_inputs()
    converted = quantize_int8(net, [inputs], 2, compile=False).graph
    convs = [n for n in converted.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.conv2d.default]
    float_inputs = [n.name for n in convs if "dequantize" not in str(n.args[0].target)]
    assert len(convs) > 10 and not float_inputs, float_inputs


def test_compiled_int8_runs_at_each_batch_size_it_meets():
    """Sampling meets several batch sizes (the sample grid's, the evaluation's, a remainder): each compiles once and
    agrees with the uncompiled graph."""
    net, inputs = _net_and_inputs(6)
    calibration = [tuple(t[:4] for t in inputs)]
    compiled, reference = (quantize_int8(net, calibration, 2, compile=c) for c in (True, False))
    with torch.no_grad():
        for n in (4, 6, 4):
            batch = tuple(t[:n] for t in inputs)
            assert _relative_error(compiled(*batch), reference(*batch)) < 0.02


def test_pruned_network_is_narrower_and_rebuilds_exactly_from_a_weights_only_checkpoint(tmp_path):
    net, inputs = _net_and_inputs()
    pruned = prune_unet(net, 0.3, inputs)
    assert count_parameters(pruned) < 0.7 * count_parameters(net)
    with torch.no_grad():
        out, ref = pruned(*inputs), net(*inputs)
    assert out.shape == ref.shape
    atomic_save({"widths": network_widths(pruned), "weights": pruned.state_dict()}, tmp_path / "p.pt")
    state = torch.load(tmp_path / "p.pt", weights_only=True)
    rebuilt = resize_to(build_unet(UNET, 1, 16, 2), state["widths"], state["weights"])
    rebuilt.load_state_dict(state["weights"])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(*inputs), out)


def test_pruning_a_small_share_keeps_the_output_close():
    net, inputs = _net_and_inputs()
    with torch.no_grad():
        ref = net(*inputs)
        errors = [_relative_error(prune_unet(net, a, inputs)(*inputs), ref) for a in (0.1, 0.5)]
    assert errors[0] < errors[1] and errors[0] < 1.0, errors  # tolerance: the 10% prune within 100% relative error


def test_pruned_finetuning_adds_the_originals_outputs_as_a_target():
    net, inputs = _net_and_inputs()
    student = prune_unet(net, 0.3, inputs).train()

    def data_loss(model, batch):  # stands in for the diffusion loss: one call of the network on its inputs
        return model(*batch).pow(2).mean()

    loss = with_teacher_outputs(data_loss, net, 0.5)(student, inputs)
    loss.backward()
    with torch.no_grad():
        out, target = student(*inputs), net(*inputs)
    assert torch.allclose(loss, out.pow(2).mean() + 0.5 * (out - target).pow(2).mean())
    assert all(p.grad is None for p in net.parameters()) and all(p.grad is not None for p in student.parameters())


@pytest.fixture(scope="module")
def model_ckpt(shapes_dir, cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("model")
    r = run_py(*tiny_overrides(shapes_dir, cache, "flow"), "train.threads=1", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    return read_metrics(run)["checkpoint"]


@pytest.mark.slow
def test_prune_end_to_end_gives_a_normal_checkpoint_that_samples(model_ckpt, shapes_dir, cache, tmp_path):
    base = [*tiny_overrides(shapes_dir, cache, "flow"), "train.threads=1"]
    r = run_py(*base, "mode=prune", f"ckpt={model_ckpt}", "prune.amount=0.5", "prune.finetune_steps=3",
               f"hydra.run.dir={tmp_path / 'prune'}")
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_metrics(tmp_path / "prune")
    assert m["params"] < 0.5 * m["original_params"] and m["num_images"] == 8
    state = torch.load(m["checkpoint"], map_location="cpu", weights_only=True)
    assert state["stage"] == "diffusion" and state["pruned"]["widths"]
    s = run_py(*base, "mode=sample", f"ckpt={m['checkpoint']}", "compress.quantize=bf16",
               f"hydra.run.dir={tmp_path / 'sample'}")
    assert s.returncode == 0, s.stderr[-3000:]
    assert read_metrics(tmp_path / "sample")["quantize"] == "bf16"


@pytest.mark.slow
def test_int8_sampling_end_to_end_is_recorded(model_ckpt, shapes_dir, cache, tmp_path):
    r = run_py(*tiny_overrides(shapes_dir, cache, "flow"), "mode=sample", f"ckpt={model_ckpt}", "compress.quantize=int8",
               "compress.compile=false", "compress.calibration_batches=2", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_metrics(tmp_path)
    assert m["quantize"] == "int8" and m["calibration_images"] == 8 and m["num_images"] == 8


class _BatchRecorder(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.sizes = net, []

    def forward(self, x, cond, y=None):
        self.sizes.append(len(x))
        return self.net(x, cond, y)


@pytest.mark.parametrize("guidance, sizes", [({"name": "cfg", "scale": 1.5}, [2, 8]), ({"name": "none", "scale": 0}, [1, 4])])
def test_int8_is_compiled_at_the_batch_sizes_sampling_will_feed_it(model_ckpt, guidance, sizes):
    """5 images in batches of 4 feed batches of 4 and 1, each twice over under classifier-free guidance."""
    model = load_diffusion_model(model_ckpt, torch.device("cpu"))
    model.net = _BatchRecorder(model.net)
    cfg = OmegaConf.create({"sample": {"batch_size": 4}, "guidance": guidance,
                            "sampler": {"steps": 3, "spacing": "trailing", "rho": 7.0}})
    compile_for_sampling(model, cfg, [5], torch.device("cpu"))
    assert model.net.sizes == sizes


def test_the_sampled_counts_follow_the_mode():
    def counts(mode: str, num_samples: int = 300) -> list[int]:
        return sampled_counts(OmegaConf.create({"mode": {"name": mode}, "sample": {"num_images": 100},
                                                "eval": {"num_samples": num_samples}}))

    assert counts("sample") == [100] and counts("evaluate") == [100, 300] and counts("diffusion", 0) == [100]
    assert counts("edit") == []


@pytest.mark.parametrize("setting, words", [
    (["mode=prune", "prune.amount=1.5"], "prune.amount=1.5 must be the share of channels removed"),
    (["mode=sample", "ckpt=x.pt", "compress.quantize=int8", "device=cuda"], "compress.quantize=int8 runs on the CPU"),
    (["mode=classifier", "compress.quantize=bf16"], "applies to a trained model"),
])
def test_a_bad_compression_request_is_one_sentence(shapes_dir, cache, setting, words):
    r = run_py(*tiny_overrides(shapes_dir, cache, "flow"), *setting, "dry_run=true")
    assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
