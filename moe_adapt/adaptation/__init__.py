"""Downstream adaptation: LoRA through peft on a (sliced) MoE ViT, the fine-tuning loop, built-in downstream sets
and the efficiency report. See docs/adaptation.md."""

from .lora import (
    apply_lora,
    count_model_parameters,
    has_lora,
    load_lora,
    lora_config,
    merge_lora,
)

__all__ = [
    "apply_lora",
    "count_model_parameters",
    "has_lora",
    "load_lora",
    "lora_config",
    "merge_lora",
]
