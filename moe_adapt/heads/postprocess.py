"""Turn a batch's labels into what the metrics take as references, matching the heads' `postprocess` outputs.

- classification: `accuracy` references are the class ids `[batch]` themselves.
- detection: `coco_map` references are `{"boxes", "labels"}` per image in ORIGINAL pixels; the loaders give boxes
  in `pixel_values` pixels plus `size` and `orig_size`, so they are rescaled here (`scale_boxes`).
- semantic segmentation: `mean_iou` references are the label masks `[H, W]` (255 = ignore); each is cropped to its
  unpadded size when `sizes` are given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def detection_references(labels: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Loader detection targets → `coco_map` references (boxes rescaled from `size` to `orig_size`)."""
    refs = []
    for target in labels:
        boxes = target["boxes"].float().reshape(-1, 4)
        if "size" in target and "orig_size" in target:
            (h, w), (oh, ow) = (float(v) for v in target["size"]), (float(v) for v in target["orig_size"])
            boxes = boxes * boxes.new_tensor([ow / w, oh / h, ow / w, oh / h])
        refs.append({"boxes": boxes, "labels": target["class_labels"].long().reshape(-1)})
    return refs


def detection_sizes(
    labels: Sequence[Mapping[str, torch.Tensor]],
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """`(input_sizes, target_sizes)` for `FCOSHead.postprocess` from loader targets (`size`, `orig_size`)."""
    inputs = [tuple(int(v) for v in t["size"]) for t in labels]
    targets = [tuple(int(v) for v in t.get("orig_size", t["size"])) for t in labels]
    return inputs, targets


def metric_references(task_type: str, labels) -> list | torch.Tensor:
    """A batch's `labels` (as collated by `moe_adapt.data.collate_fn_for`) → the metric's references."""
    if task_type == "classification":
        return labels
    if task_type == "detection":
        return detection_references(labels)
    if task_type == "semantic_segmentation":
        return list(labels) if isinstance(labels, torch.Tensor) else labels
    raise ValueError(f"Unknown task type {task_type!r}.")


__all__ = ["detection_references", "detection_sizes", "metric_references"]
