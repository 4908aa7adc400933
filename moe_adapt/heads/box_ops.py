"""Box operations in plain torch (no torchvision): areas, IoU, generalised IoU and non-maximum suppression.

Boxes are `[n, 4]` absolute `x1, y1, x2, y2` pixels throughout (the loaders' and the `coco_map` metric's format).
"""

from __future__ import annotations

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """`[n, 4]` xyxy → `[n]` areas (zero for degenerate boxes)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: `[n, 4]`, `[m, 4]` → `[n, m]`."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    return inter / (area1[:, None] + area2[None, :] - inter).clamp_min(1e-9)


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Element-wise generalised IoU (Rezatofighi et al., 2019) of matched pairs: `[n, 4]`, `[n, 4]` → `[n]`.

    GIoU = IoU − |C \\ (A ∪ B)| / |C|, with C the smallest box enclosing A and B; in [−1, 1].
    """
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = box_area(boxes1) + box_area(boxes2) - inter
    iou = inter / union.clamp_min(1e-9)
    enclose = (torch.maximum(boxes1[:, 2:], boxes2[:, 2:]) - torch.minimum(boxes1[:, :2], boxes2[:, :2])).clamp_min(0)
    enclose_area = enclose.prod(-1).clamp_min(1e-9)
    return iou - (enclose_area - union) / enclose_area


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: `[n, 4]`, `[n]` → indices of the kept boxes `[k]`, by decreasing score.

    A box is dropped when its IoU with a higher-scoring kept box exceeds `iou_threshold` (torchvision's rule).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True)
    suppress = (box_iou(boxes[order], boxes[order]) > iou_threshold).cpu()
    # One pass over the IoU matrix rows; only kept rows suppress later boxes.
    removed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        removed |= suppress[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-wise NMS in one call: boxes of different classes never suppress each other. Returns kept indices
    `[k]` by decreasing score. (Boxes are shifted apart by class, so one `nms` pass does all classes.)"""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offsets = classes.to(boxes.dtype) * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


__all__ = ["batched_nms", "box_area", "box_iou", "generalized_box_iou", "nms"]
