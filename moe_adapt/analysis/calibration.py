"""Calibration data from a dataset spec: the batches `collect_expert_usage` and `verify_submodel` run on.

`SPEC` is what `moe_adapt.data.load_specs` reads: a YAML (or JSON) file of dataset specs, or a folder holding
`specs.yaml` such as the mini benchmark built by `moe-adapt data mini --out DIR`. The dataset is the spec named
like the task (or the only spec in the file, or the one named explicitly).
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Subset

__all__ = ["calibration_loader", "resolve_spec"]


def resolve_spec(source: str | os.PathLike, task: str, dataset: str | None = None):
    """The `DatasetSpec` for `task` in `source` (see the module docstring)."""
    from ..data import load_specs

    specs = load_specs(source)
    name = dataset or task
    if name in specs:
        return specs[name]
    if dataset is None and len(specs) == 1:
        return next(iter(specs.values()))
    raise ValueError(
        f"{source} has no dataset named {name!r} (it has {list(specs)}); name the dataset of task {task!r} with "
        f"--dataset {task}=NAME."
    )


def calibration_loader(
    source: str | os.PathLike,
    task: str,
    *,
    split: str = "train",
    dataset: str | None = None,
    batch_size: int = 32,
    max_images: int | None = 256,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over up to `max_images` images (a seeded random subset) of `task`'s dataset.

    `split`: `"train"` (the spec's training split), `"eval"` (its eval split, else the training split) or a split
    name. Images get the spec's eval transforms; batches are the collated dicts of `moe_adapt.data`.
    """
    from ..data import collate_fn_for, load_task_dataset

    spec = resolve_spec(source, task, dataset)
    split_name = {"train": spec.split, "eval": spec.eval_split or spec.split}.get(split, split)
    ds = load_task_dataset(spec, split=split_name, transform="eval")
    if len(ds) == 0:
        raise ValueError(f"Dataset {spec.name!r}, split {split_name!r} is empty: no calibration images.")
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images={max_images} leaves no calibration images; give at least 1.")
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:max_images]
        ds = Subset(ds, sorted(order.tolist()))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_fn_for(spec.task_type))
