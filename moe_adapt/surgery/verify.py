"""Check a slice against its parent on calibration data: `verify_submodel(parent, submodel, data)`.

For every task of the slice it runs both models on the same images and reports:

- agreement: top-1 agreement of the task outputs (argmax over classes: per image for classification, per query
  for detection, per pixel for segmentation), the max and mean absolute difference of the logits (of
  `last_hidden_state` for a bare backbone), and, when the batches carry labels, the task metric of both models
  (the task type's primary metric as `moe_adapt.metrics.evaluate` computes it: accuracy, COCO mAP or mean IoU,
  fed the outputs already computed here) and its delta;
- routing: per MoE layer, the fraction of tokens whose *parent* routing chose an expert outside the kept set
  (and the fraction of tokens for which that happened in any layer), and the parent's router mass on dropped
  experts. With non-renormalised gates a slice scales a layer's output by 1 / P_kept(x); `max_gate_scale`
  reports the largest such factor seen;
- size: parameters (`moe_adapt.flops.count_parameters`) and FLOPs per image (`flops_per_image`) before/after.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..flops import count_parameters, flops_per_image
from ..io import atomic_write_json
from ..metrics import TaskMetric
from ..models.moe_vit import find_backbone

__all__ = ["VerificationReport", "verify_submodel"]


@dataclass
class VerificationReport:
    """What `verify_submodel` measured. `tasks`: `{task: numbers}` (see the module docstring); `params`:
    `{"parent": count_parameters(parent), "submodel": ..., "ratio": sub total / parent total}`; `flops`:
    `{task: {"parent": FLOPs, "submodel": FLOPs, "ratio"}}`; `renormalized`: the parent's `router_renormalize`;
    `kept_experts`: `{layer: kept/parent counts}`."""

    tasks: dict[str, dict] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    flops: dict = field(default_factory=dict)
    renormalized: bool = True
    kept_experts: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": "moe_adapt.verification", **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping) -> VerificationReport:
        data = {k: v for k, v in data.items() if k != "format"}
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> VerificationReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        """A few lines for a terminal."""
        p = self.params
        lines = [f"parameters: {p['parent']['total']:,} -> {p['submodel']['total']:,} ({100 * p['ratio']:.1f}%)"]
        for task, t in self.tasks.items():
            f = self.flops.get(task, {})
            line = (
                f"{task}: FLOPs/image {f.get('parent', 0) / 1e6:.2f}M -> {f.get('submodel', 0) / 1e6:.2f}M; "
                f"max |diff| {t['max_abs_diff']:.3g}"
            )
            if t.get("top1_agreement") is not None:
                line += f"; top-1 agreement {100 * t['top1_agreement']:.2f}%"
            m = t.get("metric")
            if m:
                line += f"; {m['name']} {m['parent']:.4f} -> {m['submodel']:.4f} ({m['delta']:+.4f})"
            line += f"; tokens routed outside the kept set: {100 * t['routing_left_kept_set']['any_layer']:.2f}%"
            lines.append(line)
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """Tables for a model card."""
        p = self.params
        out = [
            "| | parent | slice | slice / parent |",
            "|---|---:|---:|---:|",
            f"| parameters | {p['parent']['total']:,} | {p['submodel']['total']:,} | {p['ratio']:.3f} |",
        ]
        for task, f in self.flops.items():
            out.append(f"| FLOPs / image ({task}) | {f['parent']:,} | {f['submodel']:,} | {f['ratio']:.3f} |")
        out += [
            "",
            "| task | images | top-1 agreement | max abs logit diff | metric (parent → slice) | "
            "tokens routed outside kept set |",
            "|---|---:|---:|---:|---|---:|",
        ]
        for task, t in self.tasks.items():
            m = t.get("metric")
            metric = f"{m['name']}: {m['parent']:.4f} → {m['submodel']:.4f}" if m else "–"
            agree = "–" if t.get("top1_agreement") is None else f"{t['top1_agreement']:.4f}"
            out.append(
                f"| {task} | {t['num_images']} | {agree} | {t['max_abs_diff']:.3g} | {metric} | "
                f"{t['routing_left_kept_set']['any_layer']:.4f} |"
            )
        return "\n".join(out)


def _split_batch(batch, index: int):
    """(pixels, labels or None) of a pixel tensor, a dict batch or a (pixels, labels) tuple."""
    if isinstance(batch, torch.Tensor):
        pixels, labels = batch, None
    elif isinstance(batch, Mapping):
        if "pixel_values" not in batch:
            raise ValueError(f"calibration batch {index} is a dict without 'pixel_values' (keys: {sorted(batch)}).")
        pixels, labels = batch["pixel_values"], batch.get("labels")
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        pixels, labels = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        raise ValueError(
            f"calibration batch {index} is a {type(batch).__name__}; expected a pixel tensor, a dict "
            "with 'pixel_values' or a (pixels, labels) tuple."
        )
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(0)
    return pixels, labels


def _task_output(model: nn.Module, pixels: torch.Tensor, task: str):
    """(outputs, the tensor compared: logits or last_hidden_state, pred_boxes or None, whether it is logits)."""
    out = model(pixel_values=pixels, task=task, return_dict=True)
    logits = getattr(out, "logits", None)
    if logits is None:
        return out, out.last_hidden_state, None, False
    return out, logits, getattr(out, "pred_boxes", None), True


def _class_dim(task_type: str) -> int:
    return 1 if task_type == "semantic_segmentation" else -1


class _Stats:
    """Running sums for one task."""

    def __init__(self, layers):
        self.images = self.tokens = 0
        self.max_diff = self.abs_sum = 0.0
        self.numel = self.agree = self.agree_total = 0
        self.box_max = 0.0
        self.metrics: dict[str, TaskMetric] = {}  # "parent" / "submodel", once a labelled batch is seen
        self.left = dict.fromkeys(layers, 0)
        self.left_any = 0
        self.dropped = dict.fromkeys(layers, 0.0)
        self.max_scale = 1.0
        self.image_hw = None


def slice_tasks(parent: nn.Module, submodel: nn.Module, tasks: list[str] | None) -> list[str]:
    """The tasks to compare a slice on (default the slice's), each checked to be a task of the slice and of the
    parent (`verify_submodel` and `heal_submodel` share it)."""
    sub_config = submodel.config
    tasks = list(tasks or sub_config.tasks)
    for t in tasks:
        if t not in sub_config.tasks:
            raise ValueError(f"The slice has no task {t!r}; its tasks are {sub_config.tasks}.")
        parent.config.task_index(t)  # a clear error for a task the parent lacks
    return tasks


def _kept_experts(parent: nn.Module, submodel: nn.Module) -> tuple[dict[str, nn.Module], dict[str, list[int]]]:
    """The parent's MoE layers (`{name: module}`) and, per layer, the slice's kept experts in the parent's numbering;
    a clear error when `submodel` is no slice of `parent`."""
    sub_config = submodel.config
    parent_backbone, _ = find_backbone(parent)
    parent_ids = sub_config.parent_expert_ids
    if not parent_ids:
        raise ValueError("The submodel's config has no parent_expert_ids: it is not a slice made by extract_submodel.")
    layers = parent_backbone.moe_layers()
    # kept experts in the parent's numbering: the slice's ids relative to the parent's own (which may be a slice)
    kept: dict[str, list[int]] = {}
    parent_root = parent.config.parent_expert_ids or {}
    if sub_config.num_hidden_layers != parent.config.num_hidden_layers:
        raise ValueError("The slice and the parent have different depths; verify a slice against its own parent.")
    for name, m in layers.items():
        i, kind = m.router.layer_idx, m.router.kind
        ids = parent_ids[kind][i]
        root = (parent_root.get(kind) or [None] * parent.config.num_hidden_layers)[i]
        missing = [e for e in ids if root and e not in root]
        if missing or any(e >= m.router.num_experts for e in ids if not root) or len(ids) != len(set(ids)):
            raise ValueError(
                f"The slice's experts of {name} (original ids {ids}) are not all in this parent; verify a slice "
                "against the model it was extracted from."
            )
        kept[name] = [root.index(e) for e in ids] if root else list(ids)
    return layers, kept


def _kept_masks(
    parent: nn.Module, task: str, layers: dict[str, nn.Module], kept: dict[str, list[int]], device: torch.device
) -> dict[str, torch.Tensor]:
    """Per MoE layer, a `[E_t]` bool mask over `task`'s router outputs in the parent: True for a kept expert."""
    masks = {}
    for name, m in layers.items():
        e_t = parent.config.router_size(task, m.router.kind, m.router.layer_idx)
        mask = torch.zeros(e_t, dtype=torch.bool, device=device)
        mask[[e for e in kept[name] if e < e_t]] = True
        masks[name] = mask
    return masks


def _compare_batch(
    s: _Stats,
    parent: nn.Module,
    submodel: nn.Module,
    task: str,
    task_type: str,
    pixels: torch.Tensor,
    labels,
    masks: dict[str, torch.Tensor],
    captured: dict[str, tuple],
) -> None:
    """Run both models on one batch and add to `s` its output differences, top-1 agreement, metric inputs (with
    `labels`) and, from the parent's routing `captured` by the hooks, the tokens routed outside the kept set."""
    captured.clear()
    full_p, out_p, box_p, is_logits = _task_output(parent, pixels, task)
    full_s, out_s, box_s, _ = _task_output(submodel, pixels, task)
    s.images += pixels.shape[0]
    s.image_hw = tuple(pixels.shape[-2:])
    diff = (out_p.float() - out_s.float()).abs()
    s.max_diff = max(s.max_diff, float(diff.max()))
    s.abs_sum += float(diff.sum())
    s.numel += diff.numel()
    if box_p is not None and box_s is not None:
        s.box_max = max(s.box_max, float((box_p - box_s).abs().max()))
    if is_logits:
        dim = _class_dim(task_type)
        pred_p, pred_s = out_p.argmax(dim), out_s.argmax(dim)
        s.agree += int((pred_p == pred_s).sum())
        s.agree_total += pred_p.numel()
        if labels is not None:
            if not s.metrics:
                s.metrics = {"parent": TaskMetric(parent, task), "submodel": TaskMetric(submodel, task)}
            s.metrics["parent"].add_batch(full_p, labels)
            s.metrics["submodel"].add_batch(full_s, labels)
    any_left = None
    for name, (indices, probs) in captured.items():
        inside = masks[name][indices]  # [tokens, k]
        left = ~inside.all(-1)
        any_left = left if any_left is None else any_left | left
        s.left[name] += int(left.sum())
        p_kept = (probs * masks[name]).sum(-1)
        s.dropped[name] += float((1 - p_kept).sum())
        s.max_scale = max(s.max_scale, float((1 / p_kept.clamp(min=1e-12)).max()))
    tokens = next(iter(captured.values()))[0].shape[0] if captured else 0
    s.tokens += tokens
    if any_left is not None:
        s.left_any += int(any_left.sum())


def _task_entry(s: _Stats, layers: Iterable[str], renormalized: bool) -> dict:
    """One task's numbers in `VerificationReport.tasks` from its running sums `s`."""
    tok = max(s.tokens, 1)
    entry = {
        "num_images": s.images,
        "num_tokens": s.tokens,
        "max_abs_diff": s.max_diff,
        "mean_abs_diff": s.abs_sum / max(s.numel, 1),
        "top1_agreement": s.agree / s.agree_total if s.agree_total else None,
        "routing_left_kept_set": {
            "any_layer": s.left_any / tok,
            "per_layer": {n: s.left[n] / tok for n in layers},
        },
        "dropped_gate_mass": {n: s.dropped[n] / tok for n in layers},
        "max_gate_scale": None if renormalized else s.max_scale,
    }
    if s.box_max:
        entry["max_abs_box_diff"] = s.box_max
    if s.metrics:
        result_p, result_s = s.metrics["parent"].compute(), s.metrics["submodel"].compute()
        mp, ms = result_p.score, result_s.score
        entry["metric"] = {
            "name": result_p.primary,
            "parent": mp,
            "submodel": ms,
            "delta": ms - mp,
            "relative": ms / mp if mp else None,
        }
    return entry


def verify_submodel(
    parent: nn.Module,
    submodel: nn.Module,
    data: Iterable | Mapping[str, Iterable],
    tasks: list[str] | None = None,
    *,
    max_batches: int | None = None,
    progress: bool = False,
) -> VerificationReport:
    """Compare `submodel` (from `extract_submodel`) with `parent` on calibration data.

    Args:
        parent, submodel: the models (task models or bare backbones), on the same device.
        data: `{task: iterable of batches}`, or one iterable used for every task. Batches as for
            `collect_expert_usage`; labels (`batch["labels"]` or the tuple's second item) enable the metric.
        tasks: the tasks to check; default all tasks of the slice.
        max_batches: per task.
        progress: show a tqdm progress bar.

    Returns:
        a [`VerificationReport`].
    """
    tasks = slice_tasks(parent, submodel, tasks)
    sub_config = submodel.config
    layers, kept = _kept_experts(parent, submodel)

    report = VerificationReport(renormalized=bool(parent.config.router_renormalize))
    report.kept_experts = {
        n: [len(kept[n]), m.router.num_experts if hasattr(m.router, "num_experts") else None] for n, m in layers.items()
    }
    report.params = {"parent": count_parameters(parent), "submodel": count_parameters(submodel)}
    report.params["ratio"] = report.params["submodel"]["total"] / max(report.params["parent"]["total"], 1)

    captured: dict[str, tuple] = {}

    def make_hook(name):
        def hook(module, args, output):
            captured[name] = (output[1].indices, output[1].probs)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    modes = (parent.training, submodel.training)
    parent.eval()
    submodel.eval()
    device = next(submodel.parameters()).device
    try:
        for task in tasks:
            task_data = data[task] if isinstance(data, Mapping) else data
            if task_data is None:
                raise ValueError(f"No calibration data for task {task!r}.")
            task_type = sub_config.task_types.get(task, "classification")
            masks = _kept_masks(parent, task, layers, kept, device)
            s = _Stats(list(layers))
            iterator = enumerate(task_data)
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(iterator, desc=f"verify {task}", unit="batch")
            batches = 0
            with torch.no_grad():
                for index, batch in iterator:
                    if max_batches is not None and batches >= max_batches:
                        break
                    pixels, labels = _split_batch(batch, index)
                    pixels = pixels.to(device)
                    _compare_batch(s, parent, submodel, task, task_type, pixels, labels, masks, captured)
                    batches += 1
            if batches == 0:
                raise ValueError(f"The verification data for task {task!r} is empty: it gave no batch.")
            # FLOPs at the size of the images actually verified (position embeddings interpolate)
            f_parent = flops_per_image(parent, task=task, image_size=s.image_hw)["total"]
            f_sub = flops_per_image(submodel, task=task, image_size=s.image_hw)["total"]
            report.flops[task] = {
                "parent": f_parent,
                "submodel": f_sub,
                "ratio": f_sub / max(f_parent, 1),
                "image_size": list(s.image_hw),
            }
            report.tasks[task] = _task_entry(s, layers, report.renormalized)
    finally:
        for h in handles:
            h.remove()
        parent.train(modes[0])
        submodel.train(modes[1])
    return report
