"""LoRA for the MoE ViT through peft: fused 3-D expert tensors via `target_parameters`, attention projections via
`target_modules`, the new task's head and router trained whole via `modules_to_save`.

```python
>>> from moe_adapt import MoEViTConfig, MoEViTForImageClassification, lora_config
>>> from moe_adapt.adaptation import apply_lora, merge_lora
>>> model = MoEViTForImageClassification(MoEViTConfig.from_preset("tiny", tasks=["digits"]))
>>> peft_model = apply_lora(model, lora_config(model, r=4))      # prints the trainable-parameter count
>>> merged = merge_lora(peft_model)                              # a plain MoEViTForImageClassification again
```

What LoRA reaches (names as in `MoEViTModel`):

| layer kind               | tensor                                              | peft mechanism        |
|--------------------------|-----------------------------------------------------|-----------------------|
| MLP experts              | `mlp.experts.up_proj` `[E, I, d]`, `down_proj` `[E, d, I]` | `target_parameters` (one rank-r pair per expert) |
| attention experts (MoA)  | `attention.experts.q_proj` `[E, h, d]`, `o_proj` `[E, d, h]` | `target_parameters`   |
| MoA shared keys / values | `attention.k_proj`, `attention.v_proj` (Linear)     | `target_modules`      |
| dense attention          | `attention.{q,k,v,o}_proj` (Linear)                 | `target_modules`      |
| dense MLP (optional)     | `mlp.fc1`, `mlp.fc2` (Linear)                       | `target_modules`      |
| head, router (optional)  | `heads[task]`, `router.routers[task]`               | `modules_to_save`     |

Routers are not LoRA-wrapped: a `[E, d]` matrix is small enough to train whole, so `train_router=True` puts it
in `modules_to_save` instead.

Everything goes through peft's own mechanisms: `peft.get_peft_model(model, lora_config(model))` (or `apply_lora`)
wraps each targeted expert module in peft's `ParamWrapper`, whose forward applies `W + ΔW` while the experts'
own forward runs (every MoE submodule reads its tensors there: the MLP experts' backends, the attention experts'
query and output projections, a slice's fused dense path), and `merge_and_unload` folds the deltas in.
"""

from __future__ import annotations

import os

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..models.moe_vit.modeling_moe_vit import (
    MoEViTMoAttention,
    MoEViTSparseMLP,
    backbone_of,
    realign_cpu_tensors,
)

# Fused expert tensors LoRA may target, per kind of MoE layer.
EXPERT_PARAMETERS = {"mlp": ("up_proj", "down_proj"), "attn": ("q_proj", "o_proj")}
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP_LINEARS = ("fc1", "fc2")


# ----------------------------------------------------------------------------------------------------------------
# Finding targets
# ----------------------------------------------------------------------------------------------------------------


def _backbone(model: nn.Module) -> nn.Module:
    return backbone_of(model)


def _prefix(model: nn.Module) -> str:
    model = model.get_base_model() if isinstance(model, PeftModel) else model
    return "moe_vit." if hasattr(model, "moe_vit") else ""


def _tasks_of(model: nn.Module, tasks) -> list[str]:
    config = _backbone(model).config
    if tasks is None:
        return list(config.tasks)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    for t in tasks:
        config.task_index(t)  # a clear ValueError for an unknown task
    return tasks


def task_head_names(model: nn.Module, task: str) -> list[str]:
    """Names of `task`'s own modules outside the backbone (heads kept in a `ModuleDict` keyed by task name,
    e.g. `heads.<task>`), as `named_modules` spells them."""
    model = model.get_base_model() if isinstance(model, PeftModel) else model
    names = []
    for name, module in model.named_modules():
        if name.startswith("moe_vit") or not isinstance(module, nn.ModuleDict) or task not in module:
            continue
        names.append(f"{name}.{task}" if name else task)
    return names


def router_names(model: nn.Module, task: str) -> list[str]:
    """Names of `task`'s router in every MoE layer (`...router.routers.<task>`)."""
    backbone, prefix = _backbone(model), _prefix(model)
    return [
        f"{prefix}layers.{r.layer_idx}.{'attention' if r.kind == 'attn' else 'mlp'}.router.routers.{task}"
        for r in (module.router for module in backbone.moe_layers().values())
        if task in r.routers
    ]


def _lora_targets(
    backbone: nn.Module,
    prefix: str,
    include_attention: bool,
    include_mlp: bool,
    include_experts: bool,
    projections: tuple[str, ...] = ATTENTION_LINEARS,
):
    """→ (target_parameters {name: shape [E, out, in]}, target_modules {name: (in, out)}). `projections`: which
    of q/k/v/o attention projections to adapt (MoA q/o are expert tensors, k/v shared Linears)."""
    params, linears = {}, {}
    for i, layer in enumerate(backbone.layers):
        base = f"{prefix}layers.{i}"
        attn, mlp = layer.attention, layer.mlp
        if include_attention:
            if isinstance(attn, MoEViTMoAttention):
                if include_experts:
                    for j, ex in enumerate([attn.experts, *attn.extra_experts]):
                        group = "experts" if j == 0 else f"extra_experts.{j - 1}"
                        for p in EXPERT_PARAMETERS["attn"]:
                            if p in projections:
                                params[f"{base}.attention.{group}.{p}"] = tuple(getattr(_unwrap(ex), p).shape)
                for p in ("k_proj", "v_proj"):
                    if p not in projections:
                        continue
                    lin = _unwrap(getattr(attn, p))
                    linears[f"{base}.attention.{p}"] = (lin.in_features, lin.out_features)
            else:
                for p in (p for p in ATTENTION_LINEARS if p in projections):
                    lin = _unwrap(getattr(attn, p))
                    linears[f"{base}.attention.{p}"] = (lin.in_features, lin.out_features)
        if include_mlp:
            if isinstance(mlp, MoEViTSparseMLP):
                if include_experts:
                    for j, ex in enumerate([mlp.experts, *mlp.extra_experts]):
                        group = "experts" if j == 0 else f"extra_experts.{j - 1}"
                        for p in EXPERT_PARAMETERS["mlp"]:
                            params[f"{base}.mlp.{group}.{p}"] = tuple(getattr(_unwrap(ex), p).shape)
            else:
                for p in DENSE_MLP_LINEARS:
                    lin = _unwrap(getattr(mlp, p))
                    linears[f"{base}.mlp.{p}"] = (lin.in_features, lin.out_features)
    return params, linears


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, BaseTunerLayer):
        module = module.base_layer
    return module


# ----------------------------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------------------------


def _check_rank(r: int, params: dict, modules: dict) -> None:
    """Raise if rank `r` exceeds the smaller side of any targeted expert tensor (`params`) or layer (`modules`)."""
    for name, (_, out_f, in_f) in params.items():
        if r > min(out_f, in_f):
            raise ValueError(
                f"LoRA rank r={r} is larger than expert tensor {name} allows: each expert is a {out_f}x{in_f} "
                f"matrix, so r must be at most {min(out_f, in_f)}. Lower r."
            )
    for name, (in_f, out_f) in modules.items():
        if r > min(in_f, out_f):
            raise ValueError(
                f"LoRA rank r={r} is larger than {name} ({in_f} -> {out_f}) allows: r must be at most "
                f"{min(in_f, out_f)}. Lower r."
            )


def _modules_to_save(
    model: nn.Module, backbone: nn.Module, prefix: str, tasks, train_head: bool, train_router: bool, train_norms: bool
) -> list[str]:
    """The names `lora_config` puts in `modules_to_save`: the backbone's LayerNorms (with `train_norms`), then per
    task its head and routers, each name once."""
    task_list = _tasks_of(model, tasks)
    to_save = []
    if train_norms:
        to_save += [prefix + n for n, m in backbone.named_modules() if isinstance(m, nn.LayerNorm)]
    for t in task_list:
        if train_head:
            to_save += task_head_names(model, t)
        if train_router:
            to_save += router_names(model, t)
    return list(dict.fromkeys(to_save))  # a bare backbone's routers are also its "heads": list each once


def lora_config(
    model: nn.Module,
    r: int = 8,
    alpha: float | None = None,
    include_attention: bool = True,
    attention_projections: str | list[str] | tuple[str, ...] = ATTENTION_LINEARS,
    include_mlp: bool = True,
    include_dense_mlp: bool = False,
    include_experts: bool = True,
    tasks: str | list[str] | None = None,
    train_head: bool = True,
    train_router: bool = True,
    train_norms: bool = False,
    include_patch_embedding: bool = False,
    verbose: bool = True,
    **lora_kwargs,
) -> LoraConfig:
    """A ready `LoraConfig` for this model's layout.

    Args:
        model: a `MoEViTModel` or a task model holding one as `.moe_vit` (full or sliced).
        r: LoRA rank, the same for every target; it must not exceed the smaller side of any targeted matrix
            (per expert: `min(I, d)` for MLP experts, `min(h, d)` for attention experts).
        alpha: LoRA alpha (scaling = alpha / r); default `2 * r`.
        include_attention: adapt attention (dense q/k/v/o, MoA shared k/v and the attention experts' q/o).
        attention_projections: which of `q_proj`, `k_proj`, `v_proj`, `o_proj` to adapt (default all four; the LoRA
            paper's choice is `["q_proj", "v_proj"]`, fewer adapted layers and a faster step). In MoA layers `q_proj`
            and `o_proj` are the attention experts' fused tensors, `k_proj`/`v_proj` the shared Linears.
        include_mlp: adapt MLP experts (`up_proj`, `down_proj`). `include_dense_mlp` also adapts the dense MLPs'
            `fc1`/`fc2` of non-MoE blocks (off by default: they are the largest matrices per block).
        include_experts: False leaves the fused expert tensors alone (LoRA on Linear layers only).
        tasks: whose head / router go in `modules_to_save` (default: every task of the model).
        train_head, train_router: put the tasks' heads (`heads[task]`) and routers
            (`router.routers[task]` in every MoE layer) in `modules_to_save` (trained whole, saved with the
            adapter). Routers are never LoRA-wrapped.
        train_norms: also train the backbone's LayerNorms (weight and bias, 2·d per norm) through
            `modules_to_save`, so they are saved with the adapter.
        include_patch_embedding: also LoRA the patch embedding (peft's LoRA for `nn.Conv2d`: a rank-r `p x p`
            convolution, then a 1x1 one; r·(C·p² + d) parameters). For a downstream set whose images differ in kind
            from pretraining (digits after clothes) this first projection is a cheap place to adapt.
        verbose: print the number of parameters the config will train.
        lora_kwargs: any other `LoraConfig` field (e.g. `init_lora_weights`, `use_rslora`). `lora_dropout` must
            stay 0: peft cannot apply dropout to LoRA on a parameter.

    Raises:
        ValueError: `r` larger than a targeted matrix allows (naming it), no target selected, or an unknown task.

    `peft.get_peft_model(model, lora_config(model))` works as well as `apply_lora`.
    """
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer; got {r!r}.")
    if lora_kwargs.get("lora_dropout", 0.0):
        raise ValueError(
            "lora_dropout must be 0: peft's LoRA on fused expert parameters (target_parameters) cannot apply "
            "dropout (it cannot factor the input out of the low-rank update)."
        )
    projections = (attention_projections,) if isinstance(attention_projections, str) else tuple(attention_projections)
    unknown = [p for p in projections if p not in ATTENTION_LINEARS]
    if unknown or not projections:
        raise ValueError(
            f"attention_projections={list(projections)!r}: choose a non-empty subset of {list(ATTENTION_LINEARS)}."
        )
    backbone, prefix = _backbone(model), _prefix(model)
    params, linears = _lora_targets(
        backbone, prefix, include_attention, include_mlp or include_dense_mlp, include_experts, projections
    )
    if not include_mlp:  # only dense MLPs were asked for
        params = {k: v for k, v in params.items() if ".mlp." not in k}
    if not include_dense_mlp:
        linears = {k: v for k, v in linears.items() if not k.endswith(DENSE_MLP_LINEARS)}
    modules = dict(linears)  # target_modules: the Linear layers, and the patch embedding's conv if asked
    if include_patch_embedding:
        conv = backbone.embeddings.projection
        modules[prefix + "embeddings.projection"] = (
            conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1],
            conv.out_channels,
        )
    if not params and not modules:
        raise ValueError(
            "lora_config selected no target: the model has no layer matching include_attention="
            f"{include_attention}, include_mlp={include_mlp}, include_dense_mlp={include_dense_mlp}."
        )
    _check_rank(r, params, modules)
    to_save = _modules_to_save(model, backbone, prefix, tasks, train_head, train_router, train_norms)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=0.0,
        target_modules=sorted(modules) or None,
        target_parameters=sorted(params) or None,
        modules_to_save=to_save or None,
        **lora_kwargs,
    )
    if verbose:
        n_lora = sum(r * e * (o + i) for e, o, i in params.values()) + sum(r * (i + o) for i, o in modules.values())
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        n_saved = sum(p.numel() for n in to_save for p in base.get_submodule(n).parameters())
        total = sum(p.numel() for p in base.parameters())
        print(
            f"lora_config: r={r}, {len(params)} expert tensors + {len(modules)} linear/conv layers -> {n_lora:,} "
            f"LoRA params, {n_saved:,} in modules_to_save ({len(to_save)} modules); {n_lora + n_saved:,} trainable "
            f"({100 * (n_lora + n_saved) / max(total, 1):.2f}% of the {total:,} model params)"
        )
    return config


def _bias_numel(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return 0 if bias is None else bias.numel()


# ----------------------------------------------------------------------------------------------------------------
# Applying, saving, loading, merging
# ----------------------------------------------------------------------------------------------------------------


def apply_lora(model: nn.Module, config: LoraConfig | None = None, verbose: bool = True, **kwargs) -> PeftModel:
    """Wrap `model` with LoRA (`config` defaults to `lora_config(model, **kwargs)`) and print the trainable count."""
    if isinstance(model, PeftModel):
        raise ValueError("apply_lora: the model already carries a peft adapter; merge or unload it first.")
    config = config or lora_config(model, verbose=verbose, **kwargs)
    peft_model = get_peft_model(model, config)
    if verbose:
        trainable, _ = peft_model.get_nb_trainable_parameters()
        total = count_model_parameters(peft_model)
        print(
            f"LoRA applied: trainable params {trainable:,} of {total:,} model params ({100 * trainable / total:.2f}%)"
        )
    return peft_model


def count_model_parameters(model: nn.Module) -> int:
    """Parameters of the deployable model: LoRA factors and peft's `modules_to_save` copies are not counted (they
    fold into the base tensors on merge)."""
    if not isinstance(model, PeftModel):
        return sum(p.numel() for p in model.parameters())
    total = 0
    for name, p in model.get_base_model().named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        total += p.numel()
    return total


def has_lora(model: nn.Module) -> bool:
    return isinstance(model, PeftModel) and any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the LoRA deltas and the trained `modules_to_save` copies into the base tensors
    (`merge_and_unload`) → the plain task model, which `save_pretrained` / `from_pretrained` handle without peft."""
    if not has_lora(model):
        raise ValueError(
            f"merge_lora: this {type(model).__name__} carries no LoRA adapter, so there is nothing to merge. Pass "
            "the model returned by apply_lora / load_lora (a peft PeftModel), or save the model as it is."
        )
    return model.merge_and_unload()


def load_lora(model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False) -> PeftModel:
    """`PeftModel.from_pretrained(model, adapter_dir)`, its tensors realigned like a loaded model's."""
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise FileNotFoundError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json is missing).")
    peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
    realign_cpu_tensors(peft_model)  # the adapter's tensors too compute as they did before saving
    return peft_model


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA factor tensors (`lora_A` / `lora_B`) of a peft-wrapped model."""
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


__all__ = [
    "apply_lora",
    "count_model_parameters",
    "has_lora",
    "load_lora",
    "lora_config",
    "lora_parameter_names",
    "merge_lora",
    "router_names",
    "task_head_names",
]
