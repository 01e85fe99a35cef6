"""The compiled CPU kernels (group_norm_silu.cpp, attention.cpp) as one library, built on first use.

The library is compiled with the system C++ compiler (about 3.5 s, once; $CXX, else c++) into
$DIFFLAB_CACHE/kernels (default ~/.cache/difflab/kernels), named by a hash of the sources, the
flags and this CPU, and loaded with ctypes; its OpenMP regions run on the libgomp torch already
loaded. Where it cannot be had (no compiler, not Linux, torch not on libgomp, a failed build)
`library()` is None after one warning and each layer keeps its torch fallback;
DIFFLAB_FUSED_KERNELS=0 turns the kernels off.

The layers reach the library only through typed torch operators (torch.ops.difflab.*, defined
by `cpu_operator` in group_norm_silu.py and attention.py) that `expect` their tensors first: the
C code trusts every pointer and size it is given, so a wrong dtype, device, shape or layout would
read or write out of bounds instead of failing.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Optional

import torch
from torch import Tensor
from torch._ops import OpOverload

from difflab.checkpoint import atomic_copy

log = logging.getLogger("difflab")

HERE = Path(__file__).parent
SOURCES = [HERE / "group_norm_silu.cpp", HERE / "attention.cpp"]
HEADERS = [HERE / "kernel_math.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
I64, VP = ctypes.c_int64, ctypes.c_void_p  # every pointer is a void*: the operators pass data_ptr()s

_library: Optional[ctypes.CDLL] = None
_tried = False
OPERATORS = torch.library.Library("difflab", "DEF")  # the torch.ops.difflab namespace


_held_off = 0  # torch_layers() depth


def kernels_enabled() -> bool:
    return not _held_off and os.environ.get("DIFFLAB_FUSED_KERNELS", "1") != "0"


@contextmanager
def torch_layers() -> Iterator[None]:
    """The layers run their torch fallbacks within: for a graph that another compiler lowers (the int8
    export), which can fuse and quantise aten operators and cannot see into ours."""
    global _held_off
    _held_off += 1
    try:
        yield
    finally:
        _held_off -= 1


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in info.splitlines() if ln.startswith(("flags", "model name"))]
    return "\n".join(sorted(set(lines)))


def _torch_uses_libgomp() -> bool:
    """Our OpenMP must be the runtime torch runs on, else two thread pools fight for the cores."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(out)], check=True, capture_output=True,
                       text=True, timeout=300)
        atomic_copy(out, target)  # concurrent processes each build, the last rename wins


def _load() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None
    if not _torch_uses_libgomp():
        log.info("torch does not run on libgomp here; the fused CPU kernels stay off")
        return None
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        log.warning("no C++ compiler found, so GroupNorm, SiLU, dropout and attention run as slower torch "
                    "layers; set CXX or install g++ for the fused CPU kernels")
        return None
    code = [p.read_text() for p in SOURCES + HEADERS]
    key = hashlib.sha256("\n".join([*code, " ".join(FLAGS), compiler, _cpu_signature()]).encode())
    cache = Path(os.environ.get("DIFFLAB_CACHE", Path.home() / ".cache" / "difflab")) / "kernels"
    target = cache / f"difflab_kernels-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("could not build the fused CPU kernels (%s), so GroupNorm, SiLU, dropout and attention run "
                    "as torch layers", detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__)
        return None
    drop = [ctypes.c_uint32, ctypes.c_float, ctypes.c_uint32, ctypes.c_uint32]  # cut, scale, two seeds
    lib.group_norm_silu_forward.argtypes = [ctypes.c_int, *[VP] * 8, I64, I64, I64, I64, ctypes.c_float,
                                            ctypes.c_int, ctypes.c_int, *drop]
    lib.group_norm_silu_backward.argtypes = [ctypes.c_int, *[VP] * 12, I64, I64, I64, I64, ctypes.c_int,
                                             ctypes.c_int, *drop]
    shape = [I64, I64, I64, I64, ctypes.c_float]  # B, L, H, D, scale
    lib.attention_forward.argtypes = [VP, VP, VP, *shape]
    lib.attention_backward.argtypes = [VP, VP, VP, VP, VP, *shape]
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, built on first use; None where they cannot be had."""
    global _library, _tried
    if not _tried:
        _tried = True
        _library = _load()
    return _library


def kernels() -> ctypes.CDLL:
    """The compiled kernels, for an operator that cannot run without them."""
    lib = library()
    if lib is None:
        raise RuntimeError("the fused CPU kernels are not available here (no C++ compiler, or their build failed); "
                           "call the layers, which fall back to torch, instead of the difflab:: operators")
    return lib


def floats(*shape: int) -> Tensor:
    """An uninitialised float32 CPU buffer for a kernel to write (whatever torch's default dtype)."""
    return torch.empty(*shape, dtype=torch.float32)


FORMAT_NAMES = {torch.contiguous_format: "contiguous", torch.channels_last: "channels_last-contiguous"}


def expect(name: str, t: Tensor, shape: tuple[int, ...], dtypes: Collection[torch.dtype] = (torch.float32,),
           memory_format: torch.memory_format = torch.contiguous_format) -> None:
    """Refuse, with a ValueError naming the tensor, what was expected and what was found, a tensor
    that a kernel would misread: not on the CPU, of another dtype or shape, or laid out otherwise."""
    if not t.is_cpu:
        raise ValueError(f"{name} must be a CPU tensor, got one on {t.device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous(memory_format=memory_format):
        raise ValueError(f"{name} must be {FORMAT_NAMES[memory_format]}, got strides {t.stride()}")


@torch.compiler.assume_constant_result
def kernels_ready() -> bool:
    """Kernels on and built. torch.compile runs this once while tracing and keeps the answer (so it
    builds the library then, if need be, instead of failing to trace the build; and changing
    DIFFLAB_FUSED_KERNELS later does not recompile a compiled model). This imports torch._dynamo
    (~1 s), which run.py's imports (torchvision) load anyway."""
    return kernels_enabled() and library() is not None


def usable(x: Tensor) -> bool:
    """Whether a kernel may take x: a non-empty CPU tensor, kernels on and built."""
    return x.is_cpu and x.numel() > 0 and kernels_ready()


def cpu_operator(fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], OpOverload]:
    """Make a function the CPU kernel of the typed torch operator difflab::<its name>, its schema
    inferred from its type hints, with `fake` (same arguments, outputs of the right shapes and
    nothing computed) as the implementation torch.compile traces with.

    Registered with torch.library's define and impl rather than torch.library.custom_op: the ops
    need no autograd of their own (the layers' autograd.Functions pair forward and backward), and
    custom_op would add its Python autograd and alias checks to every call. Measured against the
    ctypes calls they replace: the same training speed (benchmarks/results/kernel_ops_cpu.json)."""

    def register(kernel: Callable[..., Any]) -> OpOverload:
        name = kernel.__name__
        OPERATORS.define(name + torch.library.infer_schema(kernel, mutates_args=()),
                         tags=(torch.Tag.pt2_compliant_tag,))
        OPERATORS.impl(name, kernel, "CPU")
        torch.library.register_fake(f"difflab::{name}", fake, lib=OPERATORS)
        return getattr(torch.ops.difflab, name).default

    return register
