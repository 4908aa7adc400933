"""Compute budget: a task's metric against its active FLOPs per image, over top-k settings.

A MoE ViT's cost at inference is set by how many experts each token runs. `budget_curve` sets a top-k override with
`model.set_routing(task, top_k=...)` (the model-level control, restored afterwards), counts FLOPs with the one
counter (`moe_adapt.flops.flops_per_image`) and evaluates the task at every setting; `plot_budget_curve` draws the
curve (PNG). Given labelled batches, each setting is scored by `moe_adapt.metrics.evaluate` (the task type's
primary metric: accuracy, COCO mAP or mean IoU); given a function, by that function. `moe-adapt inspect MODEL --data
SPEC --task T --budget` does both from the command line.

```python
>>> curve = budget_curve(model, "cls", eval_loader)          # or evaluate=lambda m: my_score(m)
>>> [(p.top_k, round(p.gflops, 3), p.metric) for p in curve.points]
>>> plot_budget_curve(curve, "budget_cls.png")
```
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..flops import flops_per_image
from ..io import atomic_write, atomic_write_json
from ..metrics import evaluate as evaluate_metric
from ..models.moe_vit import find_backbone

__all__ = [
    "BudgetCurve",
    "BudgetPoint",
    "budget_curve",
    "budget_from_args",
    "default_top_k_sweep",
    "parse_top_k_list",
    "plot_budget_curve",
]


@dataclass
class BudgetPoint:
    """One setting: `top_k` (`{"attn": k, "mlp": k}`), FLOPs per image (total and GFLOPs), the metric's value."""

    top_k: dict[str, int]
    flops: int
    gflops: float
    metric: float
    is_default: bool = False


@dataclass
class BudgetCurve:
    """`points` sorted by FLOPs; `metric_name`; `task`; `image_size` the FLOPs are counted at."""

    task: str
    metric_name: str
    points: list[BudgetPoint] = field(default_factory=list)
    image_size: list[int] | None = None

    def to_dict(self) -> dict:
        return {
            "format": "moe_adapt.budget_curve",
            "task": self.task,
            "metric_name": self.metric_name,
            "image_size": self.image_size,
            "points": [asdict(p) for p in self.points],
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_json(path, self.to_dict(), indent=2)
        return path


def _kind_limits(config, task: str) -> dict[str, tuple[int, int]]:
    """`{kind: (default k, largest k valid in every MoE layer of that kind for task)}` for the kinds present."""
    limits = {}
    for kind in ("attn", "mlp"):
        sizes = [config.router_size(task, kind, i) for i, c in enumerate(getattr(config, f"{kind}_experts")) if c]
        if sizes:
            limits[kind] = (getattr(config, f"{kind}_top_k"), min(sizes))
    return limits


def default_top_k_sweep(config, task: str) -> list[dict[str, int]]:
    """Top-k settings from one expert per token up to every expert, scaling each kind's k in proportion to its
    default (so the default setting is on the curve): for step s, k_kind = round(s · k_kind / g) with g the gcd
    of the defaults, capped at the kind's expert count; plus `{kind: 1}` (the cheapest)."""
    limits = _kind_limits(config, task)
    if not limits:
        raise ValueError("This model has no MoE layer: there is no top-k to vary.")
    from math import gcd

    g = 0
    for default, _ in limits.values():
        g = gcd(g, default)
    settings = [{kind: 1 for kind in limits}]
    step = 1
    while True:
        point = {kind: max(1, min(cap, int(step * default / g + 0.5))) for kind, (default, cap) in limits.items()}
        if point not in settings:
            settings.append(point)
        if all(point[kind] == cap for kind, (_, cap) in limits.items()):
            return settings
        step += 1


def _as_setting(top_k, config, task: str) -> dict[str, int]:
    limits = _kind_limits(config, task)
    if isinstance(top_k, Mapping):
        unknown = set(top_k) - {"attn", "mlp"}
        if unknown:
            raise ValueError(f"top_k settings take the keys 'attn' and 'mlp'; got {sorted(unknown)}.")
        setting = {kind: int(top_k.get(kind, default)) for kind, (default, _) in limits.items()}
    else:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise ValueError(f"A top-k setting is an int or {{'attn': k, 'mlp': k}}; got {top_k!r}.")
        setting = {kind: int(top_k) for kind in limits}
    return setting


def budget_curve(
    model: nn.Module,
    task: str,
    evaluate: Callable[[nn.Module], float] | Iterable,
    top_ks: Sequence[int | Mapping[str, int]] | None = None,
    image_size: int | tuple[int, int] | None = None,
    metric_name: str | None = None,
) -> BudgetCurve:
    """Metric and active FLOPs per image of `task` at every top-k setting.

    Args:
        model: a MoE ViT (bare or a task model; a task model when `evaluate` is labelled batches).
        task: the task to measure.
        evaluate: `fn(model) -> float` run with the setting in place, or labelled batches (a DataLoader as
            `moe_adapt.data` collates them) scored by `moe_adapt.metrics.evaluate` (the task type's primary metric).
        top_ks: ints (the same k for attention and MLP experts) or `{"attn": k, "mlp": k}`; default
            `default_top_k_sweep`.
        image_size: the size FLOPs are counted at (default `config.image_size`).
        metric_name: the name to plot (default: the primary metric's name with batches, else "metric").

    The task's model-level routing setting is replaced while measuring and restored afterwards; an invalid
    setting (0, above the expert count) raises the model's own `ValueError` before anything is evaluated.
    """
    backbone, _ = find_backbone(model)
    config = backbone.config
    task = config.tasks[config.task_index(task)]
    settings = [
        _as_setting(k, config, task) for k in (top_ks if top_ks is not None else default_top_k_sweep(config, task))
    ]
    if not settings:
        raise ValueError("budget_curve needs at least one top-k setting.")
    for setting in settings:
        backbone.routing_plan(task, top_k=setting)  # validates every setting first
    default = {kind: d for kind, (d, _) in _kind_limits(config, task).items()}
    previous = backbone.routing_overrides.get(task)
    points = []
    try:
        for setting in settings:
            backbone.set_routing(task, top_k=setting)
            if callable(evaluate):
                value = float(evaluate(model))
            else:
                result = evaluate_metric(model, evaluate, task)
                value, metric_name = result.score, metric_name or result.primary
            flops = flops_per_image(model, task=task, image_size=image_size, top_k=setting)
            points.append(
                BudgetPoint(
                    top_k=setting,
                    flops=int(flops["total"]),
                    gflops=float(flops["gflops"]),
                    metric=value,
                    is_default=setting == default,
                )
            )
    finally:
        backbone.set_routing(task)
        if previous is not None:
            backbone.set_routing(task, **previous)
    points.sort(key=lambda p: (p.flops, sorted(p.top_k.items())))
    return BudgetCurve(
        task=task, metric_name=metric_name or "metric", points=points, image_size=list(flops["image_size"])
    )


def _label(top_k: Mapping[str, int]) -> str:
    return "/".join(f"{kind} {k}" for kind, k in top_k.items())


def plot_budget_curve(
    curves: BudgetCurve | Sequence[BudgetCurve], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Draw metric against GFLOPs per image (one line per curve, points labelled with their top-k as `attn/mlp`, the
    default setting circled) to a PNG at `path` (written to a temporary name, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [curves] if isinstance(curves, BudgetCurve) else list(curves)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for curve in curves:
        xs = [p.gflops for p in curve.points]
        ys = [p.metric for p in curve.points]
        ax.plot(xs, ys, marker="o", label=f"{curve.task}")
        span = (max(xs) - min(xs)) or 1.0
        last = None
        for p in curve.points:  # label the points far enough apart to read (and always the trained setting)
            if p.is_default or last is None or p.gflops - last >= 0.1 * span:
                ax.annotate(
                    "/".join(str(k) for k in p.top_k.values()),
                    (p.gflops, p.metric),
                    textcoords="offset points",
                    xytext=(3, -11),
                    fontsize=8,
                )
                last = p.gflops
            if p.is_default:
                ax.scatter([p.gflops], [p.metric], s=140, facecolors="none", edgecolors="black", zorder=3)
    kinds = "/".join(curves[0].points[0].top_k) if curves and curves[0].points else "attn/mlp"
    ax.set_xlabel(f"active GFLOPs per image (point labels: top-k {kinds})")
    ax.set_ylabel(curves[0].metric_name if curves else "metric")
    ax.set_title(title or "Metric against compute over top-k (circled: the trained top-k)")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def parse_top_k_list(text: str | None) -> list[int | dict[str, int]] | None:
    """`"1,2,4"` → `[1, 2, 4]`; `"2:1,4:2"` → `[{"attn": 2, "mlp": 1}, {"attn": 4, "mlp": 2}]` (attn:mlp)."""
    if not text:
        return None
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            if ":" in item:
                a, m = item.split(":")
                out.append({"attn": int(a), "mlp": int(m)})
            else:
                out.append(int(item))
        except ValueError:
            raise ValueError(
                f"--budget-top-k: {item!r} is not K or ATTN_K:MLP_K (e.g. '1,2,4' or '2:1,4:2')."
            ) from None
    return out


def budget_from_args(model: nn.Module, args, out: Path, datasets: Mapping[str, str] | None = None) -> list[Path]:
    """`moe-adapt inspect --budget`: for every `--task`, the curve on its eval split (up to `--max-images`), written
    as `budget_<task>.json`, and all tasks' curves in `budget.png`. Prints one table per task. `datasets`:
    `{task: dataset name}` from `--dataset`."""
    from .calibration import calibration_loader

    names = dict(datasets or {})
    top_ks = parse_top_k_list(getattr(args, "budget_top_k", None))
    curves, written = [], []
    for task in args.task:
        loader = calibration_loader(
            args.data,
            task,
            split="eval",
            dataset=names.get(task),
            batch_size=args.batch_size,
            max_images=args.max_images,
        )
        curve = budget_curve(model, task, loader, top_ks=top_ks)
        curves.append(curve)
        print(f"\nbudget of {task} ({curve.metric_name} on up to {args.max_images} eval images):")
        for p in curve.points:
            mark = "  (trained top-k)" if p.is_default else ""
            print(
                f"  {_label(p.top_k):<16} {p.gflops * 1e3:9.3f} MFLOPs/image  {curve.metric_name} {p.metric:.4f}{mark}"
            )
        written.append(curve.save(out / f"budget_{task}.json"))
    written.append(plot_budget_curve(curves, out / "budget.png"))
    return written
