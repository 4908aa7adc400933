"""Train / eval transforms that move boxes and masks together with the image.

A transform is a callable `transform(sample, generator=None) -> sample` on a *sample dict*:

- `"image"`: FloatTensor[3, H, W], values in [0, 1] before `Normalize`.
- `"boxes"`: FloatTensor[n, 4], absolute `x1, y1, x2, y2` pixels of `image` (detection only).
- `"class_labels"`: LongTensor[n], one class per box (detection only).
- `"mask"`: LongTensor[H, W], class per pixel, 255 = ignore (semantic segmentation only).

Other keys pass through untouched. Random transforms draw from `generator` (a `torch.Generator`) when
given, else from torch's global generator (which `DataLoader` seeds per worker), so a fixed seed gives
the same crops and flips. Geometry is plain torch: bilinear (antialiased) resampling for images,
nearest for masks, boxes scaled / shifted / clipped the same way; boxes narrower or shorter than
`min_box_size` pixels after a crop are dropped together with their class labels.

```python
>>> t = build_transforms("detection", image_size=64, train=True)
>>> out = t({"image": torch.rand(3, 100, 80), "boxes": torch.tensor([[10., 20., 50., 60.]]),
...          "class_labels": torch.tensor([3])}, generator=torch.Generator().manual_seed(0))
>>> out["image"].shape
torch.Size([3, 64, 64])
```
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Sample = dict[str, Any]

DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
# Area range of RandomResizedCrop per task type: milder for dense tasks, whose objects a crop can cut off.
DEFAULT_CROP_SCALE = {"classification": (0.25, 1.0), "detection": (0.5, 1.0), "semantic_segmentation": (0.5, 1.0)}


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def scale_boxes(boxes: torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> torch.Tensor:
    """Rescale xyxy pixel boxes [n, 4] from an image of `from_size` (h, w) to one of `to_size` (h, w).

    Use it to map predictions on `pixel_values` back to the original image (`size` → `orig_size`).
    """
    sy = to_size[0] / from_size[0]
    sx = to_size[1] / from_size[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def resize(sample: Sample, size: int | Sequence[int]) -> Sample:
    """Resize image (bilinear, antialiased), mask (nearest) and boxes to `size` (int: square, or (h, w))."""
    out_h, out_w = _size_pair(size)
    image = sample["image"]
    in_h, in_w = image.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return sample
    sample = dict(sample)
    sample["image"] = F.interpolate(
        image[None].float(), size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True
    )[0]
    if sample.get("mask") is not None:
        mask = sample["mask"]
        sample["mask"] = F.interpolate(mask[None, None].float(), size=(out_h, out_w), mode="nearest-exact")[0, 0].to(
            mask.dtype
        )
    if sample.get("boxes") is not None:
        sample["boxes"] = scale_boxes(sample["boxes"], (in_h, in_w), (out_h, out_w))
    return sample


def crop(sample: Sample, top: int, left: int, height: int, width: int, min_box_size: float = 1.0) -> Sample:
    """Cut the window [top:top+height, left:left+width] out of image and mask; shift and clip boxes.

    Boxes whose clipped width or height falls below `min_box_size` pixels are dropped with their labels.
    """
    sample = dict(sample)
    sample["image"] = sample["image"][..., top : top + height, left : left + width]
    if sample.get("mask") is not None:
        sample["mask"] = sample["mask"][..., top : top + height, left : left + width]
    if sample.get("boxes") is not None:
        boxes = sample["boxes"] - sample["boxes"].new_tensor([left, top, left, top])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= min_box_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_box_size)
        sample["boxes"] = boxes[keep]
        if sample.get("class_labels") is not None:
            sample["class_labels"] = sample["class_labels"][keep]
    return sample


def hflip(sample: Sample) -> Sample:
    """Mirror image, mask and boxes left-right (x → W - x)."""
    sample = dict(sample)
    width = sample["image"].shape[-1]
    sample["image"] = sample["image"].flip(-1)
    if sample.get("mask") is not None:
        sample["mask"] = sample["mask"].flip(-1)
    if sample.get("boxes") is not None:
        boxes = sample["boxes"]
        sample["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    return sample


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Callable[..., Sample]]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        for t in self.transforms:
            sample = t(sample, generator=generator)
        return sample

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class Resize:
    """Resize to `size` × `size` (or (h, w)), ignoring the aspect ratio, as ViT image processors do."""

    def __init__(self, size: int | Sequence[int]):
        self.size = _size_pair(size)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        return resize(sample, self.size)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class RandomResizedCrop:
    """Crop a random window (area fraction in `scale`, aspect ratio in `ratio`) and resize it to `size`.

    Same sampling as torchvision's RandomResizedCrop: 10 tries, then a centre crop of the nearest ratio.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        min_box_size: float = 1.0,
    ):
        self.size = _size_pair(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.min_box_size = min_box_size

    def get_params(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """A crop window (top, left, h, w) inside an image of `height` × `width`."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        height, width = sample["image"].shape[-2:]
        top, left, h, w = self.get_params(height, width, generator)
        # Drop boxes by their size in the output image, not in the crop.
        min_size = self.min_box_size * min(h / self.size[0], w / self.size[1])
        return resize(crop(sample, top, left, h, w, min_box_size=min_size), self.size)

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Flip left-right with probability `p`."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        if torch.rand((), generator=generator).item() < self.p:
            return hflip(sample)
        return sample

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """`image = (image - mean) / std` per channel; default mean = std = 0.5 maps [0, 1] to [-1, 1]."""

    def __init__(self, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        if (self.std <= 0).any():
            raise ValueError(f"Normalize: std must be positive, got {list(std)}")

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        sample = dict(sample)
        sample["image"] = (sample["image"] - self.mean) / self.std
        return sample

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


#: what an augmentation mapping (a recipe's `augment:`) may set: `build_transforms`' training options
AUGMENT_OPTIONS = ("hflip_p", "ratio", "scale")


def check_augment_keys(augment: Mapping[str, Any]) -> None:
    """A `ValueError` naming any key of an augmentation mapping that is not one of `AUGMENT_OPTIONS`."""
    unknown = sorted(set(augment) - set(AUGMENT_OPTIONS))
    if unknown:
        raise ValueError(f"augment: unknown key(s) {unknown}; an augment mapping takes {sorted(AUGMENT_OPTIONS)}.")


def augment_options(augment: Mapping[str, Any]) -> dict[str, Any]:
    """An augmentation mapping as `build_transforms` keywords: `scale` and `ratio` (lists in YAML) as float tuples."""
    out = dict(augment)
    for key in ("scale", "ratio"):
        if key in out:
            out[key] = tuple(float(v) for v in out[key])
    return out


def build_transforms(
    task_type: str,
    image_size: int | Sequence[int] | None,
    train: bool,
    *,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    scale: tuple[float, float] | None = None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.5,
    normalize: bool = True,
) -> Compose:
    """The standard pipeline for a task type.

    train: `RandomResizedCrop(image_size, scale) → RandomHorizontalFlip(hflip_p) → Normalize(mean, std)`.
    eval:  `Resize(image_size) → Normalize(mean, std)`.

    `image_size=None` keeps the native size (no crop or resize; train still flips). `scale` defaults to
    `DEFAULT_CROP_SCALE[task_type]`. `normalize=False` leaves pixels in [0, 1] (for plotting).
    """
    if task_type not in DEFAULT_CROP_SCALE:
        raise ValueError(f"build_transforms: unknown task_type {task_type!r}; use one of {list(DEFAULT_CROP_SCALE)}")
    steps: list[Callable[..., Sample]] = []
    if train:
        if image_size is not None:
            steps.append(RandomResizedCrop(image_size, scale=scale or DEFAULT_CROP_SCALE[task_type], ratio=ratio))
        if hflip_p > 0:
            steps.append(RandomHorizontalFlip(hflip_p))
    elif image_size is not None:
        steps.append(Resize(image_size))
    if normalize:
        steps.append(Normalize(mean, std))
    return Compose(steps)
