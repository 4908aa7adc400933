"""A look at the data: a grid of samples with their class names, boxes or masks, saved as a PNG.

`moe-adapt data show DIR --task NAME --out grid.png [--n 16] [--augment]` draws samples of one task
of a benchmark folder (or spec file). `--augment` shows them through the training transforms, which is
the quickest way to see that crops and flips move the boxes and masks with the image.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write
from .loaders import TaskDataset, load_task_dataset
from .specs import IGNORE_INDEX, DatasetSpec
from .transforms import build_transforms


def _class_colors(n: int) -> np.ndarray:
    import matplotlib

    palette = [c for name in ("tab10", "Dark2", "Set1") for c in matplotlib.colormaps[name].colors]
    return np.array([palette[i % len(palette)][:3] for i in range(n)])


def draw_samples(dataset: TaskDataset, out: str | Path, n: int = 16, seed: int = 0, title: str | None = None) -> Path:
    """Draw `n` random samples (seeded) of `dataset` into a PNG grid at `out`.

    `dataset` must produce pixel values in [0, 1] (build it with `build_transforms(..., normalize=False)`);
    boxes are drawn with their class names, masks as a coloured overlay (255 = ignore and a class
    named "background" are left clear).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False))
    cols = math.ceil(math.sqrt(len(indices)))
    rows = math.ceil(len(indices) / cols)
    colors = _class_colors(dataset.num_labels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows + 0.6), squeeze=False)
    seen: set[int] = set()
    for ax in axes.flat:
        ax.axis("off")
    with torch.random.fork_rng(devices=[]):  # seed the transforms without touching the caller's generator
        torch.manual_seed(seed)
        items = [dataset[int(index)] for index in indices]
    for ax, item in zip(axes.flat, items):
        image = item["pixel_values"].clamp(0, 1).permute(1, 2, 0).numpy()
        ax.imshow(image, interpolation="nearest")
        labels = item["labels"]
        if dataset.task_type == "classification":
            ax.set_title(dataset.label_names[labels], fontsize=8)
        elif dataset.task_type == "detection":
            for box, c in zip(labels["boxes"].tolist(), labels["class_labels"].tolist()):
                x1, y1, x2, y2 = box
                # Box edges are pixel edges; imshow centres pixel (i, j) on (j, i), hence the -0.5.
                ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=1.2, ec=colors[c]))
                ax.text(
                    x1 - 0.5,
                    y1 - 0.5,
                    dataset.label_names[c],
                    color="white",
                    fontsize=6,
                    va="bottom",
                    bbox={"facecolor": colors[c], "alpha": 0.8, "pad": 0.5, "lw": 0},
                )
            ax.set_title(f"image_id {labels['image_id']}", fontsize=7)
        else:
            mask = labels.numpy()
            overlay = np.zeros((*mask.shape, 4))
            valid = mask != IGNORE_INDEX
            present = [int(c) for c in np.unique(mask[valid])]
            if "background" in dataset.label_names:  # leave the background clear, colour the objects
                valid &= mask != dataset.label_names.index("background")
            overlay[valid, :3] = colors[mask[valid]]
            overlay[valid, 3] = 0.45
            ax.imshow(overlay, interpolation="nearest")
            seen.update(present)
            ax.set_title(", ".join(dataset.label_names[c] for c in present), fontsize=6)
    seen.discard(dataset.label_names.index("background") if "background" in dataset.label_names else -1)
    if dataset.task_type == "semantic_segmentation" and seen:
        handles = [Patch(color=colors[c], label=dataset.label_names[c]) for c in sorted(seen)]
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    fig.suptitle(title or f"{dataset.spec.name} ({dataset.split}, {len(dataset)} samples)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05 if dataset.task_type == "semantic_segmentation" else 0, 1, 0.97))
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return out


def show_task(
    spec: DatasetSpec, out: str | Path, split: str | None = None, n: int = 16, augment: bool = False, seed: int = 0
) -> Path:
    """Draw samples of `spec`'s `split` (default: its training split) at native size, or through the
    training transforms with `augment`."""
    transform = build_transforms(spec.task_type, spec.image_size if augment else None, train=augment, normalize=False)
    dataset = load_task_dataset(spec, split, transform=transform)
    what = "training transforms" if augment else "as stored"
    return draw_samples(
        dataset, out, n=n, seed=seed, title=f"{spec.name} ({dataset.split}, {len(dataset)} samples, {what})"
    )
