"""Evaluation during and after pretraining: each task's metric, and how specialised the routing is.

- `evaluate_task(model, task_data, task)`: `moe_adapt.metrics.evaluate` on a task's eval split (`TaskData`), the
  first `max_samples` images when given.
- `normalized_task_expert_mi(usages)`: I(T; E) / log T per MoE layer from measured expert usage, where
  P(t, e) = (1/T) · gate_mass_t[e] / Σ_e gate_mass_t[e] (every task weighted equally). 0 = every task routes
  alike; 1 = the expert alone tells which task a token belongs to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from ..metrics import METRIC_FOR, PRIMARY_METRIC, EvaluationResult, evaluate
from ..models.moe_vit.losses import mutual_information_loss


def evaluate_task(model, task_data, task: str | None = None, max_samples: int | None = None) -> EvaluationResult:
    """`moe_adapt.metrics.evaluate` of `model` on `task` (default `task_data.name`) over `task_data`'s eval split."""
    return evaluate(model, task_data.eval_loader(max_samples), task or task_data.name)


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
