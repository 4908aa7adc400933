"""Fine-tune a pretrained multi-task MoE ViT (or an extracted sub-model) on a downstream task.

    accelerate launch recipes/finetune.py --config recipes/configs/finetune_digits.yaml
    python recipes/finetune.py --config recipes/configs/finetune_digits.yaml --model runs/mini/model --merge
    python recipes/finetune.py --config recipes/configs/finetune_digits.yaml train.max_steps=50 optimizer.lr=0.02

All knobs live in the YAML (keys: the fields of `moe_adapt.adaptation.finetune.FinetuneConfig`, with the `optimizer`
and `train` sections every recipe shares); the flags below and dotted overrides win. The same as `moe-adapt finetune`; the logic is `moe_adapt.adaptation.finetune` (docs/adaptation.md).
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moe_adapt.cli import recipe_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return recipe_main("finetune", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
