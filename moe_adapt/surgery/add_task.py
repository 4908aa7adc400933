"""Continual learning without forgetting: grow a trained MoE ViT by one task, freeze everything the old tasks use.

`add_task` returns a new model (same class, new config) with, in every MoE layer, a new expert group, a router for
the new task over the old and the new experts, and a new task embedding and head. Old tasks' routers keep their
`[E_old, d]` shape, and `config.task_router_sizes` pins them to the first E_old experts, so an old task runs the
same code on the same tensors as before growth. The grown model comes back frozen (`freeze_old_tasks`):
`requires_grad=False` on everything an old task can reach (shared patch embedding, norms, dense layers, shared
keys/values, old expert groups, old routers, embeddings and heads). Frozen tensors get no gradient, so any optimiser
built afterwards, plain `torch.optim.AdamW(model.parameters(), weight_decay=...)` or transformers' `Trainer`
included, leaves them untouched (AdamW skips parameters without a gradient, weight decay too). After training the
new task, every old task's outputs are bit-identical.

Example:

```python
>>> model = add_task(model, "digits", "classification", labels=10, data=digit_batches)
>>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)   # moves only digits' tensors
```
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..analysis.usage import collect_expert_usage
from ..models.moe_vit import TASK_TYPES, MoEViTConfig, find_backbone

KINDS = ("attn", "mlp")


# ----------------------------------------------------------------------------------------------------------------
# Growing the config
# ----------------------------------------------------------------------------------------------------------------


def _backbone(model: nn.Module) -> nn.Module:
    """The `MoEViTModel` inside `model` (the model itself, or its `moe_vit`)."""
    return find_backbone(model)[0]


def _new_counts(config: MoEViTConfig, kind: str, new) -> list[int]:
    """Per-layer number of experts to add: an int applies to every MoE layer of `kind`, a list gives one per layer."""
    counts = getattr(config, f"{kind}_experts")
    k = getattr(config, f"{kind}_top_k")
    depth = config.num_hidden_layers
    if isinstance(new, bool) or not isinstance(new, (int, Sequence)):
        raise ValueError(f"new_{kind}_experts must be an int or a list of {depth} ints; got {new!r}.")
    if isinstance(new, int):
        new = [new if c else 0 for c in counts]
    new = [int(n) for n in new]
    if len(new) != depth:
        raise ValueError(
            f"new_{kind}_experts has {len(new)} entries but the model has {depth} layers: give one per layer."
        )
    for i, (n, c) in enumerate(zip(new, counts)):
        if c == 0 and n != 0:
            raise ValueError(
                f"new_{kind}_experts[{i}]={n}, but layer {i}'s {kind} is dense: add_task grows existing mixtures only "
                f"(MoE {kind} layers: {[j for j, e in enumerate(counts) if e]}). Give 0 for dense layers."
            )
        if c and c + n < k:
            raise ValueError(
                f"new_{kind}_experts[{i}]={n} would leave layer {i} with {c + n} {kind} experts, fewer than "
                f"{kind}_top_k={k}. add_task only adds experts: give a count >= 0."
            )
        if n < 0:
            raise ValueError(
                f"new_{kind}_experts[{i}]={n} is negative: add_task only adds experts (give a count >= 0)."
            )
    return new


def grown_config(
    config: MoEViTConfig,
    name: str,
    task_type: str = "classification",
    labels: Sequence[str] | int | None = None,
    new_attn_experts: int | Sequence[int] = 2,
    new_mlp_experts: int | Sequence[int] = 2,
    head_config: dict | None = None,
) -> MoEViTConfig:
    """The config of `config`'s model grown by task `name`: one new expert group per MoE layer (where the count is
    > 0), every old task pinned to the experts it routes over now, the new task routing over all experts."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"The new task's name must be a non-empty string; got {name!r}.")
    if name in config.tasks:
        raise ValueError(
            f"Task {name!r} already exists in this model (tasks: {config.tasks}); choose another name for the new task."
        )
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type={task_type!r} is not supported: expected one of {TASK_TYPES}.")
    if isinstance(labels, bool):
        raise ValueError(f"labels must be a list of class names or a class count; got {labels!r}.")
    if isinstance(labels, int):
        labels = [str(i) for i in range(labels)]
    labels = [str(x) for x in labels] if labels is not None else None
    if task_type == "classification" and not labels:
        raise ValueError(f"Classification task {name!r} needs labels: a list of class names or a class count.")
    new = {kind: _new_counts(config, kind, n) for kind, n in zip(KINDS, (new_attn_experts, new_mlp_experts))}

    d = config.to_dict()
    depth = config.num_hidden_layers
    router_sizes = {
        t: {kind: [config.router_size(t, kind, i) for i in range(depth)] for kind in KINDS} for t in config.tasks
    }
    for kind in KINDS:
        counts = getattr(config, f"{kind}_experts")
        groups = [config.expert_groups(kind, i) for i in range(depth)]
        d[f"{kind}_experts"] = [c + n for c, n in zip(counts, new[kind])]
        d[f"{kind}_expert_groups"] = [g + [n] if n else g for g, n in zip(groups, new[kind])]
    router_sizes[name] = {kind: list(d[f"{kind}_experts"]) for kind in KINDS}
    d["task_router_sizes"] = router_sizes
    if config.parent_expert_ids:
        # A slice's experts remember their parent id; experts added here have none (-1).
        d["parent_expert_ids"] = {
            kind: [list(ids) + [-1] * n for ids, n in zip(config.parent_expert_ids[kind], new[kind])]
            for kind in KINDS
            if kind in config.parent_expert_ids
        }
    d["tasks"] = list(config.tasks) + [name]
    d["task_types"] = {**config.task_types, name: task_type}
    d["task_labels"] = {**config.task_labels, **({name: labels} if labels else {})}
    if head_config is not None:  # options of the new task's head (MoEViTForMultiTask: config.head_configs)
        d["head_configs"] = {**(d.get("head_configs") or {}), name: dict(head_config)}
    for key in ("model_type", "transformers_version"):
        d.pop(key, None)
    out = type(config).from_dict(d)
    out._experts_implementation = getattr(config, "_experts_implementation", None)
    out._attn_implementation = getattr(config, "_attn_implementation", None)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Initialising the new experts
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def source_expert_ranking(model: nn.Module, source_task: str, data, max_batches: int = 8) -> dict[str, list[int]]:
    """For each MoE layer, the source task's experts ranked by how often its router selects them on `data` (the NEW
    task's images), most used first: `{layer_name: [expert ids]}` (ties go to the lower id)."""
    usage = collect_expert_usage(model, data, source_task, max_batches=max_batches, output_norms=False)
    return {name: torch.sort(-usage.frequency(name), stable=True).indices.tolist() for name in usage.layers}


def _expert_group(module: nn.Module, group: int) -> nn.Module:
    return module.experts if group == 0 else module.extra_experts[group - 1]


def _expert_tensors(module: nn.Module, expert: int) -> tuple[nn.Module, int]:
    """The group holding `expert` (a layer-wide id) and its index inside that group."""
    for g, size in enumerate(module.group_sizes):
        if expert < size:
            return _expert_group(module, g), expert
        expert -= size
    raise IndexError(expert)


@torch.no_grad()
def _init_copy_top(old: nn.Module, new: nn.Module, name: str, source_task: str, ranking: dict[str, list[int]]) -> None:
    """Copy the source task's most used experts into the new group, and start the new task as the source task:
    its embedding and router rows are the source's (a copied expert gets its original's row)."""
    old_b, new_b = _backbone(old), _backbone(new)
    new_b.task_embeddings[name].copy_(old_b.task_embeddings[source_task])
    for layer_name, module in new_b.moe_layers().items():
        old_module = old_b.moe_layers()[layer_name]
        n_old = sum(old_module.group_sizes)
        n_new = sum(module.group_sizes) - n_old
        src_router = old_module.router.routers[source_task].weight
        router = module.router.routers[name].weight
        router.zero_()
        router[: src_router.shape[0]].copy_(src_router)
        if n_new == 0:
            continue
        group = _expert_group(module, len(module.group_sizes) - 1)
        order = ranking[layer_name]
        for j in range(n_new):
            src = order[j % len(order)]
            src_group, local = _expert_tensors(old_module, src)
            for pname, param in group.named_parameters():
                param[j].copy_(getattr(src_group, pname)[local])
            router[n_old + j].copy_(src_router[src])


@torch.no_grad()
def _init_random(new: nn.Module, name: str) -> None:
    """Random new experts (the class's own init, already done), zero router (uniform start) and task embedding."""
    new_b = _backbone(new)
    new_b.task_embeddings[name].zero_()
    for module in new_b.moe_layers().values():
        module.router.routers[name].weight.zero_()


# ----------------------------------------------------------------------------------------------------------------
# add_task
# ----------------------------------------------------------------------------------------------------------------


def add_task(
    model: nn.Module,
    name: str,
    task_type: str = "classification",
    labels: Sequence[str] | int | None = None,
    new_attn_experts: int | Sequence[int] = 2,
    new_mlp_experts: int | Sequence[int] = 2,
    init: str = "copy_top",
    source_task: str | None = None,
    data=None,
    max_batches: int = 8,
    head_config: dict | None = None,
    freeze: bool = True,
) -> nn.Module:
    """Grow `model` (a `MoEViTModel`, `MoEViTForImageClassification`, `MoEViTForMultiTask`, ...) by task `name`.

    Returns a new instance of `type(model)` built from the grown config (`grown_config`) with every tensor of
    `model` copied by name, plus:

    - `new_attn_experts` / `new_mlp_experts` experts (an int for every MoE layer of that kind, or a per-layer
      list) stored as a new expert group, so they can train while the old groups stay frozen;
    - a router for `name` over the old and the new experts, a task embedding and a head (the class's own, built
      from `task_type` and `labels`: class names or a class count);
    - `init="copy_top"`: the new experts copy the experts that `source_task`'s router (default: the config's
      default task, else the first) selects most on `data` (the new task's images: a tensor, a batch dict or
      an iterable of batches, `max_batches` used), and the new task starts from the source task's embedding
      and router. `init="random"`: fresh experts, zero router (uniform routing), zero embedding.
    - `head_config`: options of the new task's head (`config.head_configs[name]` of `MoEViTForMultiTask`).
    - `freeze` (default True): `freeze_old_tasks(grown, name)`, so only the new task's own tensors are trainable
      and no optimiser can move an old task's. `freeze=False` leaves every tensor trainable (joint fine-tuning of
      all tasks, which gives up the old tasks' bit-identity).

    Old tasks' routers keep their shapes and `config.task_router_sizes` pins them to their current experts, so
    their outputs stay bit-identical.
    """
    if init not in ("copy_top", "random"):
        raise ValueError(f"init={init!r}: expected 'copy_top' (copy the source task's most used experts) or 'random'.")
    backbone = _backbone(model)
    config = backbone.config
    new_config = grown_config(config, name, task_type, labels, new_attn_experts, new_mlp_experts, head_config)
    if init == "copy_top":
        source_task = source_task or config.default_task or config.tasks[0]
        if source_task not in config.tasks:
            raise ValueError(f"source_task={source_task!r} is not a task of this model (tasks: {config.tasks}).")
        if data is None:
            raise ValueError(
                "init='copy_top' ranks experts by how often the source task's router picks them on the new task's "
                "images: pass data= (pixel_values, a batch dict or a DataLoader), or use init='random'."
            )
        ranking = source_expert_ranking(model, source_task, data, max_batches)

    grown = type(model)(new_config)
    param = next(model.parameters())
    grown.to(device=param.device, dtype=param.dtype)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"add_task: tensors of the old model have no place in the grown one: {unexpected[:10]}.")
    new_names = {n for n, _ in _new_task_parameters(grown, [name])}
    stray = [k for k in missing if k not in new_names and k in dict(grown.named_parameters())]
    if stray:
        raise RuntimeError(
            f"add_task: the grown model has parameters that are neither old nor the new task's: {stray[:10]}."
        )
    if isinstance(getattr(grown, "heads", None), nn.ModuleDict) and name not in grown.heads:
        raise ValueError(
            f"{type(model).__name__} holds no {task_type} heads, so it cannot learn {name!r}: grow a "
            "MoEViTForMultiTask (any task type) or the task model of that type."
        )
    if init == "copy_top":
        _init_copy_top(model, grown, name, source_task, ranking)
    else:
        _init_random(grown, name)
    # Model-level routing settings of the old tasks carry over (their router sizes are unchanged).
    _backbone(grown).routing_overrides = copy.deepcopy(backbone.routing_overrides)
    grown.train(model.training)
    if freeze:
        freeze_old_tasks(grown, [name])
    return grown


# ----------------------------------------------------------------------------------------------------------------
# Freezing for real
# ----------------------------------------------------------------------------------------------------------------


def _new_task_parameters(model: nn.Module, new_tasks: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    """Parameters that only `new_tasks` can reach: every entry keyed by a new task in a ModuleDict/ParameterDict
    (routers, task embeddings, heads) and the expert groups that no other task's router reaches."""
    backbone = _backbone(model)
    config = backbone.config
    new_tasks = list(new_tasks)
    old_tasks = [t for t in config.tasks if t not in new_tasks]
    owned: dict[int, str] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for module in model.modules():
        if isinstance(module, (nn.ModuleDict, nn.ParameterDict)):
            for task in new_tasks:
                if task in module:
                    entry = module[task]
                    params = [entry] if isinstance(entry, nn.Parameter) else list(entry.parameters())
                    owned.update({id(p): names[id(p)] for p in params})
    for module in backbone.moe_layers().values():
        i, kind = module.router.layer_idx, module.router.kind
        reach = max((config.router_size(t, kind, i) for t in old_tasks), default=0)
        offset = 0
        for g, size in enumerate(module.group_sizes):
            if offset >= reach:  # no old task routes into this group
                owned.update({id(p): names[id(p)] for p in _expert_group(module, g).parameters()})
            offset += size
    return [(owned[id(p)], p) for p in model.parameters() if id(p) in owned]


def freeze_old_tasks(model: nn.Module, new_tasks: Sequence[str] | str) -> list[str]:
    """Set `requires_grad=False` on every parameter an old task can reach, `True` on the new tasks' own parameters
    (their routers, embeddings, heads and expert groups no old task routes into). Returns the trainable names.

    Shared tensors (patch embedding, norms, dense layers, shared attention keys/values) are frozen: they serve
    the old tasks. Build the optimiser with `trainable_optimizer` so frozen tensors are not even in it."""
    new_tasks = [new_tasks] if isinstance(new_tasks, str) else list(new_tasks)
    config = _backbone(model).config
    unknown = [t for t in new_tasks if t not in config.tasks]
    if unknown:
        raise ValueError(f"freeze_old_tasks: unknown tasks {unknown}; this model's tasks are {config.tasks}.")
    owned = _new_task_parameters(model, new_tasks)
    keep = {id(p) for _, p in owned}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [n for n, _ in owned]


def trainable_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.05, **kwargs) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (frozen ones are left out, so weight decay cannot move them), with
    the pretraining's parameter groups (`moe_adapt.training.loop.parameter_groups`: no decay on biases, norms,
    embeddings and routers)."""
    from ..training.loop import adamw, parameter_groups

    groups = [g for g in parameter_groups(model, weight_decay) if g["params"]]
    if not groups:
        raise ValueError("The model has no trainable parameters: did freeze_old_tasks name the new task?")
    return adamw(groups, lr=lr, **kwargs)


def train_new_tasks(model: nn.Module) -> nn.Module:
    """`model.train()`, except that modules whose parameters are all frozen and that keep running statistics
    (batch norms) stay in eval mode, so training a new task cannot change an old task's buffers."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            module.eval()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Training the new task
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class NewTaskResult:
    """What `learn_new_task` returns: the trained model, the names of the tensors it trained, the training losses,
    and the old-task check: `old_task_change` `{task: max |after - before|}` over every output tensor, and
    `old_tasks_identical` (every output `torch.equal` to its value before training)."""

    model: nn.Module
    trainable: list[str]
    losses: list[float]
    old_task_change: dict[str, float]
    old_tasks_identical: bool


def learn_new_task(
    model: nn.Module,
    task: str,
    train_set,
    check_images: torch.Tensor | Mapping[str, torch.Tensor],
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup_ratio: float = 0.05,
    seed: int = 0,
    log_every: int = 50,
    accelerator=None,
    optimizer=None,
) -> NewTaskResult:
    """Train classification task `task` of a grown model without touching any old task, and prove it.

    `freeze_old_tasks`, then the one training loop (`moe_adapt.training.loop.train_loop`: accelerate; AdamW over the
    trainable tensors only, warm-up and cosine decay, or the `OptimizerConfig` given as `optimizer`) on `train_set`
    (items `{"pixel_values", "labels"}`), then every old task's outputs on `check_images` (one batch for all old
    tasks, or `{task: batch}`) are compared with their values before training.
    """
    from ..data import collate_fn_for
    from ..training.config import OptimizerConfig, TrainConfig
    from ..training.loop import adamw, build_scheduler, make_accelerator, repeat_loader, shuffled_loader, train_loop

    config = _backbone(model).config
    old_tasks = [t for t in config.tasks if t != task]
    batches = check_images if isinstance(check_images, Mapping) else {t: check_images for t in old_tasks}
    missing = [t for t in old_tasks if t not in batches]
    if missing:
        raise ValueError(
            f"check_images has no batch for old task(s) {missing}: give one batch for all or one per task."
        )
    before = {t: task_outputs(model, batches[t], [t])[t] for t in old_tasks}
    trainable = freeze_old_tasks(model, [task])
    accelerator = accelerator or make_accelerator(TrainConfig(max_steps=steps), find_unused_parameters=True)
    opt_cfg = optimizer or OptimizerConfig(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio)
    opt = adamw(
        [p for p in model.parameters() if p.requires_grad],
        accelerator.device,
        lr=opt_cfg.lr,
        weight_decay=opt_cfg.weight_decay,
        betas=opt_cfg.betas,
        eps=opt_cfg.eps,
    )
    loader = accelerator.prepare(shuffled_loader(train_set, batch_size, seed, collate_fn_for("classification")))

    def loss_fn(m, batch):
        return m(pixel_values=batch["pixel_values"], labels=batch["labels"], task=task, return_dict=True).loss

    train_new_tasks(model)
    result = train_loop(
        model,
        opt,
        build_scheduler(opt, opt_cfg, steps),
        lambda start: repeat_loader(loader, start),
        loss_fn,
        accelerator,
        max_steps=steps,
        seed=seed,
        max_grad_norm=opt_cfg.max_grad_norm,
        log_every=log_every,
        progress_bar=False,
        desc=f"learn {task}",
    )
    trained = accelerator.unwrap_model(result.model)
    trained.eval()
    after = {t: task_outputs(trained, batches[t], [t])[t] for t in old_tasks}
    return NewTaskResult(
        model=trained,
        trainable=trainable,
        losses=result.losses,
        old_task_change=max_output_change(before, after),
        old_tasks_identical=outputs_identical(before, after),
    )


# ----------------------------------------------------------------------------------------------------------------
# Checking old tasks
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def task_outputs(
    model: nn.Module, pixel_values: torch.Tensor, tasks: Sequence[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor output (logits, boxes, ...) of `model` for each task on one batch, in eval mode:
    `{task: {field: tensor}}`. Compare two snapshots with `max_output_change`."""
    was_training = model.training
    model.eval()
    out = {}
    for task in tasks:
        result = model(pixel_values, task=task, return_dict=True)
        fields = result.items() if hasattr(result, "items") else [("output", result)]
        out[task] = {k: v.detach().clone() for k, v in fields if isinstance(v, torch.Tensor) and k != "aux_loss"}
    model.train(was_training)
    return out


def max_output_change(before: dict, after: dict) -> dict[str, float]:
    """`{task: max |after - before|}` over every output tensor (0.0 exactly when bit-identical)."""
    change = {}
    for task, fields in before.items():
        diffs = [
            (after[task][k].float() - v.float()).abs().max().item() if v.numel() else 0.0 for k, v in fields.items()
        ]
        change[task] = max(diffs, default=0.0)
    return change


def outputs_identical(before: dict, after: dict) -> bool:
    """True when every task's every output tensor is bit-identical (`torch.equal`)."""
    return all(torch.equal(v, after[t][k]) for t, fields in before.items() for k, v in fields.items())


__all__ = [
    "add_task",
    "freeze_old_tasks",
    "grown_config",
    "learn_new_task",
    "NewTaskResult",
    "max_output_change",
    "outputs_identical",
    "source_expert_ranking",
    "task_outputs",
    "train_new_tasks",
    "trainable_optimizer",
]
