"""`moe-adapt inspect`: how each task uses the experts of a model.

    moe-adapt inspect MODEL --data SPEC --task NAME [--task NAME2 ...] [--out DIR] [--split train]
                      [--max-images 256] [--batch-size 32] [--criterion frequency] [--dataset TASK=NAME]

Prints a per-layer usage table for every task and writes `usage_<task>.json` and `usage_heatmap.png` to `--out`.
With `--budget [--budget-top-k LIST]` it also writes each task's metric against FLOPs over top-k (`budget.png`).
`SPEC` is a dataset spec YAML/JSON file or a folder holding `specs.yaml` (e.g. the mini benchmark); each task reads
the dataset of its own name unless `--dataset TASK=NAME` says otherwise.

The data and model options are added by `add_model_data_arguments` / `add_calibration_arguments`, shared with
`moe-adapt extract`; further options go in `register`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_adapt.analysis.usage import CRITERIA


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """--data, --task, --dataset, --split, --max-images, --batch-size, --no-norms."""
    group = parser.add_argument_group("calibration data")
    group.add_argument("--data", metavar="SPEC", help="dataset spec YAML/JSON, or a folder holding specs.yaml")
    group.add_argument("--task", action="append", metavar="NAME", help="task to measure (repeat for several)")
    group.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="[TASK=]NAME",
        help="dataset of the spec file to use for a task (default: the one named like the task)",
    )
    group.add_argument("--split", default="train", help="'train', 'eval' or a split name (default: train)")
    group.add_argument("--max-images", type=int, default=256, help="calibration images per task (default: 256)")
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument(
        "--no-norms",
        action="store_true",
        help="skip the REAP output norms (faster; the 'reap' criterion is then unavailable)",
    )


def dataset_names(args: argparse.Namespace) -> dict[str, str]:
    """`--dataset` values as `{task: dataset name}`; a bare NAME applies to the only task."""
    names = {}
    for item in args.dataset or []:
        if "=" in item:
            task, name = item.split("=", 1)
        elif len(args.task or []) == 1:
            task, name = args.task[0], item
        else:
            raise ValueError(f"--dataset {item}: with several tasks write --dataset TASK=NAME.")
        names[task] = name
    return names


def collect_usages(model, args: argparse.Namespace, split: str | None = None, keep: dict | None = None) -> dict:
    """Run `collect_expert_usage` for every `--task` on its calibration data; `{task: ExpertUsage}`. With `keep` (a
    dict), each task's calibration batches are read once into memory and left in `keep[task]` for a later use."""
    from moe_adapt.analysis import collect_expert_usage
    from moe_adapt.analysis.calibration import calibration_loader

    if not args.data:
        raise ValueError("--data SPEC is required: a dataset spec YAML/JSON file or a folder holding specs.yaml.")
    if not args.task:
        raise ValueError(f"--task NAME is required; the model's tasks are {model.config.tasks}.")
    names = dataset_names(args)
    usages = {}
    for task in args.task:
        model.config.task_index(task)  # a clear error before any data is read
        loader = calibration_loader(
            args.data,
            task,
            split=split or args.split,
            dataset=names.get(task),
            batch_size=args.batch_size,
            max_images=args.max_images,
        )
        if keep is not None:
            loader = keep[task] = list(loader)
        usages[task] = collect_expert_usage(model, loader, task, output_norms=not args.no_norms, progress=True)
    return usages


def run(args: argparse.Namespace) -> int:
    from moe_adapt.analysis import plot_usage_heatmap
    from moe_adapt.hub import load_model

    model = load_model(args.model)
    usages = collect_usages(model, args)
    out = Path(args.out or f"inspect-{Path(args.model).name}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task, usage in usages.items():
        print()
        print(usage.table(args.criterion))
        written.append(usage.save(out / f"usage_{task}.json"))
    written.append(
        plot_usage_heatmap(
            usages,
            out / "usage_heatmap.png",
            criterion=args.criterion,
            title=f"{Path(args.model).name}: expert usage ({args.criterion})",
        )
    )
    if args.budget:  # metric vs active FLOPs over top-k (moe_adapt.analysis.budget)
        from moe_adapt.analysis.budget import budget_from_args

        written += budget_from_args(model, args, out, dataset_names(args))
    print()
    print(f"inspected {len(usages)} task(s) on {sum(u.num_images for u in usages.values())} images; wrote:")
    for path in written:
        print(f"  {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `inspect` to the CLI; returns its parser so that other options can be added."""
    parser = subparsers.add_parser(
        "inspect",
        help="per-task expert usage: table, JSON and heatmap",
        description="Measure how each task uses the experts of a MoE ViT on calibration data.",
    )
    parser.add_argument("model", metavar="MODEL", help="model folder (save_pretrained) or Hub id")
    add_calibration_arguments(parser)
    parser.add_argument("--criterion", choices=CRITERIA, default="frequency", help="what the table and heatmap show")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: inspect-<model name>)")
    parser.add_argument(
        "--budget",
        action="store_true",
        help="also write budget.png: each task's metric on its eval split against FLOPs over top-k",
    )
    parser.add_argument(
        "--budget-top-k",
        metavar="LIST",
        help="top-k settings for --budget: '1,2,4' or ATTN:MLP pairs '2:1,4:2' (default: a sweep)",
    )
    parser.set_defaults(func=run)
    return parser
