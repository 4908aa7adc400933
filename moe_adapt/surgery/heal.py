"""Heal a slice toward its parent on unlabelled calibration images: `heal_submodel(parent, submodel, data)`.

A slice that keeps k experts per layer computes exactly what its parent computes while the parent's routing stays
inside the kept set; tokens whose parent routing used a dropped expert get the kept experts only. When a task's
routing is still spread (a short pretraining, a weak modularity loss), that costs quality. Healing fits a few
tensors of the slice so that its backbone output matches the parent's on calibration images (distillation: no
labels, no new parameters, the slice's size and speed unchanged), through the one training loop (`moe_adapt.training.loop.train_loop`).
The groups (`train`):

- `routers`: the kept router rows (in a layer that kept exactly k experts they only scale each expert's block),
- `norms`: the LayerNorms' weights and biases,
- `biases`: every bias of the backbone (attention, MLP and expert biases),
- `weights`: everything else of the backbone (projection matrices, expert tensors, embeddings).

The default fits the first three (about 1.5% of the mini slice's parameters, lr 3e-3); adding `weights`
distills the whole backbone (lr 3e-4 by default). With 600 steps on 2,048 calibration images that brought every
task's k-expert slice to 99.3–100.6% of its parent's metric on both mini models (the small groups alone left the
classification slice at 98.5%; at lr 1e-4 with 256 images the longer-trained model's fashion slice stayed at 97%). Adam on the mean squared difference
of the last hidden states (every token, every image), for `steps` steps of `batch_size` images drawn from the
calibration batches; the task heads stay as they are. If the fit does not lower the loss on the calibration images,
the slice is put back as it was (`HealReport.restored`). The result is no longer bit-identical to the parent where
routing stays inside the kept set: it is a better approximation on the calibration distribution; `verify_submodel`
measures both.

```python
>>> import torch
>>> from moe_adapt import MoEViTConfig, MoEViTForImageClassification
>>> from moe_adapt.analysis import collect_expert_usage, select_experts
>>> from moe_adapt.surgery import extract_submodel, heal_submodel
>>> parent = MoEViTForImageClassification(MoEViTConfig.from_preset("tiny", tasks=["a"])).eval()
>>> images = [torch.randn(8, 3, 32, 32)]
>>> sub = extract_submodel(parent, select_experts(collect_expert_usage(parent, images, task="a")), tasks=["a"])
>>> report = heal_submodel(parent, sub, images, steps=5)
>>> report.steps, report.loss_after <= report.loss_before
(5, True)
```
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from transformers import get_scheduler

from ..analysis.usage import iter_pixel_batches
from ..models.moe_vit import find_backbone
from ..training.loop import adamw, train_loop
from .verify import slice_tasks

__all__ = ["DEFAULT_HEAL_GROUPS", "HEAL_GROUPS", "HealReport", "heal_submodel", "healable_parameters"]

#: what `heal_submodel` may train: router rows, LayerNorms, biases, and every other backbone tensor ("weights")
HEAL_GROUPS = ("routers", "norms", "biases", "weights")
#: what it trains unless told: the small tensors
DEFAULT_HEAL_GROUPS = ("routers", "norms", "biases")
#: the learning rate unless given: for the small groups, and once `weights` are in
DEFAULT_HEAL_LR = {"small": 3e-3, "weights": 3e-4}


@dataclass
class HealReport:
    """What `heal_submodel` did: `steps`, `lr`, `batch_size`, `train` (the groups), `trained_params` (count),
    `images` (calibration images per task), and the mean squared difference of the last hidden states to the
    parent's on all calibration images, `loss_before` / `loss_after` (averaged over tasks) and per task.
    `restored`: the fit did not lower that loss, so the slice's tensors were put back as they were."""

    steps: int
    lr: float
    batch_size: int
    train: list[str]
    trained_params: int
    images: dict[str, int] = field(default_factory=dict)
    loss_before: float = 0.0
    loss_after: float = 0.0
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)
    restored: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _heal_groups(train: str | Iterable[str]) -> tuple[str, ...]:
    """`train` (one group name or several) as a tuple, checked against `HEAL_GROUPS`."""
    train = (train,) if isinstance(train, str) else tuple(train)
    unknown = [g for g in train if g not in HEAL_GROUPS]
    if unknown or not train:
        raise ValueError(f"heal_submodel: train={list(train)!r}; choose a non-empty subset of {list(HEAL_GROUPS)}.")
    return train


def healable_parameters(backbone: nn.Module, train: Iterable[str] = DEFAULT_HEAL_GROUPS) -> dict[str, nn.Parameter]:
    """The backbone's floating-point parameters of the chosen groups: `{name: parameter}`."""
    train = _heal_groups(train)
    norms = {n for n, m in backbone.named_modules() if isinstance(m, nn.LayerNorm)}
    chosen = {}
    for name, p in backbone.named_parameters():
        if not p.is_floating_point():
            continue
        if ".router.routers." in f".{name}":
            group = "routers"
        elif name.rpartition(".")[0] in norms:
            group = "norms"
        elif name.endswith("bias") or name.endswith("_bias"):
            group = "biases"
        else:
            group = "weights"
        if group in train:
            chosen[name] = p
    return chosen


def _task_batches(data, tasks: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for t in tasks:
        if isinstance(data, Mapping) and t not in data:
            raise ValueError(f"heal_submodel: no calibration data for task {t!r} (data has {sorted(data)}).")
        batches = list(iter_pixel_batches(data[t] if isinstance(data, Mapping) else data))
        if not batches:
            raise ValueError(f"heal_submodel: the calibration data of task {t!r} is empty.")
        shapes = {tuple(b.shape[1:]) for b in batches}
        if len(shapes) > 1:
            raise ValueError(
                f"heal_submodel: task {t!r}'s calibration batches have different image shapes {sorted(shapes)}."
            )
        out[t] = torch.cat(batches)
    return out


def _round_robin(tasks: list[str], pixels: dict[str, torch.Tensor], batch_size: int, seed: int, device, start: int):
    """Yield `(task, image indices)` from step `start` on: round robin over `tasks`, one random batch of
    `batch_size` images (fewer if the task has fewer) of one task per step, drawn by a generator seeded with `seed`
    (the draws before `start` are made and skipped: a step's batch depends only on the step)."""
    generator = torch.Generator().manual_seed(seed)
    for step in itertools.count():
        t = tasks[step % len(tasks)]
        idx = torch.randint(0, len(pixels[t]), (min(batch_size, len(pixels[t])),), generator=generator).to(device)
        if step >= start:
            yield t, idx


def _fit_only(backbone: nn.Module, params: dict[str, nn.Parameter], lr: float, device, steps, batches_from, loss_fn):
    """Train only `params` of `backbone` for `steps` steps of `train_loop` (Adam at `lr`, constant schedule), then
    put every parameter's `requires_grad` back as it was and clear the gradients, even when training fails."""
    flags = {name: p.requires_grad for name, p in backbone.named_parameters()}
    try:
        for name, p in backbone.named_parameters():
            p.requires_grad_(name in params)
        # the caller leaves it in eval mode: no dropout, the function the slice computes at inference; Adam = AdamW, no decay
        accelerator = Accelerator(device_placement=False)
        optimizer = adamw(list(params.values()), device, lr=lr, weight_decay=0.0)
        train_loop(
            backbone,
            optimizer,
            get_scheduler("constant", optimizer),
            batches_from,
            loss_fn,
            accelerator,
            max_steps=steps,
            progress_bar=False,
            desc="heal",
        )
    finally:
        for name, p in backbone.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None


def heal_submodel(
    parent: nn.Module,
    submodel: nn.Module,
    data: Iterable | Mapping[str, Iterable],
    tasks: list[str] | None = None,
    *,
    steps: int = 300,
    lr: float | None = None,
    batch_size: int = 32,
    train: Iterable[str] = DEFAULT_HEAL_GROUPS,
    seed: int = 0,
) -> HealReport:
    """Fit `submodel`'s router rows, LayerNorms and biases (in place; with `"weights"` in `train`, its whole backbone)
    so that its last hidden states match `parent`'s on calibration images.

    Args:
        parent, submodel: the parent and its slice (task models or bare backbones), on the same device.
        data: `{task: iterable of batches}`, or one iterable used for every task; batches as for
            `collect_expert_usage` (labels are ignored). Each task's images are kept in memory.
        tasks: the tasks to heal toward (round robin, one batch of one task per step); default the slice's tasks.
        steps, lr, batch_size: Adam steps, learning rate and images per step; `lr` defaults to 3e-3, or 3e-4 once
            `"weights"` are trained.
        train: which groups of `HEAL_GROUPS` to fit (default `DEFAULT_HEAL_GROUPS`).
        seed: seeds the batch draws.

    Returns:
        a [`HealReport`] with the distillation loss before and after.

    Raises:
        ValueError: a task the slice or the parent lacks, empty calibration data, `steps < 1`, or an unknown group.
    """
    if steps < 1:
        raise ValueError(f"heal_submodel: steps must be at least 1, got {steps}.")
    train = _heal_groups(train)
    if lr is None:
        lr = DEFAULT_HEAL_LR["weights" if "weights" in train else "small"]
    sub_backbone, _ = find_backbone(submodel)
    parent_backbone, _ = find_backbone(parent)
    tasks = slice_tasks(parent, submodel, tasks)
    params = healable_parameters(sub_backbone, train)
    first = next(sub_backbone.parameters())
    device = first.device
    pixels = {t: p.to(device=device, dtype=first.dtype) for t, p in _task_batches(data, tasks).items()}

    @torch.no_grad()
    def targets_of(model, t):
        return torch.cat([model(x, task=t, return_dict=True).last_hidden_state for x in pixels[t].split(batch_size)])

    def loss_on_all(t, target):
        return F.mse_loss(targets_of(sub_backbone, t), target).item()

    was_training = (parent_backbone.training, sub_backbone.training)
    original = {name: p.detach().clone() for name, p in params.items()}
    parent_backbone.eval()
    sub_backbone.eval()
    targets = {t: targets_of(parent_backbone, t) for t in tasks}
    before = {t: loss_on_all(t, targets[t]) for t in tasks}

    def batches_from(start):  # round robin over the tasks, one random batch of one task per step
        return _round_robin(tasks, pixels, batch_size, seed, device, start)

    def distillation_loss(model, batch):
        t, idx = batch
        return F.mse_loss(
            model(pixels[t].index_select(0, idx), task=t, return_dict=True).last_hidden_state,
            targets[t].index_select(0, idx),
        )

    _fit_only(sub_backbone, params, lr, device, steps, batches_from, distillation_loss)
    after = {t: loss_on_all(t, targets[t]) for t in tasks}
    restored = sum(after.values()) >= sum(before.values())
    if restored:  # healing did not help on the calibration images (e.g. the slice was exact already): undo it
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(original[name])
        after = dict(before)
    parent_backbone.train(was_training[0])
    sub_backbone.train(was_training[1])
    return HealReport(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        train=list(train),
        trained_params=sum(p.numel() for p in params.values()),
        images={t: len(pixels[t]) for t in tasks},
        loss_before=sum(before.values()) / len(tasks),
        loss_after=sum(after.values()) / len(tasks),
        per_task={t: {"loss_before": before[t], "loss_after": after[t]} for t in tasks},
        restored=restored,
    )
