"""Dataset specs: one small dict (or YAML block) that says where a task's data lives and how to read it.

A spec names the task, its type, the on-disk format and the path; `load_task_dataset` turns it into a
`torch.utils.data.Dataset`. Example, the three tasks of the embedded mini benchmark (`DIR/specs.yaml`,
written by `moe-adapt data mini --out DIR`; relative paths are resolved against the YAML file's folder):

```yaml
datasets:
  - name: fashion
    task_type: classification
    format: imagefolder          # fashion/<split>/<class name>/*.png
    path: fashion
    split: train
    eval_split: test
    label_names: [T-shirt/top, Trouser, ...]
    image_size: 32
  - name: digits-det
    task_type: detection
    format: coco                 # digits-det/annotations/instances_<split>.json + digits-det/<split>/*.png
    path: digits-det
    split: train
    eval_split: test
    label_names: ["0", "1", ..., "9"]
    image_size: 64
  - name: fashion-seg
    task_type: semantic_segmentation
    format: ade20k               # fashion-seg/{images,annotations}/<split>/*.png
    path: fashion-seg
    split: training
    eval_split: validation
    label_names: [background, T-shirt/top, ...]
    image_size: 64
```

Formats per task type:

| task_type               | format        | layout under `path`                                                   |
|-------------------------|---------------|-----------------------------------------------------------------------|
| classification          | `hf`          | Hub id, `save_to_disk` folder or data folder; columns `image`, `label` |
| classification          | `imagefolder` | `<split>/<class name>/<image>`                                        |
| detection               | `coco`        | `annotations/instances_<split>.json`, images in `<split>/` or `images/<split>/` |
| detection               | `hf`          | columns `image`, `objects: {bbox: [[x, y, w, h], ...], category: [...]}` |
| semantic_segmentation   | `ade20k`      | `images/<split>/*.jpg|png` and `annotations/<split>/*.png` (same stem) |
| semantic_segmentation   | `hf`          | columns `image`, `annotation` (a label-mask image), like `scene_parse_150` |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..io import atomic_write_text

TASK_TYPES = ("classification", "detection", "semantic_segmentation")
FORMATS = {
    "classification": ("hf", "imagefolder"),
    "detection": ("coco", "hf"),
    "semantic_segmentation": ("ade20k", "hf"),
}
# Mask value that losses and metrics skip (transformers' and mmseg's convention).
IGNORE_INDEX = 255
# The column that holds the target, per task type, in the `hf` format.
DEFAULT_LABEL_COLUMNS = {"classification": "label", "detection": "objects", "semantic_segmentation": "annotation"}


@dataclasses.dataclass
class DatasetSpec:
    """Where one task's data lives and how to read it.

    Args:
        name: task name, used in errors, logs and as the key of a multi-task model's head.
        task_type: `"classification"`, `"detection"` or `"semantic_segmentation"`.
        format: on-disk format, see the module docstring (`hf`, `imagefolder`, `coco`, `ade20k`).
        path: local folder (always works) or, for `format: hf`, a Hub dataset id (needs the network).
        split: the training split (e.g. `train`; ADE20K's folders are `training` / `validation`).
        eval_split: the split to evaluate on, or None.
        label_names: class names, index = label id. Read from the data when None (ClassLabel names,
            COCO categories, class folders); required for semantic segmentation with `ade20k` / `hf`
            (masks carry no names). With `reduce_labels`, list the names after the reduction.
        image_size: side of the square images the default transforms produce; None keeps the native size.
        reduce_labels: segmentation only; mask value 0 becomes 255 (ignored) and all others drop by one,
            like transformers' `reduce_labels` (ADE20K's 0 = "other").
        skip_bad: skip samples that fail the checks (counted in a warning) instead of raising
            `BadSampleError`.
        check_images: open every image (and decode every mask) when the dataset is built, so that
            unreadable files, wrong mask sizes and out-of-range mask values show up before training.
            Turn off for very large datasets; problems then raise when the sample is read.
        subset: Hub dataset configuration name (`load_dataset(path, subset)`), `hf` format only.
        image_column: column holding the image, `hf` format only.
        label_column: column holding the target, `hf` format only; default `label` / `objects` / `annotation`.
        bbox_format: `"xywh"` (COCO, default) or `"xyxy"`, for `objects.bbox` in the `hf` detection format.
    """

    name: str
    task_type: str
    format: str
    path: str
    split: str = "train"
    eval_split: str | None = None
    label_names: list[str] | None = None
    image_size: int | None = None
    reduce_labels: bool = False
    skip_bad: bool = False
    check_images: bool = True
    subset: str | None = None
    image_column: str = "image"
    label_column: str | None = None
    bbox_format: str = "xywh"

    def __post_init__(self) -> None:
        self._validate()

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)

    @property
    def target_column(self) -> str:
        return self.label_column or DEFAULT_LABEL_COLUMNS[self.task_type]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: str | Path | None = None) -> DatasetSpec:
        """Build a spec from a dict (e.g. a YAML block), checking every field.

        Relative local paths are resolved against `base_dir` when given (the folder of the YAML file).
        Raises `ValueError` naming the bad field.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a dataset spec must be a mapping of field: value, got {type(d).__name__}: {d!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        label = d.get("name", "<unnamed>")
        if unknown:
            raise ValueError(
                f"dataset spec {label!r}: unknown field(s) {unknown}; the known fields are {sorted(fields)}"
            )
        missing = [f for f in ("name", "task_type", "format", "path") if f not in d]
        if missing:
            raise ValueError(f"dataset spec {label!r}: missing required field(s) {missing}")
        values = dict(d)
        if base_dir is not None and isinstance(values["path"], str):
            candidate = Path(base_dir) / values["path"]
            if not Path(values["path"]).is_absolute() and candidate.exists():
                values["path"] = str(candidate)
        return cls(**values)

    def to_dict(self, relative_to: str | Path | None = None) -> dict[str, Any]:
        """The spec as a plain dict (only fields that differ from the defaults, plus the required ones)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "task_type", "format", "path", "split") or value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        if relative_to is not None:
            try:
                out["path"] = str(Path(self.path).resolve().relative_to(Path(relative_to).resolve()))
            except ValueError:
                pass  # not below relative_to: keep the path as given
        return out

    def _validate(self) -> None:
        def bad(field: str, problem: str) -> ValueError:
            return ValueError(f"dataset spec {self.name!r}: field {field!r} {problem}")

        for field in ("name", "task_type", "format", "path", "split", "image_column", "bbox_format"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise bad(field, f"must be a non-empty string, got {value!r}")
        if self.task_type not in TASK_TYPES:
            raise bad("task_type", f"must be one of {list(TASK_TYPES)}, got {self.task_type!r}")
        if self.format not in FORMATS[self.task_type]:
            raise bad(
                "format", f"must be one of {list(FORMATS[self.task_type])} for {self.task_type}, got {self.format!r}"
            )
        for field in ("eval_split", "subset", "label_column"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                raise bad(field, f"must be a non-empty string or null, got {value!r}")
        if self.label_names is not None:
            if isinstance(self.label_names, str) or not isinstance(self.label_names, Iterable):
                raise bad("label_names", f"must be a list of class names, got {self.label_names!r}")
            self.label_names = [str(n) for n in self.label_names]
            if not self.label_names:
                raise bad("label_names", "must not be empty")
            dups = sorted({n for n in self.label_names if self.label_names.count(n) > 1})
            if dups:
                raise bad("label_names", f"has duplicate names {dups}")
            if len(self.label_names) > IGNORE_INDEX and self.task_type == "semantic_segmentation":
                raise bad(
                    "label_names",
                    f"has {len(self.label_names)} classes; at most {IGNORE_INDEX} fit "
                    f"below the ignore index {IGNORE_INDEX}",
                )
        if self.image_size is not None and (
            isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0
        ):
            raise bad("image_size", f"must be a positive integer or null, got {self.image_size!r}")
        for field in ("reduce_labels", "skip_bad", "check_images"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, f"must be true or false, got {getattr(self, field)!r}")
        if self.reduce_labels and self.task_type != "semantic_segmentation":
            raise bad("reduce_labels", "only applies to semantic_segmentation")
        if self.bbox_format not in ("xywh", "xyxy"):
            raise bad("bbox_format", f"must be 'xywh' or 'xyxy', got {self.bbox_format!r}")
        if self.task_type == "semantic_segmentation" and self.label_names is None:
            raise bad("label_names", "is required for semantic_segmentation (masks carry no class names)")


def load_specs(source: str | Path | Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, DatasetSpec]:
    """Read dataset specs from a YAML file, or from already-parsed data.

    `source` is a path to a YAML file holding either a list of spec blocks or a mapping with a `datasets:`
    list (as in `specs.yaml` of the mini benchmark), or that list / mapping itself. A folder is read as
    `<folder>/specs.yaml`. Relative paths in a YAML file are resolved against the file's folder.

    Returns the specs keyed by name, in file order.
    """
    base_dir = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            path = path / "specs.yaml"
        if not path.is_file():
            raise FileNotFoundError(
                f"no dataset spec file at {path}; build the mini benchmark with "
                f"`moe-adapt data mini --out DIR` or write a YAML list of specs"
            )
        with open(path) as f:
            source = yaml.safe_load(f)
        base_dir = path.parent
        where = str(path)
    else:
        where = "the given specs"
    blocks = source.get("datasets") if isinstance(source, Mapping) else source
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(
            f"{where}: expected a non-empty list of dataset specs (or a mapping with a "
            f"'datasets:' list), got {type(blocks).__name__}"
        )
    specs: dict[str, DatasetSpec] = {}
    for i, block in enumerate(blocks):
        try:
            spec = DatasetSpec.from_dict(block, base_dir=base_dir)
        except ValueError as e:
            raise ValueError(f"{where}, dataset #{i}: {e}") from None
        if spec.name in specs:
            raise ValueError(f"{where}: two datasets are named {spec.name!r}; names must be unique")
        specs[spec.name] = spec
    return specs


def save_specs(specs: Iterable[DatasetSpec], path: str | Path, header: str | None = None) -> Path:
    """Write specs as `datasets: [...]` YAML, with paths relative to the file's folder when below it."""
    path = Path(path)
    blocks = [s.to_dict(relative_to=path.parent) for s in specs]
    text = yaml.safe_dump({"datasets": blocks}, sort_keys=False, allow_unicode=True, default_flow_style=None, width=110)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    return atomic_write_text(path, text)
