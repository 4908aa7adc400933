"""`moe-adapt data ...`: build the embedded mini benchmark and look at data.

    moe-adapt data mini --out DIR [--seed 0] [--small] [--force] [--fashion-dir PATH]
    moe-adapt data show DIR --task NAME --out grid.png [--n 16] [--split SPLIT] [--augment] [--seed 0]

`DIR` of `show` is a benchmark folder holding `specs.yaml`, or a spec YAML file.
"""

from __future__ import annotations

import argparse
import sys
import time


def _mini(args: argparse.Namespace) -> int:
    from moe_adapt.data.mini import build_mini_benchmark

    start = time.perf_counter()
    try:
        specs = build_mini_benchmark(
            args.out, seed=args.seed, small=args.small, force=args.force, fashion_dir=args.fashion_dir
        )
    except (FileExistsError, FileNotFoundError, ImportError) as e:
        print(f"moe-adapt data mini: {e}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    for spec in specs.values():
        print(f"  {spec.name:<12} {spec.task_type:<22} {spec.format:<12} {spec.path}")
    print(
        f"built the mini benchmark (seed {args.seed}{', small' if args.small else ''}) in {elapsed:.1f} s; "
        f"specs: {args.out}/specs.yaml"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    from moe_adapt.data.show import show_task
    from moe_adapt.data.specs import load_specs

    try:
        specs = load_specs(args.dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"moe-adapt data show: {e}", file=sys.stderr)
        return 1
    if args.task not in specs:
        print(f"moe-adapt data show: no task {args.task!r} in {args.dir}; tasks: {list(specs)}", file=sys.stderr)
        return 1
    out = show_task(specs[args.task], args.out, split=args.split, n=args.n, augment=args.augment, seed=args.seed)
    print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command (with `mini` and `show`) to the CLI's subparsers."""
    data = subparsers.add_parser(
        "data",
        help="build the mini benchmark, look at data",
        description="Build the embedded mini benchmark and look at data.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="{mini,show}", required=True)

    mini = commands.add_parser(
        "mini",
        help="build the embedded mini benchmark (offline, deterministic)",
        description="Build three small tasks from real images (Fashion-MNIST, MNIST "
        "digits): classification, detection, segmentation.",
    )
    mini.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    mini.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same bytes")
    mini.add_argument("--small", action="store_true", help="a few hundred images per task, for tests")
    mini.add_argument("--force", action="store_true", help="replace --out if it exists")
    mini.add_argument(
        "--fashion-dir",
        default=None,
        help="folder with Fashion-MNIST's IDX files (default /usr/share/datasets/fashion-mnist)",
    )
    mini.set_defaults(func=_mini)

    show = commands.add_parser(
        "show",
        help="draw a grid of samples with their labels, boxes or masks",
        description="Draw samples of one task as a PNG grid.",
    )
    show.add_argument("dir", help="benchmark folder with specs.yaml, or a spec YAML file")
    show.add_argument("--task", required=True, help="task name in the specs (e.g. digits-det)")
    show.add_argument("--out", required=True, help="PNG file to write")
    show.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    show.add_argument("--split", default=None, help="split to draw (default: the spec's training split)")
    show.add_argument("--augment", action="store_true", help="show the samples through the training transforms")
    show.add_argument("--seed", type=int, default=0, help="which samples, and which augmentations")
    show.set_defaults(func=_show)
