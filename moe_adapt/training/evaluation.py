"""Evaluation during and after pretraining: each task's metric, and how specialised the routing is.

- `evaluate_task(model, task_data, task)` runs a `MoEViTForMultiTask` on a task's eval split and returns the
  package metric for its type (`accuracy`; COCO box mAP via `coco_map`; `mean_iou`), as plain floats.
- `normalized_task_expert_mi(usages)`: I(T; E) / log T per MoE layer from measured expert usage, where
  P(t, e) = (1/T) · gate_mass_t[e] / Σ_e gate_mass_t[e] (every task weighted equally). 0 = every task routes
  alike; 1 = the expert alone tells which task a token belongs to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from .. import metrics as metric_modules
from ..heads import detection_references, detection_sizes
from ..models.moe_vit.losses import mutual_information_loss

METRIC_FOR = {"classification": "accuracy", "detection": "coco_map", "semantic_segmentation": "mean_iou"}
PRIMARY_METRIC = {"classification": "accuracy", "detection": "map", "semantic_segmentation": "mean_iou"}


@torch.no_grad()
def evaluate_task(model, task_data, task: str | None = None, max_samples: int | None = None) -> dict[str, float]:
    """The metric of `task` (default `task_data.name`) on its eval split: `{name: value}` (scalars only).

    `model`: a `MoEViTForMultiTask` (eval mode is set here and the previous mode restored).
    """
    task = task or task_data.name
    kind = task_data.task_type
    device = next(model.parameters()).device
    kwargs = {"num_labels": len(task_data.label_names)} if kind == "semantic_segmentation" else {}
    metric = metric_modules.load(METRIC_FOR[kind], **kwargs)
    was_training = model.training
    model.eval()
    try:
        for batch in task_data.eval_loader(max_samples):
            labels = batch["labels"]
            out = model(batch["pixel_values"].to(device), task=task, return_dict=True)
            if kind == "classification":
                metric.add_batch(predictions=model.postprocess(out).cpu().tolist(), references=labels.tolist())
            elif kind == "detection":
                input_sizes, target_sizes = detection_sizes(labels)
                preds = model.postprocess(out, target_sizes=target_sizes, input_sizes=input_sizes)
                metric.add_batch(
                    predictions=[{k: v.cpu().tolist() for k, v in p.items()} for p in preds],
                    references=[{k: v.tolist() for k, v in r.items()} for r in detection_references(labels)],
                )
            else:
                sizes = [tuple(mask.shape[-2:]) for mask in labels]
                preds = model.postprocess(out, target_sizes=sizes, input_sizes=[out.input_size] * len(sizes))
                metric.add_batch(predictions=[p.cpu().numpy() for p in preds], references=[m.numpy() for m in labels])
        result = metric.compute()
    finally:
        model.train(was_training)
    return {k: float(v) for k, v in result.items() if np.ndim(v) == 0}


def normalized_task_expert_mi(usages: Mapping, criterion: str = "gate_mass") -> dict[str, float]:
    """I(T; E) / log T for each MoE layer and their mean (`"mean"`), from `{task: ExpertUsage}`.

    Uses the one MI implementation (`mutual_information_loss`, uniform task prior); experts a task cannot route
    to count as zero mass.
    """
    tasks = list(usages)
    if len(tasks) < 2:
        raise ValueError("normalized_task_expert_mi needs the usage of at least two tasks.")
    layers = list(usages[tasks[0]].layers)
    out = {}
    for layer in layers:
        rows = [getattr(usages[t], criterion)[layer].double() for t in tasks]
        width = max(r.numel() for r in rows)
        m = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])
        out[layer] = float(-mutual_information_loss(m, task_prior="uniform")) / math.log(len(tasks))
    out["mean"] = float(np.mean([out[layer] for layer in layers]))
    return out


__all__ = ["METRIC_FOR", "PRIMARY_METRIC", "evaluate_task", "normalized_task_expert_mi"]
