"""The feature pyramid that the dense heads read from a plain ViT backbone (ViTDet / BEiT style).

A ViT keeps one resolution (the patch grid, stride = patch size) in every block. The dense heads take the
token maps of a few blocks and rescale each with a small op: ×4 (two 2×2 transposed convolutions), ×2 (one),
×1 (a 1×1 convolution) or ×½ (2×2 max-pooling then a 1×1 convolution), giving strides patch/4, patch/2, patch,
2·patch. Each dense head owns its pyramid, so a task's head can be kept or dropped on its own (slicing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

SCALES = (4.0, 2.0, 1.0, 0.5, 0.25)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (the most of 32, 16, 8, 4, 2, 1 that divide `channels`), every group of at
    least 2 channels: batch-size independent and buffer-free (nothing to sync under DDP).

    Where 32 groups or fewer would leave one channel per group (2, 4, 8, 16 or 32 channels), groups of 4 channels
    (of 2 at 2 channels) instead: on a 1×1 map (the pyramid pooling module's 1-bin stage, a detection level of one
    cell) a one-channel group normalises a single value, which PyTorch refuses for one image and which gives the
    bias whatever the input at any batch size; and pairs would normalise to a near sign function. Every other
    channel count keeps its groups, so trained heads load unchanged.
    """
    if channels < 2:
        raise ValueError(
            f"A dense head needs at least 2 channels (its GroupNorms normalise groups of >= 2); got {channels}."
        )
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    if groups == channels:
        groups = max(1, channels // 4)
    return nn.GroupNorm(groups, channels)


def default_feature_layers(num_layers: int, num_scales: int) -> list[int]:
    """Evenly spaced block outputs ending at the last one: 12 blocks, 4 scales → `[3, 6, 9, 12]`."""
    return [round(num_layers * (i + 1) / num_scales) for i in range(num_scales)]


def tokens_to_map(hidden: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`[batch, 1 + h·w, d]` tokens (CLS first) → `[batch, d, h, w]` patch map."""
    b, n, d = hidden.shape
    if n != 1 + height * width:
        raise ValueError(f"tokens_to_map: {n} tokens do not make a CLS token plus a {height}x{width} patch grid.")
    return hidden[:, 1:].transpose(1, 2).reshape(b, d, height, width)


def _rescale(hidden_size: int, channels: int, scale: float) -> nn.Module:
    if scale == 4.0:
        return nn.Sequential(
            nn.ConvTranspose2d(hidden_size, channels, 2, 2),
            group_norm(channels),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, 2, 2),
        )
    if scale == 2.0:
        return nn.ConvTranspose2d(hidden_size, channels, 2, 2)
    if scale == 1.0:
        return nn.Conv2d(hidden_size, channels, 1)
    if scale == 0.5:
        return nn.Sequential(nn.MaxPool2d(2, 2), nn.Conv2d(hidden_size, channels, 1))
    if scale == 0.25:
        return nn.Sequential(nn.MaxPool2d(4, 4), nn.Conv2d(hidden_size, channels, 1))
    raise ValueError(f"Feature pyramid scale {scale} is not supported; use values from {SCALES}.")


class SimpleFeaturePyramid(nn.Module):
    """Token maps of chosen blocks → multi-scale feature maps, each `[batch, channels, h·s, w·s]`.

    Args:
        hidden_size: the backbone width d.
        num_layers: the backbone depth (block `num_layers` output is the final, already normalised one).
        channels: output channels of every level.
        scales: one rescaling factor per level, finest first, from `SCALES`.
        feature_layers: the block output each level reads (1-based: `hidden_states[i]` is block i's output);
            default evenly spaced, ending at the last block.

    `forward(hidden_states, grid)`: `hidden_states` as returned by `MoEViTModel(..., output_hidden_states=True)`
    (`num_layers + 1` tensors `[batch, 1 + h·w, d]`), `grid` = (h, w) → list of maps, finest first.
    """

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        channels: int,
        scales: Sequence[float],
        feature_layers: Sequence[int] | None = None,
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__()
        scales = [float(s) for s in scales]
        if list(scales) != sorted(scales, reverse=True) or len(set(scales)) != len(scales):
            raise ValueError(
                f"Feature pyramid scales must be distinct and finest first (e.g. [4, 2, 1, 0.5]); got {scales}."
            )
        layers = list(feature_layers) if feature_layers is not None else default_feature_layers(num_layers, len(scales))
        if len(layers) != len(scales):
            raise ValueError(f"feature_layers={layers} must give one block per scale ({len(scales)} scales: {scales}).")
        if any(not 1 <= i <= num_layers for i in layers):
            raise ValueError(f"feature_layers={layers} must name blocks between 1 and num_hidden_layers={num_layers}.")
        self.scales, self.feature_layers, self.num_layers = scales, [int(i) for i in layers], num_layers
        # Inner blocks' outputs are the un-normalised residual stream; the last block's output is already normed.
        self.norms = nn.ModuleList(
            [
                nn.Identity() if i == num_layers else nn.LayerNorm(hidden_size, eps=layer_norm_eps)
                for i in self.feature_layers
            ]
        )
        self.rescale = nn.ModuleList([_rescale(hidden_size, channels, s) for s in scales])
        self.out_norms = nn.ModuleList([group_norm(channels) for _ in scales])

    def forward(self, hidden_states: Sequence[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
        if len(hidden_states) != self.num_layers + 1:
            raise ValueError(
                f"The feature pyramid expects {self.num_layers + 1} hidden states (output_hidden_states=True); "
                f"got {len(hidden_states)}."
            )
        maps = []
        for layer, norm, rescale, out_norm in zip(self.feature_layers, self.norms, self.rescale, self.out_norms):
            maps.append(out_norm(rescale(tokens_to_map(norm(hidden_states[layer]), *grid))))
        return maps

    def strides(self, patch_size: int) -> list[float]:
        """Stride of each level in input pixels."""
        return [patch_size / s for s in self.scales]


__all__ = ["SCALES", "SimpleFeaturePyramid", "default_feature_layers", "group_norm", "tokens_to_map"]
