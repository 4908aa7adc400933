"""`benchmarks/moe_layer.py` (issue 2) prints its one JSON line with the keys the README and the issue name; a small
shape keeps this a smoke test (the README's numbers come from the full-size run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_moe_layer_benchmark_prints_its_json_line():
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "moe_layer.py"),
        "--rounds",
        "1",
        "--model-rounds",
        "1",
        "--tokens",
        "197",
        "--batch",
        "1",
        "--image-size",
        "32",
        "--backends",
        "segmented_mm,grouped_mm,eager",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1, run.stdout
    result = json.loads(lines[0])
    assert set(result["backends_ms"]) == {"segmented_mm", "grouped_mm", "eager"}
    for key in ("dense_ms", "loop_ms", "moe_vit_s_train_img_s", "dense_vit_s_train_img_s"):
        assert result[key] > 0, key
    best = result["best_backend"]
    assert result["backends_ms"][best] == min(result["backends_ms"].values())
    assert abs(result["best_vs_dense"] - result["backends_ms"][best] / result["dense_ms"]) < 2e-3
    ratio = result["moe_vit_s_train_img_s"] / result["dense_vit_s_train_img_s"]
    assert abs(result["vit_s_train_vs_dense"] - ratio) < 0.01
    assert result["dtype"] == "float32" and result["tokens"] == 197 and "1 threads" in result["device"]
    assert result["preset"] == "vit-s" and result["hidden_size"] == 384 and result["batch"] == 1
    assert 0 < result["dense_gflops_per_image"] and 0 < result["moe_gflops_per_image"]


def test_moe_layer_benchmark_takes_the_vit_b_preset():
    """The GPU measurement's command line (`--preset vit-b --batch 128 --device cuda --dtype bfloat16`), here on the
    CPU at a tiny size and layer only: the layer is ViT-B's width and the tokens default to batch x 197."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "moe_layer.py"),
        "--preset",
        "vit-b",
        "--batch",
        "1",
        "--rounds",
        "1",
        "--skip-model",
        "--backends",
        "segmented_mm",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["preset"] == "vit-b" and result["hidden_size"] == 768 and result["tokens"] == 197
    assert result["best_vs_dense"] > 0
