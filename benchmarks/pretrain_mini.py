"""Benchmark: multi-task MoE pretraining vs single-task dense baselines on the mini benchmark. Prints ONE JSON line.

    python benchmarks/pretrain_mini.py                      # the mini recipe's settings, its 600 steps per run
    python benchmarks/pretrain_mini.py --steps 100          # shorter
    python benchmarks/pretrain_mini.py --quick              # smoke run on the small benchmark (numbers not meaningful)
    python benchmarks/pretrain_mini.py --runs single_task_dense --dense-tasks fashion-seg seed=1   # one baseline

All runs use `recipes/configs/mini.yaml` (same data, per-task batch sizes, image sizes, augmentation, optimiser and
schedule; no wall-clock cap) for the same number of optimisation steps (the recipe's `train.max_steps` unless `--steps`
says otherwise), one after the other in this process on this machine:

1. `multitask_moe`: the recipe's multi-task MoE model (all tasks every step, MI loss on);
2. `multitask_moe_no_mi`: the same with `mi_loss_weight = 0`;
3. `single_task_dense` per task: the same backbone with experts off — every layer dense, the MLP as wide as the
   active experts (`mlp_top_k · mlp_expert_size`), standard multi-head attention — trained on that task alone with
   its batch size for the same number of steps (so it sees the same images of its task as the multi-task run).

Reported: each task's metric for the three (and multitask − single-task), training images/s of each run, FLOPs per
image (`moe_adapt.flops.flops_per_image`, backbone + head) of the MoE model and of the dense baselines, and the
normalised mutual information between tasks and experts (I(T;E) / log T from each task's expert usage on its eval
split, mean over MoE layers) with and without the MI loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "mini.yaml"))
    p.add_argument("--steps", type=int, default=None, help="optimisation steps of every run (default: the recipe's)")
    p.add_argument("--data", default=None, help="mini benchmark folder (default: the recipe's)")
    p.add_argument("--quick", action="store_true", help="small benchmark, tiny model, 6 steps: a smoke test")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument(
        "--runs",
        default="multitask_moe,multitask_moe_no_mi,single_task_dense",
        help="comma-separated runs to do (default all three kinds); what is left out is null in the JSON line",
    )
    p.add_argument(
        "--dense-tasks", default=None, help="comma-separated tasks for the single-task dense runs (default: every task)"
    )
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides applied to every run")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[pretrain_mini] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from moe_adapt.flops import flops_per_image
    from moe_adapt.training import load_pretrain_config, pretrain

    overrides = list(args.overrides) + [
        "train.progress_bar=false",
        "train.max_minutes=null",
        "train.save_every=0",
        "train.eval_every=0",
        "train.log_every=50",
    ]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    if args.quick:
        overrides += ["model.preset=tiny", "train.max_steps=6", "train.usage_max_batches=2"]
        overrides += [f"tasks.{t}.eval_max_samples=32" for t in ("fashion", "digits-det", "fashion-seg")]
    base = load_pretrain_config(args.config, overrides)
    if args.data or args.quick:
        out = args.data or str(Path(tempfile.gettempdir()) / "moe_adapt_mini_small")
        base.data.mini = {"out": out, "small": bool(args.quick), "seed": 0}
    tasks = list(base.tasks)
    dense_tasks = args.dense_tasks.split(",") if args.dense_tasks else tasks
    unknown = sorted(set(dense_tasks) - set(tasks))
    if unknown:
        raise SystemExit(f"error: --dense-tasks: unknown task(s) {unknown}; tasks: {tasks}")

    with contextlib.ExitStack() as stack:
        root = (
            Path(args.out)
            if args.out
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pretrain_mini_")))
        )
        started = time.perf_counter()

        def run(name: str, **changes):
            config = load_pretrain_config(args.config, overrides)
            config.data = base.data
            config.output_dir = str(root / name)
            if "tasks" in changes:
                config.tasks = {t: config.tasks[t] for t in changes.pop("tasks")}
            config.model.overrides.update(changes)
            log(f"{name}: {config.train.max_steps} steps, tasks {list(config.tasks)} ...")
            t0 = time.perf_counter()
            result = pretrain(config)
            log(f"{name}: done in {time.perf_counter() - t0:.0f} s: {result['primary']}")
            return result

        wanted = set(args.runs.split(","))
        unknown = wanted - {"multitask_moe", "multitask_moe_no_mi", "single_task_dense"}
        if unknown:
            raise SystemExit(f"error: --runs: unknown run(s) {sorted(unknown)}")
        moe = run("multitask_moe") if "multitask_moe" in wanted else None
        no_mi = run("multitask_moe_no_mi", mi_loss_weight=0.0) if "multitask_moe_no_mi" in wanted else None
        dense = {}
        if "single_task_dense" in wanted:
            from moe_adapt import MoEViTConfig

            mc = MoEViTConfig.from_preset(base.model.preset, tasks=tasks, **base.model.overrides)
            dense_changes = dict(attn_experts=0, mlp_experts=0, intermediate_size=mc.mlp_top_k * mc.mlp_expert_size)
            dense = {t: run(f"single_task_dense_{t}", tasks=[t], **dense_changes) for t in dense_tasks}
        done = {
            "multitask_moe": moe,
            "multitask_moe_no_mi": no_mi,
            **{f"single_task_dense_{t}": r for t, r in dense.items()},
        }
        any_run = next(r for r in done.values() if r is not None)

        def primary(r, t):
            return None if r is None else round(r["primary"][t], 4)

        def gflops(r, t):
            if r is None:
                return None
            return round(flops_per_image(r["model"], task=t, image_size=image_size[t])["gflops"], 4)

        reported = tasks if moe is not None or no_mi is not None else list(dense)
        image_size = {t: base.tasks[t].image_size or any_run["model"].config.image_size for t in reported}
        result = {
            "benchmark": "pretrain_mini",
            "seed": base.seed,
            "steps": any_run["steps"],
            "overrides": list(args.overrides),
            "tasks": {
                t: {
                    "metric": any_run["primary_metric"].get(t) or dense[t]["primary_metric"][t],
                    "multitask_moe": primary(moe, t),
                    "multitask_moe_no_mi": primary(no_mi, t),
                    "single_task_dense": primary(dense.get(t), t),
                    "multitask_minus_single": None
                    if moe is None or t not in dense
                    else round(moe["primary"][t] - dense[t]["primary"][t], 4),
                }
                for t in reported
            },
            "images_per_s": {
                "multitask_moe": None if moe is None else round(moe["images_per_second"], 1),
                "multitask_moe_no_mi": None if no_mi is None else round(no_mi["images_per_second"], 1),
                "single_task_dense": {t: round(dense[t]["images_per_second"], 1) for t in dense},
            },
            "gflops_per_image": {
                t: {"multitask_moe": gflops(moe, t), "single_task_dense": gflops(dense.get(t), t)} for t in reported
            },
            "normalized_mi": {
                "with_mi_loss": None if moe is None else round(moe["normalized_mi"]["mean"], 4),
                "without_mi_loss": None if no_mi is None else round(no_mi["normalized_mi"]["mean"], 4),
            },
            "within_1_point": None
            if moe is None or not dense
            else all(moe["primary"][t] >= dense[t]["primary"][t] - 0.01 for t in dense),
            "machine": {
                "cpus": os.cpu_count(),
                "threads": any_run["threads"],
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "wall_s": round(time.perf_counter() - started, 1),
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
