"""Built-in downstream sets: small classification tasks from real images that ship with our dependencies (so
they work offline) and that no pretraining task of the mini benchmark uses.

| name       | classes | train / test | images                                                                 |
|------------|---------|--------------|------------------------------------------------------------------------|
| `digits`   | 10      | 1347 / 450   | scikit-learn's `load_digits` (UCI optical digits, 8×8 gray, 17 levels) |
| `textures` | 6       | 1200 / 360   | 48×48 gray crops of scikit-image sample photos: brick, grass, gravel, moon, cell, coins |

Both are written once as an `imagefolder` (`<root>/<name>/{train,test}/<class>/<id>.png`, through a temporary
folder renamed into place) and returned as a `DatasetSpec`, so the fine-tuning recipe reads them exactly like a
user's image folder. `root` defaults to `$MOE_ADAPT_DATA/downstream` or `~/.cache/moe_adapt/downstream`.
`digits` splits each class 75/25 at random (seed 0); `textures` takes train crops from the top 70% of every photo
and test crops from the bottom 30%, so no test pixel was seen in training.

In a recipe config, `dataset:` is any of

```yaml
dataset: builtin:digits                     # a built-in set (image_size from the model)
dataset: {builtin: textures, image_size: 64}
dataset: {name: pets, task_type: classification, format: imagefolder, path: data/pets, eval_split: test}
dataset: {name: beans, task_type: classification, format: hf, path: /data/beans_saved, eval_split: test}
```
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.specs import DatasetSpec
from ..io import atomic_dir

DIGITS_CLASSES = [str(d) for d in range(10)]
TEXTURE_PHOTOS = ["brick", "grass", "gravel", "moon", "cell", "coins"]
TEXTURE_CROP, TEXTURE_TRAIN_PER_CLASS, TEXTURE_TEST_PER_CLASS, TEXTURE_TRAIN_ROWS = 48, 200, 60, 0.7

BUILTIN_DOWNSTREAM = {
    "digits": "scikit-learn digits: 1,797 8x8 handwritten digits (UCI), 10 classes, 1347 train / 450 test",
    "textures": "scikit-image sample photos: 48x48 crops of brick, grass, gravel, moon, cell, coins; "
    "6 classes, 1200 train / 360 test from disjoint rows",
}
# Bumped when a set's content changes, so an old cache is rebuilt.
_VERSION = 1


def default_root() -> Path:
    base = os.environ.get("MOE_ADAPT_DATA")
    return Path(base) / "downstream" if base else Path.home() / ".cache" / "moe_adapt" / "downstream"


def _digits() -> dict[str, list[tuple[np.ndarray, int]]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0 * 255.0).round().astype(np.uint8)  # 17 gray levels → 0..255
    rng = np.random.default_rng(0)
    out = {"train": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(data.target == c))
        n_test = round(0.25 * len(idx))
        out["test"] += [(images[i], c) for i in idx[:n_test]]
        out["train"] += [(images[i], c) for i in idx[n_test:]]
    return out


def _textures() -> dict[str, list[tuple[np.ndarray, int]]]:
    import skimage.color
    import skimage.data

    rng = np.random.default_rng(0)
    out = {"train": [], "test": []}
    s = TEXTURE_CROP
    for c, name in enumerate(TEXTURE_PHOTOS):
        photo = getattr(skimage.data, name)()
        if photo.ndim == 3:
            photo = (skimage.color.rgb2gray(photo[..., :3]) * 255).round().astype(np.uint8)
        h, w = photo.shape
        cut = int(TEXTURE_TRAIN_ROWS * h)
        for split, (top, bottom, n) in {
            "train": (0, cut, TEXTURE_TRAIN_PER_CLASS),
            "test": (cut, h, TEXTURE_TEST_PER_CLASS),
        }.items():
            ys = rng.integers(top, bottom - s + 1, size=n)
            xs = rng.integers(0, w - s + 1, size=n)
            out[split] += [(photo[y : y + s, x : x + s].copy(), c) for y, x in zip(ys, xs)]
    return out


_BUILDERS = {"digits": (_digits, DIGITS_CLASSES), "textures": (_textures, TEXTURE_PHOTOS)}


def _write_imagefolder(target: Path, splits: dict, classes: list[str], name: str) -> None:
    with atomic_dir(target) as tmp:
        for split, items in splits.items():
            for c in classes:
                (tmp / split / c).mkdir(parents=True)
            for i, (image, label) in enumerate(items):
                Image.fromarray(image, mode="L").save(tmp / split / classes[label] / f"{i:05d}.png")
        counts = {split: len(items) for split, items in splits.items()}
        (tmp / "manifest.json").write_text(json.dumps({"name": name, "version": _VERSION, "counts": counts}))


def builtin_downstream_spec(
    name: str, root: str | os.PathLike | None = None, image_size: int | None = None
) -> DatasetSpec:
    """Write built-in set `name` (once) under `root` and return its `DatasetSpec` (train split `train`, eval split
    `test`). Raises `ValueError` for an unknown name."""
    if name not in _BUILDERS:
        raise ValueError(f"Unknown built-in downstream set {name!r}; available: {sorted(_BUILDERS)}.")
    build, classes = _BUILDERS[name]
    target = Path(root) if root is not None else default_root()
    target = target / name
    manifest = target / "manifest.json"
    fresh = manifest.is_file() and json.loads(manifest.read_text()).get("version") == _VERSION
    if not fresh:
        _write_imagefolder(target, build(), classes, name)
    return DatasetSpec(
        name=name,
        task_type="classification",
        format="imagefolder",
        path=str(target),
        split="train",
        eval_split="test",
        label_names=list(classes),
        image_size=image_size,
    )


def resolve_dataset_spec(
    value: Any, image_size: int | None = None, base_dir: str | os.PathLike | None = None
) -> DatasetSpec:
    """A recipe's `dataset:` entry → `DatasetSpec`: `"builtin:<name>"`, `{"builtin": name, "image_size": ...,
    "root": ...}`, a spec dict (see `moe_adapt.data.specs`) or a `DatasetSpec`. `image_size` fills a spec that
    gives none (the model's input size)."""
    if isinstance(value, DatasetSpec):
        spec = value
    elif isinstance(value, str):
        if not value.startswith("builtin:"):
            raise ValueError(
                f"dataset {value!r}: a string names a built-in set as 'builtin:<name>' (one of {sorted(_BUILDERS)}); "
                "describe other data with a spec mapping (name, task_type, format, path, ...)."
            )
        spec = builtin_downstream_spec(value.split(":", 1)[1], image_size=image_size)
    elif isinstance(value, Mapping) and "builtin" in value:
        extra = sorted(set(value) - {"builtin", "image_size", "root"})
        if extra:
            raise ValueError(
                f"dataset {dict(value)!r}: a built-in set takes only builtin, image_size and root; got {extra}."
            )
        spec = builtin_downstream_spec(
            value["builtin"], root=value.get("root"), image_size=value.get("image_size", image_size)
        )
    elif isinstance(value, Mapping):
        spec = DatasetSpec.from_dict(value, base_dir=base_dir)
    else:
        raise ValueError(f"dataset must be 'builtin:<name>', a mapping or a DatasetSpec; got {type(value).__name__}.")
    if spec.image_size is None and image_size is not None:
        spec.image_size = image_size
    return spec


__all__ = ["BUILTIN_DOWNSTREAM", "builtin_downstream_spec", "default_root", "resolve_dataset_spec"]
