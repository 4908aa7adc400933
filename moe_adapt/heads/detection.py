"""Object detection head: FCOS (Tian et al., 2019), single-stage and anchor-free, in plain torch.

Every location of every pyramid level predicts class scores (sigmoid, focal loss), the distances (l, t, r, b)
from the location to the four sides of its box (GIoU loss) and a centerness score (BCE) that down-weights
boxes predicted far from an object's centre. Towers of 3×3 convolutions are shared across levels; each level
has a learnable scale on its distances.

Assignment (per image): a location is positive for a box when it lies inside the box, within
`center_radius · stride` of the box centre ("centre sampling") and its largest distance falls in the level's
size range; among several such boxes it takes the smallest. Decoding: score = √(sigmoid(class) ·
sigmoid(centerness)), the `pre_nms_top_k` best above `score_threshold`, class-wise NMS, at most
`max_detections` boxes, rescaled to the original image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import batched_nms, generalized_box_iou
from .pyramid import SimpleFeaturePyramid, group_norm


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Summed focal loss (Lin et al., 2017): logits, targets `[n, C]` (targets 0/1) → scalar.

    FL = −α_t (1 − p_t)^γ log p_t, with p_t the probability of the true 0/1 value and α_t = α for positives.
    """
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.sum()


def default_size_ranges(strides: Sequence[float]) -> list[tuple[float, float]]:
    """FCOS's rule: level i takes boxes whose largest distance is in (8·stride_{i−1}, 8·stride_i]; the finest
    level starts at 0 and the coarsest has no upper limit."""
    bounds = [0.0] + [8.0 * s for s in strides[:-1]] + [math.inf]
    return [(bounds[i], bounds[i + 1]) for i in range(len(strides))]


class Scale(nn.Module):
    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x):
        return x * self.scale


class FCOSHead(nn.Module):
    """Options (`config.head_configs[task]`): `channels` (256), `scales` ([2, 1, 0.5]: strides patch/2, patch,
    2·patch), `feature_layers`, `num_convs` (4 per tower), `center_radius` (1.5), `size_ranges` (FCOS's rule),
    `focal_alpha` (0.25), `focal_gamma` (2.0), `prior_prob` (0.01), `score_threshold` (0.05), `nms_threshold`
    (0.6), `pre_nms_top_k` (1000), `max_detections` (100).

    `forward(backbone_output, grid)` → `{"logits": [B, N, C], "pred_boxes": [B, N, 4] (xyxy input pixels),
    "pred_centerness": [B, N], "points": [N, 2], "point_strides": [N]}` over the N locations of all levels;
    `loss(outputs, labels)` with `labels` a list of `{"boxes": [n, 4] xyxy, "class_labels": [n]}`;
    `postprocess(outputs, target_sizes, input_sizes)` → per image `{"boxes", "scores", "labels"}` in original
    pixels (the `coco_map` metric's predictions).
    """

    task_type = "detection"
    defaults: dict[str, Any] = {
        "channels": 256,
        "scales": [2, 1, 0.5],
        "feature_layers": None,
        "num_convs": 4,
        "center_radius": 1.5,
        "size_ranges": None,
        "focal_alpha": 0.25,
        "focal_gamma": 2.0,
        "prior_prob": 0.01,
        "score_threshold": 0.05,
        "nms_threshold": 0.6,
        "pre_nms_top_k": 1000,
        "max_detections": 100,
    }

    def __init__(
        self,
        config,
        num_labels: int,
        channels: int = 256,
        scales: Sequence[float] = (2, 1, 0.5),
        feature_layers: Sequence[int] | None = None,
        num_convs: int = 4,
        center_radius: float = 1.5,
        size_ranges: Sequence[Sequence[float]] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        prior_prob: float = 0.01,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.6,
        pre_nms_top_k: int = 1000,
        max_detections: int = 100,
    ):
        super().__init__()
        self.num_labels = num_labels
        self.pyramid = SimpleFeaturePyramid(
            config.hidden_size, config.num_hidden_layers, channels, scales, feature_layers, config.layer_norm_eps
        )
        self.strides = self.pyramid.strides(config.patch_size)
        if size_ranges is None:
            self.size_ranges = default_size_ranges(self.strides)
        else:
            self.size_ranges = [(float(lo), float(hi)) for lo, hi in size_ranges]
            if len(self.size_ranges) != len(self.strides):
                raise ValueError(
                    f"size_ranges={size_ranges} must give one (low, high) pair per level ({len(self.strides)})."
                )
        self.center_radius, self.focal_alpha, self.focal_gamma = center_radius, focal_alpha, focal_gamma
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self.pre_nms_top_k, self.max_detections = pre_nms_top_k, max_detections

        def tower():
            layers = []
            for _ in range(num_convs):
                layers += [
                    nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                    group_norm(channels),
                    nn.ReLU(inplace=True),
                ]
            return nn.Sequential(*layers)

        self.cls_tower, self.box_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(channels, num_labels, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.level_scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        self.prior_prob = prior_prob
        self.reset_head_parameters()

    def reset_head_parameters(self) -> None:
        """FCOS's initialisation: N(0, 0.01) convolutions, and a classification bias giving every location the
        foreground probability `prior_prob` at the start (keeps the focal loss stable)."""
        for module in [*self.cls_tower, *self.box_tower, self.cls_logits, self.bbox_pred, self.centerness]:
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - self.prior_prob) / self.prior_prob))

    @property
    def needs_hidden_states(self) -> bool:
        return True

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, backbone_output, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        feats = self.pyramid(backbone_output.hidden_states, grid)
        logits, boxes, centerness, points, strides = [], [], [], [], []
        for feat, stride, scale in zip(feats, self.strides, self.level_scales):
            b, _, h, w = feat.shape
            cls_feat, box_feat = self.cls_tower(feat), self.box_tower(feat)
            ys, xs = torch.meshgrid(
                torch.arange(h, device=feat.device, dtype=torch.float32),
                torch.arange(w, device=feat.device, dtype=torch.float32),
                indexing="ij",
            )
            pts = torch.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], -1)  # [hw, 2]
            # Distances in pixels: softplus keeps them positive and smooth at the start.
            ltrb = F.softplus(scale(self.bbox_pred(box_feat).float())).flatten(2).transpose(1, 2) * stride  # [b, hw, 4]
            boxes.append(torch.cat([pts - ltrb[..., :2], pts + ltrb[..., 2:]], -1))
            logits.append(self.cls_logits(cls_feat).flatten(2).transpose(1, 2))
            centerness.append(self.centerness(box_feat).flatten(1))
            points.append(pts)
            strides.append(torch.full((h * w,), float(stride), device=feat.device))
        return {
            "logits": torch.cat(logits, 1),
            "pred_boxes": torch.cat(boxes, 1),
            "pred_centerness": torch.cat(centerness, 1),
            "points": torch.cat(points, 0),
            "point_strides": torch.cat(strides, 0),
        }

    # -- training ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def assign(self, points: torch.Tensor, point_strides: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Index of the box each location learns (`[N]`, −1 = background). points `[N, 2]`, boxes `[M, 4]`."""
        n = points.shape[0]
        if boxes.numel() == 0:
            return torch.full((n,), -1, dtype=torch.long, device=points.device)
        x, y = points[:, 0:1], points[:, 1:2]
        ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], -1)  # [N, M, 4]
        inside = ltrb.min(-1).values > 0
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        radius = point_strides[:, None] * self.center_radius
        near_centre = ((x - cx).abs() < radius) & ((y - cy).abs() < radius)
        lo = torch.zeros_like(point_strides)
        hi = torch.zeros_like(point_strides)
        for stride, (low, high) in zip(self.strides, self.size_ranges):
            level = point_strides == float(stride)
            lo[level], hi[level] = low, high
        reach = ltrb.max(-1).values
        in_range = (reach >= lo[:, None]) & (reach <= hi[:, None])
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(n, -1)
        area = torch.where(inside & near_centre & in_range, area, torch.full_like(area, math.inf))
        best_area, best = area.min(-1)
        return torch.where(torch.isinf(best_area), torch.full_like(best, -1), best)

    def loss(self, outputs: Mapping[str, Any], labels: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """Focal loss over all locations (normalised by the number of positives) + GIoU loss and centerness
        BCE over positives (the GIoU term weighted by the centerness targets, as in FCOS)."""
        logits, pred_boxes, pred_ctr = (
            outputs["logits"].float(),
            outputs["pred_boxes"].float(),
            outputs["pred_centerness"].float(),
        )
        points, point_strides = outputs["points"], outputs["point_strides"]
        if not isinstance(labels, Sequence) or len(labels) != logits.shape[0]:
            raise ValueError(
                f"Detection labels must be a list of {logits.shape[0]} dicts with 'boxes' [n, 4] (xyxy pixels) and "
                f"'class_labels' [n]; got {type(labels).__name__}."
            )
        cls_targets = torch.zeros_like(logits)
        pos_pred, pos_target, pos_ctr_logit, pos_points = [], [], [], []
        for i, target in enumerate(labels):
            boxes = target["boxes"].to(logits.device, torch.float32).reshape(-1, 4)
            classes = target["class_labels"].to(logits.device).long().reshape(-1)
            assigned = self.assign(points, point_strides, boxes)
            pos = assigned >= 0
            if pos.any():
                cls_targets[i, pos, classes[assigned[pos]]] = 1.0
                pos_pred.append(pred_boxes[i, pos])
                pos_target.append(boxes[assigned[pos]])
                pos_ctr_logit.append(pred_ctr[i, pos])
                pos_points.append(points[pos])
        num_pos = sum(p.shape[0] for p in pos_pred)
        loss_cls = sigmoid_focal_loss(logits, cls_targets, self.focal_alpha, self.focal_gamma) / max(num_pos, 1)
        if num_pos == 0:
            return loss_cls + 0.0 * (pred_boxes.sum() + pred_ctr.sum())  # keep every parameter in the graph
        pred, target, ctr_logit = torch.cat(pos_pred), torch.cat(pos_target), torch.cat(pos_ctr_logit)
        ctr_target = self.centerness_target(torch.cat(pos_points), target)
        giou = generalized_box_iou(pred, target)
        loss_box = ((1 - giou) * ctr_target).sum() / ctr_target.sum().clamp_min(1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_logit, ctr_target)
        return loss_cls + loss_box + loss_ctr

    @staticmethod
    def centerness_target(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """√(min(l, r)/max(l, r) · min(t, b)/max(t, b)) for locations `[n, 2]` inside boxes `[n, 4]` → `[n]`."""
        left, top = points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1]
        right, bottom = boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]
        lr = torch.minimum(left, right) / torch.maximum(left, right).clamp_min(1e-6)
        tb = torch.minimum(top, bottom) / torch.maximum(top, bottom).clamp_min(1e-6)
        return (lr.clamp_min(0) * tb.clamp_min(0)).sqrt()

    # -- inference -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def postprocess(
        self,
        outputs: Mapping[str, Any],
        target_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
        input_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
        score_threshold: float | None = None,
        nms_threshold: float | None = None,
        max_detections: int | None = None,
        **kwargs,
    ) -> list[dict[str, torch.Tensor]]:
        """Per image `{"boxes": [k, 4] xyxy, "scores": [k], "labels": [k]}` (`decode_detections` with this head's
        options, each overridable here)."""
        return decode_detections(
            outputs,
            target_sizes,
            input_sizes,
            score_threshold=self.score_threshold if score_threshold is None else score_threshold,
            nms_threshold=self.nms_threshold if nms_threshold is None else nms_threshold,
            pre_nms_top_k=self.pre_nms_top_k,
            max_detections=self.max_detections if max_detections is None else max_detections,
        )


@torch.no_grad()
def decode_detections(
    outputs: Mapping[str, Any],
    target_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
    input_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
    score_threshold: float = 0.05,
    nms_threshold: float = 0.6,
    pre_nms_top_k: int = 1000,
    max_detections: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """FCOS outputs (`logits` `[B, N, C]`, `pred_centerness` `[B, N]`, `pred_boxes` `[B, N, 4]` xyxy input pixels,
    optional `input_size` (H, W)) → per image `{"boxes": [k, 4] xyxy, "scores": [k], "labels": [k]}`.

    score = √(sigmoid(class) · sigmoid(centerness)); the `pre_nms_top_k` best above `score_threshold`, boxes
    clipped to the image, class-wise NMS at `nms_threshold`, at most `max_detections`. Boxes are in the pixels of
    `target_sizes[i]` (the original image, (h, w)) when given, else of the input; `input_sizes[i]`: (h, w) of image
    i inside `pixel_values` (unpadded; default the full input)."""
    num_labels = outputs["logits"].shape[-1]
    scores_all = (outputs["logits"].float().sigmoid() * outputs["pred_centerness"].float().sigmoid()[..., None]).sqrt()
    full = outputs.get("input_size")
    results = []
    for i in range(scores_all.shape[0]):
        scores = scores_all[i].flatten()
        idx = (scores > score_threshold).nonzero().squeeze(1)
        if idx.numel() > pre_nms_top_k:
            idx = idx[scores[idx].topk(pre_nms_top_k).indices]
        loc, cls = idx // num_labels, idx % num_labels
        boxes, sc = outputs["pred_boxes"][i, loc].float(), scores[idx]
        h, w = (
            (float(v) for v in input_sizes[i])
            if input_sizes is not None
            else ((float(full[0]), float(full[1])) if full is not None else (math.inf, math.inf))
        )
        boxes = torch.stack(
            [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], -1
        )
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, sc, cls = boxes[valid], sc[valid], cls[valid]
        kept = batched_nms(boxes, sc, cls, nms_threshold)[:max_detections]
        boxes, sc, cls = boxes[kept], sc[kept], cls[kept]
        if target_sizes is not None and math.isfinite(h):
            th, tw = (float(v) for v in target_sizes[i])
            boxes = boxes * boxes.new_tensor([tw / w, th / h, tw / w, th / h])
        results.append({"boxes": boxes, "scores": sc, "labels": cls})
    return results


__all__ = ["FCOSHead", "decode_detections", "default_size_ranges", "sigmoid_focal_loss"]
