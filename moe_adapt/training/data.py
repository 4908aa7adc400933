"""The pretraining data: each task's datasets, and deterministic batch streams for exact resume.

`load_task_data(config)` reads every task of the recipe (building the mini benchmark first when the config asks
for it) and returns `{task: TaskData}`. `TaskBatchStream(dataset, batch_size, seed, ...)` serves a task's training
batches by draw number: the k-th batch of a task is a pure function of (seed, task, k, rank), so a run resumed at
step s draws exactly what the uninterrupted run drew (the training loop seeds the augmentation RNG per micro-batch
separately).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..data import (
    DatasetSpec,
    TaskDataset,
    augment_options,
    build_mini_benchmark,
    build_transforms,
    collate_fn_for,
    load_specs,
    load_task_dataset,
)
from .config import PretrainConfig


@dataclasses.dataclass
class TaskData:
    """One task's data: training and evaluation datasets (`TaskDataset`) and batch sizes."""

    name: str
    task_type: str
    label_names: list[str]
    train: TaskDataset | None
    eval: TaskDataset | None
    batch_size: int
    eval_batch_size: int

    @property
    def collate_fn(self):
        return collate_fn_for(self.task_type)

    def eval_loader(self, max_samples: int | None = None) -> torch.utils.data.DataLoader:
        """The evaluation split in order (the first `max_samples` items when given)."""
        if self.eval is None:
            raise ValueError(f"Task {self.name!r} has no eval split: set eval_split in its dataset spec.")
        dataset = self.eval
        if max_samples is not None and max_samples < len(dataset):
            dataset = torch.utils.data.Subset(dataset, range(max_samples))
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate_fn
        )


class SeededItems(torch.utils.data.Dataset):
    """`dataset[(index, seed)]` = `dataset[index]` with torch's RNG seeded by `seed` first, so an item's random
    augmentation is the same whichever process (main or DataLoader worker) reads it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        # The CPU generator alone: `torch.manual_seed` also seeds every lazy device backend (~1 ms a call).
        torch.default_generator.manual_seed(seed)
        return self.dataset[index]


class TaskBatchStream:
    """Training batches of one task, addressed by draw number.

    Batches walk through per-epoch permutations (seeded by `(seed, task_index, epoch)`); under data parallelism
    each draw is a global batch of `batch_size · world_size` samples and rank r takes the r-th slice. An epoch
    drops its incomplete last global batch. Item i of draw k is augmented with the seed
    `hash_seed(seed, task_index, k, i, rank)`. `batches(start)` iterates over draws `start, start + 1, ...` through a
    `DataLoader` with `num_workers` workers: the batches are identical for any `num_workers`.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        collate_fn,
        seed: int = 0,
        task_index: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ):
        self.dataset, self.batch_size, self.collate_fn = dataset, int(batch_size), collate_fn
        self.seed, self.task_index, self.rank, self.world_size = int(seed), int(task_index), int(rank), int(world_size)
        self.num_workers = int(num_workers)
        self.global_batch = self.batch_size * self.world_size
        self.batches_per_epoch = max(1, len(dataset) // self.global_batch)
        self._epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(hash_seed(self.seed, self.task_index, epoch))
            n = len(self.dataset)
            perm = torch.randperm(n, generator=g)
            if n < self.global_batch:  # tiny dataset: repeat it to fill one global batch
                perm = perm.repeat((self.global_batch + n - 1) // n)
            self._epoch, self._perm = epoch, perm
        return self._perm

    def indices(self, draw: int) -> list[int]:
        """Dataset indices of this rank's share of draw number `draw`."""
        epoch, within = divmod(int(draw), self.batches_per_epoch)
        start = within * self.global_batch + self.rank * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size].tolist()

    def keys(self, draw: int) -> list[tuple[int, int]]:
        """`(index, augmentation seed)` of every item of this rank's share of draw `draw`."""
        return [
            (i, hash_seed(self.seed, self.task_index, draw, j, self.rank)) for j, i in enumerate(self.indices(draw))
        ]

    def batch(self, draw: int) -> dict[str, Any]:
        """Draw `draw`, read in this process."""
        items = SeededItems(self.dataset)
        return self.collate_fn([items[key] for key in self.keys(draw)])

    def batches(self, start: int = 0):
        """Iterator over draws `start, start + 1, ...` (prefetched by `num_workers` DataLoader workers)."""

        def plan():
            draw = start
            while True:
                yield self.keys(draw)
                draw += 1

        loader = torch.utils.data.DataLoader(
            SeededItems(self.dataset),
            batch_sampler=plan(),
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
        )
        return iter(loader)


def hash_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (stable across processes and Python versions)."""
    import numpy as np

    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


def resolve_specs(config: PretrainConfig, main_process: bool = True) -> dict[str, DatasetSpec]:
    """The dataset specs the recipe names. With `data.mini`, builds the mini benchmark into `data.mini.out` when
    it has no `specs.yaml` yet (only on the main process; call again on the others after a barrier)."""
    data = config.data
    if data.mini is not None:
        out = Path(data.mini["out"]).expanduser()
        if not (out / "specs.yaml").is_file():
            if not main_process:
                raise FileNotFoundError(f"The mini benchmark at {out} is not built yet (the main process builds it).")
            print(
                f"Building the mini benchmark into {out} (small={bool(data.mini.get('small', False))}) ...", flush=True
            )
            build_mini_benchmark(
                out, seed=int(data.mini.get("seed", 0)), small=bool(data.mini.get("small", False)), force=out.exists()
            )
        return load_specs(out / "specs.yaml")
    if isinstance(data.specs, (str, Path)):
        return load_specs(Path(data.specs).expanduser())
    return load_specs(data.specs)


def task_spec(config: PretrainConfig, specs: Mapping[str, DatasetSpec], task: str) -> DatasetSpec:
    """The spec of `task` with the recipe's per-task `image_size` override applied."""
    if task not in specs:
        raise ValueError(f"Task {task!r} of the recipe has no dataset spec; the specs define {sorted(specs)}.")
    spec, settings = specs[task], config.tasks[task]
    changes = {}
    if settings.image_size is not None:
        changes["image_size"] = settings.image_size
    return dataclasses.replace(spec, **changes) if changes else spec


def load_task_data(
    config: PretrainConfig, main_process: bool = True, splits: tuple[str, ...] = ("train", "eval")
) -> dict[str, TaskData]:
    """Read every task of the recipe: `{task: TaskData}` in the recipe's task order."""
    specs = resolve_specs(config, main_process)
    out = {}
    for task, settings in config.tasks.items():
        spec = task_spec(config, specs, task)
        train_tf = build_transforms(spec.task_type, spec.image_size, train=True, **augment_options(settings.augment))
        train = load_task_dataset(spec, split=spec.split, transform=train_tf) if "train" in splits else None
        evaluation = None
        if "eval" in splits and spec.eval_split:
            evaluation = load_task_dataset(spec, split=spec.eval_split, transform="eval")
        names = (train or evaluation).label_names if (train or evaluation) is not None else list(spec.label_names or [])
        out[task] = TaskData(
            name=task,
            task_type=spec.task_type,
            label_names=list(names),
            train=train,
            eval=evaluation,
            batch_size=settings.batch_size,
            eval_batch_size=settings.eval_batch_size or 2 * settings.batch_size,
        )
    return out


__all__ = ["SeededItems", "TaskBatchStream", "TaskData", "hash_seed", "load_task_data", "resolve_specs", "task_spec"]
