"""Readers for the on-disk formats: each turns (spec, split) into an index of `Record`s.

Readers only read annotations (no image decoding) and never raise for a single bad sample: they note
the problem on the record (`Record.problem`) so that `load_task_dataset` can raise `BadSampleError` or,
with `skip_bad`, skip it. They raise `FileNotFoundError` / `ValueError` for problems with the whole
split (missing folder, unknown split, wrong columns, label names that do not match the data).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from .specs import DatasetSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Other spellings of a split, tried when the named split folder does not exist (ADE20K says "training").
SPLIT_ALIASES = {
    "train": ("training",),
    "training": ("train",),
    "validation": ("val",),
    "val": ("validation",),
    "test": ("testing",),
    "testing": ("test",),
}


@dataclasses.dataclass
class Record:
    """One sample's annotations.

    `image` / `mask` are a file path, or a row index into `SplitIndex.hf_table` for the `hf` format.
    `boxes` are float32 [n, 4] xyxy pixels of the original image, `class_labels` int64 [n];
    `size` is (h, w) as the annotation file states it (None when it does not).
    """

    name: str
    image: str | int
    label: int | None = None
    boxes: np.ndarray | None = None
    class_labels: np.ndarray | None = None
    box_names: list[str] | None = None
    image_id: int | None = None
    mask: str | int | None = None
    size: tuple[int, int] | None = None
    problem: str | None = None


@dataclasses.dataclass
class SplitIndex:
    """What a reader found: the records, the class names, and the table rows refer to (hf format)."""

    records: list[Record]
    label_names: list[str]
    hf_table: Any = None
    # Problems that belong to no record (e.g. a COCO annotation of an image that is not listed).
    orphan_problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def read_split(spec: DatasetSpec, split: str) -> SplitIndex:
    """Read the annotations of `split` with the reader for `spec.format`."""
    if spec.format == "hf":
        return read_hf(spec, split)
    reader = {"imagefolder": read_imagefolder, "coco": read_coco, "ade20k": read_ade20k}[spec.format]
    root = Path(spec.path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset {spec.name!r}: folder {root} (field 'path') does not exist")
    return reader(spec, split, root)


def _split_dir(spec: DatasetSpec, parent: Path, split: str) -> Path:
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        if (parent / name).is_dir():
            return parent / name
    found = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    raise FileNotFoundError(
        f"dataset {spec.name!r}: no folder for split {split!r} in {parent} (found {found}); "
        f"set 'split' / 'eval_split' in the spec to one of them"
    )


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _check_label_names(spec: DatasetSpec, found: list[str], where: str) -> list[str]:
    if spec.label_names is None:
        return found
    unknown = [n for n in found if n not in spec.label_names]
    if unknown:
        raise ValueError(
            f"dataset {spec.name!r}: {where} has classes {unknown} that are not in the spec's label_names "
            f"{spec.label_names}; add them or remove 'label_names' to take the names from the data"
        )
    return spec.label_names


def read_imagefolder(spec: DatasetSpec, split: str, root: Path) -> SplitIndex:
    """`<root>/<split>/<class name>/<image>`; class names are the sorted folder names of all splits."""
    split_dir = _split_dir(spec, root, split)
    class_dirs = {p.name for s in root.iterdir() if s.is_dir() for p in s.iterdir() if p.is_dir()}
    label_names = _check_label_names(spec, sorted(class_dirs), f"{root}")
    index = {n: i for i, n in enumerate(label_names)}
    records = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        for file in _image_files(class_dir):
            records.append(Record(name=str(file.relative_to(root)), image=str(file), label=index[class_dir.name]))
    return SplitIndex(records, label_names)


def _to_xyxy(bbox: Any, fmt: str) -> np.ndarray | None:
    try:
        b = np.asarray(bbox, dtype=np.float64).reshape(4)
    except (TypeError, ValueError):
        return None
    return b if fmt == "xyxy" else np.array([b[0], b[1], b[0] + b[2], b[1] + b[3]])


def _box_arrays(boxes: list[np.ndarray], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64).reshape(-1),
    )


def read_coco(spec: DatasetSpec, split: str, root: Path) -> SplitIndex:
    """COCO instances: `<root>/annotations/instances_<split>.json`, images in `<root>/<split>/`,
    `<root>/images/<split>/` or `<root>/` (where `file_name` is relative to).

    Category ids map to contiguous labels 0..K-1 in the order of `label_names` (default: categories
    sorted by id). Crowd annotations (`iscrowd: 1`) are left out, as DETR-style training does.
    """
    ann_dir = root / "annotations"
    candidates = [ann_dir / f"instances_{name}.json" for name in (split, *SPLIT_ALIASES.get(split, ()))]
    ann_file = next((c for c in candidates if c.is_file()), None)
    if ann_file is None:
        found = sorted(p.name for p in ann_dir.glob("*.json")) if ann_dir.is_dir() else []
        raise FileNotFoundError(
            f"dataset {spec.name!r}: no COCO annotation file {candidates[0]} for split {split!r} (found {found})"
        )
    try:
        coco = json.loads(ann_file.read_text())
        images, categories = coco["images"], coco["categories"]
        annotations = coco.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"dataset {spec.name!r}: {ann_file} is not a COCO instances file ({e!r}); it needs "
            f"'images', 'annotations' and 'categories'"
        ) from None
    image_dir = next(
        (
            d
            for d in (root / split, root / "images" / split, *(root / a for a in SPLIT_ALIASES.get(split, ())))
            if d.is_dir()
        ),
        root,
    )
    cats = sorted(categories, key=lambda c: c["id"])
    label_names = _check_label_names(spec, [str(c["name"]) for c in cats], f"{ann_file} 'categories'")
    cat_to_label = {c["id"]: label_names.index(str(c["name"])) for c in cats}

    records: dict[Any, Record] = {}
    boxes: dict[Any, list] = {}
    for im in images:
        rec = Record(
            name=f"image_id {im.get('id')} ({im.get('file_name')})",
            image=str(image_dir / str(im.get("file_name"))),
            image_id=im.get("id"),
            box_names=[],
        )
        if "width" in im and "height" in im:
            rec.size = (int(im["height"]), int(im["width"]))
        if not isinstance(im.get("id"), int) or not im.get("file_name"):
            rec.problem = "image entry needs an integer 'id' and a 'file_name'"
        records[im.get("id")] = rec
        boxes[im.get("id")] = [[], []]
    orphans = []
    for ann in annotations:
        name = f"annotation id {ann.get('id')}"
        rec = records.get(ann.get("image_id"))
        if rec is None:
            orphans.append((name, f"refers to image_id {ann.get('image_id')}, which is not in {ann_file.name}"))
            continue
        if ann.get("iscrowd", 0):
            continue
        xyxy = _to_xyxy(ann.get("bbox"), "xywh")
        if rec.problem is not None:
            continue
        if xyxy is None:
            rec.problem = f"{name}: 'bbox' must be [x, y, width, height], got {ann.get('bbox')!r}"
        elif ann.get("category_id") not in cat_to_label:
            rec.problem = (
                f"{name}: category_id {ann.get('category_id')!r} is not in the file's categories {sorted(cat_to_label)}"
            )
        else:
            boxes[ann["image_id"]][0].append(xyxy)
            boxes[ann["image_id"]][1].append(cat_to_label[ann["category_id"]])
            rec.box_names.append(name)
    for image_id, rec in records.items():
        rec.boxes, rec.class_labels = _box_arrays(*boxes[image_id])
    return SplitIndex(list(records.values()), label_names, orphan_problems=orphans)


def read_ade20k(spec: DatasetSpec, split: str, root: Path) -> SplitIndex:
    """`<root>/images/<split>/<stem>.jpg|png` with label masks `<root>/annotations/<split>/<stem>.png`."""
    image_dir = _split_dir(spec, root / "images", split)
    mask_dir = root / "annotations" / image_dir.name
    records = []
    for file in _image_files(image_dir):
        rel = file.relative_to(image_dir)
        mask = mask_dir / rel.with_suffix(".png")
        rec = Record(name=str(file.relative_to(root)), image=str(file), mask=str(mask))
        if not mask.is_file():
            rec.problem = f"its label mask {mask.relative_to(root)} does not exist"
        records.append(rec)
    return SplitIndex(records, list(spec.label_names or []))


# --- Hugging Face datasets ------------------------------------------------------------------------


def _load_hf_split(spec: DatasetSpec, split: str):
    import datasets

    local = Path(spec.path)
    if not (local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file())):
        # A Hub id, or a folder of data files: let datasets pick the split (downloads only that split).
        try:
            return datasets.load_dataset(spec.path, spec.subset, split=split)
        except Exception as e:  # datasets raises many types (offline, unknown split or config, bad files)
            where = (
                "local folder" if local.exists() else "Hub dataset (no local folder by that name; needs the network)"
            )
            raise ValueError(f"dataset {spec.name!r}: cannot load split {split!r} of {where} {spec.path!r}: {e}") from e
    obj = datasets.load_from_disk(str(local))
    if isinstance(obj, datasets.Dataset):
        raise ValueError(
            f"dataset {spec.name!r}: {spec.path} holds a single Dataset without splits; save a "
            f"DatasetDict({{{split!r}: ds, ...}}) so train and eval splits cannot be mixed up"
        )
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        if name in obj:
            return obj[name]
    raise ValueError(
        f"dataset {spec.name!r}: no split {split!r} in {spec.path} (found {list(obj)}); "
        f"set 'split' / 'eval_split' in the spec to one of them"
    )


def _class_names(feature: Any) -> list[str] | None:
    """The names of the ClassLabel inside `feature` (possibly wrapped in List / Sequence / dict)."""
    if hasattr(feature, "names") and isinstance(feature.names, list):
        return list(feature.names)
    if isinstance(feature, dict):
        feature = feature.get("category")
        return None if feature is None else _class_names(feature)
    inner = getattr(feature, "feature", None)
    return None if inner is None else _class_names(inner)


def _as_image_column(ds, column: str, spec: DatasetSpec):
    import datasets

    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return ds  # file paths
    raise ValueError(
        f"dataset {spec.name!r}: column {column!r} must hold images (datasets.Image) or file paths, got {feature}"
    )


def read_hf(spec: DatasetSpec, split: str) -> SplitIndex:
    """A `datasets` split with an image column and a label / objects / annotation column."""
    ds = _load_hf_split(spec, split)
    column = spec.target_column
    for field, col in (("image_column", spec.image_column), ("label_column", column)):
        if col not in ds.column_names:
            raise ValueError(
                f"dataset {spec.name!r}: split {split!r} has no column {col!r} (field {field!r}); "
                f"its columns are {ds.column_names}"
            )
    ds = _as_image_column(ds, spec.image_column, spec)
    names = [f"row {i}" for i in range(len(ds))]
    if spec.task_type == "semantic_segmentation":
        ds = _as_image_column(ds, column, spec)
        records = [Record(name=names[i], image=i, mask=i) for i in range(len(ds))]
        return SplitIndex(
            records, list(spec.label_names or []), hf_table=ds.select_columns([spec.image_column, column])
        )

    found = _class_names(ds.features[column])
    if found is None and spec.label_names is None:
        raise ValueError(
            f"dataset {spec.name!r}: column {column!r} has no ClassLabel names; list the classes "
            f"in the spec's 'label_names'"
        )
    label_names = spec.label_names or found
    if found is not None and spec.label_names is not None and found != spec.label_names:
        raise ValueError(
            f"dataset {spec.name!r}: the spec's label_names {spec.label_names} differ from the "
            f"names in column {column!r}: {found}; remove 'label_names' or make them equal"
        )
    table = ds.select_columns([spec.image_column])
    if spec.task_type == "classification":
        records = []
        for i, label in enumerate(ds[column]):
            rec = Record(name=names[i], image=i)
            if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
                rec.label = int(label)
            else:
                rec.problem = f"label {label!r} is not an integer class id"
            records.append(rec)
        return SplitIndex(records, label_names, hf_table=table)

    image_ids = ds["image_id"] if "image_id" in ds.column_names else range(len(ds))
    sizes = zip(ds["height"], ds["width"]) if {"width", "height"} <= set(ds.column_names) else [None] * len(ds)
    records = []
    for i, (objects, image_id, size) in enumerate(zip(ds[column], image_ids, sizes)):
        rec = Record(name=f"row {i} (image_id {image_id})", image=i, image_id=int(image_id), box_names=[])
        rec.size = None if size is None else (int(size[0]), int(size[1]))
        if isinstance(objects, dict):  # {"bbox": [...], "category": [...]}
            bboxes, categories = objects.get("bbox"), objects.get("category")
        elif isinstance(objects, list):  # [{"bbox": ..., "category": ...}, ...]
            bboxes = [o.get("bbox") for o in objects]
            categories = [o.get("category") for o in objects]
        else:
            bboxes = categories = None
        if bboxes is None or categories is None or len(bboxes) != len(categories):
            rec.problem = f"column {column!r} must hold bbox and category lists of equal length, got {objects!r}"
            bboxes, categories = [], []
        xyxy = []
        for j, (bbox, category) in enumerate(zip(bboxes, categories)):
            box = _to_xyxy(bbox, spec.bbox_format)
            if box is None and rec.problem is None:
                rec.problem = f"object {j}: bbox must be 4 numbers ({spec.bbox_format}), got {bbox!r}"
            if not isinstance(category, (int, np.integer)) and rec.problem is None:
                rec.problem = f"object {j}: category {category!r} is not an integer class id"
            xyxy.append(box if box is not None else np.zeros(4))
            rec.box_names.append(f"object {j}")
        rec.boxes, rec.class_labels = _box_arrays(
            xyxy, [c if isinstance(c, (int, np.integer)) else -1 for c in categories]
        )
        records.append(rec)
    return SplitIndex(records, label_names, hf_table=table)
