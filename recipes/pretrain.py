"""Multi-task heterogeneous pretraining of a MoE ViT (classification + detection + segmentation at once).

    python recipes/pretrain.py --config recipes/configs/mini.yaml
    accelerate launch recipes/pretrain.py --config recipes/configs/mini.yaml
    torchrun --nproc_per_node 2 recipes/pretrain.py --config recipes/configs/mini.yaml
    python recipes/pretrain.py --config recipes/configs/mini.yaml --resume            # newest checkpoint
    python recipes/pretrain.py --config recipes/configs/mini.yaml train.max_steps=50  # dotted overrides

All logic lives in `moe_adapt.training`; this script parses arguments and prints the results.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads slow every process down.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from moe_adapt.cli import add_debug_flag, run_reporting_errors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/configs/mini.yaml", help="recipe YAML file")
    parser.add_argument("--output_dir", "--output-dir", default=None, help="override output_dir")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from the newest checkpoint of output_dir, or from the given checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50 sampling.strategy=temperature")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors("pretrain.py", run, args, debug=args.debug)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from moe_adapt.training import load_pretrain_config, pretrain

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
        print(f"training loop: {results['loop_seconds']:.1f} s ({results['steps']} steps, {results['images_per_second']:.1f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
