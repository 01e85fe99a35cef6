"""The compiled CPU kernels (group_norm_silu.cpp, attention.cpp) as one library, built on first use.

The library is compiled with the system C++ compiler (about 3.5 s, once; $CXX, else c++) into
$DIFFLAB_CACHE/kernels (default ~/.cache/difflab/kernels), named by a hash of the sources, the
flags and this CPU, and loaded with ctypes; its OpenMP regions run on the libgomp torch already
loaded. Where it cannot be had (no compiler, not Linux, torch not on libgomp, a failed build)
`library()` is None after one warning and each layer keeps its torch fallback;
DIFFLAB_FUSED_KERNELS=0 turns the kernels off.
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
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from difflab.checkpoint import atomic_copy

log = logging.getLogger("difflab")

HERE = Path(__file__).parent
SOURCES = [HERE / "group_norm_silu.cpp", HERE / "attention.cpp"]
HEADERS = [HERE / "kernel_math.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
I64, F32P, VP = ctypes.c_int64, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p

_library: Optional[ctypes.CDLL] = None
_tried = False


def kernels_enabled() -> bool:
    return os.environ.get("DIFFLAB_FUSED_KERNELS", "1") != "0"


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
    lib.group_norm_silu_forward.argtypes = [ctypes.c_int, VP, F32P, F32P, F32P, VP, F32P, F32P, F32P, I64,
                                            I64, I64, I64, ctypes.c_float, ctypes.c_int, ctypes.c_int, *drop]
    lib.group_norm_silu_backward.argtypes = [ctypes.c_int, VP, F32P, F32P, VP, F32P, F32P, F32P, F32P, VP,
                                             F32P, F32P, F32P, I64, I64, I64, I64, ctypes.c_int, ctypes.c_int,
                                             *drop]
    shape = [I64, I64, I64, I64, ctypes.c_float]  # B, L, H, D, scale
    lib.attention_forward.argtypes = [F32P, F32P, F32P, *shape]
    lib.attention_backward.argtypes = [F32P, F32P, F32P, F32P, F32P, *shape]
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, built on first use; None where they cannot be had."""
    global _library, _tried
    if not _tried:
        _tried = True
        _library = _load()
    return _library


def f32(t: Optional[Tensor]) -> ctypes.POINTER(ctypes.c_float):
    """A float32 tensor's data as the kernels' float*, None as NULL."""
    return ctypes.cast(t.data_ptr(), F32P) if t is not None else None


def floats(*shape: int) -> Tensor:
    """An uninitialised float32 CPU buffer for a kernel to write (whatever torch's default dtype)."""
    return torch.empty(*shape, dtype=torch.float32)


def usable(x: Tensor) -> bool:
    """Whether a kernel may take x: a CPU tensor outside torch.compile, kernels on and built."""
    return (x.device.type == "cpu" and x.numel() > 0 and kernels_enabled() and not torch.compiler.is_compiling()
            and library() is not None)
