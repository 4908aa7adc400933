"""The multi-task mixture-of-experts Vision Transformer, read top to bottom like transformers' ViT and Mixtral:

embeddings → router → experts → mixture-of-heads attention → layer → pretrained base → task models.

Every MoE layer holds one router per task (zero-initialised, so routing starts uniform). MLP experts are fused
3-D parameters (`up_proj` [E, I, d], `down_proj` [E, d, I]) run by transformers' experts backends
(`config.experts_implementation`: `segmented_mm` (default, `moe_adapt.kernels`), transformers' `grouped_mm` and
`batched_mm`, or the `eager` reference forward below); attention experts (a mixture of attention heads with shared
keys and values) dispatch the same ways. Every submodule computes in its own `forward`, so accelerate's hooks
(`device_map` offloading) and peft's LoRA wrappers see every tensor read.
"""

from __future__ import annotations

import contextvars
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.integrations.moe import use_experts_implementation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple

from ...kernels import EXPERTS_IMPLEMENTATIONS, ExpertDispatch, ExpertGroupSplit  # registers segmented_mm
from ...kernels.dispatch import add_gated_bias, gates_full
from .configuration_moe_vit import MoEViTConfig
from .image_processing_moe_vit import default_image_processor
from .losses import load_balancing_loss, router_z_loss
from .weights_files import _check_load_report, _check_weights_readable, _keep_other_files, realign_cpu_tensors

# ----------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------


class MoEViTEmbeddings(nn.Module):
    """Patch embedding, CLS token and position embeddings (bicubically interpolated for other input sizes)."""

    def __init__(self, config: MoEViTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.grid = config.image_size // config.patch_size
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def check_input(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be [batch, channels, height, width]; got shape {tuple(pixel_values.shape)}."
            )
        _, c, h, w = pixel_values.shape
        if c != self.num_channels:
            raise ValueError(f"pixel_values has {c} channels but the model expects num_channels={self.num_channels}.")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"Input size {h}x{w} is not a multiple of patch_size={self.patch_size}: resize or pad the image."
            )

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        gh, gw = height // self.patch_size, width // self.patch_size
        if gh == self.grid and gw == self.grid:
            return self.position_embeddings
        cls_pos, patch_pos = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(cls_pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, dim)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check_input(pixel_values)
        b, _, h, w = pixel_values.shape
        x = self.projection(pixel_values.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        return self.dropout(x + self.interpolate_pos_encoding(h, w))


class MoEViTTaskEmbeddings(nn.ParameterDict):
    """One learned `[d]` vector per task, added to every token before each layer (`task_embeddings.<task>`)."""

    __call__ = nn.Module.__call__  # ParameterDict refuses calls; this one is a module with a forward

    def forward(self, task: str) -> torch.Tensor:
        return self[task]


# ----------------------------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------------------------


class RouterOutput(NamedTuple):
    """What one MoE layer's router decided for one batch (tokens flattened): logits `[tokens, E_t]`, probs
    `[tokens, E_t]` (softmax of logits; E_t = the task's router size), indices `[tokens, k]` (chosen expert ids,
    highest gate first), weights `[tokens, k]` (gates, renormalised if configured)."""

    logits: torch.Tensor
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor


class MoEViTTaskRouter(nn.Linear):
    """One task's router in one layer: Linear(d → E_task, no bias), zero-initialised (uniform routing at start)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states `[tokens, d]` → logits `[tokens, E]`, computed as `(W xᵀ)ᵀ`: the `[E, tokens]` product
        is the faster layout on CPU for the few experts of a slice, and the softmax over experts runs on it."""
        return torch.mm(self.weight, hidden_states.t()).t()


class MoEViTTopKRouter(nn.Module):
    """One zero-initialised linear router per task (`routers[task]`, `[E_task, hidden]`): linear → softmax → top-k →
    renormalise. A task may route over only the first `E_task` experts of the layer (continual learning keeps old
    tasks on their old experts this way)."""

    def __init__(self, config: MoEViTConfig, kind: str, layer_idx: int):
        super().__init__()
        self.kind, self.layer_idx = kind, layer_idx
        self.num_experts = getattr(config, f"{kind}_experts")[layer_idx]
        self.top_k = getattr(config, f"{kind}_top_k")
        self.renormalize = config.router_renormalize
        self.routers = nn.ModuleDict(
            {t: MoEViTTaskRouter(config.hidden_size, config.router_size(t, kind, layer_idx)) for t in config.tasks}
        )

    def forward(self, hidden_states, task: str, top_k: int | None = None, expert_mask=None) -> RouterOutput:
        """hidden_states `[tokens, d]` → `RouterOutput`. `expert_mask` `[E_t]` (bool) removes experts before the
        softmax, so the gates equal those of a model sliced to the unmasked experts."""
        logits = self.routers[task](hidden_states)
        if expert_mask is not None:
            logits = logits.masked_fill(~expert_mask.to(device=logits.device, dtype=torch.bool), float("-inf"))
        # the softmax over experts on the `[E, tokens]` layout: PyTorch's CPU softmax over a last dimension shorter
        # than its vector width (a slice's 2-4 experts) runs element by element, several times slower
        probs = logits.float().t().softmax(dim=0).t()
        weights, indices = probs.topk(self.top_k if top_k is None else top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, probs, indices, weights.to(hidden_states.dtype))


# ----------------------------------------------------------------------------------------------------------------
# MLP: dense and mixture of experts
# ----------------------------------------------------------------------------------------------------------------


class MoEViTMLP(nn.Module):
    """The dense ViT MLP: fc1 → activation → fc2."""

    def __init__(self, config: MoEViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act_fn(self.fc1(hidden_states))))


@use_experts_implementation(has_gate=False, has_bias=True)
class MoEViTExperts(nn.Module):
    """E MLP experts stored fused: `up_proj` [E, I, d], `up_proj_bias` [E, I], `down_proj` [E, d, I],
    `down_proj_bias` [E, d]. `forward(hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k]) → [T, d]`;
    the backend comes from `config.experts_implementation`, and this eager loop is the reference. (The default
    `segmented_mm` runs a layer whose router chooses every expert, as in a slice that kept exactly k, as one fused
    dense MLP.)"""

    def __init__(self, config: MoEViTConfig, num_experts: int):
        super().__init__()
        d, i = config.hidden_size, config.mlp_expert_size
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, d, i
        self.up_proj = nn.Parameter(torch.empty(num_experts, i, d))
        self.up_proj_bias = nn.Parameter(torch.zeros(num_experts, i))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d, i))
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, d))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            h = self.act_fn(F.linear(hidden_states[token], self.up_proj[e], self.up_proj_bias[e]))
            h = F.linear(h, self.down_proj[e], self.down_proj_bias[e]) * top_k_weights[token, slot, None]
            out = out.index_add(0, token, h.to(out.dtype))
        return out


class MoEViTSparseMLP(nn.Module):
    """A mixture of MLP experts with one router per task. Experts may be stored in several groups (continual
    learning freezes old groups); `experts` is the first group and `extra_experts` the others. A task routing over
    several groups runs each group on only the (token, slot) pairs whose expert it holds (`ExpertGroupSplit`)."""

    def __init__(self, config: MoEViTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.router = MoEViTTopKRouter(config, "mlp", layer_idx)
        self.group_sizes = config.expert_groups("mlp", layer_idx)
        self.experts = MoEViTExperts(config, self.group_sizes[0])
        self.extra_experts = nn.ModuleList([MoEViTExperts(config, g) for g in self.group_sizes[1:]])
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, task, top_k=None, expert_mask=None):
        b, n, d = hidden_states.shape
        flat = hidden_states.reshape(b * n, d)
        route = self.router(flat, task, top_k, expert_mask)
        if route.logits.shape[-1] <= self.group_sizes[0]:  # within the first group (old tasks keep their code)
            out = self.experts(flat, route.indices, route.weights)
        else:  # over several groups: each group runs only the pairs whose expert it holds, with top-1 routing
            split, groups = ExpertGroupSplit(route.indices, self.group_sizes), [self.experts, *self.extra_experts]
            parts = zip(split.parts, split.rows(flat), split.gates(route.weights))
            out = split.combine([groups[g](x, idx, w) for (g, idx), x, w in parts])
        return self.dropout(out.view(b, n, d)), route


# ----------------------------------------------------------------------------------------------------------------
# Attention: dense and mixture of attention heads
# ----------------------------------------------------------------------------------------------------------------


class MoEViTAttention(nn.Module):
    """Standard ViT multi-head self-attention (q_proj/k_proj/v_proj/o_proj, as in transformers 5's ViT)."""

    def __init__(self, config: MoEViTConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(d, d)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, d = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class MoEViTAttentionExperts(nn.Module):
    """E attention experts (heads) stored fused: `q_proj` [E, h, d] (+ `q_proj_bias` [E, h]) and `o_proj` [E, d, h]
    (+ `o_proj_bias` [E, d]), sharing one key and one value head (multi-query attention).

    `forward(hidden_states [b, n, d], key [b, 1, n, h], value [b, 1, n, h], top_k_index [b·n, k],
    top_k_weights [b·n, k]) → [b·n, d]`: each token's k queries (one per chosen expert), attention against the
    shared keys and values, each expert's output projection and the gate-weighted sum:
    `y = Σ_j g_j · (softmax(q_j Kᵀ / √h) V) W_o^{e_j} + g_j b_o^{e_j}`, `q_j = x W_q^{e_j} + b_q^{e_j}`.
    `stage="query"` (rows `[P, d]` → queries `[P, k, h]`) and `stage="output"` (attention outputs `[P, k, h]` →
    gated sums `[P, d]`) run one projection each, for a task whose slots span several expert groups.

    The projections dispatch like the MLP experts (`config.experts_implementation`); when every expert is chosen
    (a slice that kept exactly k) or shapes must be static (`torch.export`), they run as dense projections over
    the concatenated heads."""

    def __init__(self, config: MoEViTConfig, num_experts: int):
        super().__init__()
        d, h = config.hidden_size, config.attn_expert_head_size
        self.config = config
        self.num_experts, self.head_dim = num_experts, h
        self.q_proj = nn.Parameter(torch.empty(num_experts, h, d))
        self.q_proj_bias = nn.Parameter(torch.zeros(num_experts, h))
        self.o_proj = nn.Parameter(torch.empty(num_experts, d, h))
        self.o_proj_bias = nn.Parameter(torch.zeros(num_experts, d))
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden_states, key=None, value=None, top_k_index=None, top_k_weights=None, stage: str = "all"):
        tokens, k = top_k_index.shape
        dense = k == self.num_experts or torch.compiler.is_exporting()
        plan = None if dense else ExpertDispatch(top_k_index, self.num_experts)
        if stage == "query":
            return self._queries(hidden_states, top_k_index, plan)
        if stage == "output":
            return self._outputs(hidden_states, top_k_index, top_k_weights, plan)
        b, n, d = hidden_states.shape
        q = self._queries(hidden_states.reshape(tokens, d), top_k_index, plan)
        # One key/value head serves all k queries of a token, so each token's k queries are k more query rows
        # against the same keys: `[tokens, k, h]` is already `[b, n·k, h]` in memory.
        attn = F.scaled_dot_product_attention(
            q.reshape(b, 1, n * k, self.head_dim), key, value, dropout_p=self.dropout_p if self.training else 0.0
        )
        return self._outputs(attn.view(tokens, k, self.head_dim), top_k_index, top_k_weights, plan)

    def _queries(self, flat, top_k_index, plan):
        """Token rows `[T, d]` → each slot's query `[T, k, h]`."""
        if plan is not None:
            return plan.project(
                flat, self.q_proj, self.q_proj_bias, self.config._experts_implementation or "segmented_mm"
            )
        num, h = self.num_experts, self.head_dim
        q = F.linear(flat, self.q_proj.reshape(num * h, -1), self.q_proj_bias.reshape(-1)).view(-1, num, h)
        return q if top_k_index.shape[-1] == num else q.gather(1, top_k_index.unsqueeze(-1).expand(-1, -1, h))

    def _outputs(self, attn, top_k_index, top_k_weights, plan):
        """Each slot's attention output `[T, k, h]` → `Σ_j g_j · (attn_j W_o^{e_j} + b_o^{e_j})` `[T, d]`."""
        if plan is not None:
            impl = self.config._experts_implementation or "segmented_mm"
            return plan.project_sum(attn, self.o_proj, self.o_proj_bias, top_k_weights, impl)
        (tokens, k, h), num = attn.shape, self.num_experts
        gates = gates_full(top_k_index, top_k_weights, num)
        if k == num:
            # queries, and so outputs, in expert order; gated in place where autograd records nothing
            g = gates.unsqueeze(-1).to(attn.dtype)
            weighted = attn * g if torch.is_grad_enabled() and (attn.requires_grad or g.requires_grad) else attn.mul_(g)
        else:  # each token's k gated outputs (in top-k order) into its expert slots
            weighted = attn * top_k_weights.unsqueeze(-1).to(attn.dtype)
            weighted = attn.new_zeros(tokens, num, h).scatter_add(
                1, top_k_index.unsqueeze(-1).expand(-1, -1, h), weighted
            )
        o_proj = self.o_proj.permute(1, 0, 2).reshape(-1, num * h)  # the experts' inputs side by side
        return add_gated_bias(F.linear(weighted.reshape(tokens, num * h), o_proj), gates, self.o_proj_bias)


class MoEViTMoAttention(nn.Module):
    """Mixture of attention heads (multi-query): each token selects k experts; expert e owns its query and output
    projections (`experts`), and one shared `k_proj`/`v_proj` (d → h) serves every selected head. Experts may be
    stored in several groups like the MLP experts; a task routing over several groups projects each slot in the
    group holding its expert (`ExpertGroupSplit`)."""

    def __init__(self, config: MoEViTConfig, layer_idx: int):
        super().__init__()
        d, h = config.hidden_size, config.attn_expert_head_size
        self.config = config
        self.router = MoEViTTopKRouter(config, "attn", layer_idx)
        self.group_sizes = config.expert_groups("attn", layer_idx)
        self.experts = MoEViTAttentionExperts(config, self.group_sizes[0])
        self.extra_experts = nn.ModuleList([MoEViTAttentionExperts(config, g) for g in self.group_sizes[1:]])
        self.k_proj = nn.Linear(d, h, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, h, bias=config.qkv_bias)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden_states, task, top_k=None, expert_mask=None):
        b, n, d = hidden_states.shape
        flat = hidden_states.reshape(b * n, d)
        route = self.router(flat, task, top_k, expert_mask)
        key = self.k_proj(hidden_states).unsqueeze(1)  # [b, 1, n, h]
        value = self.v_proj(hidden_states).unsqueeze(1)
        if route.logits.shape[-1] <= self.group_sizes[0]:  # within the first group (old tasks keep their code)
            return self.experts(hidden_states, key, value, route.indices, route.weights).view(b, n, d), route
        # over several groups: each group projects only its slots (as tokens with top-1 routing)
        k, h = route.indices.shape[-1], key.shape[-1]
        split, groups = ExpertGroupSplit(route.indices, self.group_sizes), [self.experts, *self.extra_experts]
        qs = [
            groups[g](x, top_k_index=idx, stage="query").view(-1, h)
            for (g, idx), x in zip(split.parts, split.rows(flat))
        ]
        q = split.to_pairs(qs).view(b, 1, n * k, h)
        attn = F.scaled_dot_product_attention(q, key, value, dropout_p=self.dropout_p if self.training else 0.0)
        parts = zip(split.parts, split.rows(attn.reshape(b * n * k, h), per_slot=True), split.gates(route.weights))
        ys = [groups[g](a.unsqueeze(1), top_k_index=idx, top_k_weights=w, stage="output") for (g, idx), a, w in parts]
        return split.combine(ys).view(b, n, d), route


# ----------------------------------------------------------------------------------------------------------------
# Layer
# ----------------------------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class MoEViTLayer(GradientCheckpointingLayer):
    """Pre-norm ViT block whose attention and/or MLP may be mixtures of experts."""

    def __init__(self, config: MoEViTConfig, layer_idx: int, drop_path: float = 0.0):
        super().__init__()
        self.layer_idx = layer_idx
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn_is_moe = config.attn_experts[layer_idx] > 0
        self.mlp_is_moe = config.mlp_experts[layer_idx] > 0
        self.attention = MoEViTMoAttention(config, layer_idx) if self.attn_is_moe else MoEViTAttention(config)
        self.mlp = MoEViTSparseMLP(config, layer_idx) if self.mlp_is_moe else MoEViTMLP(config)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states, task_embedding, task, routing: dict):
        routes = []
        hidden_states = hidden_states + task_embedding
        x = self.layernorm_before(hidden_states)
        if self.attn_is_moe:
            x, route = self.attention(x, task, *routing.get(f"layers.{self.layer_idx}.attn", (None, None)))
            routes.append(route)
        else:
            x = self.attention(x)
        hidden_states = hidden_states + self.drop_path(x)
        x = self.layernorm_after(hidden_states)
        if self.mlp_is_moe:
            x, route = self.mlp(x, task, *routing.get(f"layers.{self.layer_idx}.mlp", (None, None)))
            routes.append(route)
        else:
            x = self.mlp(x)
        return hidden_states + self.drop_path(x), routes


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MoEViTModelOutput(ModelOutput):
    """Output of [`MoEViTModel`].

    last_hidden_state `[batch, 1 + patches, d]`; pooler_output `[batch, d]`; aux_loss: the configured Switch
    balance and router z-losses (zero when both weights are 0); hidden_states (input of every layer, then the
    final output) when asked; router_probs / router_logits `[tokens, E_t]` and router_indices `[tokens, k]`, one
    per MoE layer in `config.moe_layer_names()` order, when `output_router_probs=True` (indices highest gate
    first).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    router_probs: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_indices: tuple[torch.LongTensor, ...] | None = None
    task: str | None = None


@dataclass
class MoEViTBackboneOutput(BackboneOutput):
    """`BackboneOutput` plus the MoE extras, for losses the model around the backbone does not compute: `aux_loss`
    (the configured balance / z-losses) and, when `config.backbone_output_router_probs`, `router_probs` and
    `router_indices` per MoE layer, and the task that routed. UperNet and DETR read only `feature_maps`; a forward
    hook on the backbone (`model.backbone.register_forward_hook(...)`) hands the rest to a training loop."""

    aux_loss: torch.FloatTensor | None = None
    router_probs: tuple[torch.FloatTensor, ...] | None = None
    router_indices: tuple[torch.LongTensor, ...] | None = None
    task: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Pretrained base
# ----------------------------------------------------------------------------------------------------------------

#: set while `MoEViTPreTrainedModel.from_pretrained` loads: it checks the backbone from the load report itself
_LOADING_WITH_REPORT = contextvars.ContextVar("moe_adapt_loading_with_report", default=False)


class MoEViTPreTrainedModel(PreTrainedModel):
    config_class = MoEViTConfig
    config: MoEViTConfig
    base_model_prefix = "moe_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoEViTEmbeddings", "MoEViTLayer"]
    _supports_sdpa = True
    # transformers decides whether `experts_implementation` can be set by looking for `@use_experts_implementation`
    # in the model class's own module; the task models live beside this file, the experts in it.
    _can_set_experts_implementation_cached_value = True
    # our forwards take **kwargs but compute a mean loss themselves: Trainer must scale it (gradient accumulation,
    # several processes) as for any model that does not normalise by the number of items
    accepts_loss_kwargs = False

    def set_routing(self, task, top_k=None, expert_mask=None) -> None:
        """Model-level compute control for `task` (see `MoEViTModel.set_routing`); task models delegate to their
        backbone."""
        return MoEViTModel.set_routing(backbone_of(self), task, top_k=top_k, expert_mask=expert_mask)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        return super().get_correct_experts_implementation(requested_experts or EXPERTS_IMPLEMENTATIONS[0])

    def _init_weights(self, module):
        if isinstance(self, MoEViTModel):
            _refuse_backbone_reinit(self, module)
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoEViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
        elif isinstance(module, MoEViTExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, MoEViTAttentionExperts):
            init.normal_(module.q_proj, mean=0.0, std=std)
            init.normal_(module.o_proj, mean=0.0, std=std)
            init.zeros_(module.q_proj_bias)
            init.zeros_(module.o_proj_bias)
        elif isinstance(module, MoEViTTaskRouter):
            init.zeros_(module.weight)  # uniform routing at the start (Mod-Squad)
        elif isinstance(module, MoEViTTaskEmbeddings):
            for emb in module.values():
                init.zeros_(emb)

    def save_pretrained(self, save_directory, *args, image_processor=None, **kwargs):
        """`PreTrainedModel.save_pretrained` (safetensors), plus an image processor beside the weights so that
        transformers' pipelines work on the folder. `image_processor`: one to save, `None` for the default
        (`default_image_processor(config)`), `False` for none.

        The folder is written in one step (`moe_adapt.io.atomic_dir`): everything goes to a hidden sibling folder
        that then replaces `save_directory`, so a process killed while saving leaves the previous complete folder
        (or none), never a half-written one. Other files already in `save_directory` (a model card, say) are kept.
        Only one process writes: with `is_main_process=False` (accelerate's pattern, called on every rank) nothing
        is written. A folder that holds the working directory cannot be swapped and is written in place.
        """
        from ...io import atomic_dir

        if not kwargs.get("is_main_process", True):
            return
        target = Path(save_directory).resolve()
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", Path(save_directory).name)  # not the staging folder's name
        cwd = Path.cwd().resolve()
        if cwd == target or target in cwd.parents:
            self._save_into(target, image_processor, *args, **kwargs)
            return
        with atomic_dir(target) as stage:
            if target.is_dir():
                _keep_other_files(target, stage)
            self._save_into(stage, image_processor, *args, **kwargs)

    def _save_into(self, folder: Path, image_processor, *args, **kwargs) -> None:
        super().save_pretrained(folder, *args, **kwargs)
        if image_processor is not False:
            (image_processor or default_image_processor(self.config)).save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = False, **kwargs):
        """`PreTrainedModel.from_pretrained` with safetensors only (never pickle) and the MoE ViT backbone loaded
        strictly, judged from transformers' load report (`output_loading_info`).

        - A backbone tensor (embeddings, attention, experts, routers, task embeddings, norms) that is missing,
          unexpected or shaped unlike the config is an error naming it, and a damaged weights file an error naming
          the file: never a silent re-initialisation. Models that hold the backbone inside their own classes
          (`UperNetForSemanticSegmentation`, `DetrForObjectDetection`) load through transformers' own
          `from_pretrained`, which initialises what the checkpoint lacked: `_init_weights` refuses that for the
          backbone, naming the tensor.
        - Task heads follow transformers' rules: a head the checkpoint lacks or holds in another shape is an error
          naming it, unless `ignore_mismatched_sizes=True`, which starts such heads fresh. The base model loaded
          from a task model's checkpoint drops the heads.
        - `strict=True`: every tensor, heads included, must be in the checkpoint and nothing else may be.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("moe_adapt loads weights from safetensors only (pickle is never used).")
        kwargs["use_safetensors"] = True
        want_info = kwargs.pop("output_loading_info", False)
        fresh_ok = bool(kwargs.pop("ignore_mismatched_sizes", False))
        path = pretrained_model_name_or_path
        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
            path = os.fspath(path)
            _check_weights_readable(path)
        token = _LOADING_WITH_REPORT.set(True)
        try:  # mismatched tensors come back in the report (and are judged below) instead of a generic error
            model, info = super().from_pretrained(
                path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        finally:
            _LOADING_WITH_REPORT.reset(token)
        _check_load_report(model, path, info, strict=strict, fresh_ok=fresh_ok)
        backbone_of(model)._built_on_meta = False  # loaded: later initialisations are its user's
        realign_cpu_tensors(model)
        return (model, info) if want_info else model


def _refuse_backbone_reinit(backbone: MoEViTModel, module: nn.Module) -> None:
    """Called from `_init_weights` on the backbone's modules. At the end of a load by another model's
    `from_pretrained` (UperNet, DETR: the backbone was built on the meta device and transformers marked each loaded
    tensor `_is_hf_initialized`), a backbone parameter without the mark was not in the checkpoint (or was
    mis-shaped): raise naming it instead of letting transformers initialise it. Our own `from_pretrained` judges
    the load report instead, and a model built or loaded before initialises as asked."""
    if not backbone._built_on_meta or _LOADING_WITH_REPORT.get():
        return
    # parameters offloaded to disk (`device_map=... "disk"`) stay on the meta device, unmarked, until used
    fresh = [
        p for p in module.parameters(recurse=False) if not getattr(p, "_is_hf_initialized", False) and not p.is_meta
    ]
    if not fresh:
        return
    names = {id(p): n for n, p in backbone.named_parameters()}
    raise ValueError(
        f"The checkpoint is missing the MoE ViT backbone's {', '.join(names[id(p)] for p in fresh)} (or holds it "
        "mis-shaped, skipped under ignore_mismatched_sizes). moe_adapt never re-initialises backbone tensors "
        "silently: load a checkpoint that holds them, or fix its config (e.g. the per-layer expert counts)."
    )


def backbone_of(model: nn.Module) -> MoEViTModel:
    """The `MoEViTModel` of a model: itself, a task model's `.moe_vit`, or that of the model a peft wrapper holds."""
    if hasattr(model, "get_base_model") and not isinstance(model, PreTrainedModel):
        model = model.get_base_model()
    return find_backbone(model)[0]


def find_backbone(model: nn.Module) -> tuple[MoEViTModel, str]:
    """The `MoEViTModel` inside `model` and its state-dict prefix: `(model, "")` for a bare backbone,
    `(model.moe_vit, "moe_vit.")` for a task model."""
    if isinstance(model, MoEViTModel):
        return model, ""
    backbone = getattr(model, "moe_vit", None)
    if isinstance(backbone, MoEViTModel):
        return backbone, "moe_vit."
    raise ValueError(
        f"{type(model).__name__} is not a MoE ViT: expected an MoEViTModel or a task model holding it as `.moe_vit`."
    )


class MoEViTModel(MoEViTPreTrainedModel):
    """The multi-task MoE ViT backbone. `forward(pixel_values, task=...)` routes with that task's routers.

    Example:

    ```python
    >>> import torch
    >>> from moe_adapt import MoEViTConfig, MoEViTModel
    >>> model = MoEViTModel(MoEViTConfig.from_preset("tiny", tasks=["cls", "seg"]))
    >>> out = model(torch.randn(2, 3, 32, 32), task="seg", output_router_probs=True)
    >>> out.last_hidden_state.shape, len(out.router_probs)
    (torch.Size([2, 17, 32]), 4)
    ```
    """

    def __init__(self, config: MoEViTConfig):
        super().__init__(config)
        self.embeddings = MoEViTEmbeddings(config)
        self.task_embeddings = MoEViTTaskEmbeddings(
            {t: nn.Parameter(torch.zeros(config.hidden_size)) for t in config.tasks}
        )
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList([MoEViTLayer(config, i, rates[i]) for i in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.routing_overrides: dict[str, dict] = {}
        self.gradient_checkpointing = False
        # built by a `from_pretrained` (transformers builds models on the meta device, then loads): see
        # `_refuse_backbone_reinit`
        self._built_on_meta = self.embeddings.cls_token.is_meta
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.projection

    # -- routing control ---------------------------------------------------------------------------------------
    def moe_layers(self) -> dict[str, nn.Module]:
        """`{name: MoE module}` in forward order; names as in `config.moe_layer_names()`."""
        return {
            name: self.layers[i].attention if kind == "attn" else self.layers[i].mlp
            for name, i, kind in self.config.moe_layers()
        }

    def resolve_task(self, task: str | int | None) -> str:
        """A task name from `task` (a name, an index, or None = `config.default_task`, else the first task)."""
        if task is None:
            return self.config.default_task or self.config.tasks[0]
        return self.config.tasks[self.config.task_index(task)]

    def set_routing(self, task: str, top_k: int | dict | None = None, expert_mask: dict | None = None) -> None:
        """Model-level compute control for `task`: a top-k override (an int, or `{"attn": k, "mlp": k}`) and/or
        expert masks (`{layer_name: bool [E_t]}`). `set_routing(task)` with no override clears it."""
        task = self.resolve_task(task)
        self.routing_plan(task, top_k, expert_mask)  # validates
        if top_k is None and expert_mask is None:
            self.routing_overrides.pop(task, None)
        else:
            self.routing_overrides[task] = {"top_k": top_k, "expert_mask": expert_mask}

    def routing_plan(self, task: str, top_k=None, expert_mask=None) -> dict[str, tuple]:
        """`{layer_name: (top_k or None, mask or None)}` for `task`: the given overrides, else those of
        `set_routing`, validated by `MoEViTConfig.routing_plan`."""
        if top_k is None and expert_mask is None and task in self.routing_overrides:
            top_k = self.routing_overrides[task]["top_k"]
            expert_mask = self.routing_overrides[task]["expert_mask"]
        return self.config.routing_plan(task, top_k, expert_mask)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        task: str | int | None = None,
        output_router_probs: bool = False,
        output_hidden_states: bool | None = None,
        top_k: int | dict | None = None,
        expert_mask: dict | None = None,
        **kwargs,
    ) -> MoEViTModelOutput:
        """pixel_values `[batch, C, H, W]` (H, W multiples of patch_size) → `MoEViTModelOutput` (a tuple of its
        non-None fields under `return_dict=False`, as in transformers)."""
        task = self.resolve_task(task)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        routing = self.routing_plan(task, top_k, expert_mask)
        hidden = self.embeddings(pixel_values)
        task_embedding = self.task_embeddings(task).to(hidden.dtype)
        all_hidden, routes = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden)
            hidden, layer_routes = layer(hidden, task_embedding, task, routing)
            routes.extend(layer_routes)
        last = self.layernorm(hidden)
        if output_hidden_states:
            all_hidden.append(last)
        pooled = last[:, 0] if self.config.pooling == "cls" else last[:, 1:].mean(1)
        aux = hidden.new_zeros(())
        if routes and self.config.balance_loss_weight:
            aux = aux + self.config.balance_loss_weight * sum(
                load_balancing_loss(r.probs, r.indices) for r in routes
            ) / len(routes)
        if routes and self.config.router_z_loss_weight:
            aux = aux + self.config.router_z_loss_weight * sum(router_z_loss(r.logits) for r in routes) / len(routes)
        return MoEViTModelOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            aux_loss=aux,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            # contiguous, as users may .view() them (routers compute them as transposed views)
            router_probs=tuple(r.probs.contiguous() for r in routes) if output_router_probs else None,
            router_logits=tuple(r.logits.contiguous() for r in routes) if output_router_probs else None,
            router_indices=tuple(r.indices for r in routes) if output_router_probs else None,
            task=task,
        )

    # -- sparse upcycling ----------------------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        vit,
        tasks: list[str],
        num_experts: int = 8,
        top_k: int = 2,
        moe_layers: str = "odd",
        attn_experts: int = 0,
        attn_top_k: int | None = None,
        attn_layers: str = "even",
        **config_kwargs,
    ):
        """Sparse upcycling: build a MoE ViT from a transformers `ViTModel` / `ViTForImageClassification` (or a
        local path to one). Embeddings, attention and norms are copied; the dense MLP is copied into every MLP
        expert (each expert as wide as the dense MLP, top-k gates renormalised), so before any training the result
        reproduces the dense `last_hidden_state` for every task. `moe_layers`: "odd" (Mod-Squad), "even" or "all"
        blocks get MLP experts.

        Attention stays dense unless `attn_experts` > 0 (a multiple of the number of heads): then the `attn_layers`
        blocks ("even", Mod-Squad's layout) get a mixture of attention heads, expert e from dense head `e mod heads`
        (its query and output projection; the shared key and value projections are the mean of the heads', as in
        multi-query uptraining), routing to `attn_top_k` experts (default: as many as the dense model has heads).
        Multi-query attention cannot hold per-head keys and values, so this start is close to, not equal to, the
        dense model; see `upcycling._upcycle_attention`."""
        from .upcycling import upcycle_dense_vit

        return upcycle_dense_vit(
            cls,
            vit,
            tasks,
            num_experts=num_experts,
            top_k=top_k,
            moe_layers=moe_layers,
            attn_experts=attn_experts,
            attn_top_k=attn_top_k,
            attn_layers=attn_layers,
            **config_kwargs,
        )


# ----------------------------------------------------------------------------------------------------------------
# Task models
# ----------------------------------------------------------------------------------------------------------------


class MoEViTBackbone(BackboneMixin, MoEViTPreTrainedModel):
    """Multi-scale feature maps for dense heads (UperNet, DETR, ...): the chosen layers' patch tokens, reshaped to
    maps and passed through a simple feature pyramid (strides 4, 8, 16, 32 of the patch grid's ×4, ×2, ×1, ×½,
    as in BEiT/ViTDet) when `config.backbone_fpn` and four layers are chosen. Routes with `config.backbone_task`
    (default: the first task) unless `task=` is given. Inputs whose size is not a multiple of the patch size are
    zero-padded at the bottom/right."""

    def __init__(self, config: MoEViTConfig):
        super().__init__(config)
        self.moe_vit = MoEViTModel(config)
        d = config.hidden_size
        self.num_features = [d] * (config.num_hidden_layers + 1)
        self.use_fpn = config.backbone_fpn and len(self.out_features) == 4
        if self.use_fpn:
            self.fpn = nn.ModuleList(
                [
                    nn.Sequential(
                        nn.ConvTranspose2d(d, d, 2, 2), nn.BatchNorm2d(d), nn.GELU(), nn.ConvTranspose2d(d, d, 2, 2)
                    ),
                    nn.ConvTranspose2d(d, d, 2, 2),
                    nn.Identity(),
                    nn.MaxPool2d(2, 2),
                ]
            )
        self.post_init()

    def forward(
        self, pixel_values, output_hidden_states=None, output_attentions=None, return_dict=None, task=None, **kwargs
    ):
        p = self.config.patch_size
        h, w = pixel_values.shape[-2:]
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        gh, gw = (h + pad_h) // p, (w + pad_w) // p
        task = task if task is not None else (self.config.backbone_task or self.config.tasks[0])
        out = self.moe_vit(
            pixel_values,
            task=task,
            output_hidden_states=True,
            return_dict=True,
            output_router_probs=self.config.backbone_output_router_probs,
        )
        maps = []
        for name, hs in zip(self.stage_names, out.hidden_states):
            if name in self.out_features:
                maps.append(hs[:, 1:].transpose(1, 2).reshape(hs.shape[0], -1, gh, gw))
        if self.use_fpn:
            maps = [op(m) for op, m in zip(self.fpn, maps)]
        return MoEViTBackboneOutput(
            feature_maps=tuple(maps),
            hidden_states=out.hidden_states if output_hidden_states else None,
            aux_loss=out.aux_loss,
            router_probs=out.router_probs,
            router_indices=out.router_indices,
            task=out.task,
        )


__all__ = [
    "MoEViTAttention",
    "MoEViTAttentionExperts",
    "MoEViTBackbone",
    "MoEViTBackboneOutput",
    "MoEViTEmbeddings",
    "MoEViTExperts",
    "MoEViTLayer",
    "MoEViTMLP",
    "MoEViTModel",
    "MoEViTModelOutput",
    "MoEViTMoAttention",
    "MoEViTPreTrainedModel",
    "MoEViTSparseMLP",
    "MoEViTTaskEmbeddings",
    "MoEViTTaskRouter",
    "MoEViTTopKRouter",
    "RouterOutput",
    "backbone_of",
]
