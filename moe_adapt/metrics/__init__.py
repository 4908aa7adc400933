"""Metrics shipped with moe_adapt as local `evaluate` modules (no Hub access needed), and the one evaluator.

`evaluate(model, data, task)` scores a task model on one task's labelled batches with its task type's module
(`METRIC_FOR`) and returns `{metric: float}` whose `.primary` / `.score` name the headline number
(`PRIMARY_METRIC`); see `moe_adapt/metrics/evaluate.py`. Everything in moe_adapt that reports a metric calls it.

`load(name, **kwargs)` returns an `evaluate.EvaluationModule` with the usual `add_batch(predictions=...,
references=...)` / `compute(...)`:

- `"accuracy"`: predictions / references are class ids; returns `accuracy`.
- `"mean_iou"`: [H, W] class maps per image; `num_labels` (required), `ignore_index` (default 255); returns
  `mean_iou`, `mean_accuracy`, `overall_accuracy`, `per_category_iou`, `per_category_accuracy`.
- `"coco_map"`: per image `{"boxes": [[x1, y1, x2, y2]...], "scores", "labels"}` predictions and
  `{"boxes", "labels"}` references in original-image pixels; returns `map`, `map_50`, `map_75`, `map_small`,
  `map_medium`, `map_large`, `mar_1`, `mar_10`, `mar_100`, ... (`class_metrics=True` adds `map_per_class`).

The modules' own docstrings (`modules/<name>/<name>.py`) give the exact formulas and conventions.

```python
>>> from moe_adapt import metrics
>>> miou = metrics.load("mean_iou", num_labels=11)
>>> miou.add_batch(predictions=pred_masks, references=label_masks)
>>> miou.compute()["mean_iou"]
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODULES_DIR = Path(__file__).parent / "modules"
METRICS = ("accuracy", "mean_iou", "coco_map")


def load(name: str, **kwargs: Any):
    """Load one of `METRICS` from the package by path, offline.

    Keyword arguments go to the module: `num_labels` / `ignore_index` for `mean_iou` (defaults for
    `compute`, which can override them), or evaluate's own (`experiment_id`, `num_process`, ...).
    Data is kept in memory unless `keep_in_memory=False` is passed (needed for `num_process > 1`).
    """
    import evaluate

    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; moe_adapt ships {list(METRICS)}")
    kwargs.setdefault("keep_in_memory", kwargs.get("num_process", 1) == 1)
    return evaluate.load(str(MODULES_DIR / name / f"{name}.py"), **kwargs)


# Imported last: `evaluate.py` reads `load` from this package. `moe_adapt.metrics.evaluate` is the function below (the
# submodule stays reachable as `sys.modules["moe_adapt.metrics.evaluate"]`, or by importing its names from it).
from .evaluate import METRIC_FOR, PRIMARY_METRIC, EvaluationResult, TaskMetric, evaluate, task_model_of  # noqa: E402

__all__ = [
    "METRICS",
    "METRIC_FOR",
    "MODULES_DIR",
    "PRIMARY_METRIC",
    "EvaluationResult",
    "TaskMetric",
    "evaluate",
    "load",
    "task_model_of",
]
