"""Let the process keep the memory it frees, so a training step does not page-fault its own
activations back in.

glibc's malloc serves every block above M_MMAP_THRESHOLD (128 KiB, adapting up to 32 MiB) with
fresh pages from the kernel and hands them back when the block is freed. A training step frees
and re-allocates the same large activations every step, so each step faulted in thousands of
zeroed pages (18-21k per step of unet=small at batch 128, 118-157k per ddpm_cifar step). With a
high mmap and trim threshold freed blocks stay in the heap and the next step reuses them:
training +6-8% (small, bf16) and +13% (ddpm_cifar, fp32), peak RSS within 3%
(benchmarks/results/allocator.json). This is what LD_PRELOADing jemalloc or tcmalloc buys,
without a dependency.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("difflab")

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # larger than one activation of the networks in conf/unet at batch 128
TRIM_THRESHOLD = 1 << 30

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once. Returns whether they are
    raised. Nothing happens off glibc (macOS, musl, Windows) or when the user tunes malloc
    through glibc's own environment (MALLOC_*_ variables or glibc.malloc.* GLIBC_TUNABLES)."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ) \
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _done:
        log.debug("glibc refused the malloc thresholds; freed memory goes back to the kernel as usual")
    return _done
