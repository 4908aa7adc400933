"""Specs, loaders (all formats), bad-sample handling, transforms and collators, on real tiny data."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from moe_adapt.data import (
    BadSampleError,
    BadSampleWarning,
    DatasetSpec,
    build_transforms,
    collate_fn_for,
    load_specs,
    load_task_dataset,
    scale_boxes,
)
from moe_adapt.data.transforms import RandomResizedCrop, crop, hflip

# --- tiny fixtures in each on-disk layout --------------------------------------------------------


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _coco(tmp_path, boxes_per_image, sizes=((40, 30), (40, 30)), categories=((5, "cat"), (9, "dog")), skip_files=()):
    """A COCO layout: images/<split>/ + annotations/instances_train.json; boxes as [x, y, w, h, cat_id, crowd]."""
    root = tmp_path / "coco"
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in categories]}
    for k, ((h, w), boxes) in enumerate(zip(sizes, boxes_per_image)):
        name = f"img{k}.png"
        if name not in skip_files:
            _png(root / "images" / "train" / name, np.full((h, w, 3), 40 * k, dtype=np.uint8))
        coco["images"].append({"id": 100 + k, "file_name": name, "width": w, "height": h})
        for x, y, bw, bh, cat, crowd in boxes:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": 100 + k,
                    "bbox": [x, y, bw, bh],
                    "category_id": cat,
                    "iscrowd": crowd,
                }
            )
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    return {"name": "coco-toy", "task_type": "detection", "format": "coco", "path": str(root)}


def _ade(tmp_path, masks, image_size=(8, 6), stems=None):
    """An ADE20K layout with one training image per mask (masks: uint8 arrays, None = no mask file)."""
    root = tmp_path / "ade"
    for k, mask in enumerate(masks):
        stem = stems[k] if stems else f"ADE_{k:04d}"
        _png(root / "images" / "training" / f"{stem}.png", np.full((*image_size, 3), 10 * k))
        if mask is not None:
            _png(root / "annotations" / "training" / f"{stem}.png", mask)
    return {
        "name": "ade-toy",
        "task_type": "semantic_segmentation",
        "format": "ade20k",
        "path": str(root),
        "split": "training",
        "label_names": ["wall", "floor", "sky"],
    }


def _imagefolder(tmp_path, layout):
    """`layout`: {split: {class: [arrays]}} → <root>/<split>/<class>/<i>.png."""
    root = tmp_path / "folder"
    for split, classes in layout.items():
        for cls, arrays in classes.items():
            for i, a in enumerate(arrays):
                _png(root / split / cls / f"{i}.png", a)
    return {"name": "folder-toy", "task_type": "classification", "format": "imagefolder", "path": str(root)}


# --- specs -----------------------------------------------------------------------------------------

GOOD = {"name": "t", "task_type": "classification", "format": "imagefolder", "path": "x"}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"task_type": "regression"}, "task_type"),
        ({"format": "coco"}, "format"),
        ({"image_size": -3}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"skip_bad": "yes"}, "skip_bad"),
        ({"label_names": ["a", "a"]}, "label_names"),
        ({"label_names": "abc"}, "label_names"),
        ({"reduce_labels": True}, "reduce_labels"),
        ({"pth": "typo"}, "pth"),
        ({"path": None}, "path"),
        ({"task_type": "semantic_segmentation", "format": "ade20k"}, "label_names"),
        ({"task_type": "detection", "format": "hf", "bbox_format": "cxcywh"}, "bbox_format"),
    ],
)
def test_spec_from_dict_names_the_bad_field(change, field):
    with pytest.raises(ValueError, match=field):
        DatasetSpec.from_dict({**GOOD, **change})


def test_spec_requires_name_type_format_path():
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['format', 'path'\]"):
        DatasetSpec.from_dict({"name": "t", "task_type": "detection"})


def test_load_specs_from_yaml_resolves_relative_paths(tmp_path):
    (tmp_path / "data" / "fashion").mkdir(parents=True)
    blocks = [{**GOOD, "name": "a", "path": "data/fashion"}, {**GOOD, "name": "b", "path": "/abs/elsewhere"}]
    (tmp_path / "list.yaml").write_text(yaml.safe_dump(blocks))
    (tmp_path / "specs.yaml").write_text(yaml.safe_dump({"datasets": blocks}))
    for source in (tmp_path / "list.yaml", tmp_path):  # a list, or a folder holding specs.yaml
        specs = load_specs(source)
        assert list(specs) == ["a", "b"]
        assert specs["a"].path == str(tmp_path / "data" / "fashion")
        assert specs["b"].path == "/abs/elsewhere"
    (tmp_path / "dup.yaml").write_text(yaml.safe_dump([blocks[0], blocks[0]]))
    with pytest.raises(ValueError, match="two datasets are named 'a'"):
        load_specs(tmp_path / "dup.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump([blocks[0], {**GOOD, "image_size": 0}]))
    with pytest.raises(ValueError, match=r"dataset #1.*image_size"):
        load_specs(tmp_path / "bad.yaml")


# --- loaders on the mini benchmark -------------------------------------------------------------------


def test_mini_items_have_the_documented_formats(mini_specs):
    cls = load_task_dataset(mini_specs["fashion"], "test")
    item = cls[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert isinstance(item["labels"], int) and 0 <= item["labels"] < 10
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0  # mean = std = 0.5
    assert len(cls) == 100 and cls.num_labels == 10 and cls.id2label[1] == "trouser"

    det = load_task_dataset(mini_specs["digits-det"], "test")
    target = det[3]["labels"]
    assert det[3]["pixel_values"].shape == (3, 64, 64)
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
    assert target["class_labels"].dtype == torch.long and len(target["class_labels"]) == len(target["boxes"]) >= 1
    assert target["image_id"] == 4 and target["orig_size"].tolist() == [64, 64] == target["size"].tolist()

    seg = load_task_dataset(mini_specs["fashion-seg"], "validation")
    item = seg[0]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["labels"].shape == (64, 64) and item["labels"].dtype == torch.long
    assert set(item["labels"].unique().tolist()) <= set(range(11)) and seg.num_labels == 11


def test_mini_detection_boxes_are_tight_around_the_digits(mini_specs):
    raw = build_transforms("detection", None, train=False, normalize=False)
    ds = load_task_dataset(mini_specs["digits-det"], "test", transform=raw)
    for i in range(0, len(ds), 7):
        item = ds[i]
        ink = item["pixel_values"][0] > 0
        covered = torch.zeros_like(ink)
        for x1, y1, x2, y2 in item["labels"]["boxes"].round().long().tolist():
            region = ink[y1:y2, x1:x2]
            # every border row and column of a tight box holds ink
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
            covered[y1:y2, x1:x2] = True
        assert not (ink & ~covered).any(), f"image {i}: ink outside every box"


def test_mini_segmentation_masks_cover_every_item_pixel(mini_specs):
    raw = build_transforms("semantic_segmentation", None, train=False, normalize=False)
    ds = load_task_dataset(mini_specs["fashion-seg"], "training", transform=raw)
    for i in range(0, len(ds), 9):
        item = ds[i]
        ink = item["pixel_values"][0] > 0
        assert not (ink & (item["labels"] == 0)).any()  # no item pixel is labelled background
        assert (item["labels"] > 0).any()


def test_dataloader_batches_each_mini_task(mini_specs):
    for name, batch_shape in (
        ("fashion", (4, 3, 32, 32)),
        ("digits-det", (4, 3, 64, 64)),
        ("fashion-seg", (4, 3, 64, 64)),
    ):
        ds = load_task_dataset(mini_specs[name], transform="train")
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_fn_for(ds.task_type))))
        assert batch["pixel_values"].shape == batch_shape
        if ds.task_type == "detection":
            assert isinstance(batch["labels"], list) and len(batch["labels"]) == 4
        else:
            assert batch["labels"].shape[0] == 4


# --- loaders on the other layouts --------------------------------------------------------------------


def test_hf_image_label_dataset_from_disk(tmp_path):
    import datasets

    gray = Image.fromarray(np.full((5, 7), 200, dtype=np.uint8))
    rgba = Image.fromarray(np.full((6, 4, 4), 100, dtype=np.uint8), mode="RGBA")
    rgb = Image.fromarray(np.zeros((3, 3, 3), dtype=np.uint8))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"image": [gray, rgba], "label": [2, 0]}, features=features),
            "validation": datasets.Dataset.from_dict({"image": [rgb], "label": [1]}, features=features),
        }
    )
    dd.save_to_disk(str(tmp_path / "imnet"))
    spec = {"name": "imnet", "task_type": "classification", "format": "hf", "path": str(tmp_path / "imnet")}
    ds = load_task_dataset(spec, transform=build_transforms("classification", None, False, normalize=False))
    assert ds.label_names == ["a", "b", "c"] and len(ds) == 2
    assert ds[0]["pixel_values"].shape == (3, 5, 7) and ds[0]["labels"] == 2  # grayscale → 3 channels
    assert torch.allclose(ds[0]["pixel_values"], torch.tensor(200 / 255))
    assert ds[1]["pixel_values"].shape == (3, 6, 4) and ds[1]["labels"] == 0  # RGBA → RGB
    assert load_task_dataset(spec, "validation")[0]["labels"] == 1
    with pytest.raises(ValueError, match=r"no split 'test'.*\['train', 'validation'\]"):
        load_task_dataset(spec, "test")


def test_imagefolder_label_names_are_shared_by_all_splits(tmp_path):
    px = np.zeros((4, 4), dtype=np.uint8)
    spec = _imagefolder(tmp_path, {"train": {"cat": [px, px], "dog": [px]}, "val": {"dog": [px + 9]}})
    train, val = load_task_dataset(spec, "train"), load_task_dataset(spec, "val")
    assert train.label_names == val.label_names == ["cat", "dog"]
    assert [train[i]["labels"] for i in range(3)] == [0, 0, 1] and val[0]["labels"] == 1
    with pytest.raises(FileNotFoundError, match=r"no folder for split 'test'.*\['train', 'val'\]"):
        load_task_dataset(spec, "test")


def test_coco_layout_maps_categories_and_drops_crowd(tmp_path):
    spec = _coco(
        tmp_path,
        [
            [(2, 3, 10, 5, 9, 0), (0, 0, 4, 4, 5, 1)],  # the second one is a crowd region
            [(1.5, 2.5, 8, 20, 5, 0)],
        ],
    )
    ds = load_task_dataset(spec, transform=build_transforms("detection", None, False))
    assert ds.label_names == ["cat", "dog"]
    t0, t1 = ds[0]["labels"], ds[1]["labels"]
    assert t0["boxes"].tolist() == [[2, 3, 12, 8]] and t0["class_labels"].tolist() == [1]
    assert t0["image_id"] == 100 and t0["orig_size"].tolist() == [40, 30]
    assert t1["boxes"].tolist() == [[1.5, 2.5, 9.5, 22.5]] and t1["class_labels"].tolist() == [0]
    resized = load_task_dataset(spec, transform=build_transforms("detection", 20, False))[1]["labels"]
    assert resized["size"].tolist() == [20, 20]
    assert torch.allclose(resized["boxes"], torch.tensor([[1.5 * 20 / 30, 2.5 / 2, 9.5 * 20 / 30, 22.5 / 2]]))
    assert torch.allclose(scale_boxes(resized["boxes"], resized["size"], resized["orig_size"]), t1["boxes"])


def test_hf_objects_detection_dataset(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "objects": {
                "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                "category": datasets.Sequence(datasets.ClassLabel(names=["person", "car"])),
            },
        }
    )
    images = [Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)), Image.fromarray(np.zeros((10, 10), np.uint8))]
    objects = [{"bbox": [[1, 2, 3, 4], [10, 5, 20, 15]], "category": [1, 0]}, {"bbox": [], "category": []}]
    ds = datasets.Dataset.from_dict({"image": images, "image_id": [7, 8], "objects": objects}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "cppe"))
    spec = {"name": "cppe", "task_type": "detection", "format": "hf", "path": str(tmp_path / "cppe")}
    loaded = load_task_dataset(spec)
    assert loaded.label_names == ["person", "car"]
    target = loaded[0]["labels"]
    assert target["boxes"].tolist() == [[1, 2, 4, 6], [10, 5, 30, 20]] and target["class_labels"].tolist() == [1, 0]
    assert target["image_id"] == 7 and target["orig_size"].tolist() == [20, 30]
    assert loaded[1]["labels"]["boxes"].shape == (0, 4)  # an image without objects is fine


def test_ade20k_layout_with_reduce_labels(tmp_path):
    mask = np.array([[0, 1, 2, 3, 255, 1]] * 8, dtype=np.uint8)
    spec = _ade(tmp_path, [mask, mask])
    ds = load_task_dataset(
        {**spec, "reduce_labels": True}, transform=build_transforms("semantic_segmentation", None, False)
    )
    assert ds[0]["labels"][0].tolist() == [255, 0, 1, 2, 255, 0]
    plain = load_task_dataset({**spec, "label_names": ["other", "wall", "floor", "sky"]}, "train")  # train→training
    assert plain[1]["labels"][0].tolist() == [0, 1, 2, 3, 255, 1]


def test_hf_segmentation_dataset(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    mask = Image.fromarray(np.array([[1, 2], [0, 1]], dtype=np.uint8))
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(np.zeros((2, 2, 3), np.uint8))], "annotation": [mask]}, features=features
    )
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "sp150"))
    spec = {
        "name": "sp",
        "task_type": "semantic_segmentation",
        "format": "hf",
        "path": str(tmp_path / "sp150"),
        "split": "validation",
        "label_names": ["wall", "floor"],
        "reduce_labels": True,
    }
    assert load_task_dataset(spec)[0]["labels"].tolist() == [[0, 1], [255, 0]]


# --- bad samples -----------------------------------------------------------------------------------

GOOD_MASK = np.zeros((8, 6), dtype=np.uint8)


def _bad_unreadable(tmp_path):
    px = np.zeros((4, 4), dtype=np.uint8)
    spec = _imagefolder(tmp_path, {"train": {"cat": [px, px], "dog": [px]}})
    (tmp_path / "folder" / "train" / "dog" / "0.png").write_bytes(b"this is not a png")
    return spec, "train/dog/0.png", "cannot read image", 2


def _bad_label_range(tmp_path):
    import datasets

    im = Image.fromarray(np.zeros((3, 3), np.uint8))
    ds = datasets.Dataset.from_dict(
        {"image": [im] * 3, "label": [0, 7, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    spec = {
        "name": "hf-toy",
        "task_type": "classification",
        "format": "hf",
        "path": str(tmp_path / "hf"),
        "label_names": ["a", "b"],
    }
    return spec, "row 1", "label 7 is out of range 0..1", 2


def _bad_missing_image(tmp_path):
    spec = _coco(tmp_path, [[(1, 1, 5, 5, 5, 0)], [(1, 1, 5, 5, 9, 0)]], skip_files=("img1.png",))
    return spec, "image_id 101 (img1.png)", "does not exist", 1


def _bad_box_outside(tmp_path):
    spec = _coco(tmp_path, [[(1, 1, 5, 5, 5, 0)], [(25, 1, 10, 5, 9, 0)]])  # image is 30 wide
    return spec, "image_id 101 (img1.png)", "annotation id 2: box .* lies outside the 30x40", 1


def _bad_box_size(tmp_path):
    spec = _coco(tmp_path, [[(1, 1, 0, 5, 5, 0)], [(1, 1, 5, 5, 9, 0)]])
    return spec, "image_id 100 (img0.png)", "non-positive width or height", 1


def _bad_category(tmp_path):
    spec = _coco(tmp_path, [[(1, 1, 5, 5, 5, 0)], [(1, 1, 5, 5, 3, 0)]])
    return spec, "image_id 101 (img1.png)", "category_id 3 is not in the file's categories", 1


def _bad_mask_size(tmp_path):
    spec = _ade(tmp_path, [GOOD_MASK, np.zeros((4, 6), np.uint8), GOOD_MASK])
    return spec, "images/training/ADE_0001.png", r"label mask is 6x4 \(w x h\) but its image is 6x8", 2


def _bad_mask_value(tmp_path):
    spec = _ade(tmp_path, [GOOD_MASK, GOOD_MASK + 7])
    return spec, "images/training/ADE_0001.png", r"class values \[7\] outside 0..2", 1


def _bad_missing_mask(tmp_path):
    spec = _ade(tmp_path, [GOOD_MASK, None])
    return spec, "images/training/ADE_0001.png", "label mask annotations/training/ADE_0001.png does not exist", 1


@pytest.mark.parametrize(
    "make_bad",
    [
        _bad_unreadable,
        _bad_label_range,
        _bad_missing_image,
        _bad_box_outside,
        _bad_box_size,
        _bad_category,
        _bad_mask_size,
        _bad_mask_value,
        _bad_missing_mask,
    ],
)
def test_bad_sample_raises_naming_it_or_is_skipped(tmp_path, make_bad):
    spec, sample, problem, good = make_bad(tmp_path)
    with pytest.raises(BadSampleError, match=problem) as err:
        load_task_dataset(spec)
    assert err.value.sample == sample and sample in str(err.value) and "skip_bad" in str(err.value)
    with pytest.warns(BadSampleWarning, match=r"skipped 1 bad sample\(s\)"):
        ds = load_task_dataset({**spec, "skip_bad": True})
    assert len(ds) == good and ds.skipped[0][0] == sample
    for i in range(len(ds)):  # every kept sample reads
        ds[i]


def test_unchecked_bad_mask_raises_when_read(tmp_path):
    spec = _ade(tmp_path, [GOOD_MASK, np.zeros((4, 6), np.uint8)])
    ds = load_task_dataset({**spec, "check_images": False})
    ds[0]
    with pytest.raises(BadSampleError, match="ADE_0001.png.*label mask is 6x4"):
        ds[1]
    with pytest.raises(BadSampleError) as err:
        ds[1]
    # DataLoader workers pickle the error, and torch re-raises it as exc_type(message): both keep the message
    assert pickle.loads(pickle.dumps(err.value)).sample == "images/training/ADE_0001.png"
    assert "ADE_0001.png" in str(BadSampleError(f"Caught in worker.\nOriginal {err.value}"))


# --- transforms ------------------------------------------------------------------------------------


def _square_sample(h=48, w=64, box=(10, 8, 30, 28)):
    """Black image with a white rectangle `box` (x1, y1, x2, y2), its box and its mask (class 1)."""
    image = torch.zeros(3, h, w)
    mask = torch.zeros(h, w, dtype=torch.long)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 1.0
    mask[y1:y2, x1:x2] = 1
    return {
        "image": image,
        "mask": mask,
        "boxes": torch.tensor([box], dtype=torch.float32),
        "class_labels": torch.tensor([4]),
    }


def test_hflip_twice_is_identity_and_moves_the_box_with_the_object():
    sample = _square_sample()
    flipped = hflip(sample)
    assert flipped["boxes"].tolist() == [[64 - 30, 8, 64 - 10, 28]]
    x1, y1, x2, y2 = (int(v) for v in flipped["boxes"][0])
    assert flipped["image"][:, y1:y2, x1:x2].min() == 1 and flipped["mask"][y1:y2, x1:x2].min() == 1
    twice = hflip(flipped)
    for key in ("image", "mask", "boxes", "class_labels"):
        assert torch.equal(twice[key], sample[key])


def test_random_resized_crop_keeps_boxes_and_masks_on_the_object():
    t = RandomResizedCrop(40, scale=(0.2, 1.0))
    kept = 0
    for seed in range(40):
        out = t(_square_sample(), generator=torch.Generator().manual_seed(seed))
        image, mask, boxes = out["image"][0], out["mask"], out["boxes"]
        assert image.shape == (40, 40) and mask.shape == (40, 40)
        assert set(mask.unique().tolist()) <= {0, 1}  # nearest: no new classes
        assert len(boxes) == len(out["class_labels"]) <= 1
        if len(boxes) == 0:
            assert (mask == 1).sum() <= 1  # the object left the crop (or shrank below a pixel)
            continue
        kept += 1
        x1, y1, x2, y2 = boxes[0].tolist()
        ys, xs = torch.nonzero(mask == 1, as_tuple=True)
        # the mask's extent and the box agree within a pixel (nearest vs exact scaling)
        assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1
        assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - y2) <= 1
        inner = image[int(np.ceil(y1 + 1.5)) : int(y2 - 1.5), int(np.ceil(x1 + 1.5)) : int(x2 - 1.5)]
        outer = image.clone()
        outer[max(0, int(y1 - 1.5)) : int(np.ceil(y2 + 1.5)), max(0, int(x1 - 1.5)) : int(np.ceil(x2 + 1.5))] = 0
        assert inner.numel() == 0 or inner.min() > 0.95
        assert outer.max() < 0.05
    assert kept >= 20


def test_crop_drops_vanished_boxes_and_clips_the_rest():
    sample = _square_sample()
    sample["boxes"] = torch.tensor([[10.0, 8, 30, 28], [50, 30, 60, 40]])
    sample["class_labels"] = torch.tensor([4, 7])
    out = crop(sample, top=20, left=0, height=28, width=40)
    assert out["boxes"].tolist() == [[10, 0, 30, 8]] and out["class_labels"].tolist() == [4]


def test_transforms_are_deterministic_given_a_generator():
    t = build_transforms("detection", 32, train=True)
    a = t(_square_sample(), generator=torch.Generator().manual_seed(3))
    b = t(_square_sample(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    others = [t(_square_sample(), generator=torch.Generator().manual_seed(s))["boxes"] for s in range(4, 8)]
    assert any(not torch.equal(o, a["boxes"]) for o in others)


def test_eval_transform_resizes_and_normalises():
    out = build_transforms("semantic_segmentation", (24, 32), train=False, mean=(0.5, 0, 0), std=(0.5, 1, 2))(
        _square_sample()
    )
    assert out["image"].shape == (3, 24, 32) and out["mask"].shape == (24, 32)
    assert out["image"][0].min() == -1 and out["image"][0].max() == 1 and out["image"][2].max() == 0.5
    assert out["boxes"].tolist() == [[5, 4, 15, 14]]


# --- collators -------------------------------------------------------------------------------------


def test_collators_pad_to_the_batch():
    a, b = torch.ones(3, 4, 5), torch.ones(3, 6, 3)
    seg = collate_fn_for("semantic_segmentation")(
        [
            {"pixel_values": a, "labels": torch.zeros(4, 5, dtype=torch.long)},
            {"pixel_values": b, "labels": torch.ones(6, 3, dtype=torch.long)},
        ]
    )
    assert seg["pixel_values"].shape == (2, 3, 6, 5) and seg["labels"].shape == (2, 6, 5)
    assert seg["labels"][0, 4:].eq(255).all() and seg["labels"][1, :, 3:].eq(255).all()
    assert seg["pixel_values"][1, :, :, 3:].eq(0).all() and seg["labels"][1, :, :3].eq(1).all()

    cls = collate_fn_for("classification")([{"pixel_values": a, "labels": 3}, {"pixel_values": a, "labels": 1}])
    assert cls["pixel_values"].shape == (2, 3, 4, 5) and cls["labels"].tolist() == [3, 1]

    targets = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.ones(2, 4)}]
    det = collate_fn_for("detection")(
        [{"pixel_values": a, "labels": targets[0]}, {"pixel_values": b, "labels": targets[1]}]
    )
    assert det["pixel_values"].shape == (2, 3, 6, 5) and det["labels"] == targets
    with pytest.raises(ValueError, match="unknown task_type 'depth'"):
        collate_fn_for("depth")
