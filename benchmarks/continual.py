"""Benchmark: continual learning without forgetting, and compute control (issue 7). Prints ONE JSON line.

    python benchmarks/continual.py --model runs/mini/model          # a mini-pretrained multi-task model
    python benchmarks/continual.py                                  # runs a short mini pretraining itself first
    python benchmarks/continual.py --quick                          # smoke run (minutes; numbers not meaningful)

From a multi-task model pretrained on the mini benchmark (fashion, digits-det, fashion-seg), it adds scikit-learn's
digits as a new classification task with `add_task` and trains it with the old tasks frozen (`learn_new_task`),
then reports, all measured in this run:

- every old task's metric (accuracy / COCO mAP / mean IoU on its eval split) before and after, and the max
  absolute change of any output (logits, boxes, ...) on its eval images, which must be exactly 0;
- the new task's accuracy against the forgetting baseline: a copy of the whole model (new head, router and task
  embedding, no new experts) fine-tuned entirely on digits, and what that baseline does to the old tasks;
- the parameters added, and the new task's accuracy and active FLOPs per image over top-k (PNG curve).

Targets: zero change on old tasks, new task within 2 points of the baseline, at most 25% parameters added.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a pretrained MoEViTForMultiTask folder; default: pretrain one first")
    p.add_argument("--pretrain-config", default="recipes/configs/mini.yaml", help="recipe of the old tasks' data")
    p.add_argument("--pretrain-steps", type=int, default=150, help="steps of the short pretraining (no --model)")
    p.add_argument("--dataset", default="builtin:digits", help="the new task's dataset (as in the finetune recipe)")
    p.add_argument("--image-size", type=int, default=32, help="the new task's input size")
    p.add_argument("--new-attn-experts", type=int, default=2)
    p.add_argument("--new-mlp-experts", type=int, default=2)
    p.add_argument("--init", default="copy_top", choices=["copy_top", "random"])
    p.add_argument("--steps", type=int, default=800, help="training steps of the new task (ours and the baseline)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3, help="ours (new experts, router, embedding, head)")
    p.add_argument("--baseline-lr", type=float, default=5e-4, help="the full fine-tune (the finetune recipe's default)")
    p.add_argument("--weight-decay", type=float, default=0.3, help="both runs")
    p.add_argument("--eval-images", type=int, default=300, help="eval images per old task for its metric")
    p.add_argument("--check-images", type=int, default=64, help="eval images per old task for the output check")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    p.add_argument("--out", default="runs/bench_continual")
    p.add_argument("--quick", action="store_true", help="tiny numbers: a smoke run of the whole path")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from accelerate.utils import set_seed

    from moe_adapt.adaptation.finetune import (
        FinetuneConfig,
        choose_source_task,
        load_downstream_data,
        train,
    )
    from moe_adapt.analysis.budget import budget_curve, plot_budget_curve
    from moe_adapt.data import collate_fn_for
    from moe_adapt.flops import count_parameters
    from moe_adapt.hub.loading import load_model
    from moe_adapt.metrics import evaluate
    from moe_adapt.surgery.add_task import add_task, learn_new_task, max_output_change, task_outputs
    from moe_adapt.training import load_pretrain_config, pretrain
    from moe_adapt.training.data import load_task_data
    from moe_adapt.training.evaluation import PRIMARY_METRIC, evaluate_task

    if args.quick:
        args.pretrain_steps, args.steps, args.eval_images, args.check_images = 3, 10, 32, 16
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731 - stdout carries the JSON line only

    # 1. The pretrained multi-task model and its tasks' data ------------------------------------------------------
    overrides = ["train.progress_bar=false"]
    if args.quick:  # a small mini benchmark of its own, never the shared data/mini
        overrides += ["data.mini.small=true", f"data.mini.out={out / 'mini-small'}"]
    pre_cfg = load_pretrain_config(
        args.pretrain_config, overrides + [f"train.max_steps={args.pretrain_steps}", f"output_dir={out / 'pretrain'}"]
    )
    t0 = time.perf_counter()
    if args.model:
        model_dir, pretrained_here = args.model, False
    else:
        log(f"pretraining the mini model for {args.pretrain_steps} steps ...")
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON line only
            model_dir, pretrained_here = pretrain(pre_cfg)["model_dir"], True
    seconds["pretrain"] = time.perf_counter() - t0
    model = load_model(model_dir).eval()
    old_tasks = list(model.config.tasks)
    data = {t: d for t, d in load_task_data(pre_cfg, splits=("eval",)).items() if t in old_tasks}
    check = {t: torch.cat([b["pixel_values"] for b in data[t].eval_loader(args.check_images)]) for t in data}

    def old_metrics(m):
        return {
            t: evaluate_task(m, d, t, max_samples=args.eval_images)[PRIMARY_METRIC[d.task_type]]
            for t, d in data.items()
        }

    def old_outputs(m):
        return {t: task_outputs(m, check[t], [t])[t] for t in data}

    t0 = time.perf_counter()
    metrics_before = old_metrics(model)
    outputs_before = old_outputs(model)
    seconds["evaluate_old"] = time.perf_counter() - t0

    # 2. The new task's data and source task ----------------------------------------------------------------------
    data_cfg = FinetuneConfig(
        model=None,
        dataset=args.dataset,
        max_train_images=256 if args.quick else None,
        max_eval_images=128 if args.quick else None,
    )
    spec, train_set, eval_set, labels = load_downstream_data(data_cfg, args.image_size)
    task = spec.name
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=128, collate_fn=collate_fn_for("classification"))
    calib = train_set.pixel_values[:256].split(64)
    source, _, _ = choose_source_task(model, calib, "auto")

    # 3. Ours: grow, freeze the old tasks, train the new one --------------------------------------------------------
    t0 = time.perf_counter()
    grown = add_task(
        model,
        task,
        "classification",
        labels,
        new_attn_experts=args.new_attn_experts,
        new_mlp_experts=args.new_mlp_experts,
        init=args.init,
        source_task=source,
        data=calib,
    )
    result = learn_new_task(
        grown,
        task,
        train_set,
        check,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        log_every=0,
    )
    grown = result.model
    seconds["train_ours"] = time.perf_counter() - t0
    ours = evaluate(grown, eval_loader, task)["accuracy"]
    metrics_after = old_metrics(grown)
    change_after = max_output_change(outputs_before, old_outputs(grown))
    grown.save_pretrained(out / "grown")  # written atomically
    reloaded = load_model(out / "grown").eval()
    change_reloaded = max_output_change(outputs_before, old_outputs(reloaded))
    del reloaded

    # 4. The forgetting baseline: fine-tune a copy of the whole model on the new task ------------------------------
    t0 = time.perf_counter()
    baseline = add_task(
        model,
        task,
        "classification",
        labels,
        new_attn_experts=0,
        new_mlp_experts=0,
        init=args.init,
        source_task=source,
        data=calib,
    )
    baseline.requires_grad_(True)
    baseline, _, _ = train(
        baseline, train_set, task, args.steps, args.batch_size, args.baseline_lr, args.weight_decay, 0.05, args.seed, 0
    )
    baseline.eval()
    seconds["train_baseline"] = time.perf_counter() - t0
    base_acc = evaluate(baseline, eval_loader, task)["accuracy"]
    baseline_old = old_metrics(baseline)
    baseline_change = max_output_change(outputs_before, old_outputs(baseline))
    del baseline

    # 5. Parameters and the compute curve of the new task ---------------------------------------------------------
    params_before, params_after = count_parameters(model)["total"], count_parameters(grown)["total"]
    t0 = time.perf_counter()
    curve = budget_curve(grown, task, eval_loader, image_size=args.image_size)
    png = plot_budget_curve(
        curve, out / f"budget_{task}.png", title=f"{task} (new task): accuracy vs compute over top-k"
    )
    curve.save(out / f"budget_{task}.json")
    seconds["budget_curve"] = time.perf_counter() - t0

    max_change = max([*change_after.values(), *change_reloaded.values()], default=0.0)
    gap = 100.0 * (ours - base_acc)
    added = (params_after - params_before) / params_before
    report = {
        "benchmark": "continual",
        "model": str(model_dir),
        "pretrained_here_steps": args.pretrain_steps if pretrained_here else None,
        "new_task": task,
        "source_task": source,
        "init": args.init,
        "steps": args.steps,
        "new_experts_per_layer": {"attn": args.new_attn_experts, "mlp": args.new_mlp_experts},
        "old_tasks": {
            t: {
                "metric": PRIMARY_METRIC[data[t].task_type],
                "before": metrics_before[t],
                "after": metrics_after[t],
                "max_abs_output_change": max(change_after[t], change_reloaded[t]),
                "baseline_after": baseline_old[t],
                "baseline_max_abs_output_change": baseline_change[t],
            }
            for t in data
        },
        "new_task_accuracy": {"ours": ours, "full_finetune_baseline": base_acc, "gap_points": gap},
        "params": {
            "before": params_before,
            "added": params_after - params_before,
            "added_ratio": added,
            "trained": sum(p.numel() for n, p in grown.named_parameters() if n in set(result.trainable)),
        },
        "budget_curve": {
            "task": task,
            "metric": curve.metric_name,
            "png": str(png),
            "points": [
                {
                    "top_k": p.top_k,
                    "gflops": round(p.gflops, 6),
                    "accuracy": round(p.metric, 4),
                    "default": p.is_default,
                }
                for p in curve.points
            ],
        },
        "targets": {
            "old_tasks_unchanged": max_change == 0.0 and result.old_tasks_identical,
            "within_2_points_of_baseline": gap >= -2.0,
            "params_added_at_most_25pct": added <= 0.25,
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "device": "cpu",
        "threads": args.threads,
        "quick": args.quick,
        "note": "CPU shared with other jobs: times are indicative; every ratio comes from this one run",
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
