"""`moe-adapt pretrain` (and `recipes/pretrain.py`): multi-task heterogeneous pretraining from a recipe YAML."""

from __future__ import annotations

import argparse
import os

HELP = "multi-task pretraining from a recipe YAML (recipes/configs/*.yaml)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="recipes/configs/mini.yaml", help="recipe YAML file")
    parser.add_argument("--output_dir", "--output-dir", default=None, help="override output_dir")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="resume from the newest checkpoint of output_dir, or from the given checkpoint folder",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50 sampling.strategy=temperature"
    )


def run(args: argparse.Namespace) -> int:
    """Train, then (on the main process) print each task's metric, the MI, where the model and metrics went."""
    from accelerate import PartialState

    from ..training import load_pretrain_config, pretrain

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    config = load_pretrain_config(args.config, overrides)
    try:
        results = pretrain(config, resume=args.resume)
    finally:  # leave no live process group behind: gloo's threads at interpreter exit can abort the process
        is_main = PartialState().is_main_process
        PartialState().destroy_process_group()
    if is_main:  # every rank trains; the main process evaluates, saves and reports
        for task, value in results["primary"].items():
            print(f"{task}: {results['primary_metric'][task]} = {value:.4f}")
        if results.get("normalized_mi"):
            print(f"normalised MI(tasks; experts) = {results['normalized_mi']['mean']:.4f}")
        print(f"heatmap: {results['heatmap']}")
        print(f"model: {results['model_dir']}   metrics: {os.path.join(config.output_dir, 'metrics.json')}")
        print(
            f"training loop: {results['loop_seconds']:.1f} s ({results['steps']} steps, {results['images_per_second']:.1f} images/s)"
        )
    return 0
