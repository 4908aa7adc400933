"""Continual learning: add a classification task to a pretrained MoE ViT without changing any old task.

    accelerate launch recipes/continual.py --config recipes/configs/continual.yaml --model runs/mini/model
    python recipes/continual.py --config recipes/configs/continual.yaml --model runs/mini/model train.max_steps=50 init=random

The same as `moe-adapt continual`; the logic is `moe_adapt.adaptation.continual` (docs/continual.md). Prints one JSON
summary line last.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from moe_adapt.cli import recipe_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return recipe_main("continual", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
