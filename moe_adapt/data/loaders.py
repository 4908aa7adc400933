"""`load_task_dataset`: a dataset spec → a `torch.utils.data.Dataset` of model-ready items.

Every item is a dict with `pixel_values` (FloatTensor[3, H, W], normalised; grayscale and RGBA images
are converted to RGB) and `labels`, whose form depends on the task type:

- classification: `labels` is an `int` class id in `[0, num_labels)`.
- detection: `labels` is a dict
    - `"boxes"`: FloatTensor[n, 4], absolute `x1, y1, x2, y2` in pixels of `pixel_values`;
    - `"class_labels"`: LongTensor[n], class ids in `[0, num_labels)`;
    - `"image_id"`: int (COCO image id, or the `image_id` column / row index for the `hf` format);
    - `"orig_size"`: LongTensor[2], (h, w) of the image on disk;
    - `"size"`: LongTensor[2], (h, w) of `pixel_values`.
  Map predicted boxes back to the original image with `scale_boxes(boxes, size, orig_size)`.
- semantic_segmentation: `labels` is a LongTensor[H, W] of class ids, 255 = ignore (after
  `reduce_labels` when the spec sets it).

`collate_fn_for(task_type)` batches them (see `moe_adapt.data.collate`). The dataset also carries
`spec`, `split`, `task_type`, `label_names`, `num_labels`, `id2label` and `skipped` (the samples that
`skip_bad` left out, as (sample, problem) pairs).

Bad samples (missing or unreadable file, box outside the image or of non-positive size, mask of
another size than its image, label out of range) raise `BadSampleError` naming the sample; with
`skip_bad: true` they are left out and counted in one `BadSampleWarning`. Checks run when the dataset is
built (annotations always; images and masks are opened when `check_images` is true), so an epoch does
not crash half-way.

```python
>>> ds = load_task_dataset({"name": "fashion", "task_type": "classification", "format": "imagefolder",
...                         "path": "mini/fashion", "image_size": 32}, transform="train")
>>> loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, collate_fn=collate_fn_for(ds.task_type))
```
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import BadSampleError, BadSampleWarning
from .formats import Record, read_split
from .specs import IGNORE_INDEX, DatasetSpec
from .transforms import Sample, build_transforms

# A box may stick out of its image by this many pixels (rounding in annotation tools); it is clipped.
BOX_TOLERANCE = 1.0


def reduce_mask_labels(mask: np.ndarray) -> np.ndarray:
    """transformers' `reduce_labels`: 0 → 255 (ignored), every other value v → v - 1, 255 stays 255."""
    mask = mask.astype(np.int64)
    mask[mask == 0] = IGNORE_INDEX
    mask = mask - 1
    mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
    return mask


def box_problem(rec: Record, num_labels: int, image_hw: tuple[int, int] | None) -> str | None:
    """What is wrong with a record's boxes / class labels, or None. `image_hw` = (h, w) when known."""
    for j, (box, label) in enumerate(zip(rec.boxes, rec.class_labels)):
        who = rec.box_names[j] if rec.box_names else f"box {j}"
        shown = "(" + ", ".join(f"{v:g}" for v in box) + ")"
        if not np.isfinite(box).all():
            return f"{who}: box (x1, y1, x2, y2) = {shown} has non-finite coordinates"
        if box[2] <= box[0] or box[3] <= box[1]:
            return f"{who}: box (x1, y1, x2, y2) = {shown} has non-positive width or height"
        if image_hw is not None:
            h, w = image_hw
            if (
                box[0] < -BOX_TOLERANCE
                or box[1] < -BOX_TOLERANCE
                or box[2] > w + BOX_TOLERANCE
                or (box[3] > h + BOX_TOLERANCE)
            ):
                return f"{who}: box (x1, y1, x2, y2) = {shown} lies outside the {w}x{h} (w x h) image"
        if not 0 <= label < num_labels:
            return f"{who}: class {label} is out of range 0..{num_labels - 1}"
    return None


def mask_problem(mask: np.ndarray, image_hw: tuple[int, int], num_labels: int) -> str | None:
    """What is wrong with a (reduced) label mask, or None."""
    if mask.ndim != 2:
        return f"label mask has shape {mask.shape}; it must be a single-channel image (mode L, P or I)"
    if mask.shape != tuple(image_hw):
        return f"label mask is {mask.shape[1]}x{mask.shape[0]} (w x h) but its image is {image_hw[1]}x{image_hw[0]}"
    bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= num_labels))
    if bad.any():
        values = np.unique(mask[bad])[:8].tolist()
        return (
            f"label mask holds class values {values} outside 0..{num_labels - 1} (255 = ignore); check "
            f"'label_names' and 'reduce_labels' in the spec"
        )
    return None


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode) → FloatTensor[3, H, W] in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class TaskDataset(torch.utils.data.Dataset):
    """The checked samples of one split of one task; build it with `load_task_dataset`."""

    def __init__(
        self,
        spec: DatasetSpec,
        split: str,
        records: list[Record],
        label_names: list[str],
        transform: Callable[..., Sample] | None,
        hf_table: Any = None,
        skipped: list[tuple[str, str]] | None = None,
    ):
        self.spec, self.split, self.records = spec, split, records
        self.task_type = spec.task_type
        self.label_names = list(label_names)
        self.transform = transform
        self.hf_table = hf_table
        self.skipped = list(skipped or [])

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (
            f"TaskDataset(name={self.spec.name!r}, task_type={self.task_type!r}, split={self.split!r}, "
            f"samples={len(self)}, num_labels={self.num_labels}, skipped={len(self.skipped)})"
        )

    # --- reading ----------------------------------------------------------------------------------

    def _bad(self, rec: Record, problem: str) -> BadSampleError:
        return BadSampleError(self.spec.name, self.split, rec.name, problem)

    def _open(self, rec: Record, source: str | int, what: str, header_only: bool = False) -> Image.Image:
        """Open the image or mask of `rec`; `source` is a path or an hf_table row."""
        if isinstance(source, int):
            column = self.spec.image_column if what == "image" else self.spec.target_column
            value = self.hf_table[source][column]
            if isinstance(value, Mapping):
                data, path = value.get("bytes"), value.get("path")
            else:
                data, path = None, value
        else:
            data, path = None, source
        try:
            image = Image.open(io.BytesIO(data)) if data else Image.open(path)
            if header_only:
                image.verify()  # checks the file's structure without decoding the pixels
            else:
                image.load()
        except FileNotFoundError:
            raise self._bad(rec, f"{what} file {path} does not exist") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise self._bad(rec, f"cannot read {what} {path or '(bytes)'}: {e}") from None
        return image

    def _read_mask(self, rec: Record) -> np.ndarray:
        mask = np.asarray(self._open(rec, rec.mask, "label mask"))
        return reduce_mask_labels(mask) if self.spec.reduce_labels else mask.astype(np.int64)

    def check(self, rec: Record, open_files: bool) -> str | None:
        """What is wrong with `rec`, or None; opens its files when `open_files`."""
        if rec.problem:
            return rec.problem
        if self.task_type == "classification" and not 0 <= rec.label < self.num_labels:
            return f"label {rec.label} is out of range 0..{self.num_labels - 1}"
        if self.task_type == "detection":
            problem = box_problem(rec, self.num_labels, None if open_files else rec.size)
            if problem:
                return problem
        if not open_files:
            for path in (rec.image, rec.mask):
                if isinstance(path, str) and not os.path.isfile(path):
                    return f"file {path} does not exist"
            return None
        try:
            image = self._open(rec, rec.image, "image", header_only=True)
            hw = (image.height, image.width)
            if self.task_type == "detection":
                if rec.size is not None and rec.size != hw:
                    return f"image is {hw[1]}x{hw[0]} (w x h) but the annotations say {rec.size[1]}x{rec.size[0]}"
                return box_problem(rec, self.num_labels, hw)
            if self.task_type == "semantic_segmentation":
                return mask_problem(self._read_mask(rec), hw, self.num_labels)
        except BadSampleError as e:
            return e.problem
        return None

    def read_sample(self, index: int) -> Sample:
        """The untransformed sample dict of item `index`: image FloatTensor[3, H, W] in [0, 1] and its
        boxes / class_labels / mask (see `moe_adapt.data.transforms`), plus `label` and `orig_size`."""
        rec = self.records[index]
        image = self._open(rec, rec.image, "image")
        hw = (image.height, image.width)
        sample: Sample = {"image": pil_to_tensor(image), "orig_size": hw}
        if self.task_type == "classification":
            sample["label"] = rec.label
        elif self.task_type == "detection":
            problem = box_problem(rec, self.num_labels, hw)
            if problem:
                raise self._bad(rec, problem)
            boxes = torch.from_numpy(rec.boxes.copy())
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, hw[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, hw[0])
            sample["boxes"] = boxes
            sample["class_labels"] = torch.from_numpy(rec.class_labels.copy())
            sample["image_id"] = rec.image_id
        else:
            mask = self._read_mask(rec)
            problem = mask_problem(mask, hw, self.num_labels)
            if problem:
                raise self._bad(rec, problem)
            sample["mask"] = torch.from_numpy(mask)
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.read_sample(index)
        if self.transform is not None:
            sample = self.transform(sample)
        pixel_values = sample["image"]
        if self.task_type == "classification":
            return {"pixel_values": pixel_values, "labels": sample["label"]}
        if self.task_type == "detection":
            return {
                "pixel_values": pixel_values,
                "labels": {
                    "boxes": sample["boxes"].float(),
                    "class_labels": sample["class_labels"].long(),
                    "image_id": int(sample["image_id"]),
                    "orig_size": torch.tensor(sample["orig_size"], dtype=torch.long),
                    "size": torch.tensor(pixel_values.shape[-2:], dtype=torch.long),
                },
            }
        return {"pixel_values": pixel_values, "labels": sample["mask"].long()}


def load_task_dataset(
    spec: DatasetSpec | Mapping[str, Any],
    split: str | None = None,
    transform: Callable[..., Sample] | str | None = None,
) -> TaskDataset:
    """Read and check one split of a task's data.

    Args:
        spec: a `DatasetSpec` or its dict form.
        split: the split to read; default `spec.split` (the training split). Use `spec.eval_split` for eval.
        transform: a callable on sample dicts (see `moe_adapt.data.transforms`), or `"train"` / `"eval"`
            for `build_transforms(spec.task_type, spec.image_size, train=...)`. None means `"eval"`.

    Returns:
        a `TaskDataset` whose items are described in this module's docstring.

    Raises:
        BadSampleError: a sample failed the checks and `spec.skip_bad` is false.
        FileNotFoundError / ValueError: the split cannot be read at all (missing folder, unknown split, ...).
    """
    if not isinstance(spec, DatasetSpec):
        spec = DatasetSpec.from_dict(spec)
    split = split or spec.split
    if transform is None or isinstance(transform, str):
        if transform not in (None, "train", "eval"):
            raise ValueError(f"load_task_dataset: transform must be a callable, 'train' or 'eval', got {transform!r}")
        transform = build_transforms(spec.task_type, spec.image_size, train=transform == "train")
    index = read_split(spec, split)
    dataset = TaskDataset(spec, split, index.records, index.label_names, transform, hf_table=index.hf_table)

    problems = list(index.orphan_problems)
    good = []
    for rec in index.records:
        problem = dataset.check(rec, open_files=spec.check_images)
        if problem is None:
            good.append(rec)
        else:
            problems.append((rec.name, problem))
    if problems and not spec.skip_bad:
        sample, problem = problems[0]
        raise BadSampleError(spec.name, split, sample, problem, more=len(problems) - 1)
    if problems:
        shown = "; ".join(f"{s}: {p}" for s, p in problems[:3])
        warnings.warn(
            f"dataset {spec.name!r}, split {split!r}: skipped {len(problems)} bad sample(s) of "
            f"{len(index.records)} (skip_bad: true); first: {shown}",
            BadSampleWarning,
            stacklevel=2,
        )
    if not good:
        raise ValueError(f"dataset {spec.name!r}, split {split!r}: no usable samples in {spec.path}")
    dataset.records = good
    dataset.skipped = problems
    return dataset
