"""Process-level settings for training on CPU.

`keep_freed_memory()`: by default glibc's malloc gives memory back to the kernel as soon as a large block is freed
(blocks above a dynamic mmap threshold of at most 32 MiB are unmapped; a free region above the trim threshold at the
top of the heap is returned). A training step frees its activations and gradients at the end and allocates the same
sizes again in the next step, so every step page-faults those megabytes back in, zero-filled, one 4 KiB page at a
time. A MoE layer allocates more, and larger, temporaries than a dense MLP (the k-times-replicated token rows of
its dispatch, a weight gradient per expert), so it pays more: at ViT-S shape one MoE MLP layer's forward + backward
faulted 2,700-9,900 pages per step (depending on what the process had run before) against the dense MLP's
800-1,100, about 5% of its time on this project's CPU. Raising both thresholds keeps the freed memory in the
process for the next step. This is the glibc form of what PyTorch's CPU performance guides get from jemalloc or
tcmalloc (`LD_PRELOAD`); it is also what `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` in the environment
do, but settable from Python after start-up.

The cost: memory the process frees stays in its RSS (blocks larger than the threshold are still mapped and
unmapped as before) until the process ends or calls `malloc_trim`. Nothing in this package turns it on by itself:
pretraining does when its config says so (`train.keep_freed_memory: true`), and `benchmarks/moe_layer.py` does by
default and says so in its JSON (`--malloc default` measures without it).
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory", "freed_memory_threshold_mb"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_threshold_mb: int | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has mallopt but ignores these parameters  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory(threshold_mb: int = 256) -> int | None:
    """Keep freed blocks of up to `threshold_mb` MiB in the process instead of handing them back to the kernel
    (glibc's `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD`; see the module docstring). Returns the threshold in effect
    in MiB (glibc versions that refuse a threshold above 32 MiB get 32), or None where the C library is not glibc
    (nothing is changed there). Process-wide and not undone: glibc has no call that restores its dynamic
    thresholds."""
    global _threshold_mb
    if isinstance(threshold_mb, bool) or not isinstance(threshold_mb, int) or not 1 <= threshold_mb < 2048:
        raise ValueError(f"threshold_mb={threshold_mb!r}: give a whole number of MiB from 1 to 2047 (mallopt takes an int).")
    libc = _glibc()
    if libc is None:
        return None
    for mb in dict.fromkeys((threshold_mb, min(threshold_mb, 32))):
        size = ctypes.c_int(mb * 2**20)
        if libc.mallopt(_M_MMAP_THRESHOLD, size) == 1:  # older glibc refuses more than 32 MiB here: try 32
            if libc.mallopt(_M_TRIM_THRESHOLD, size) != 1:  # never refused by any glibc; say so if it were
                raise OSError(f"glibc mallopt(M_TRIM_THRESHOLD, {mb} MiB) failed after M_MMAP_THRESHOLD was set.")
            _threshold_mb = mb
            return mb
    return None


def freed_memory_threshold_mb() -> int | None:
    """The threshold `keep_freed_memory` set in this process, or None if it was not called (or had no effect)."""
    return _threshold_mb
