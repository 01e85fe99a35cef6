"""Sampling a trained model at lower precision (compress.quantize): bf16 autocast, or int8 weights and
activations, post-training, with torch's PT2E flow (export -> prepare with the x86 inductor quantiser
-> calibrate -> convert -> torch.compile; reference/methods.md, "Compression on a CPU"). Every convolution is
quantised, and difflab's fused CPU kernels (GroupNorm+SiLU, attention) stay in the graph between them.

The int8 activation scales are calibrated on training images noised at exactly the levels the
run's sampler visits (and with the labels it feeds the network, the null class too under CFG),
since a denoiser's activations at pure noise and near clean data differ by orders of magnitude.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch._inductor.config as inductor_config
from omegaconf import DictConfig
from torch import nn

from difflab.data import load_splits, to_model_range
from difflab.diffusion.spacing import sampling_grid
from difflab.errors import UserError
from difflab.sampling import batch_slices
from difflab.trained import DiffusionModel

log = logging.getLogger("difflab.quantize")


class Autocast(nn.Module):
    """`net` run under autocast to `dtype` (its outputs cast back to fp32 by the denoiser)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, *args):
        with torch.autocast(args[0].device.type, dtype=self.dtype):
            return self.net(*args)


class Int8Net(nn.Module):
    """The converted int8 graph, compiled; takes y=None as the all-null labels the float network would."""

    def __init__(self, graph, num_classes: int):
        super().__init__()
        self.graph, self.num_classes = graph, num_classes

    def forward(self, x, cond, y=None):
        if self.num_classes and y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        # Freezing folds the weights into constants: only then does inductor replace dequantise -> conv ->
        # quantise with oneDNN's int8 convolution (without it they run in float, slower than fp32). It must hold
        # whenever a call compiles, e.g. for a new batch size.
        with inductor_config.patch(freezing=True):
            return self.graph(x, cond, y) if self.num_classes else self.graph(x, cond)


def calibration_inputs(model: DiffusionModel, cfg: DictConfig, device: torch.device) -> list[tuple]:
    """(x_t, conditioning, y) batches: training images in model space, each example at one of the sampler's levels
    (the levels in turn), with the labels sampling uses (the null class for a share under CFG)."""
    train, _ = load_splits(model.cfg.dataset, cfg.paths.cache_dir)
    grid = sampling_grid(model.process, cfg.sampler.steps, cfg.sampler.spacing, cfg.sampler.rho)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, batches = min(cfg.sample.batch_size, len(train)), []
    for b in range(cfg.compress.calibration_batches):
        idx = torch.randint(0, len(train), (n,), generator=gen)
        x0 = model.to_model_space(to_model_range(train.images[idx]).to(device))
        levels = grid.levels[(torch.arange(n) + b * n) % len(grid)].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_in, cond = model.process.net_inputs(model.process.add_noise(x0, noise, levels), levels)
        y = None
        if model.num_classes:
            y = train.labels[idx].to(device)
            if cfg.guidance.name == "cfg":
                y = torch.where(torch.arange(n, device=device) % 2 == 1, torch.full_like(y, model.num_classes), y)
        batches.append((x_in, cond, y))
    return batches


def _pt2e():
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError:
        raise UserError("compress.quantize=int8 needs the torchao package: pip install 'difflab[compress]'.") from None
    return prepare_pt2e, convert_pt2e, x86


def expose_convolutions(graph: torch.fx.Graph) -> None:
    """Name every convolution of an exported graph as F.conv2d's. The quantiser finds convolutions by the module
    that ran them, and the exact type nn.Conv2d only: without this the 1x1 PointwiseConvs, the attention's projections
    and Upsample's phase convolutions (21 of the default UNet's 49) stay in float."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.conv2d.default:
            node.meta["source_fn_stack"] = [(node.name, torch.nn.functional.conv2d)]


def quantize_int8(net: nn.Module, batches: list[tuple], num_classes: int, compile: bool = True) -> nn.Module:
    """`net` as an int8 graph (static per-tensor activation scales from `batches`, per-channel weights), compiled
    to inductor's int8 kernels (uncompiled, it runs the same arithmetic as reference ops). The fused norm and
    attention kernels stay opaque operators in float: on the default UNet that is 1.3x faster than inductor's own
    GroupNorm kernels, which it would fuse with the quantisation (results/compression_forward_mnist.json)."""
    prepare_pt2e, convert_pt2e, x86 = _pt2e()
    example = batches[0] if num_classes else batches[0][:2]
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = tuple({0: batch} for _ in example)
    exported = torch.export.export(net.eval(), example, dynamic_shapes=shapes).module()
    expose_convolutions(exported.graph)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for inputs in batches:
            prepared(*(inputs if num_classes else inputs[:2]))
    converted = convert_pt2e(prepared)
    # static shapes, each batch size compiled once (6-20 s): with a dynamic batch inductor expects the first
    # convolution's output in NCHW, as its 1-channel input reads, and oneDNN writes it channels_last
    return Int8Net(torch.compile(converted, dynamic=False) if compile else converted, num_classes)


def compile_for_sampling(model: DiffusionModel, cfg: DictConfig, counts: Sequence[int], device: torch.device) -> None:
    """Compile the int8 network at each batch size sampling `counts` images will feed it, through the denoiser sampling
    uses (which doubles the batch under classifier-free guidance), so the compile counts as preparation rather than
    sampling time. On inference tensors, as sampling's are: the compiled graph is guarded on their dispatch keys."""
    sizes = {s.stop - s.start for n in counts for s in batch_slices(n, cfg.sample.batch_size)}
    grid = sampling_grid(model.process, cfg.sampler.steps, cfg.sampler.spacing, cfg.sampler.rho)
    with torch.inference_mode():
        for b in sorted(sizes):
            x = torch.randn((b, *model.shape), device=device)
            y = torch.zeros(b, dtype=torch.long, device=device) if model.num_classes else None
            model.denoiser(y, cfg.guidance, clip_x0=False)(x, grid.level(0, x))


def quantize_model(model: DiffusionModel, cfg: DictConfig, device: torch.device, counts: Sequence[int] = ()) -> dict:
    """Put `model`'s network at compress.quantize's precision in place, ready to sample `counts` images (a compiled
    int8 network compiles for other batch sizes when it meets them); what metrics.json records of it."""
    q = cfg.compress.quantize
    t0 = time.perf_counter()
    record = {"quantize": q}
    if q == "bf16":
        model.net = Autocast(model.net, torch.bfloat16)
    elif q == "int8":
        if device.type != "cpu":  # the plan refuses this; a model loaded elsewhere (the API) too
            raise UserError("compress.quantize=int8 runs on the CPU's int8 kernels: use device=cpu.")
        batches = calibration_inputs(model, cfg, device)
        model.net = quantize_int8(model.net, batches, model.num_classes, cfg.compress.compile)
        if cfg.compress.compile:
            compile_for_sampling(model, cfg, counts, device)
        record.update({"quantize_backend": "torchao PT2E, X86InductorQuantizer (static, per-channel weights)",
                       "calibration_images": sum(len(b[0]) for b in batches)})
    record["quantize_seconds"] = time.perf_counter() - t0
    log.info("compress.quantize=%s: the network samples at that precision (%.1f s to prepare)", q,
             record["quantize_seconds"])
    return record
