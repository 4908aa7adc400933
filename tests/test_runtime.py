"""`benchmarks/measure.py`, the benchmarks' measurement helpers (moved out of the library, issue 27):
`keep_freed_memory` (glibc keeps freed buffers instead of page-faulting them back in), `malloc_library` /
`release_free_memory` / `find_malloc_library` under glibc, jemalloc and tcmalloc, the `RssMeter` and `pick_threads`;
and that the library itself holds none of this. Allocator settings are process-wide and cannot be undone, and a
preloaded allocator needs its own process, so those cases run in a child Python process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moe_adapt
from moe_adapt.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # as when a benchmark runs: benchmarks/ is on sys.path

import measure  # noqa: E402
from measure import (  # noqa: E402
    MALLOC_LIBRARIES,
    RssMeter,
    find_malloc_library,
    keep_freed_memory,
    malloc_library,
    pick_threads,
    preload_env,
)

BENCH_PATH = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"

FAULTS = BENCH_PATH + textwrap.dedent("""
    import json, resource, sys, torch
    from measure import freed_memory_threshold_mb, keep_freed_memory, malloc_setting
    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    def faults(make):  # minor page faults of three rounds of allocating, filling and freeing `make()`'s tensors
        make(), make()  # the first rounds fault in any case (the heap grows to fit the aligned blocks)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            tensors = make()
            del tensors
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({
        "kept": kept, "threshold": freed_memory_threshold_mb(), "setting": malloc_setting(),
        # one 64 MiB block: glibc maps it afresh every time (above its 32 MiB dynamic mmap ceiling)
        "large": faults(lambda: torch.ones(16 * 2**20)),
        # ten 8 MiB blocks alive together: heap memory, whose freed 80 MiB top glibc trims (above its trim threshold)
        "heap": faults(lambda: [torch.ones(2 * 2**20) for _ in range(10)]),
    }))
""")


def run_python(code: str, *args: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_page_faulting_freed_buffers_back_in():
    default, kept = run_python(FAULTS, "default"), run_python(FAULTS, "keep")
    assert default["kept"] is None and default["threshold"] is None
    assert kept["kept"] == kept["threshold"] in (256, 32)  # 32: a glibc that refuses a larger mmap threshold
    assert default["setting"] == "glibc default"
    assert kept["setting"] == f"keep freed memory (glibc thresholds {kept['threshold']} MiB)"
    # glibc's defaults fault the freed pages back in every round (8 MiB blocks: at least 2,048 pages a round);
    # kept, the freed memory is reused: the trim threshold keeps the heap's top, the mmap threshold the large block
    assert default["heap"] >= 3 * 2048, default
    assert kept["heap"] * 10 <= default["heap"], (kept, default)
    assert default["large"] >= 3 * 16, default  # 4 KiB pages, or 2 MiB ones where huge pages back the mapping
    if kept["threshold"] > 64:
        assert kept["large"] * 10 <= default["large"], (kept, default)


def test_keep_freed_memory_rejects_bad_thresholds():
    for bad in (0, -5, 2048, 1.5, True):
        with pytest.raises(ValueError, match="threshold_mb"):
            keep_freed_memory(bad)


def test_the_library_holds_no_benchmark_plumbing():
    """Allocator settings, /proc reads and load-average thread picking live in benchmarks/ (issue 27 item 6)."""
    pattern = re.compile(r"malloc|LD_PRELOAD|clear_refs|mallopt|/proc/|getloadavg")
    hits = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "moe_adapt").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits
    assert "keep_freed_memory" not in moe_adapt.__all__ and not hasattr(moe_adapt, "keep_freed_memory")
    assert not (ROOT / "moe_adapt" / "runtime.py").exists()
    # the recipe keys went with it: threads are a plain int or null
    with pytest.raises(TypeError, match="keep_freed_memory"):
        TrainConfig(keep_freed_memory=True)
    for bad in ("auto", 0, True, 1.5):
        with pytest.raises(ValueError, match="train.num_threads"):
            TrainConfig(num_threads=bad)
    assert TrainConfig(num_threads=2).num_threads == 2 and TrainConfig().num_threads is None


def test_pick_threads_takes_one_thread_on_a_busy_machine(monkeypatch):
    before = torch.get_num_threads()
    try:
        cores = os.cpu_count() or 1
        monkeypatch.setattr(os, "getloadavg", lambda: (cores + 1.0, 0.0, 0.0), raising=False)
        assert pick_threads("auto") == 1
        assert pick_threads(2) == 2 == torch.get_num_threads()
        assert pick_threads(None) == 2  # None leaves torch's setting alone
    finally:
        torch.set_num_threads(before)


def test_each_launched_process_takes_its_share_of_the_cores(monkeypatch, capsys):
    """`train.num_threads: 2` (the demo recipe) under `torchrun --nproc_per_node 2` on 2 cores: 1 thread each, said
    once; alone on the same cores the process keeps its 2 (and `make_accelerator` sets them)."""
    from moe_adapt.training.loop import make_accelerator, threads_per_process

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert threads_per_process(2) == 1 and threads_per_process(1) == 1
        assert capsys.readouterr().out == "train.num_threads=2: 2 process(es) on 2 core(s), so 1 thread(s) each.\n"
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert threads_per_process(2) == 1 and capsys.readouterr().out == ""
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
        assert threads_per_process(4) == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        monkeypatch.delenv("LOCAL_RANK")
        assert threads_per_process(2) == 2 and threads_per_process(3) == 2
        make_accelerator(TrainConfig(num_threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's /proc")
def test_rss_meter_measures_the_tracked_stretch_above_live_data():
    """The benchmarks' meter: baseline = VmRSS after the allocator's free memory went back, peak = VmHWM reset at
    the start of the tracked stretch; the library's report takes it in place of its getrusage peak."""
    from moe_adapt.adaptation.report import MemoryMeter

    meter = RssMeter("cpu")
    assert isinstance(meter, MemoryMeter) and meter.kind == "rss"
    assert abs(meter.baseline_mb - measure.rss_mb("VmRSS")) < 32
    with meter.track():
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if meter.resettable:  # clear_refs may be refused (some containers): then the peak is the process's
        assert 56 <= meter.above_baseline_mb < 200, meter.above_baseline_mb
    else:
        assert meter.above_baseline_mb >= 0


RELEASE = BENCH_PATH + textwrap.dedent("""
    import json, re, torch
    from measure import keep_freed_memory, malloc_library, release_free_memory
    def rss_mb():
        return int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
    release_free_memory()
    base = rss_mb()
    blocks = [torch.ones(8192) for _ in range(2048)]  # 64 MiB in 32 KiB blocks: heap memory under every allocator
    pin = torch.ones(8192)  # allocated last, so glibc cannot give the freed blocks back by trimming the heap's top
    filled = rss_mb()
    del blocks
    held = rss_mb()
    kind = release_free_memory()
    released = rss_mb() - base
    print(json.dumps({"kind": kind, "library": malloc_library(), "filled": filled - base, "held": held - base,
                      "released": released, "kept": keep_freed_memory()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")
@pytest.mark.parametrize("kind", ["glibc", *MALLOC_LIBRARIES])
def test_release_free_memory_returns_freed_memory_under_each_allocator(kind):
    """Freed memory stays in the RSS under each allocator (so a memory baseline taken then would hide it from what
    reuses it later) until `release_free_memory` hands it back; `malloc_library` names the allocator."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if kind != "glibc":
        try:
            env = preload_env(kind, env)
        except FileNotFoundError as e:
            pytest.skip(str(e))
    if kind == "jemalloc":  # no time-based purging, so that what the call releases is all still held before it
        env["MALLOC_CONF"] = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    out = run_python(RELEASE, env=env)
    assert out["kind"] == out["library"] == kind, out
    assert out["filled"] >= 60, out  # 64 MiB of tensors were resident
    assert out["held"] >= 48, out  # freed, but still held by the allocator
    # handed back; tcmalloc keeps a few MiB of the 32 KiB size class in its central caches (2.6-5.7 MiB seen)
    assert out["released"] <= (16 if kind == "tcmalloc" else 4), out
    # glibc's thresholds mean nothing to a preloaded allocator: keep_freed_memory leaves it alone and says so
    assert (out["kept"] in (256, 32)) if kind == "glibc" else out["kept"] is None, out


def test_find_malloc_library_finds_files_and_rejects_unknown_kinds():
    assert malloc_library() in ("glibc", "jemalloc", "tcmalloc") or not sys.platform.startswith("linux")
    for kind in MALLOC_LIBRARIES:
        path = find_malloc_library(kind)
        assert path is None or kind in os.path.basename(path), path
        if path is not None and os.sep in path:
            assert os.path.isfile(path)
    with pytest.raises(ValueError, match="kind='mimalloc'"):
        find_malloc_library("mimalloc")


def test_preload_env_puts_the_allocator_first_or_names_the_package(monkeypatch):
    for kind in MALLOC_LIBRARIES:
        path = find_malloc_library(kind)
        if path is not None:
            env = {"LD_PRELOAD": "/opt/other.so", "KEEP": "1"}
            assert preload_env(kind, env) == {"LD_PRELOAD": f"{path}:/opt/other.so", "KEEP": "1"}
            assert env["LD_PRELOAD"] == "/opt/other.so"  # a copy: the caller's mapping is unchanged
            assert preload_env(kind, {})["LD_PRELOAD"] == path
    monkeypatch.setattr(measure, "find_malloc_library", lambda kind: None)  # as on a machine without them
    with pytest.raises(
        FileNotFoundError,
        match=r"no tcmalloc library found \(Debian/Ubuntu: apt-get install "
        r"libtcmalloc-minimal4; conda: conda install -c conda-forge gperftools",
    ):
        preload_env("tcmalloc")
