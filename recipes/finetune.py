"""Fine-tune a pretrained multi-task MoE ViT (or an extracted sub-model) on a downstream task.

    accelerate launch recipes/finetune.py --config recipes/configs/finetune_digits.yaml
    python recipes/finetune.py --config recipes/configs/finetune_digits.yaml --model runs/pretrain/final --merge

All knobs live in the YAML (keys: the fields of `moe_adapt.adaptation.finetune.FinetuneConfig`); the flags below override
it. The logic is `moe_adapt.adaptation.finetune`; see docs/adaptation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moe_adapt.adaptation.finetune import FinetuneConfig, finetune  # noqa: E402
from moe_adapt.cli import add_debug_flag, run_reporting_errors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (see recipes/configs/finetune_digits.yaml)")
    parser.add_argument("--model", help="pretrained multi-task model or extracted sub-model (folder or Hub id)")
    parser.add_argument("--dataset", help="'builtin:digits', 'builtin:textures' or a JSON dataset spec")
    parser.add_argument("--output-dir")
    parser.add_argument("--mode", choices=["lora", "router", "full"])
    parser.add_argument("--source-task", help="a task of the model, or 'auto' (lowest routing entropy)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float, help="learning rate (lora mode: of the LoRA factors)")
    parser.add_argument("--head-lr", type=float,
                        help="learning rate of the new task's head and routers (default: lr x 3 in lora mode, x 20 in full mode)")
    parser.add_argument("--merge", action="store_true", default=None, help="also write a merged standalone model")
    parser.add_argument("--no-slice", dest="slice", action="store_false", default=None,
                        help="keep every expert (no sub-network extraction)")
    parser.add_argument("--validation-fraction", type=float,
                        help="evaluate on this fraction of the training images (held out; the same draw every run) "
                             "instead of the eval split, e.g. to choose settings without the test images")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors("finetune.py", run, args, debug=args.debug)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    dataset = args.dataset
    if dataset is not None and dataset.lstrip().startswith("{"):
        dataset = json.loads(dataset)
    cfg = FinetuneConfig.from_yaml(
        args.config, model=args.model, dataset=dataset, output_dir=args.output_dir, mode=args.mode,
        source_task=args.source_task, steps=args.steps, lr=args.lr, head_lr=args.head_lr, merge=args.merge, slice=args.slice,
        validation_fraction=args.validation_fraction,
    )
    try:
        finetune(cfg)
    finally:  # leave no live process group behind: gloo's threads at interpreter exit can abort the process
        PartialState().destroy_process_group()
    return 0

if __name__ == "__main__":
    sys.exit(main())
