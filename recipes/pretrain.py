"""Multi-task heterogeneous pretraining of a MoE ViT (classification + detection + segmentation at once).

    python recipes/pretrain.py --config recipes/configs/mini.yaml
    accelerate launch recipes/pretrain.py --config recipes/configs/mini.yaml
    torchrun --nproc_per_node 2 recipes/pretrain.py --config recipes/configs/mini.yaml
    python recipes/pretrain.py --config recipes/configs/mini.yaml --resume            # newest checkpoint
    python recipes/pretrain.py --config recipes/configs/mini.yaml train.max_steps=50  # dotted overrides

The same as `moe-adapt pretrain`; all logic lives in `moe_adapt.training`.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from moe_adapt.cli import recipe_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return recipe_main("pretrain", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
