"""Collators: a list of items from `load_task_dataset` → one batch, per task type.

Images of different sizes are padded at the bottom and right to the largest height and width in the
batch (pixel value 0, which is mid-grey after the default normalisation); with a fixed `image_size`
no padding happens. Batches:

- classification: `{"pixel_values": FloatTensor[B, 3, H, W], "labels": LongTensor[B]}`
- detection: `{"pixel_values": FloatTensor[B, 3, H, W], "labels": list of B target dicts}` (targets
  unchanged: padding at the bottom/right moves no box)
- semantic_segmentation: `{"pixel_values": FloatTensor[B, 3, H, W], "labels": LongTensor[B, H, W]}`,
  masks padded with 255 (ignore).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .specs import IGNORE_INDEX, TASK_TYPES

Item = dict[str, Any]


def pad_to(tensor: torch.Tensor, height: int, width: int, value: float) -> torch.Tensor:
    """Pad the last two dims of `tensor` ([..., h, w]) at the bottom/right to `height` × `width`."""
    h, w = tensor.shape[-2:]
    if (h, w) == (height, width):
        return tensor
    return F.pad(tensor, (0, width - w, 0, height - h), value=value)


def _stack_padded(tensors: Sequence[torch.Tensor], value: float) -> torch.Tensor:
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    return torch.stack([pad_to(t, height, width, value) for t in tensors])


def collate_classification(items: Sequence[Item]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": _stack_padded([it["pixel_values"] for it in items], 0.0),
        "labels": torch.tensor([int(it["labels"]) for it in items], dtype=torch.long),
    }


def collate_detection(items: Sequence[Item]) -> dict[str, Any]:
    return {
        "pixel_values": _stack_padded([it["pixel_values"] for it in items], 0.0),
        "labels": [it["labels"] for it in items],
    }


def collate_segmentation(items: Sequence[Item]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": _stack_padded([it["pixel_values"] for it in items], 0.0),
        "labels": _stack_padded([it["labels"] for it in items], IGNORE_INDEX),
    }


_COLLATORS = {
    "classification": collate_classification,
    "detection": collate_detection,
    "semantic_segmentation": collate_segmentation,
}


def collate_fn_for(task_type: str) -> Callable[[Sequence[Item]], dict[str, Any]]:
    """The collator for `task_type` (pass it as `DataLoader(..., collate_fn=collate_fn_for(t))`)."""
    if task_type not in _COLLATORS:
        raise ValueError(f"collate_fn_for: unknown task_type {task_type!r}; use one of {list(TASK_TYPES)}")
    return _COLLATORS[task_type]
