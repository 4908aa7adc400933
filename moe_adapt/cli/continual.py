"""`moe-adapt continual` (and `recipes/continual.py`): add a classification task to a pretrained MoE ViT without
changing any old task (`moe_adapt.adaptation.continual`); prints one JSON summary line last."""

from __future__ import annotations

import argparse
import json

HELP = "add a task to a pretrained model, old tasks bit-identical (recipes/configs/continual.yaml)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="recipes/configs/continual.yaml", help="recipe YAML")
    parser.add_argument("--model", help="pretrained MoE ViT folder (overrides model:)")
    parser.add_argument("--output-dir", help="overrides output_dir:")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50 init=random optimizer.lr=0.01"
    )


def run(args: argparse.Namespace) -> int:
    from ..adaptation.continual import load_continual_config, run_continual

    extra = [f"model={json.dumps(args.model)}"] * bool(args.model) + [
        f"output_dir={json.dumps(args.output_dir)}"
    ] * bool(args.output_dir)
    summary = run_continual(load_continual_config(args.config, list(args.overrides) + extra))
    print(json.dumps(summary))
    return 0
