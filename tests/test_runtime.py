"""`moe_adapt.runtime`: `keep_freed_memory` (glibc keeps freed buffers instead of page-faulting them back in, and the
pretraining recipe's `train.keep_freed_memory` turns it on), and `malloc_library` / `release_free_memory` /
`find_malloc_library` under glibc, jemalloc and tcmalloc. Allocator settings are process-wide and cannot be undone,
and a preloaded allocator needs its own process, so each case runs in a child Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from test_pretrain_recipe import tiny_recipe

from moe_adapt import runtime
from moe_adapt.runtime import (
    MALLOC_LIBRARIES,
    find_malloc_library,
    keep_freed_memory,
    malloc_library,
    preload_env,
)
from moe_adapt.training import TrainConfig

FAULTS = textwrap.dedent("""
    import json, resource, sys, torch
    from moe_adapt.runtime import freed_memory_threshold_mb, keep_freed_memory, malloc_setting
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
    with pytest.raises(ValueError, match="train.keep_freed_memory='yes'"):
        TrainConfig(keep_freed_memory="yes")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_pretraining_recipe_keeps_freed_memory_when_asked(mini_data_dir, tmp_path):
    for keep in (False, True):
        recipe = tiny_recipe(mini_data_dir, tmp_path / f"run-{keep}", max_steps=1, keep_freed_memory=keep)
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        code = textwrap.dedent(f"""
            import json
            from moe_adapt.runtime import freed_memory_threshold_mb
            from moe_adapt.training import load_pretrain_config, pretrain
            pretrain(load_pretrain_config({str(tmp_path / "recipe.yaml")!r}))
            print(json.dumps({{"threshold": freed_memory_threshold_mb()}}))
        """)
        threshold = run_python(code)["threshold"]
        assert threshold in (256, 32) if keep else threshold is None


RELEASE = textwrap.dedent("""
    import json, re, torch
    from moe_adapt.runtime import keep_freed_memory, malloc_library, release_free_memory
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
    monkeypatch.setattr(runtime, "find_malloc_library", lambda kind: None)  # as on a machine without them
    with pytest.raises(FileNotFoundError, match=r"no tcmalloc library found \(Debian/Ubuntu: apt-get install "
                                                r"libtcmalloc-minimal4; conda: conda install -c conda-forge gperftools"):
        preload_env("tcmalloc")
