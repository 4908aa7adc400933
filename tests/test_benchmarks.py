"""Benchmarks print their one JSON line with the keys the docs and the issues name: `benchmarks/moe_layer.py` and
`benchmarks/task_gradients.py`; small shapes keep these smoke tests (the documented numbers come from full-size
runs)."""

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


def test_task_gradients_benchmark_measures_each_tasks_share_of_the_shared_gradient(mini_data_dir):
    """`benchmarks/task_gradients.py` on the recipe's model at initialisation, one small-benchmark batch per task:
    every task sends gradient into the shared backbone and its own head, the equal-norm loss weights give every task
    the smallest task's shared-gradient norm, and each shared tensor is counted for exactly one task."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "task_gradients.py"),
        "--model",
        "init",
        "--batches",
        "1",
        f"data.mini.out={mini_data_dir}",
        "data.mini.small=true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    tasks = ["fashion", "digits-det", "fashion-seg"]
    assert list(result["norms"]) == tasks
    for task in tasks:
        assert result["norms"][task]["shared"] > 0 and result["norms"][task]["head"] > 0, task
    shared = {t: result["norms"][t]["shared"] for t in tasks}
    weights = result["loss_weights_equal_norm"]
    assert weights[min(shared, key=shared.get)] == 1.0
    for task in tasks:
        assert abs(weights[task] * shared[task] - min(shared.values())) <= 1e-3 * shared[task] + 1e-4, task
    assert sum(result["largest_on_shared_tensors"].values()) == result["shared_tensors"] > 0
    assert set(result["shared_cosine"]) == {"fashion|digits-det", "fashion|fashion-seg", "digits-det|fashion-seg"}
