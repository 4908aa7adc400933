"""`moe-adapt finetune` (and `recipes/finetune.py`): fine-tune a pretrained MoE ViT or a slice on a downstream set."""

from __future__ import annotations

import argparse
import json

HELP = "LoRA / router / full fine-tuning on a downstream set (recipes/configs/finetune_*.yaml)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML (see recipes/configs/finetune_digits.yaml)")
    parser.add_argument("--model", help="pretrained multi-task model or extracted sub-model (folder or Hub id)")
    parser.add_argument("--dataset", help="'builtin:digits', 'builtin:textures' or a JSON dataset spec")
    parser.add_argument("--output-dir")
    parser.add_argument("--mode", choices=["lora", "router", "full"])
    parser.add_argument("--source-task", help="a task of the model, or 'auto' (lowest routing entropy)")
    parser.add_argument("--steps", type=int, help="optimizer steps (train.max_steps)")
    parser.add_argument("--lr", type=float, help="learning rate (optimizer.lr; lora mode: of the LoRA factors)")
    parser.add_argument(
        "--head-lr",
        type=float,
        help="learning rate of the new task's head and routers (default: lr x 3 in lora mode, x 20 in full mode)",
    )
    parser.add_argument("--merge", action="store_true", default=None, help="also write a merged standalone model")
    parser.add_argument(
        "--no-slice",
        dest="slice",
        action="store_false",
        default=None,
        help="keep every expert (no sub-network extraction)",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        help="evaluate on this fraction of the training images (held out; the same draw every run) "
        "instead of the eval split, e.g. to choose settings without the test images",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50 optimizer.weight_decay=0.01"
    )


#: flag → the recipe key it sets
FLAG_KEYS = {
    "model": "model",
    "output_dir": "output_dir",
    "mode": "mode",
    "source_task": "source_task",
    "steps": "train.max_steps",
    "lr": "optimizer.lr",
    "head_lr": "head_lr",
    "merge": "merge",
    "slice": "slice",
    "validation_fraction": "validation_fraction",
}


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ..adaptation.finetune import FinetuneConfig, finetune

    flags = [
        f"{key}={json.dumps(getattr(args, flag))}" for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None
    ]
    if args.dataset is not None:  # a JSON spec, or a name such as builtin:digits (YAML reads both)
        flags.append(f"dataset={args.dataset if args.dataset.lstrip().startswith('{') else json.dumps(args.dataset)}")
    cfg = FinetuneConfig.from_yaml(args.config, flags + list(args.overrides))
    try:
        finetune(cfg)
    finally:  # leave no live process group behind: gloo's threads at interpreter exit can abort the process
        PartialState().destroy_process_group()
    return 0
