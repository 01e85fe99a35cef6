"""difflab.allocator: a process that keeps the memory it frees does not fault it back in."""

import platform
import resource

import pytest
import torch

from difflab import allocator

on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def faults_per_reallocation(mib: int, times: int = 32) -> list[int]:
    """Minor page faults of each of `times` rounds of allocating, writing and freeing a `mib`
    MiB tensor, as a training step re-allocates its activations."""
    faults = []
    for _ in range(times):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(mib << 18)  # float32: 4 bytes each
        t.fill_(1.0)
        del t
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


@pytest.mark.skipif(not on_glibc, reason="mallopt is glibc's")
def test_freed_activations_are_reused_without_page_faults():
    assert allocator.keep_freed_memory()
    assert allocator.keep_freed_memory()  # idempotent
    # 64 MiB is 16384 pages: glibc's default unmaps it on free and faults every page back in on
    # every round. Kept, the heap grows over the first rounds and then serves them all.
    assert max(faults_per_reallocation(64)[-4:]) < 1000


def test_leaves_malloc_alone_off_glibc_or_when_the_user_tuned_it(monkeypatch):
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert not allocator.keep_freed_memory()
    monkeypatch.delenv("MALLOC_TOP_PAD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert not allocator.keep_freed_memory()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert not allocator.keep_freed_memory()
