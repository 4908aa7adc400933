"""The one evaluator: `evaluate(model, data, task)` scores any moe_adapt task model on one task's labelled batches.

Every place that reports a task metric (pretraining's evaluation, fine-tuning, budget curves, slice verification)
goes through here, so a number means the same thing everywhere:

1. the model runs each batch for `task` (`model(pixel_values=..., task=task)`), under `torch.inference_mode()` and
   in eval mode (each module's previous mode is restored afterwards);
2. its own `postprocess` turns the outputs into predictions: class ids; per image `{"boxes", "scores", "labels"}`
   in the original image's pixels (`labels[i]["orig_size"]`); per image a class map at the label mask's size;
3. the batch's labels become the metric's references (`moe_adapt.heads.metric_references`), and both go to the
   task type's metric module (`METRIC_FOR`: `accuracy`, `coco_map`, `mean_iou`, see `moe_adapt.metrics.load`).

The result is an [`EvaluationResult`]: a plain `dict[str, float]` of the module's scalar outputs (`accuracy`;
`map`, `map_50`, `map_75`, ..., `mar_100`; `mean_iou`, `mean_accuracy`, `overall_accuracy`) that also names its
headline number: `result.primary` is the metric's name (`PRIMARY_METRIC[task_type]`: `accuracy`, `map`,
`mean_iou`) and `result.score` its value. Being a dict of floats, it goes to JSON or a logger as it is.

```python
>>> from moe_adapt.metrics import evaluate
>>> result = evaluate(model, eval_loader, "fashion-seg")          # batches as moe_adapt.data collates them
>>> result.primary, round(result.score, 3), round(result["overall_accuracy"], 3)
('mean_iou', 0.412, 0.871)
```

`TaskMetric` is the same thing one batch at a time, for callers that run the model themselves (slice
verification feeds it the outputs it already has).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..heads.postprocess import detection_references, detection_sizes

METRIC_FOR = {"classification": "accuracy", "detection": "coco_map", "semantic_segmentation": "mean_iou"}
PRIMARY_METRIC = {"classification": "accuracy", "detection": "map", "semantic_segmentation": "mean_iou"}


class EvaluationResult(dict):
    """`{metric: float}` for one task, plus `task`, `task_type`, `primary` (the headline metric's name),
    `score` (its value) and `num_samples` (images scored). A `dict` subclass: `json.dumps`, pickle and `==` treat it
    as the plain dict; `yaml.safe_dump` wants `dict(result)`."""

    def __init__(self, values: Mapping[str, float], task: str, task_type: str, num_samples: int):
        super().__init__(values)
        self.task = task
        self.task_type = task_type
        self.primary = PRIMARY_METRIC[task_type]
        self.num_samples = num_samples

    @property
    def score(self) -> float:
        return self[self.primary]

    def __repr__(self) -> str:
        return f"EvaluationResult(task={self.task!r}, primary={self.primary!r}, {dict.__repr__(self)})"


def task_model_of(model: nn.Module) -> nn.Module:
    """The moe_adapt task model inside `model`: unwraps DDP / DeepSpeed / `torch.compile` wrappers and peft's
    `PeftModel`; an error when what is left has no task heads (a bare backbone cannot be scored)."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)
    if hasattr(inner, "get_base_model"):  # peft.PeftModel (peft is not imported unless the model uses it)
        inner = inner.get_base_model()
    if not (hasattr(inner, "postprocess") and isinstance(getattr(inner, "heads", None), nn.ModuleDict)):
        raise ValueError(
            f"evaluate needs a moe_adapt task model (with heads and postprocess), got {type(inner).__name__}; "
            "load the checkpoint with MoEViTForMultiTask or the task type's class instead of the bare backbone."
        )
    return inner


class TaskMetric:
    """The metric of one task, fed batch by batch: `add_batch(outputs, labels)` with the model's forward outputs for
    `task` and the batch's labels (as `moe_adapt.data.collate_fn_for` makes them); `compute()` →
    [`EvaluationResult`]. With an `accelerator`, each batch's predictions and references are gathered from every
    process first (`accelerator.gather_for_metrics`, which drops the samples padding the last batch), so every
    process computes the metric over the whole dataset.

    Args:
        model: a task model (or one wrapped by peft / accelerate) that has a head for `task`.
        task: the task's name (an error names the model's tasks when it has no head for it).
        accelerator: an `accelerate.Accelerator`, or None for one process.
    """

    def __init__(self, model: nn.Module, task: str, accelerator=None):
        from . import load

        self.model = task_model_of(model)
        tasks = list(self.model.heads)
        if task not in tasks:
            raise ValueError(f"evaluate: {type(self.model).__name__} has no task {task!r}; its tasks are {tasks}.")
        self.task = task
        self.task_type = self.model.config.task_types.get(task, "classification")
        self.accelerator = accelerator
        options = (
            {"num_labels": self.model.config.num_labels_for(task)} if self.task_type == "semantic_segmentation" else {}
        )
        self.metric = load(METRIC_FOR[self.task_type], **options)
        self.num_samples = 0

    def predictions_and_references(self, outputs, labels) -> tuple[list, list]:
        """One batch → (predictions, references), one entry per image, as plain numpy / Python values."""
        kind = self.task_type
        if kind == "classification":
            preds = self.model.postprocess(outputs)
            return preds.cpu().numpy().tolist(), torch.as_tensor(labels).reshape(-1).cpu().numpy().tolist()
        if kind == "detection":
            missing = [i for i, t in enumerate(labels) if "size" not in t]
            if missing:
                raise ValueError(
                    f"evaluate: detection target {missing[0]} of a batch has no 'size' (the (h, w) of "
                    "its image in pixel_values); collate detection items with moe_adapt.data."
                )
            input_sizes, target_sizes = detection_sizes(labels)
            preds = self.model.postprocess(outputs, target_sizes=target_sizes, input_sizes=input_sizes)
            refs = detection_references(labels)
            return (
                [{k: v.cpu().numpy() for k, v in p.items()} for p in preds],
                [{k: v.cpu().numpy() for k, v in r.items()} for r in refs],
            )
        masks = list(labels)
        preds = self.model.postprocess(outputs, target_sizes=[tuple(m.shape[-2:]) for m in masks])
        return [p.cpu().numpy() for p in preds], [m.cpu().numpy() for m in masks]

    def add_batch(self, outputs, labels) -> None:
        preds, refs = self.predictions_and_references(outputs, labels)
        if self.accelerator is not None:
            pairs = self.accelerator.gather_for_metrics(list(zip(preds, refs)), use_gather_object=True)
            preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
        self.metric.add_batch(predictions=preds, references=refs)
        self.num_samples += len(preds)

    def compute(self) -> EvaluationResult:
        if self.num_samples == 0:
            raise ValueError(f"evaluate: the data of task {self.task!r} gave no labelled sample to score.")
        values = self.metric.compute()
        scalars = {k: float(v) for k, v in values.items() if np.ndim(v) == 0}
        return EvaluationResult(scalars, self.task, self.task_type, self.num_samples)


def _batch_parts(batch: Any, index: int, task: str) -> tuple[torch.Tensor, Any]:
    if not (isinstance(batch, Mapping) and "pixel_values" in batch and "labels" in batch):
        what = f"a dict with keys {sorted(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
        raise ValueError(
            f"evaluate: batch {index} of task {task!r} is {what}; expected a dict with 'pixel_values' "
            "and 'labels' (collate items with moe_adapt.data.collate_fn_for)."
        )
    return batch["pixel_values"], batch["labels"]


def evaluate(
    model: nn.Module,
    data: Iterable[Mapping[str, Any]],
    task: str,
    *,
    max_batches: int | None = None,
    max_samples: int | None = None,
    accelerator=None,
) -> EvaluationResult:
    """Score `model` on `task` over `data`: the task type's metric → [`EvaluationResult`] (see the module docstring).

    Args:
        model: a moe_adapt task model (`MoEViTForMultiTask`, a task type's class, a slice from `extract_submodel`),
            possibly wrapped by peft (LoRA) or `accelerator.prepare`; it must have a head for `task`.
        data: a DataLoader or any iterable of batches `{"pixel_values": [B, 3, H, W], "labels": ...}` as
            `moe_adapt.data.collate_fn_for(task_type)` makes them (class ids `[B]`; a list of detection targets
            with `boxes`, `class_labels`, `size`, `orig_size`; masks `[B, H, W]` with 255 = ignore).
        task: the task's name in the model's config.
        max_batches: score at most this many batches.
        max_samples: score at most this many images (the batch that crosses the limit is cut); with an
            accelerator, counted on each process before gathering.
        accelerator: an `accelerate.Accelerator` whose processes each hold a shard of `data` (a prepared
            DataLoader); every process returns the metric over all shards.

    Pixels are moved to the model's device and floating dtype; labels stay where the loader put them.
    """
    metric = TaskMetric(model, task, accelerator)
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    device, dtype = (first.device, first.dtype) if first is not None else (None, None)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    seen = 0
    try:
        with torch.inference_mode():
            for index, batch in enumerate(data):
                if (max_batches is not None and index >= max_batches) or (
                    max_samples is not None and seen >= max_samples
                ):
                    break
                pixels, labels = _batch_parts(batch, index, task)
                if max_samples is not None and seen + len(pixels) > max_samples:
                    pixels, labels = pixels[: max_samples - seen], labels[: max_samples - seen]
                seen += len(pixels)
                outputs = model(pixel_values=pixels.to(device=device, dtype=dtype), task=task, return_dict=True)
                metric.add_batch(outputs, labels)
    finally:
        for module, training in modes.items():
            module.training = training
    return metric.compute()


__all__ = ["METRIC_FOR", "PRIMARY_METRIC", "EvaluationResult", "TaskMetric", "evaluate", "task_model_of"]
