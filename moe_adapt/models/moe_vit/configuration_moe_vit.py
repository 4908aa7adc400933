"""Configuration of the multi-task mixture-of-experts Vision Transformer (``model_type="moe_vit"``)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import numbers

from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig

TASK_TYPES = ("classification", "detection", "semantic_segmentation")

# Mod-Squad layouts (Chen et al., CVPR 2023): even blocks hold a mixture of attention heads (MoA) and a dense MLP,
# odd blocks a dense attention and a mixture of MLP experts.
PRESETS: dict[str, dict] = {
    "vit-s": dict(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=224,
        patch_size=16,
        attn_num_experts=15,
        attn_top_k=6,
        mlp_num_experts=16,
        mlp_top_k=4,
    ),
    "vit-b": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
        attn_num_experts=24,
        attn_top_k=12,
        mlp_num_experts=16,
        mlp_top_k=4,
    ),
    # Small enough for unit tests on a laptop CPU (a forward pass takes milliseconds).
    "tiny": dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        attn_num_experts=6,
        attn_top_k=2,
        mlp_num_experts=8,
        mlp_top_k=2,
    ),
    # The embedded mini benchmark's model (64x64 canvases): trains on 2 CPU cores in minutes.
    "mini": dict(
        hidden_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=384,
        image_size=64,
        patch_size=8,
        attn_num_experts=8,
        attn_top_k=4,
        mlp_num_experts=8,
        mlp_top_k=2,
    ),
}


def _per_layer(name: str, value, depth: int) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * depth
    if (
        isinstance(value, (str, bytes))
        or not hasattr(value, "__iter__")
        or not all(hasattr(v, "__index__") for v in value)
    ):
        raise ValueError(
            f"MoEViTConfig.{name}={value!r}: expected an integer or one integer per layer (0 = a dense layer)."
        )
    value = [int(v) for v in value]
    if len(value) != depth:
        raise ValueError(
            f"MoEViTConfig.{name} has {len(value)} entries ({value}) but num_hidden_layers={depth}: "
            "give one expert count per layer (0 = a dense layer)."
        )
    if any(v < 0 for v in value):
        raise ValueError(f"MoEViTConfig.{name} has a negative expert count: {value}.")
    return value


def parse_moe_layer_name(name: str) -> tuple[int, str]:
    """A MoE layer name as `MoEViTConfig.moe_layer_names()` gives it (`"layers.{i}.{kind}"`) → `(i, kind)`; any other
    string is a `ValueError` that shows it."""
    parts = name.split(".") if isinstance(name, str) else []
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in ("attn", "mlp"):
        raise ValueError(f"{name!r} is not a MoE layer name: expected 'layers.<index>.attn' or 'layers.<index>.mlp'.")
    return int(parts[1]), parts[2]


class UnknownConfigFieldError(ValueError):
    """`MoEViTConfig.from_preset` got keywords that are no config field (`fields`: their names): transformers'
    configs would keep them as attributes nothing reads, so a misspelt override would change nothing silently."""

    def __init__(self, fields: list[str], message: str):
        super().__init__(message)
        self.fields = list(fields)


class MoEViTConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of [`MoEViTModel`]: a ViT whose layers are mixtures of experts with one router per task.

    Field names follow transformers' `ViTConfig`; the MoE fields are:

    - `tasks` (`list[str]`): task names; each task owns a router in every MoE layer and a task embedding.
    - `task_types` (`dict[str, str]`): `classification`, `detection` or `semantic_segmentation` per task
      (default `classification`). `task_labels` (`dict[str, list[str]]`): label names per task.
      `head_configs` (`dict[str, dict]`): options of each task's head in `MoEViTForMultiTask` (see
      `moe_adapt.heads`), stored here so that `from_pretrained` rebuilds every head.
    - `attn_experts`, `mlp_experts` (`list[int]`): number of experts in each layer's attention / MLP; 0 = dense.
      Per-layer lists let sliced models (fewer experts in some layers) save and reload exactly.
    - `attn_top_k`, `mlp_top_k`: experts each token selects. `attn_expert_head_size` (default `2*d/heads`,
      Mod-Squad's doubled head) is the width of one attention expert (dense attention blocks keep transformers'
      ViT heads of `d/heads`, where Mod-Squad doubles them too, so that upcycled ViT checkpoints load as they
      are); `mlp_expert_size` (default
      `4*d/mlp_top_k`, so the active width equals a dense ViT's) is the width of one MLP expert.
    - `router_renormalize` (default True): renormalise the top-k gates to sum to one. This makes slicing exact
      (Mod-Squad does not renormalise).
    - `router_z_loss_weight`, `balance_loss_weight` (default 0): Switch-style auxiliary losses, added to
      `aux_loss` of each forward. `mi_loss_weight` (0.005) and `mi_task_prior` (`"token_share"` or
      `"uniform"`) configure [`MutualInformationLoss`], which spans every micro-batch of an optimisation step.
    - `routing_concentration_weight` (default 0) adds to it, per MoE layer, how far each task's tokens are from
      routing inside one set of that layer's top-k + `routing_concentration_extra` (default 0) experts
      (`routing_concentration_loss`): the set a task's default slice keeps.
    - `task_router_sizes` (`dict[task, {"attn": [...], "mlp": [...]}]`, optional): the number of leading experts
      a task's router may choose in each layer. Absent means all experts. Tasks added by continual learning
      leave old tasks routing over exactly their old experts this way.
    - `attn_expert_groups`, `mlp_expert_groups` (optional, per layer lists of group sizes): experts stored as
      several fused tensors (groups) so that one group can be frozen while another trains.
    - `parent_expert_ids` (optional): for a sliced model, the parent's expert id of every kept expert.
    - As a backbone of transformers' dense heads ([`MoEViTBackbone`] in UperNet, DETR, ...): `out_indices` /
      `out_features`, `backbone_task` (the task whose routers route; default the first), `backbone_fpn` (default
      True: a simple feature pyramid over four chosen layers) and `backbone_output_router_probs` (default False:
      put the router probabilities in the backbone's output too, for an MI loss the surrounding model does not
      compute; its `aux_loss` is always there).

    Dense layers use standard ViT multi-head attention (`num_attention_heads` heads of `hidden_size /
    num_attention_heads`) so that public ViT checkpoints upcycle exactly ([`MoEViTModel.from_dense`]).

    Example:

    ```python
    >>> from moe_adapt import MoEViTConfig, MoEViTModel
    >>> config = MoEViTConfig.from_preset("vit-s", tasks=["cls", "det", "seg"])
    >>> config.attn_experts[:4], config.mlp_experts[:4]
    ([15, 0, 15, 0], [0, 16, 0, 16])
    >>> model = MoEViTModel(MoEViTConfig.from_preset("tiny", tasks=["a", "b"]))
    ```
    """

    model_type = "moe_vit"

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    pooling: str = "cls"
    tasks: list | None = None
    task_types: dict | None = None
    task_labels: dict | None = None
    head_configs: dict | None = None
    attn_experts: list | None = None
    mlp_experts: list | None = None
    attn_top_k: int = 4
    mlp_top_k: int = 4
    attn_expert_head_size: int | None = None
    mlp_expert_size: int | None = None
    router_renormalize: bool = True
    router_z_loss_weight: float = 0.0
    balance_loss_weight: float = 0.0
    mi_loss_weight: float = 0.005
    mi_task_prior: str = "token_share"
    routing_concentration_weight: float = 0.0
    routing_concentration_extra: int = 0
    task_router_sizes: dict | None = None
    attn_expert_groups: list | None = None
    mlp_expert_groups: list | None = None
    parent_expert_ids: dict | None = None
    default_task: str | None = None
    backbone_task: str | None = None
    backbone_fpn: bool = True
    backbone_output_router_probs: bool = False
    _out_features: list | None = None
    _out_indices: list | None = None

    def __post_init__(self, **kwargs):
        out_indices = kwargs.pop("out_indices", None)
        out_features = kwargs.pop("out_features", None)
        depth = self.num_hidden_layers
        self._check_tasks()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"MoEViTConfig.hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}."
            )
        self.attn_experts = _per_layer("attn_experts", self.attn_experts if self.attn_experts is not None else 0, depth)
        self.mlp_experts = _per_layer("mlp_experts", self.mlp_experts if self.mlp_experts is not None else 0, depth)
        for name, counts, k in (
            ("attn", self.attn_experts, self.attn_top_k),
            ("mlp", self.mlp_experts, self.mlp_top_k),
        ):
            if any(counts) and k < 1:
                raise ValueError(f"MoEViTConfig.{name}_top_k={k} must be at least 1.")
            for i, e in enumerate(counts):
                if 0 < e < k:
                    raise ValueError(
                        f"MoEViTConfig.{name}_top_k={k} is larger than the {e} experts of layer {i} "
                        f"({name}_experts={counts})."
                    )
        if self.attn_expert_head_size is None:
            self.attn_expert_head_size = 2 * self.hidden_size // self.num_attention_heads
        if self.mlp_expert_size is None:
            self.mlp_expert_size = max(1, 4 * self.hidden_size // max(self.mlp_top_k, 1))
        extra = self.routing_concentration_extra
        if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
            raise ValueError(f"MoEViTConfig.routing_concentration_extra={extra!r}: expected an integer >= 0.")
        if self.mi_task_prior not in ("token_share", "uniform"):
            raise ValueError(f"MoEViTConfig.mi_task_prior={self.mi_task_prior!r}: expected 'token_share' or 'uniform'.")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"MoEViTConfig.pooling={self.pooling!r}: expected 'cls' or 'mean'.")
        self._check_expert_groups(depth)
        for t in (self.default_task, self.backbone_task):
            if t is not None and t not in self.tasks:
                raise ValueError(f"MoEViTConfig: task {t!r} is not in tasks={self.tasks}.")
        if not self.id2label or set(self.id2label.values()) == {f"LABEL_{i}" for i in range(len(self.id2label))}:
            labels = self.task_labels.get(self.default_task or self.tasks[0])
            if labels:
                kwargs["id2label"] = dict(enumerate(labels))
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, depth + 1)]
        self.set_output_features_output_indices(out_indices=out_indices, out_features=out_features)
        super().__post_init__(**kwargs)

    def _check_tasks(self):
        """Validate `tasks` and normalise the per-task fields (`task_types`, `task_labels`, `head_configs`)."""
        if isinstance(self.tasks, (str, bytes)) or not hasattr(self.tasks, "__iter__"):
            raise ValueError(f"MoEViTConfig.tasks={self.tasks!r}: expected a list of task names, e.g. tasks=['cls'].")
        self.tasks = [str(t) for t in self.tasks]
        if not self.tasks:
            raise ValueError(
                f"MoEViTConfig.tasks={self.tasks!r} is empty: give at least one task name, e.g. tasks=['cls']."
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"MoEViTConfig.tasks has duplicate names: {self.tasks}.")
        self.task_types = dict(self.task_types or {})
        for t in self.tasks:
            self.task_types.setdefault(t, "classification")
        for t, kind in self.task_types.items():
            if t not in self.tasks:
                raise ValueError(f"MoEViTConfig.task_types names task {t!r}, which is not in tasks={self.tasks}.")
            if kind not in TASK_TYPES:
                raise ValueError(f"MoEViTConfig.task_types[{t!r}]={kind!r}: expected one of {TASK_TYPES}.")
        self.task_labels = {t: [str(x) for x in v] for t, v in (self.task_labels or {}).items()}
        for t in self.task_labels:
            if t not in self.tasks:
                raise ValueError(f"MoEViTConfig.task_labels names task {t!r}, which is not in tasks={self.tasks}.")
        self.head_configs = {str(t): dict(v or {}) for t, v in (self.head_configs or {}).items()}
        for t in self.head_configs:
            if t not in self.tasks:
                raise ValueError(f"MoEViTConfig.head_configs names task {t!r}, which is not in tasks={self.tasks}.")

    def _check_expert_groups(self, depth: int):
        """Validate and normalise `{attn,mlp}_expert_groups` and `task_router_sizes` against the expert counts."""
        for name in ("attn", "mlp"):
            groups = getattr(self, f"{name}_expert_groups")
            counts = getattr(self, f"{name}_experts")
            if groups is None:
                continue
            groups = [[int(g) for g in layer] for layer in groups]
            if len(groups) != depth or any(sum(g) != c for g, c in zip(groups, counts)):
                raise ValueError(
                    f"MoEViTConfig.{name}_expert_groups={groups} does not add up to {name}_experts={counts}."
                )
            setattr(self, f"{name}_expert_groups", groups)
        self.task_router_sizes = copy.deepcopy(self.task_router_sizes or {})
        for t, sizes in self.task_router_sizes.items():
            if t not in self.tasks:
                raise ValueError(
                    f"MoEViTConfig.task_router_sizes names task {t!r}, which is not in tasks={self.tasks}."
                )
            for name in ("attn", "mlp"):
                counts = getattr(self, f"{name}_experts")
                k = getattr(self, f"{name}_top_k")
                layer_sizes = sizes.get(name, counts)
                if len(layer_sizes) != depth or any(
                    (c == 0 and s != 0) or (c > 0 and not k <= s <= c) for s, c in zip(layer_sizes, counts)
                ):
                    raise ValueError(
                        f"MoEViTConfig.task_router_sizes[{t!r}][{name!r}]={layer_sizes} must hold, per layer, "
                        f"between {name}_top_k={k} and {name}_experts={counts} experts."
                    )

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, tasks: list[str], layout: str = "mod-squad", **kwargs) -> MoEViTConfig:
        """Build a Mod-Squad layout: `"vit-s"`, `"vit-b"`, `"mini"` or `"tiny"`.

        `layout="mod-squad"` puts attention experts in even blocks and MLP experts in odd blocks; `"all"` makes
        every block's attention and MLP a mixture. `attn_num_experts` / `mlp_num_experts` change the preset's
        expert count of those blocks; any config field (e.g. per-layer `attn_experts` lists) can be overridden
        through `kwargs` too. A key that is no config field raises a `ValueError` naming it (and the closest field).
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available: {sorted(PRESETS)}.")
        p = dict(PRESETS[name])
        depth = kwargs.get("num_hidden_layers", p["num_hidden_layers"])
        n_attn, n_mlp = p.pop("attn_num_experts"), p.pop("mlp_num_experts")
        n_attn, n_mlp = kwargs.pop("attn_num_experts", n_attn), kwargs.pop("mlp_num_experts", n_mlp)
        if layout == "mod-squad":
            p["attn_experts"] = [n_attn if i % 2 == 0 else 0 for i in range(depth)]
            p["mlp_experts"] = [n_mlp if i % 2 == 1 else 0 for i in range(depth)]
        elif layout == "all":
            p["attn_experts"], p["mlp_experts"] = [n_attn] * depth, [n_mlp] * depth
        else:
            raise ValueError(f"Unknown layout {layout!r}; expected 'mod-squad' or 'all'.")
        p.update(kwargs)
        config = cls(tasks=tasks if isinstance(tasks, (str, bytes)) else list(tasks), **p)
        # A key that is no config field lands as a stray attribute that nothing reads (transformers' configs accept
        # any keyword): a typo such as `mi_loss_wieght` in a recipe's overrides would change nothing, silently.
        fields = {f.name for f in dataclasses.fields(cls)}
        stray = sorted(k for k in kwargs if k not in fields and k in vars(config))
        if stray:
            hints = {k: difflib.get_close_matches(k, sorted(fields), n=1) for k in stray}
            raise UnknownConfigFieldError(
                stray,
                "from_preset: unknown MoEViTConfig field(s) "
                + ", ".join(f"{k!r}" + (f" (did you mean {hints[k][0]!r}?)" if hints[k] else "") for k in stray)
                + "; the fields are the documented ones of MoEViTConfig, and transformers' own config keywords "
                "(num_labels, id2label, experts_implementation, attn_implementation, dtype, out_indices, ...) pass too.",
            )
        return config

    # Convenience views used across the package ------------------------------------------------------------------
    def task_index(self, task: str | int) -> int:
        """The index of `task` (a name or an index) in `tasks`; a clear `ValueError` otherwise."""
        if isinstance(task, bool) or not isinstance(task, (str, int)):
            raise ValueError(f"task must be a task name or index; got {task!r}. Known tasks: {self.tasks}.")
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise ValueError(f"task index {task} is out of range; known tasks: {self.tasks}.")
            return task
        if task not in self.tasks:
            raise ValueError(f"Unknown task {task!r}; known tasks: {self.tasks}.")
        return self.tasks.index(task)

    def router_size(self, task: str, kind: str, layer: int) -> int:
        """How many experts `task`'s router chooses from in `layer` (`kind` is "attn" or "mlp")."""
        counts = getattr(self, f"{kind}_experts")
        sizes = (self.task_router_sizes or {}).get(task, {}).get(kind)
        return counts[layer] if sizes is None else sizes[layer]

    def expert_groups(self, kind: str, layer: int) -> list[int]:
        groups = getattr(self, f"{kind}_expert_groups")
        return list(groups[layer]) if groups is not None else [getattr(self, f"{kind}_experts")[layer]]

    def num_labels_for(self, task: str) -> int:
        labels = (self.task_labels or {}).get(task)
        if labels:
            return len(labels)
        return self.num_labels

    def routing_plan(self, task: str, top_k=None, expert_mask=None) -> dict[str, tuple]:
        """Validate a compute-control override for `task` (a name) → `{layer_name: (top_k or None, mask or None)}`
        (`{}` without an override). `top_k`: an int or `{"attn": k, "mlp": k}`; `expert_mask`: `{layer_name: bool
        [E_t]}`. The one set of checks behind `forward(top_k=, expert_mask=)`, `set_routing` and
        `moe_adapt.flops.flops_per_image`, so each rejects the same overrides with the same message."""
        import torch

        if top_k is None and not expert_mask:
            return {}
        names = self.moe_layer_names()
        if isinstance(top_k, dict):
            unknown = set(top_k) - {"attn", "mlp"}
            if unknown:
                raise ValueError(f"top_k has unknown keys {sorted(unknown)}: use 'attn' and/or 'mlp'.")
        for value in top_k.values() if isinstance(top_k, dict) else [top_k]:
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"top_k must be an integer (or {{'attn': k, 'mlp': k}}); got {value!r}.")
        if expert_mask:
            unknown = set(expert_mask) - set(names)
            if unknown:
                raise ValueError(f"expert_mask names unknown MoE layers {sorted(unknown)}; known: {names}.")
        plan = {}
        for name, layer, kind in self.moe_layers():
            n = self.router_size(task, kind, layer)
            k = top_k.get(kind) if isinstance(top_k, dict) else top_k
            mask = None if not expert_mask else expert_mask.get(name)
            if mask is not None:
                mask = torch.as_tensor(mask)
                if mask.dtype != torch.bool:
                    raise ValueError(
                        f"expert_mask[{name!r}] must be bool (a tensor or list, True = keep); got dtype {mask.dtype}."
                    )
                if mask.shape != (n,):
                    raise ValueError(
                        f"expert_mask[{name!r}] must have shape ({n},) for task {task!r}; got {tuple(mask.shape)}."
                    )
                if not mask.any():
                    raise ValueError(f"expert_mask[{name!r}] removes every expert of task {task!r}.")
            limit = n if mask is None else int(mask.sum())
            default_k = getattr(self, f"{kind}_top_k")
            if k is not None and not 1 <= int(k) <= limit:
                raise ValueError(
                    f"top_k={k} for {name} must be between 1 and the {limit} experts available to {task!r}."
                )
            if k is None and default_k > limit:
                raise ValueError(
                    f"top_k={default_k} for {name} is the default, but expert_mask[{name!r}] leaves {limit} experts, "
                    f"fewer than top_k={default_k}: lower top_k too."
                )
            plan[name] = (None if k is None else int(k), mask)
        return plan

    def moe_layers(self) -> list[tuple[str, int, str]]:
        """The MoE layers in forward order as `(name, layer index, kind)`, e.g. `("layers.0.attn", 0, "attn")`;
        kind is "attn" or "mlp"."""
        return [
            (f"layers.{i}.{kind}", i, kind)
            for i in range(self.num_hidden_layers)
            for kind in ("attn", "mlp")
            if getattr(self, f"{kind}_experts")[i]
        ]

    def moe_layer_names(self) -> list[str]:
        """Names of the MoE layers in forward order, e.g. `["layers.0.attn", "layers.1.mlp", ...]`."""
        return [name for name, _, _ in self.moe_layers()]


__all__ = ["MoEViTConfig", "PRESETS", "TASK_TYPES", "parse_moe_layer_name"]
