"""Semantic segmentation head: UperNet (Xiao et al., 2018) on the backbone's simple feature pyramid.

pyramid levels (finest first) → pyramid pooling module on the coarsest level → top-down FPN with lateral 1×1
and output 3×3 convolutions → every level upsampled to the finest and concatenated → 3×3 fuse convolution →
dropout → 1×1 classifier. Logits come out at the finest level's stride; the loss and the post-processing
upsample them bilinearly to the label / target size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .pyramid import SimpleFeaturePyramid, group_norm

IGNORE_INDEX = 255


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        group_norm(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPoolingModule(nn.Module):
    """PSPNet's pooling module: average-pool the map to each of `pool_scales` bins, 1×1 conv, upsample back."""

    def __init__(self, channels: int, pool_scales: Sequence[int]):
        super().__init__()
        self.pool_scales = [int(s) for s in pool_scales]
        self.stages = nn.ModuleList([conv_norm_act(channels, channels, 1) for _ in self.pool_scales])
        self.bottleneck = conv_norm_act(channels * (len(self.pool_scales) + 1), channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [x]
        for scale, stage in zip(self.pool_scales, self.stages):
            pooled = stage(F.adaptive_avg_pool2d(x, scale))
            outs.append(F.interpolate(pooled, size=size, mode="bilinear", align_corners=False))
        return self.bottleneck(torch.cat(outs, 1))


class UperNetHead(nn.Module):
    """Options (`config.head_configs[task]`): `channels` (256), `scales` ([4, 2, 1, 0.5]), `feature_layers`
    (evenly spaced), `pool_scales` ([1, 2, 3, 6]), `dropout` (0.1).

    `forward(backbone_output, grid)` → `{"logits": [batch, num_labels, h, w]}` at the finest level's stride;
    `loss(outputs, labels [batch, H, W])` → cross-entropy over pixels with 255 ignored (logits upsampled to H×W);
    `postprocess(outputs, target_sizes, input_sizes)` → one `[h_t, w_t]` LongTensor class map per image at its
    original resolution (the `mean_iou` metric's predictions).
    """

    task_type = "semantic_segmentation"
    defaults: dict[str, Any] = {
        "channels": 256,
        "scales": [4, 2, 1, 0.5],
        "feature_layers": None,
        "pool_scales": [1, 2, 3, 6],
        "dropout": 0.1,
    }

    def __init__(
        self,
        config,
        num_labels: int,
        channels: int = 256,
        scales: Sequence[float] = (4, 2, 1, 0.5),
        feature_layers: Sequence[int] | None = None,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.pyramid = SimpleFeaturePyramid(
            config.hidden_size, config.num_hidden_layers, channels, scales, feature_layers, config.layer_norm_eps
        )
        n = len(self.pyramid.scales)
        self.ppm = PyramidPoolingModule(channels, pool_scales)
        self.lateral = nn.ModuleList([conv_norm_act(channels, channels, 1) for _ in range(n - 1)])
        self.fpn_out = nn.ModuleList([conv_norm_act(channels, channels, 3) for _ in range(n - 1)])
        self.fuse = conv_norm_act(channels * n, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_labels, 1)

    @property
    def needs_hidden_states(self) -> bool:
        return True

    def forward(self, backbone_output, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        feats = self.pyramid(backbone_output.hidden_states, grid)
        # Top-down pathway: the PPM output of the coarsest level flows into every finer one.
        tops = [self.ppm(feats[-1])]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.lateral[i](feats[i])
            tops.insert(
                0, lateral + F.interpolate(tops[0], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            )
        outs = [self.fpn_out[i](tops[i]) for i in range(len(feats) - 1)] + [tops[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(
            torch.cat(
                [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]], 1
            )
        )
        return {"logits": self.classifier(self.dropout(fused))}

    def loss(self, outputs: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.dim() != 3:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"Segmentation labels must be a LongTensor [batch, H, W] (255 = ignore); got {shape}.")
        logits = F.interpolate(outputs["logits"].float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        labels = labels.to(logits.device).long()
        if not (labels != IGNORE_INDEX).any():
            return logits.sum() * 0.0  # an all-ignored batch: zero loss, graph kept (DDP needs every parameter used)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def postprocess(
        self,
        outputs: Mapping[str, Any],
        target_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
        input_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
        **kwargs,
    ) -> list[torch.Tensor]:
        """Class maps `[h_t, w_t]` (long), one per image (`class_maps`)."""
        return class_maps(outputs, target_sizes, input_sizes)


@torch.no_grad()
def class_maps(
    outputs: Mapping[str, Any],
    target_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
    input_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Segmentation logits `[batch, C, h, w]` (with the input's (H, W) as `input_size`, when known) → one
    `[h_t, w_t]` LongTensor class map per image: logits upsampled bilinearly to the input, image i cropped to
    `input_sizes[i]` (its unpadded (h, w); default the full input), resized to `target_sizes[i]` (the original
    image size; default `input_sizes[i]`), argmax over classes."""
    logits = outputs["logits"]
    full = tuple(outputs.get("input_size") or (logits.shape[-2], logits.shape[-1]))
    logits = F.interpolate(logits.float(), size=full, mode="bilinear", align_corners=False)
    results = []
    for i in range(logits.shape[0]):
        h, w = (int(v) for v in input_sizes[i]) if input_sizes is not None else full
        th, tw = (int(v) for v in target_sizes[i]) if target_sizes is not None else (h, w)
        one = logits[i : i + 1, :, :h, :w]
        if (th, tw) != (h, w):
            one = F.interpolate(one, size=(th, tw), mode="bilinear", align_corners=False)
        results.append(one[0].argmax(0))
    return results


__all__ = ["IGNORE_INDEX", "PyramidPoolingModule", "UperNetHead", "class_maps"]
