"""Measurement helpers of the benchmarks: allocator settings, RSS from `/proc`, thread picking. None of this is
the library's business (issue 27): `moe_adapt` reports what torch and the operating system give without help,
and the benchmarks import this module (`benchmarks/` is on `sys.path` when one of them runs).

`RssMeter`: a `moe_adapt.adaptation.report.MemoryMeter` for CPU runs that compares runs finely: its baseline is
the RSS (`VmRSS`) after the allocator handed its free memory back (`release_free_memory`), and its peak is the
kernel's `VmHWM`, reset at the start of the tracked stretch through `/proc/self/clear_refs`.
`pick_threads("auto")`: one torch thread when the machine is already busy (1-minute load average >= cores - 0.5),
where two threads fighting other processes for two cores run several times slower.

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
unmapped as before) until the process ends or calls `malloc_trim`. Nothing turns it on by itself: the benchmarks
run under the platform's default allocator, and `benchmarks/moe_layer.py --malloc keep` / `benchmarks/extract.py
--malloc keep` opt in (their JSON's `malloc` says which ran).

`malloc_library()` names the allocator that serves this process's `malloc` (glibc's, or jemalloc / tcmalloc put in
front of it with `LD_PRELOAD`, as PyTorch's CPU launcher `python -m torch.backends.xeon.run_cpu` does by default),
`release_free_memory()` hands memory that the allocator holds but nobody uses back to the kernel, whichever it is
(so that an RSS measured next counts live data only), `find_malloc_library()` finds an installed jemalloc or
tcmalloc, and `preload_env()` makes the environment of a child process that preloads it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import re
import sys
import warnings
from pathlib import Path

import torch

from moe_adapt.adaptation.report import MemoryMeter, max_rss_mb

__all__ = [
    "MALLOC_LIBRARIES",
    "RssMeter",
    "pick_threads",
    "rss_mb",
    "find_malloc_library",
    "freed_memory_threshold_mb",
    "keep_freed_memory",
    "malloc_library",
    "malloc_setting",
    "preload_env",
    "release_free_memory",
]

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
    in MiB (glibc versions that refuse a threshold above 32 MiB get 32), or None where glibc's malloc is not the one
    in use (another C library, or jemalloc / tcmalloc preloaded; nothing is changed there). Process-wide and not
    undone: glibc has no call that restores its dynamic thresholds."""
    global _threshold_mb
    if isinstance(threshold_mb, bool) or not isinstance(threshold_mb, int) or not 1 <= threshold_mb < 2048:
        raise ValueError(
            f"threshold_mb={threshold_mb!r}: give a whole number of MiB from 1 to 2047 (mallopt takes an int)."
        )
    libc = _glibc()
    if libc is None or malloc_library() != "glibc":  # another allocator preloaded: glibc's thresholds do nothing
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


def malloc_setting() -> str:
    """How this process's `malloc` runs, in words for a benchmark's JSON: "keep freed memory (glibc thresholds N
    MiB)" after `keep_freed_memory`, "glibc default" under glibc's own thresholds, else the allocator's name
    (`malloc_library`), or "unknown" where it cannot be told."""
    if _threshold_mb:
        return f"keep freed memory (glibc thresholds {_threshold_mb} MiB)"
    kind = malloc_library()
    return "glibc default" if kind == "glibc" else kind or "unknown"


# ---------------------------------------------------------------------------------------------------------------
# Which allocator serves malloc, and handing its free memory back
# ---------------------------------------------------------------------------------------------------------------

# The allocators `find_malloc_library` can preload, with the file names their packages install, and the packages
# (Debian/Ubuntu, conda-forge; libgoogle-perftools4 also ships a tcmalloc).
MALLOC_LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc.so.4", "libtcmalloc_minimal.so.4", "libtcmalloc.so", "libtcmalloc_minimal.so"),
}
MALLOC_PACKAGES = {"jemalloc": ("libjemalloc2", "jemalloc"), "tcmalloc": ("libtcmalloc-minimal4", "gperftools")}
_MALLCTL_ARENAS_ALL = 4096  # jemalloc's "all arenas" index in "arena.<i>.purge"


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _malloc_file() -> str | None:
    """The shared object that defines the `malloc` this process calls (dladdr of the global symbol)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        proc = ctypes.CDLL(None)
        dladdr = getattr(proc, "dladdr", None) or ctypes.CDLL("libdl.so.2").dladdr
        addr = ctypes.cast(proc.malloc, ctypes.c_void_p).value
        info = _DlInfo()
        if not dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or not info.dli_fname:
            return None
        return os.fsdecode(info.dli_fname)
    except (OSError, AttributeError):
        return None


def malloc_library() -> str | None:
    """ "jemalloc", "tcmalloc" or "glibc": the allocator behind this process's `malloc` (and so behind PyTorch's CPU
    tensors); another library's file name if it is none of these; None where it cannot be told (not Linux)."""
    path = _malloc_file()
    if path is None:
        return None
    name = Path(path).name
    for kind in MALLOC_LIBRARIES:
        if kind in name:
            return kind
    if name.startswith("libc.so") and _glibc() is not None:
        return "glibc"
    return name


def release_free_memory() -> str | None:
    """Collect Python garbage, then have the allocator return the memory it holds free to the kernel: glibc's
    `malloc_trim(0)`, jemalloc's `thread.tcache.flush` and `arena.<all>.purge`, tcmalloc's
    `MallocExtension_ReleaseFreeMemory`. Returns what `malloc_library()` returns. An RSS read right after counts
    live data only, whichever allocator runs; without this, jemalloc and tcmalloc keep freed pages resident for a
    while (seconds, or until released), and a baseline taken then hides them from whatever reuses them later."""
    gc.collect()
    kind = malloc_library()
    try:
        if kind == "glibc":  # malloc_library said "glibc" only after _glibc() found it
            _glibc().malloc_trim(0)
        elif kind == "jemalloc":
            proc = ctypes.CDLL(None)
            for key in (b"thread.tcache.flush", f"arena.{_MALLCTL_ARENAS_ALL}.purge".encode()):
                if proc.mallctl(key, None, None, None, ctypes.c_size_t(0)) != 0:  # e.g. jemalloc < 5
                    warnings.warn(
                        f"jemalloc refused mallctl({key.decode()!r}): freed memory stays resident.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        elif kind == "tcmalloc":
            proc = ctypes.CDLL(None)
            proc.MallocExtension_MarkThreadIdle()  # this thread's cache first, then the page heap
            proc.MallocExtension_ReleaseFreeMemory()
    except (OSError, AttributeError):
        pass
    return kind


def find_malloc_library(kind: str) -> str | None:
    """The path of an installed `kind` ("jemalloc" or "tcmalloc") shared library, for `LD_PRELOAD` in a child
    process, or None if none is installed. Looks in this environment's `lib/`, the system library folders and the
    dynamic linker's cache, in that order."""
    if kind not in MALLOC_LIBRARIES:
        raise ValueError(f"kind={kind!r}: choose one of {sorted(MALLOC_LIBRARIES)}.")
    folders = [
        Path(sys.prefix) / "lib",
        Path(os.environ.get("CONDA_PREFIX", sys.prefix)) / "lib",
        Path("/usr/local/lib"),
        Path("/usr/lib/x86_64-linux-gnu"),
        Path("/usr/lib/aarch64-linux-gnu"),
        Path("/usr/lib64"),
        Path("/usr/lib"),
    ]
    for folder in dict.fromkeys(folders):
        for name in MALLOC_LIBRARIES[kind]:
            if (folder / name).is_file():
                return str(folder / name)
    for stem in (kind, "tcmalloc_minimal") if kind == "tcmalloc" else (kind,):
        found = ctypes.util.find_library(stem)
        if found:
            return found
    return None


def preload_env(kind: str, env: dict | None = None) -> dict:
    """A copy of `env` (default: this process's environment) whose `LD_PRELOAD` puts the installed `kind`
    ("jemalloc" or "tcmalloc") library first, for a child process. A `FileNotFoundError` naming the packages to
    install when `find_malloc_library` finds none."""
    library = find_malloc_library(kind)
    if library is None:
        apt, conda = MALLOC_PACKAGES[kind]
        raise FileNotFoundError(
            f"no {kind} library found (Debian/Ubuntu: apt-get install {apt}; conda: conda install "
            f"-c conda-forge {conda})."
        )
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD")) if p)
    return env


# ---------------------------------------------------------------------------------------------------------------
# RSS from /proc, and threads by load average
# ---------------------------------------------------------------------------------------------------------------


def rss_mb(field: str = "VmRSS") -> float | None:
    """A memory field of `/proc/self/status` in MiB ("VmRSS": resident now, "VmHWM": the peak), or None where
    there is no such file (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


class RssMeter(MemoryMeter):
    """Peak RSS of the tracked stretch above a baseline of live data (see the module docstring); on a CUDA device
    it measures as `MemoryMeter` does. Falls back to `getrusage`'s peak where `/proc` is missing, and to a
    process-lifetime peak (`resettable = False`) where `clear_refs` cannot be written."""

    def __init__(self, device: torch.device | str | None = None):
        if torch.device(device or "cpu").type != "cuda":
            release_free_memory()
        super().__init__(device)
        if self.device.type != "cuda":
            self.kind, self.resettable = "rss", True

    def _current_mb(self) -> float | None:
        if self.device.type == "cuda":
            return super()._current_mb()
        rss = rss_mb("VmRSS")
        return rss if rss is not None else max_rss_mb()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            return super().reset_peak()
        release_free_memory()
        try:  # "5" resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.resettable = False  # the peak then covers the whole process lifetime

    def read_peak(self) -> float | None:
        if self.device.type == "cuda":
            return super().read_peak()
        peak = rss_mb("VmHWM")
        return peak if peak is not None else max_rss_mb()


def pick_threads(num_threads: int | str | None) -> int:
    """Set torch's intra-op threads: an int, None (torch's default) or "auto" (one thread when the 1-minute load
    average is at least cores - 0.5, else torch's default). Returns the thread count in use."""
    if num_threads == "auto":
        cores = os.cpu_count() or 1
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= cores - 0.5
        num_threads = 1 if busy else None
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    return torch.get_num_threads()
