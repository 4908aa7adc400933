"""Slice a standalone sub-model out of a multi-task MoE ViT: `extract_submodel(model, selection, tasks=[...])`.

The sub-model is the same class as the parent, built from a new config and filled by copying tensors:

- experts: only the kept experts of every MoE layer (all expert groups of the parent fused into one);
- routers: only the chosen tasks' routers, and of those only the rows of kept experts;
- task-specific modules (task embeddings, and every entry of a per-task `nn.ModuleDict` of a task model such as
  `heads[task]`): only the chosen tasks';
- everything else (patch embedding, norms, dense layers, shared K/V projections) as is;
- config: per-layer expert counts, the chosen tasks, and `parent_expert_ids` (the original model's id of every
  kept expert; a slice of a slice maps back to the first parent).

A layer that keeps exactly k experts has a router that chooses all of them, which the model runs as one fused
dense layer (`the experts' forward (their fused dense path)`, or k-head attention): dense speed, same output.

Exactness. With renormalised top-k gates (`router_renormalize=True`, the default) the slice computes exactly what
the parent computes whenever the parent's routing stays inside the kept set: the softmax over fewer experts
changes every kept probability by the same factor, which renormalisation cancels. Without renormalisation the
slice's gates are the parent's divided by P_kept(x), the parent's router mass on the kept experts, so a MoE
layer's output is scaled by 1 / P_kept(x) ≥ 1 for that token; `verify_submodel` reports that factor.

```python
>>> import torch
>>> from moe_adapt import MoEViTConfig, MoEViTForImageClassification
>>> from moe_adapt.analysis import collect_expert_usage, select_experts
>>> from moe_adapt.surgery import extract_submodel
>>> model = MoEViTForImageClassification(MoEViTConfig.from_preset("tiny", tasks=["a", "b"])).eval()
>>> usage = collect_expert_usage(model, [torch.randn(4, 3, 32, 32)], task="a")
>>> sub = extract_submodel(model, select_experts(usage, policy="top_n"), tasks=["a"])
>>> sub.config.tasks, sub.config.mlp_experts
(['a'], [0, 2, 0, 2])
```
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.initialization import no_init_weights

from ..analysis.selection import ExpertSelection
from ..models.moe_vit import find_backbone
from ..models.moe_vit.configuration_moe_vit import parse_moe_layer_name

__all__ = ["extract_submodel", "slice_class", "sliced_config"]

_EXPERT_KEY = re.compile(r"^layers\.(\d+)\.(attention|mlp)\.(experts\.(\w+)|router\.routers\.([^.]+)\.weight)$")
_KIND = {"attention": "attn", "mlp": "mlp"}


def _check_tasks(config, tasks) -> list[str]:
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("extract_submodel: give at least one task to keep.")
    unknown = [t for t in tasks if t not in config.tasks]
    if unknown:
        raise ValueError(f"The model has no task {unknown[0]!r}; its tasks are {config.tasks}.")
    return tasks


def sliced_config(config, selection: ExpertSelection, tasks: list[str]):
    """The config of the slice of `config` that keeps `selection`'s experts and `tasks` (validated)."""
    tasks = _check_tasks(config, tasks)
    selection.check_model(config, tasks)
    depth = config.num_hidden_layers
    data = config.to_dict()
    counts = {"attn": [0] * depth, "mlp": [0] * depth}
    parent_ids = {"attn": [[] for _ in range(depth)], "mlp": [[] for _ in range(depth)]}
    router_sizes = {t: {"attn": [0] * depth, "mlp": [0] * depth} for t in tasks}
    old_parent_ids = config.parent_expert_ids or {}
    for name, ids in selection.experts.items():
        i, kind = parse_moe_layer_name(name)
        counts[kind][i] = len(ids)
        previous = (old_parent_ids.get(kind) or [None] * depth)[i]
        parent_ids[kind][i] = [int(previous[e]) for e in ids] if previous else list(ids)
        for t in tasks:
            e_t = config.router_size(t, kind, i)
            router_sizes[t][kind][i] = sum(1 for e in ids if e < e_t)
    # a task whose router reaches every kept expert needs no entry
    router_sizes = {
        t: sizes
        for t, sizes in router_sizes.items()
        if sizes["attn"] != counts["attn"] or sizes["mlp"] != counts["mlp"]
    }
    default = config.default_task if config.default_task in tasks else None
    backbone_task = config.backbone_task if config.backbone_task in tasks else None
    labels = (config.task_labels or {}).get(default or tasks[0])
    data.update(
        tasks=tasks,
        task_types={t: config.task_types[t] for t in tasks},
        task_labels={t: v for t, v in (config.task_labels or {}).items() if t in tasks},
        attn_experts=counts["attn"],
        mlp_experts=counts["mlp"],
        attn_expert_groups=None,
        mlp_expert_groups=None,
        task_router_sizes=router_sizes or None,
        parent_expert_ids=parent_ids,
        default_task=default,
        backbone_task=backbone_task,
    )
    # other per-task settings (e.g. head_configs): dicts keyed by task names keep only the kept tasks
    for key, value in list(data.items()):
        if (
            key not in ("task_types", "task_labels", "task_router_sizes", "id2label", "label2id")
            and isinstance(value, dict)
            and value
            and set(value) <= set(config.tasks)
        ):
            data[key] = {t: v for t, v in value.items() if t in tasks}
    if labels:
        data["id2label"] = dict(enumerate(labels))
        data["label2id"] = {name: i for i, name in enumerate(labels)}
    for key in ("_name_or_path", "transformers_version"):
        data.pop(key, None)
    new = type(config).from_dict(data)
    impl = getattr(config, "_experts_implementation", None)
    if impl is not None:
        new._experts_implementation = impl
    return new


def _layer_experts(backbone: nn.Module, i: int, module_name: str, param: str) -> torch.Tensor:
    """The parent's `param` of layer i's experts over all its groups, fused along the expert axis."""
    module = getattr(backbone.layers[i], module_name)
    return torch.cat([getattr(g, param).detach() for g in [module.experts, *module.extra_experts]], 0)


def slice_class(model: nn.Module, config) -> type:
    """The class of a slice of `model` with `config`: the task model of its one task's type for a one-task slice
    of a `MoEViTForMultiTask` (a union of tasks stays multi-task), else `model`'s own class."""
    from ..models.moe_vit import TASK_MODEL_CLASSES, MoEViTForMultiTask

    if type(model) is MoEViTForMultiTask and len(config.tasks) == 1:
        return TASK_MODEL_CLASSES[config.task_types.get(config.tasks[0], "classification")]
    return type(model)


def extract_submodel(model: nn.Module, selection: ExpertSelection, tasks: list[str] | None = None) -> nn.Module:
    """A new standalone model of `model`'s class that keeps only `selection`'s experts and `tasks`; a one-task
    slice of a `MoEViTForMultiTask` is that task's model (`MoEViTForImageClassification`,
    `MoEViTForSemanticSegmentation` or `MoEViTForObjectDetection`: same tensor names, transformers' outputs), so
    transformers' Auto classes and pipelines take it as it is.

    Args:
        model: an `MoEViTModel` or a task model holding one as `.moe_vit`, whose per-task modules live in
            `nn.ModuleDict`s keyed by task (see docs/DEVELOPING.md).
        selection: from `select_experts` (or `ExpertSelection.union` for several tasks); it must be made for this
            model and keep at least top-k experts per layer that each task can route to.
        tasks: the tasks to keep; default `selection.tasks`.

    Returns:
        the slice, on the parent's device and dtype, in the parent's train/eval mode. It saves and loads with
        `save_pretrained` / `from_pretrained` without the parent.

    Raises:
        ValueError: a task the model lacks, a selection made for another model or with fewer than k experts
            in a layer, or a parent tensor that does not fit the slice's layout.
    """
    config = model.config
    tasks = _check_tasks(config, tasks if tasks is not None else selection.tasks)
    new_config = sliced_config(config, selection, tasks)
    backbone, prefix = find_backbone(model)
    param = next(model.parameters())
    with no_init_weights():
        sub = slice_class(model, new_config)(new_config)
    sub.to(device=param.device, dtype=param.dtype)
    parent_state = model.state_dict()
    state = {}
    for key, target in sub.state_dict().items():
        local = key[len(prefix) :] if key.startswith(prefix) else None
        match = _EXPERT_KEY.match(local) if local is not None else None
        if match:
            i, module_name = int(match.group(1)), match.group(2)
            kind = _KIND[module_name]
            ids = selection.experts[f"layers.{i}.{kind}"]
            if match.group(4):  # fused expert tensor
                value = _layer_experts(backbone, i, module_name, match.group(4))[ids]
            else:  # a kept task's router: its rows of kept experts it can reach
                task = match.group(5)
                weight = getattr(backbone.layers[i], module_name).router.routers[task].weight.detach()
                value = weight[[e for e in ids if e < weight.shape[0]]]
        elif key in parent_state:
            value = parent_state[key]
        else:
            raise ValueError(
                f"Cannot fill tensor {key!r} of the slice from the parent: the parent has no tensor of that name. "
                "Task-specific modules must live in nn.ModuleDicts keyed by task (docs/DEVELOPING.md)."
            )
        if value.shape != target.shape:
            raise ValueError(
                f"Cannot fill tensor {key!r} of the slice: the parent's has shape {tuple(value.shape)}, the slice needs "
                f"{tuple(target.shape)}. A module of {type(model).__name__} is not built from the config alone."
            )
        state[key] = value.detach().clone()
    sub.load_state_dict(state, strict=True)
    sub.train(model.training)
    return sub
