"""The multi-task mixture-of-experts Vision Transformer, read top to bottom like a transformers model:

embeddings → routing → experts (MLP and attention) → layer → pretrained base → task models.

Every MoE layer holds one router per task (zero-initialised, so routing starts uniform). MLP experts are fused
3-D parameters (`up_proj` [E, I, d], `down_proj` [E, d, I]) run by transformers' experts backends
(`config.experts_implementation`: our `segmented_mm` (default) and `padded_bmm`, transformers' `grouped_mm`,
`batched_mm`, `eager`); attention experts (a mixture of attention heads with shared keys and values) use the same
kinds of dispatch. A router that selects all of its experts (a slice that kept exactly k) runs its layer as one
fused dense layer.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.configuration_utils import PreTrainedConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_moe_vit import MoEViTConfig
from .image_processing_moe_vit import default_image_processor
from .losses import load_balancing_loss, router_z_loss

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
            raise ValueError(f"pixel_values must be [batch, channels, height, width]; got shape {tuple(pixel_values.shape)}.")
        _, c, h, w = pixel_values.shape
        if c != self.num_channels:
            raise ValueError(
                f"pixel_values has {c} channels but the model expects num_channels={self.num_channels}."
            )
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


# ----------------------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------------------


class RouterOutput(NamedTuple):
    """What one MoE layer's router decided for one batch (tokens flattened).

    logits `[tokens, E_t]`, probs `[tokens, E_t]` (softmax of logits; E_t = the task's router size),
    indices `[tokens, k]` (chosen expert ids, highest gate first), weights `[tokens, k]` (gates, renormalised if
    configured). When the router chooses every expert (k = E_t, e.g. a slice that kept exactly k), indices are
    `0..E_t-1` in expert order instead and `all_experts` is True (on CPU, logits and probs are then transposed
    views, not contiguous; the model's `router_probs` / `router_logits` outputs are made contiguous).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    #: True when the router chose every expert: `indices` is then `arange(E)` per token and `weights` are in that order
    all_experts: bool = False


def router_softmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.softmax(-1)` for router logits `[tokens, E]`. PyTorch's CPU softmax over a last dimension shorter
    than its vector width (E < 16) runs element by element: 5-9x slower, forward and backward, than the softmax of
    the transposed `[E, tokens]` tensor over its first dimension, which is what this computes for small E."""
    if logits.dim() != 2 or logits.shape[-1] >= 16 or logits.device.type != "cpu":
        return logits.softmax(dim=-1)
    return logits.t().softmax(dim=0).t().contiguous()


def check_not_offloaded(tensor: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """Raise when `tensor` is on the meta device while `reference` (the data it is about to meet) is not.

    accelerate's offloading (a `device_map` entry "cpu" beside an accelerator, or "disk") keeps a module's tensors
    on the meta device and loads them in a hook around that module's own forward. The MoE layers read some tensors
    outside such a forward (a task's router weight, the attention experts, a slice's fused experts, the task
    embeddings): offloaded, those would reach the computation as meta tensors. Checked where they are read, so whatever
    dispatched the model (our `from_pretrained`, UperNet's, DETR's, `dispatch_model`) is covered, a hook that loads
    a whole MoE layer first (`preload_module_classes`) passes, and forwards on the meta device stay possible."""
    if tensor.is_meta and not reference.is_meta:
        raise ValueError(
            f"{what} is on the meta device: accelerate offloaded it (a device_map entry 'cpu' or 'disk'), and the MoE "
            "layers read it outside the submodule forward in which the offload hook would load it. Keep the MoE "
            "layers and the task embeddings on devices that hold them (dense layers may be offloaded)."
        )


class MoEViTTaskRouter(nn.Linear):
    """One task's router in one layer: Linear(d → E_task, no bias), zero-initialised (uniform routing at start)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts, bias=False)


class MoEViTTopKRouter(nn.Module):
    """One zero-initialised linear router per task: `routers[task].weight` is `[E_task, hidden]`.

    A task may route over only the first `E_task` experts of the layer (continual learning keeps old tasks on
    their old experts this way).
    """

    def __init__(self, config: MoEViTConfig, kind: str, layer_idx: int):
        super().__init__()
        self.kind, self.layer_idx = kind, layer_idx
        self.num_experts = getattr(config, f"{kind}_experts")[layer_idx]
        self.top_k = getattr(config, f"{kind}_top_k")
        self.renormalize = config.router_renormalize
        self.routers = nn.ModuleDict(
            {t: MoEViTTaskRouter(config.hidden_size, config.router_size(t, kind, layer_idx)) for t in config.tasks}
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        task: str,
        top_k: int | None = None,
        expert_mask: torch.Tensor | None = None,
    ) -> RouterOutput:
        """hidden_states `[tokens, d]` → `RouterOutput`. `expert_mask` `[E_t]` (bool) removes experts before the
        softmax, so the gates equal those of a model sliced to the unmasked experts."""
        weight = self.routers[task].weight
        check_not_offloaded(weight, hidden_states, f"The {self.kind} router of task {task!r} in layer {self.layer_idx}")
        k = self.top_k if top_k is None else top_k
        every_expert = k == weight.shape[0]
        # a router choosing every expert on CPU: `[tokens, E]` logits as the transposed view of `W xᵀ` `[E, tokens]`
        # (see `_route_all`); masking in place keeps that layout
        transposed = every_expert and hidden_states.device.type == "cpu"
        logits = torch.mm(weight, hidden_states.t()).t() if transposed else F.linear(hidden_states, weight)
        if expert_mask is not None:
            logits.masked_fill_(~expert_mask.to(device=logits.device, dtype=torch.bool), float("-inf"))
        if transposed:  # the softmax over the expert axis, the first of the `[E, tokens]` layout
            return self._route_all(hidden_states, logits, logits.float().t().softmax(dim=0).t())
        probs = router_softmax(logits.float())
        if every_expert:
            return self._route_all(hidden_states, logits, probs)
        weights, indices = probs.topk(k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, probs, indices, weights.to(hidden_states.dtype))

    @staticmethod
    def _route_all(hidden_states: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor) -> RouterOutput:
        """Every expert is chosen (a slice that kept exactly k): the gates are the probabilities themselves, in
        expert order (renormalising divides by a sum of 1); no top-k, no sort, and `_gates_full` needs no scatter.

        On CPU `forward` computes the logits as `W xᵀ` `[E, tokens]` and the softmax over their first dimension, so
        logits and probabilities arrive as `[tokens, E]` views of those (not contiguous). Against `x Wᵀ` followed
        by `router_softmax`, this takes the router of a mini slice layer from 81-99 µs to 46-60 µs at 1,088 tokens
        and from 264-281 µs to 149-205 µs at 4,160 (1 thread, 2 and 4 experts); elsewhere they come from the
        top-k path's `x Wᵀ`. The gates are a contiguous copy in every case, so that nothing done to them reaches
        `probs`."""
        tokens, k = probs.shape
        indices = torch.arange(k, device=probs.device).expand(tokens, k).contiguous()
        gates = probs.to(hidden_states.dtype, memory_format=torch.contiguous_format, copy=True)
        return RouterOutput(logits, probs, indices, gates, all_experts=True)


# ----------------------------------------------------------------------------------------------------------------
# Expert dispatch shared by MLP and attention experts
# ----------------------------------------------------------------------------------------------------------------


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch 2.13's CPU `grouped_mm` backward fails on a gradient with stride 0 (what `y.sum().backward()` sends);
    this sits right behind every grouped matmul so no such gradient ever reaches it.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_mm_kernel(x: torch.Tensor, weight: torch.Tensor):
    """torch's grouped matmul where it runs on these operands, else None (the caller loops over the experts):
    `F.grouped_mm` on CUDA from compute capability 8.0 (torch ≥ 2.9), on CPU where `_cpu_grouped_mm_ok` accepts the
    operands, and on `meta` tensors, or torch 2.8's `torch._grouped_mm` (CUDA, Hopper only). Other devices loop."""
    device = weight.device
    if device.type == "cpu":
        return F.grouped_mm if _cpu_grouped_mm_ok(x, weight.transpose(-2, -1)) else None
    if device.type == "meta":  # shapes only (its checks mirror CUDA's fused kernel: bf16)
        return F.grouped_mm if hasattr(F, "grouped_mm") else None
    if device.type != "cuda":
        return None
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm if torch.cuda.get_device_capability(device) >= (8, 0) else None
    if hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device)[0] == 9:
        return torch._grouped_mm
    return None


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x `[S, in]` sorted by expert, weight `[E, out, in]`, offsets `[E]` (int32 cumulative counts) → `[S, out]`.

    Under autocast both operands are cast to the autocast dtype first, as `F.linear` would be (the grouped kernels
    are not autocast-enabled; on CUDA only bf16 takes the fused kernel, other dtypes a per-expert fallback that
    reads the offsets back to the host). Where no grouped kernel runs (or rows are not 16-byte aligned), a loop
    over the experts, which reads the offsets back to the host too."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    x = x.to(weight.dtype).contiguous()
    size = weight.element_size()
    aligned = (weight.shape[-1] * size) % 16 == 0 and (weight.shape[-2] * size) % 16 == 0
    kernel = _grouped_mm_kernel(x, weight) if aligned else None
    if kernel is not None:
        out = kernel(x, weight.transpose(-2, -1), offs=offsets)
    else:  # a plain loop over experts: correct everywhere, slower
        out = torch.cat(
            [x[s:e] @ weight[i].T for i, (s, e) in enumerate(zip([0] + offsets[:-1].tolist(), offsets.tolist()))]
        )
    return _ContiguousGrad.apply(out)


class _GatherRows(torch.autograd.Function):
    """`out[i] = src[source[i]]`, where `source = index // group` for an injective `index` (each source row feeds
    `group` consecutive slots) whose inverse map `inverse` is known; callers pass `source` as they hold it.

    Its backward is a gather too (`grad[inverse]`, summed over each group of `group` rows, with the rows listed in
    `zero_blocks` zeroed), never a scatter-add: on CPU, scatter-adds into zero-filled buffers cost more than the
    expert matmuls themselves."""

    @staticmethod
    def forward(ctx, src, source, inverse, group, zero_blocks):
        ctx.save_for_backward(inverse)
        ctx.group, ctx.rows, ctx.zero_blocks = group, src.shape[0], zero_blocks
        return src.index_select(0, source)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        g = grad.contiguous().index_select(0, inverse)
        if ctx.zero_blocks is not None:  # (capacity, [rows used per expert]): zero each expert's padding tail
            capacity, used = ctx.zero_blocks
            blocks = g.view(len(used), capacity, -1)
            for e, n in enumerate(used):
                if n < capacity:
                    blocks[e, n:].zero_()
        if ctx.group > 1:
            g = g.view(ctx.rows, ctx.group, g.shape[-1]).sum(1)
        return g, None, None, None, None


def _grouped_mm_strides_ok(*mats: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands as they are: one of the last two dims unit-stride and the other's
    stride a multiple of 16 bytes (torch's check)."""
    for m in mats:
        align, (s0, s1), (n0, n1) = 16 // m.element_size(), m.stride()[-2:], m.shape[-2:]
        if s1 == 1 and s0 >= max(1, n1):
            ok = s0 % align == 0
        elif s0 == 1 and s1 >= max(1, n0):
            ok = s1 % align == 0
        else:
            ok = False
        if not ok:
            return False
    return True


@torch.compiler.disable  # a one-off probe on real tensors, outside any compiled graph
@functools.cache
def _cpu_grouped_mm_support() -> tuple[bool, bool]:
    """(whether this torch runs `F.grouped_mm` on CPU, whether it also takes operands whose data pointer is not
    16-byte aligned), probed once on CPU tensors. torch 2.13 does both; older releases in our range may lack the
    function or its CPU kernel, and torch 2.10's CPU kernel rejects misaligned pointers, which weights memory-mapped
    from a safetensors file can have."""
    offs = torch.tensor([4], dtype=torch.int32)
    try:
        F.grouped_mm(torch.ones(4, 4, device="cpu"), torch.ones(1, 4, 4, device="cpu"), offs=offs)
    except (AttributeError, NotImplementedError, RuntimeError, TypeError):
        return False, False
    misaligned = torch.ones(17, device="cpu")[1:].view(1, 4, 4)  # 4 bytes past an aligned allocation
    try:
        F.grouped_mm(torch.ones(4, 4, device="cpu"), misaligned, offs=offs)
    except RuntimeError:
        return True, False
    return True, True


def _cpu_grouped_mm_ok(*mats: torch.Tensor) -> bool:
    """Whether CPU `F.grouped_mm` takes these operands as they are: strides (`_grouped_mm_strides_ok`) and, where this
    torch needs it, 16-byte aligned data pointers."""
    if torch.compiler.is_compiling():  # traced CPU grouped_mm takes bf16 only: the per-expert matmuls compile
        return False
    runs, misaligned_ok = _cpu_grouped_mm_support()
    return runs and _grouped_mm_strides_ok(*mats) and (misaligned_ok or all(m.data_ptr() % 16 == 0 for m in mats))


def _cpu_grouped_offsets(bounds, xs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """int32 end offsets of the expert blocks when `_SegmentedLinear` can run its per-expert matmuls as one CPU
    `F.grouped_mm` call (the same MKL matmul on each block, so bit-identical to the loop, without one Python-level
    call per expert: ~3% of the ViT-S MoE layer), else None (another device or dtype, operands it rejects, or output
    rows that are not a multiple of 16 bytes, which it would pad)."""
    if (
        xs.device.type != "cpu" or xs.dtype != weight.dtype
        or xs.dtype not in (torch.float32, torch.bfloat16, torch.float16)
        or (weight.shape[1] * weight.element_size()) % 16
        or not _cpu_grouped_mm_ok(xs, weight, weight.transpose(1, 2))
    ):
        return None
    return torch.tensor([t for _, t in bounds], dtype=torch.int32)


class _SegmentedLinear(torch.autograd.Function):
    """`y[s] = W[e] · x[src(s)] + b[e]` for rows `s` sorted by expert (expert e owns rows `bounds[e]`).

    `index` (or None for rows already in sorted order) picks the source row of each sorted row. One matmul per
    expert on a contiguous block: no padding, and a hand-written backward that forms only the gradients asked for
    (frozen experts get no weight gradient) and sends the input gradient back to the source rows: with `inverse`
    (the sorted row of each of the `group` consecutive gather slots of a source row, the dispatch plan's inverse
    permutation), a gather (`group` = 1) or, on CPU in fp32/fp64, one `embedding_bag` summing each source row's
    `group` slots (0.61 ms against 0.89 for the `index_add_` into zeros at ViT-S shape, 1 thread); else one
    `index_add_`. On CPU the per-expert matmuls of each direction are one `F.grouped_mm` call (torch's CPU kernel
    runs the same MKL matmul per block, so the result is bit-identical to the Python loop it replaces, which remains
    for operands it rejects: fp64, rows that are not a multiple of 16 bytes such as LoRA rank 2 in fp32). The biases
    are added with one `_foreach_add_`; on CPU in fp32/fp64 their gradients are one `embedding_bag` over the blocks
    (it adds each block's rows one after another: relative error ~3e-7 at 394 rows against torch.sum's ~6e-8, ~3.5e-6
    at 50,000), elsewhere per-block sums."""

    @staticmethod
    def forward(ctx, x, index, weight, bias, bounds, inverse=None):
        xs = (x if index is None else x.index_select(0, index)).contiguous()
        sizes = [t - s for s, t in bounds]
        offsets = _cpu_grouped_offsets(bounds, xs, weight)
        if offsets is not None:
            out = F.grouped_mm(xs, weight.transpose(1, 2), offs=offsets)
        else:
            out = xs.new_empty(xs.shape[0], weight.shape[1])
            for x_e, w_e, o_e in zip(xs.split(sizes), weight.transpose(1, 2).unbind(0), out.split(sizes)):
                if x_e.shape[0]:
                    torch.mm(x_e, w_e, out=o_e)
        # Biases in place after all matmuls: ~6% cheaper than addmm's broadcast copy first, and ~2% cheaper than
        # adding each right after its matmul (on this CPU, work between matmuls slows them); one `_foreach_add_` call
        # over the blocks.
        if bias is not None:
            torch._foreach_add_(list(out.split(sizes)), list(bias.unbind(0)))
        ctx.save_for_backward(xs if ctx.needs_input_grad[2] else None, index, weight, offsets, inverse)
        ctx.bounds, ctx.rows, ctx.has_bias = bounds, x.shape[0], bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        xs, index, weight, offsets, inverse = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        grad = grad.contiguous()  # a stride-0 gradient (`y.sum().backward()`) becomes a real one here
        n_exp, n_out, n_in = weight.shape
        sizes = [t - s for s, t in ctx.bounds]
        if offsets is not None and _cpu_grouped_mm_ok(grad, grad.t()):  # idle experts' weight gradients come out zero
            dxs = F.grouped_mm(grad, weight, offs=offsets) if need_x else None
            dw = F.grouped_mm(grad.t(), xs, offs=offsets) if need_w else None
        else:
            dxs = grad.new_empty(grad.shape[0], n_in) if need_x else None
            dw = grad.new_empty(n_exp, n_out, n_in) if need_w else None
            none = [None] * n_exp
            for g, w_e, dx_e, x_e, dw_e in zip(
                grad.split(sizes), weight.unbind(0), none if dxs is None else dxs.split(sizes),
                none if dw is None else xs.split(sizes), none if dw is None else dw.unbind(0),
            ):
                if not g.shape[0]:  # an idle expert: zero weight gradient
                    if dw_e is not None:
                        dw_e.zero_()
                    continue
                if dx_e is not None:
                    torch.mm(g, w_e, out=dx_e)
                if dw_e is not None:
                    torch.mm(g.t(), x_e, out=dw_e)
        db = None
        if need_b and ctx.has_bias and _cpu_bag_ok(grad):
            # each expert's block of rows is one bag: all sums in one pass over the gradient (at ViT-S shape, on
            # data not in cache: 0.99 ms, against 1.23 for an index_add_ and 1.64 for 16 sums)
            starts = torch.tensor([s for s, _ in ctx.bounds], device=grad.device)
            rows = torch.arange(grad.shape[0], device=grad.device)
            with _cpu_sparse_ops():
                db = F.embedding_bag(rows, grad, starts, mode="sum")
        elif need_b and ctx.has_bias:  # torch.sum accumulates bf16/fp16 in fp32
            db = torch.stack([g.sum(0) for g in grad.split(sizes)])
        if dxs is not None and index is not None:
            group = 0 if inverse is None else inverse.numel() // max(ctx.rows, 1)
            if group == 1:  # each source row feeds one sorted row
                dxs = dxs.index_select(0, inverse)
            elif group and group * ctx.rows == inverse.numel() and _cpu_bag_ok(dxs):
                starts = torch.arange(0, inverse.numel(), group, device=dxs.device)
                with _cpu_sparse_ops():
                    dxs = F.embedding_bag(inverse, dxs, starts, mode="sum")
            else:
                dxs = dxs.new_zeros(ctx.rows, n_in).index_add_(0, index, dxs)
        return dxs, None, dw, db, None, None


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(a * b).sum(1)` for `[S, d]` operands as S batched 1×d · d×1 products: no `[S, d]` temporary (~20% faster on
    CPU at MoE shapes)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


@contextlib.contextmanager
def _cpu_sparse_ops():
    """Around the CPU `embedding_bag`s and `_CombineSorted`'s sparse sampled matmul: autocast off, so the sums
    stay in y's dtype as the `index_add_` path keeps them (CPU autocast would cast them to bf16/fp16, which these
    kernels do not take), and torch's "sparse CSR support is in beta" warning silenced (these matmuls are long
    stable)."""
    with warnings.catch_warnings(), torch.autocast("cpu", enabled=False):
        warnings.simplefilter("ignore")
        yield


def _cpu_bag_ok(y: torch.Tensor) -> bool:
    """Whether rows of y may be gathered and summed with `embedding_bag` (CPU, fp32/fp64): `_CombineSorted` in one pass
    over the expert outputs, where `y * gate` then `index_add_` makes three; `_SegmentedLinear`'s bias gradients."""
    return y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64)


class _CombineSorted(torch.autograd.Function):
    """`out[t] = Σ_j gates[t, j] · y[inverse[t·k + j]]`: expert outputs in sorted pair order `[S, d]`, gates
    `[tokens, k]` in pair order → token outputs `[tokens, d]`.

    On CPU both directions are one weighted `embedding_bag` each (its per-sample-weight kernel reads each row once
    and scales it in the same pass): forward, bag t sums token t's k pair rows of y times their gates; backward,
    sorted pair s gets `gate · grad[token(s)]`. The gates' gradient ⟨grad[t], y[pair]⟩ is one sampled matmul on the
    (token, pair) CSR pattern (`torch.sparse.sampled_addmm`). At ViT-S shape (1 thread) the two bags take ~0.6 ms
    less than the sparse CSR × dense matmul and the gather-then-scale they replace. Elsewhere: a gated
    `index_add_`, a gather and an in-place scale, and a batched row-dot for the gates."""

    @staticmethod
    def forward(ctx, y, gates, perm, inverse, sorted_tokens):
        tokens, k = gates.shape
        g_pairs = gates.reshape(-1).to(y.dtype)
        ctx.bag = _cpu_bag_ok(y)
        if ctx.bag:
            with _cpu_sparse_ops():
                offsets = torch.arange(0, tokens * k, k, device=y.device)
                out = F.embedding_bag(inverse, y, offsets, mode="sum", per_sample_weights=g_pairs)
        else:
            g_sorted = g_pairs.index_select(0, perm)
            out = y.new_zeros(tokens, y.shape[1]).index_add_(0, sorted_tokens, y * g_sorted.unsqueeze(1))
        ctx.save_for_backward(y, g_pairs, perm, inverse, sorted_tokens)
        ctx.gates_shape = gates.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        y, g_pairs, perm, inverse, sorted_tokens = ctx.saved_tensors
        grad = grad.contiguous()
        need_y, need_gates = ctx.needs_input_grad[:2]
        dy = dgate = None
        if ctx.bag:
            with _cpu_sparse_ops():
                if need_y:  # sorted pair s gets gate · grad[token(s)]
                    rows = torch.arange(sorted_tokens.numel(), device=grad.device)
                    dy = F.embedding_bag(sorted_tokens, grad, rows, mode="sum",
                                         per_sample_weights=g_pairs.index_select(0, perm))
                if need_gates:
                    # d gate[t, j] = <grad[t], y[pair (t, j)]>: one sampled matmul on the (token, pair) CSR pattern
                    # reads grad and y where a row-dot would first gather grad into pair order
                    tokens, k = ctx.gates_shape
                    cols, order = inverse.view(tokens, k).sort(dim=1)  # CSR rows with ascending columns
                    crow = torch.arange(0, tokens * k + 1, k, device=y.device)
                    # the pattern only: zero values, so that a non-finite gate does not turn its gradient into NaN
                    zeros = torch.zeros(cols.numel(), dtype=y.dtype, device=y.device)
                    pattern = torch.sparse_csr_tensor(crow, cols.reshape(-1), zeros, size=(tokens, y.shape[0]))
                    vals = torch.sparse.sampled_addmm(pattern, grad, y.t(), beta=0.0).values()
                    dgate = torch.empty(ctx.gates_shape, dtype=vals.dtype, device=vals.device).scatter_(
                        1, order, vals.view(ctx.gates_shape))
        else:  # per sorted pair: the token's gradient, then (for the gates) a row-dot before scaling
            dy = grad.index_select(0, sorted_tokens)
            if need_gates:
                dgate = _rowdot(dy, y).index_select(0, inverse).view(ctx.gates_shape)
            dy.mul_(g_pairs.index_select(0, perm).unsqueeze(1))
        return dy, dgate, None, None, None


def _is_gelu(act_fn) -> bool:
    return isinstance(act_fn, nn.GELU) or getattr(act_fn, "act", None) is F.gelu


def activation_backward(act_fn, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d act(h) / dh applied to `grad`: GELU by its kernel, any other activation by differentiating it again."""
    if _is_gelu(act_fn):
        return torch.ops.aten.gelu_backward(grad, h, approximate=getattr(act_fn, "approximate", "none"))
    with torch.enable_grad():
        leaf = h.detach().requires_grad_(True)
        return torch.autograd.grad(act_fn(leaf), leaf, grad)[0]


def _gated_activation_backward(act_fn, grad, h, gates, act, need_h: bool, need_gates: bool, grad_owned: bool = False):
    """Backward of `act(h) · gates` (gates `[T, e]` broadcast over the last dim of h `[T, e, I]`): `(dh, dgates)`,
    each None when not needed. `act` is act(h); `grad_owned`: `grad` is the caller's scratch and may be overwritten."""
    # per (token, expert) block a row-dot of grad and act(h): no `[T, e, I]` product is formed
    dgates = _rowdot(grad.reshape(-1, h.shape[-1]), act.reshape(-1, h.shape[-1])).view(gates.shape) if need_gates else None
    if not need_h:
        return None, dgates
    scaled = grad.mul_(gates.unsqueeze(-1)) if grad_owned else grad * gates.unsqueeze(-1)
    return activation_backward(act_fn, scaled, h), dgates


class _GatedActivation(torch.autograd.Function):
    """`act(h) · gate` per expert block: h `[T, e, I]`, gates `[T, e]` → `[T, e, I]` (the fused dense path of a
    slice). Keeps only h and the gates for the backward and recomputes act(h) there, where `act → mul` would also
    keep act(h): one `[T, e·I]` activation less per layer, and the gate product is done in place."""

    @staticmethod
    def forward(ctx, h, gates, act_fn):
        ctx.save_for_backward(h, gates)
        ctx.act_fn = act_fn
        return act_fn(h).mul_(gates.unsqueeze(-1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, gates = ctx.saved_tensors
        need_h, need_gates = ctx.needs_input_grad[:2]
        act = ctx.act_fn(h) if need_gates else None
        dh, dgates = _gated_activation_backward(ctx.act_fn, grad, h, gates, act, need_h, need_gates)
        return dh, dgates, None


def expert_lora(experts: nn.Module, name: str):
    """The activation-space LoRA on expert tensor `name` of an experts module, or None: `(lhs [E, out, r],
    rhs [E, r, in], scaling)`, so that expert e's weight is `W[e] + scaling · lhs[e] @ rhs[e]`.

    `moe_adapt.adaptation.enable_expert_lora` sets these for the length of a MoE layer's forward (from peft's
    `ParamWrapper` factors) instead of materialising `W + ΔW`; the base tensor then stays frozen and its gradient is
    never formed, as with LoRA on an `nn.Linear`."""
    factors = experts.__dict__.get("_lora_factors")
    return None if not factors else factors.get(name)


def segmented_linear(x, index, weight, bias, bounds, lora=None, inverse=None) -> torch.Tensor:
    """`_SegmentedLinear` plus an optional activation-space LoRA `(lhs, rhs, scaling)`: per expert block,
    `x W[e]ᵀ + b[e] + scaling · (x rhs[e]ᵀ) lhs[e]ᵀ`."""
    if lora is None:
        return _SegmentedLinear.apply(x, index, weight, bias, bounds, inverse)
    lhs, rhs, scaling = lora
    xs = x if index is None else x.index_select(0, index)
    y = _SegmentedLinear.apply(xs, None, weight, bias, bounds)
    z = _SegmentedLinear.apply(xs, None, rhs, None, bounds)
    return torch.add(y, _SegmentedLinear.apply(z, None, lhs, None, bounds), alpha=scaling)


class _LowRankLinear(torch.autograd.Function):
    """`y = x Wᵀ + b + scaling · (x Aᵀ) Bᵀ` for a frozen W (and b): LoRA with the update folded into the base
    output in place, and a backward that forms only dx, dA and dB (dx in one matmul plus an in-place rank-r
    update). On a narrow ViT this halves LoRA's cost over peft's `y + B(A(x)) * scaling`."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling):
        z = torch.mm(x, a.t())
        y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        y.addmm_(z, b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, a, b, z)
        ctx.scaling = scaling
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, a, b, z = ctx.saved_tensors
        grad = grad.contiguous()
        dz = torch.mm(grad, b).mul_(ctx.scaling)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(grad, weight).addmm_(dz, a)
        da = torch.mm(dz.t(), x) if ctx.needs_input_grad[3] else None
        db = torch.mm(grad.t(), z).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        return dx, None, None, da, db, None


def lora_linear(x, weight, bias, a, b, scaling) -> torch.Tensor:
    """`F.linear(x, weight, bias) + scaling · F.linear(F.linear(x, a), b)` for x `[..., in]`; the fused
    `_LowRankLinear` when the base tensors are frozen and no autocast is active."""
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if not frozen or torch.is_autocast_enabled(x.device.type) or x.dtype != weight.dtype or a.dtype != weight.dtype:
        return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x.to(a.dtype), a), b).to(x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    y = _LowRankLinear.apply(flat, weight, bias, a, b, scaling)
    return y.view(*x.shape[:-1], y.shape[-1])


def fused_expert_linear(x: torch.Tensor, experts: nn.Module, name: str, num: int, stack: str) -> torch.Tensor:
    """The first `num` experts of tensor `name` (`[E, out, in]`) as one dense layer on every token.

    `stack="out"`: x `[T, in]` → `[T, num·out]` (each expert's outputs side by side, with the tensor's bias);
    `stack="in"`: x `[T, num·in]` (each expert's inputs side by side) → `[T, out]`, the sum over experts, no bias.
    An activation-space LoRA on the tensor (see `expert_lora`) adds `scaling · x Rᵀ Lᵀ` with block-diagonal factors."""
    w = getattr(experts, name)[:num]
    n_exp, n_out, n_in = w.shape
    lora = expert_lora(experts, name)
    if stack == "out":
        bias = getattr(experts, f"{name}_bias", None)
        w, bias = w.reshape(n_exp * n_out, n_in), None if bias is None else bias[:num].reshape(-1)
        if lora is None:
            return F.linear(x, w, bias)
        lhs, rhs, scaling = lora  # A = the experts' R stacked [num·r, in]; B = block-diag of their L [num·out, num·r]
        return lora_linear(x, w, bias, rhs[:num].reshape(-1, n_in), torch.block_diag(*lhs[:num]), scaling)
    w, a, b, scaling = stacked_inputs_operands(experts, name, num)
    return F.linear(x, w) if a is None else lora_linear(x, w, None, a, b, scaling)


def stacked_inputs_operands(experts: nn.Module, name: str, num: int):
    """The first `num` experts of tensor `name` (`[E, out, in]`) as one matrix over their inputs side by side:
    `(W [out, num·in], A, B, scaling)`, where an activation-space LoRA gives A = block-diag of the experts' R
    `[num·r, num·in]` and B = their L side by side `[out, num·r]` (A, B, scaling are None without one)."""
    w = getattr(experts, name)[:num]
    n_exp, n_out, n_in = w.shape
    w = w.permute(1, 0, 2).reshape(n_out, n_exp * n_in)
    lora = expert_lora(experts, name)
    if lora is None:
        return w, None, None, None
    lhs, rhs, scaling = lora
    return w, torch.block_diag(*rhs[:num]), lhs[:num].permute(1, 0, 2).reshape(n_out, -1), scaling


class _GatedLowRankLinear(torch.autograd.Function):
    """`x Wᵀ + s · (x Aᵀ) Bᵀ` with `x = act(h) · gates` (per expert block) and a frozen W: a slice's gated activation
    followed by its LoRA'd down projection. Keeps h, the gates and the rank-r `x Aᵀ`, not x: the backward recomputes
    x from h (one activation pass), so LoRA's A gradient costs no `[T, e·I]` activation per layer. A must be
    block-diagonal, expert e's R on block e (`stacked_inputs_operands`): the gates then scale the rank-r gradient
    rather than act(h), and only A's diagonal blocks of the returned gradient are correct (all that block_diag's
    backward reads)."""

    @staticmethod
    def forward(ctx, h, gates, weight, a, b, scaling, act_fn):
        t, e, i = h.shape
        if a.shape[1] != e * i or a.shape[0] % e:
            raise ValueError(f"A must be block-diagonal over the {e} experts' inputs ([e·r, {e * i}]); got {tuple(a.shape)}.")
        x = act_fn(h).mul_(gates.unsqueeze(-1)).view(t, -1)
        z = torch.mm(x, a.t())
        y = torch.mm(x, weight.t()).addmm_(z, b.t(), alpha=scaling)
        ctx.save_for_backward(h, gates, weight, a, b, z)
        ctx.scaling, ctx.act_fn = scaling, act_fn
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, gates, weight, a, b, z = ctx.saved_tensors
        need_h, need_gates, _, need_a, need_b = ctx.needs_input_grad[:5]
        grad = grad.contiguous()
        act = ctx.act_fn(h)
        dz = torch.mm(grad, b).mul_(ctx.scaling)
        da = None
        if need_a:  # A is block-diagonal (expert e's R on block e): scale dz's rank-r block e by gate e, not act(h)
            t, e = gates.shape
            dz_gated = (dz.view(t, e, -1) * gates.unsqueeze(-1)).view(t, -1)
            da = torch.mm(dz_gated.t(), act.view(t, -1))  # its off-diagonal blocks are never read
        db = torch.mm(grad.t(), z).mul_(ctx.scaling) if need_b else None
        dx = torch.mm(grad, weight).addmm_(dz, a).view_as(h)  # gradient of the gated activation
        dh, dgates = _gated_activation_backward(ctx.act_fn, dx, h, gates, act, need_h, need_gates, grad_owned=True)
        return dh, dgates, None, da, db, None, None


def block_ends(sorted_ids: torch.Tensor, num_experts: int, sync_free: bool) -> torch.Tensor:
    """int32 cumulative ends `[E]` of each expert's block of rows, for expert ids sorted ascending. `sync_free`
    (accelerators): binary search, where `bincount` reads the ids' range back to the host on CUDA; on CPU
    `bincount` is the cheaper of the two."""
    if not sync_free:
        return torch.bincount(sorted_ids, minlength=num_experts).cumsum(0).to(torch.int32)
    arange = torch.arange(num_experts, device=sorted_ids.device)
    return torch.searchsorted(sorted_ids, arange, right=True, out_int32=True)


class ExpertDispatch:
    """The token-to-expert plan of one layer: `(token, slot)` pairs sorted by expert id.

    indices `[tokens, k]` → `perm` `[S]` (S = tokens·k; sorted position → flat pair), `inverse` `[S]`,
    `offsets` `[E]` (int32 cumulative counts for grouped matmuls), `sorted_ids` `[S]`, `sorted_tokens` `[S]` (the
    token of each sorted pair), `counts` `[E]`.
    """

    #: the padded-buffer path is used while E·capacity stays within this factor of S, else grouped matmuls
    max_padding = 2.0

    def __init__(self, indices: torch.Tensor, num_experts: int):
        self.indices, self.num_experts = indices, num_experts
        self.tokens, self.k = indices.shape
        flat = indices.reshape(-1)
        self.sorted_ids, self.perm = flat.sort(stable=True)
        # by device type, not `on_accelerator` (which tests patch to run the GPU code on CPU): bincount is exact on
        # CPU and only costs a host sync elsewhere; `block_ends` is tested on both branches directly
        self.offsets = block_ends(self.sorted_ids, num_experts, sync_free=flat.device.type != "cpu")
        # scatter_/index_select rather than advanced indexing: on CPU, tensor[index] costs ~1000x more here
        self.inverse = torch.empty_like(self.perm).scatter_(
            0, self.perm, torch.arange(self.perm.numel(), device=self.perm.device)
        )
        self.sorted_tokens = self.perm // self.k  #: the token of each sorted pair `[S]`
        self._buffer = None
        self._bounds = None

    @property
    def counts(self) -> torch.Tensor:
        """Rows per expert `[E]` (int64), from the block ends; only the padded-buffer path needs them."""
        return self.offsets.diff(prepend=self.offsets.new_zeros(1)).long()

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """(start, end) of each expert's block of sorted pairs."""
        if self._bounds is None:
            ends = self.offsets.tolist()
            self._bounds = list(zip([0] + ends[:-1], ends))
        return self._bounds

    def one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """`[S, E]` one-hot rows of the sorted pairs' experts, in `dtype`: `one_hot @ bias` adds each pair's expert
        bias, and its backward `one_hotᵀ @ grad` sums each expert's block in one matmul (fp32 accumulation, no
        atomics, no host sync)."""
        return (self.sorted_ids.unsqueeze(1) == torch.arange(self.num_experts, device=self.sorted_ids.device)).to(dtype)

    def to_pairs(self, y_sorted: torch.Tensor) -> torch.Tensor:
        """Rows in sorted pair order `[S, ·]` → flat pair order (token t's k rows at t·k ..): a gather whose backward
        is a gather too, where `index_select`'s is a scatter-add into zeros (on CUDA under deterministic
        algorithms, the sort-based `index_put_`)."""
        return _GatherRows.apply(y_sorted, self.inverse, self.perm, 1, None)

    def combine(self, y_sorted: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Expert outputs in sorted pair order `[S, d]` and gates `[tokens, k]` → `Σ_j gate_j · y_j` `[tokens, d]`."""
        return _CombineSorted.apply(y_sorted, gates, self.perm, self.inverse, self.sorted_tokens)

    def project_sum(self, pairs: torch.Tensor, weight: torch.Tensor, bias, gates: torch.Tensor, impl: str, lora=None):
        """`Σ_j gate_j · expert_j(pairs_j)`: pair inputs `[tokens, k, in]` → `[tokens, out]`."""
        if impl != "segmented_mm":
            return _pair_sum(self.project(pairs, weight, bias, impl, per_slot=True), gates)
        src = pairs.reshape(-1, pairs.shape[-1]).to(weight.dtype).index_select(0, self.perm)
        return self.combine(segmented_linear(src, None, weight, bias, self.bounds, lora), gates)

    def buffer(self):
        """Rows of an `[E, C, ·]` buffer (C = the busiest expert's load) for batched matmuls, or None when the
        padding would exceed `max_padding`. Returns (C, buffer row of each pair `[S]`, source pair of each buffer
        row `[E·C]` (0 for padding rows, whose contents are never read back), (C, rows used per expert))."""
        if self._buffer is None:
            n = self.perm.numel()
            counts = self.counts
            capacity = int(counts.max()) if n else 0
            if capacity == 0 or self.num_experts * capacity > self.max_padding * n:
                self._buffer = (None,)
            else:
                device = self.perm.device
                starts = self.offsets.long() - counts
                rank = torch.arange(n, device=device) - starts.index_select(0, self.sorted_ids)
                rows_sorted = self.sorted_ids * capacity + rank
                pair_row = torch.empty_like(rows_sorted).scatter_(0, self.perm, rows_sorted)
                row_pair = torch.zeros(self.num_experts * capacity, dtype=torch.long, device=device)
                row_pair.scatter_(0, rows_sorted, self.perm)
                self._buffer = (capacity, pair_row, row_pair, (capacity, counts.tolist()))
        return None if self._buffer[0] is None else self._buffer

    def project(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        impl: str,
        per_slot: bool = False,
        lora=None,
    ) -> torch.Tensor:
        """Apply each pair's expert: x `[tokens, in]` (or `[tokens, k, in]` if `per_slot`), weight `[E, out, in]`,
        bias `[E, out]` → `[tokens, k, out]`. `impl`: "eager" (loop over the experts hit), "batched_mm" (gathered
        weights), "grouped_mm" (one grouped matmul over pairs sorted by expert) or "padded_bmm" (pairs scattered
        into an `[E, C, in]` buffer and one batched matmul; falls back to grouped_mm when routing is too skewed)."""
        n_in = x.shape[-1]
        pairs = x.reshape(-1, n_in) if per_slot else None
        flat_ids = self.indices.reshape(-1)
        buf = self.buffer() if impl == "padded_bmm" else None
        if impl == "eager":
            out = x.new_zeros(self.tokens * self.k, weight.shape[1])
            for e in flat_ids.unique().tolist():
                pos = (flat_ids == e).nonzero().squeeze(1)
                src = pairs.index_select(0, pos) if per_slot else x.index_select(0, pos // self.k)
                out = out.index_add(0, pos, F.linear(src, weight[e], None if bias is None else bias[e]))
        elif impl == "batched_mm":
            src = pairs if per_slot else x.repeat_interleave(self.k, dim=0)
            out = torch.bmm(weight.index_select(0, flat_ids), src.unsqueeze(-1)).squeeze(-1)
            if bias is not None:
                out = out + bias.index_select(0, flat_ids)
        elif impl == "segmented_mm":
            src = x.to(weight.dtype)
            index = self.perm if per_slot else self.sorted_tokens
            out = segmented_linear(src.reshape(-1, n_in), index, weight, bias, self.bounds, lora, self.inverse)
            out = self.to_pairs(out)
        elif buf is not None:
            out = self.from_buffer(self.batched_linear(self.to_buffer(x, per_slot), weight, bias))
        else:
            if per_slot:
                src = _GatherRows.apply(pairs, self.perm, self.inverse, 1, None)
            elif on_accelerator(x):  # backward: a gather and a sum over each token's k rows, not a scatter-add with
                src = _GatherRows.apply(x, self.sorted_tokens, self.inverse, self.k, None)  # atomics in x's dtype
            else:
                src = x.index_select(0, self.sorted_tokens)
            out = grouped_mm(src, weight, self.offsets)
            if bias is not None:  # its gradient one matmul too (`bias.index_select` would scatter-add it with atomics
                out = torch.addmm(out, self.one_hot(out.dtype), bias.to(out.dtype))  # on CUDA, in bias's dtype)
            out = self.to_pairs(out)
        return out.view(self.tokens, self.k, -1)

    def to_buffer(self, x: torch.Tensor, per_slot: bool = False) -> torch.Tensor:
        """Token inputs `[tokens, in]` (or pair inputs `[tokens, k, in]`) → `[E, C, in]`. Padding rows hold a copy
        of some real row: they are computed but never read back, and receive no gradient."""
        capacity, pair_row, row_pair, _ = self.buffer()
        src = x.reshape(-1, x.shape[-1]) if per_slot else x
        group = 1 if per_slot else self.k
        out = _GatherRows.apply(src, row_pair // group if group > 1 else row_pair, pair_row, group, None)
        return out.view(self.num_experts, capacity, -1)

    def from_buffer(self, y: torch.Tensor) -> torch.Tensor:
        """`[E, C, out]` → `[tokens·k, out]` in pair order."""
        _, pair_row, row_pair, blocks = self.buffer()
        return _GatherRows.apply(y.reshape(-1, y.shape[-1]), pair_row, row_pair, 1, blocks)

    @staticmethod
    def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x `[E, C, in]`, weight `[E, out, in]`, bias `[E, out]` → `[E, C, out]`."""
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def padded_bmm_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The `padded_bmm` experts backend (registered with transformers' `ExpertsInterface`): pairs are scattered
    into an `[E, C, d]` buffer (C = the busiest expert's load) so that both projections are single batched
    matmuls, which on CPU run at dense-matmul speed where grouped_mm and per-expert loops do not. Falls back to
    grouped matmuls when routing is so skewed that padding would more than double the work."""
    plan = ExpertDispatch(top_k_index, self.num_experts)
    if plan.buffer() is None:
        h = self.act_fn(plan.project(hidden_states, self.up_proj, self.up_proj_bias, "grouped_mm"))
        y = plan.project(h, self.down_proj, self.down_proj_bias, "grouped_mm", per_slot=True)
    else:
        h = self.act_fn(plan.batched_linear(plan.to_buffer(hidden_states), self.up_proj, self.up_proj_bias))
        y = plan.from_buffer(plan.batched_linear(h, self.down_proj, self.down_proj_bias)).view(plan.tokens, plan.k, -1)
    # Σ_j w_j · y_j as one batched [1, k] × [k, d] product: fewer passes over the k-times-replicated tokens.
    return torch.bmm(top_k_weights.unsqueeze(1).to(y.dtype), y).squeeze(1).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register("padded_bmm", padded_bmm_experts_forward)


def on_accelerator(x: torch.Tensor) -> bool:
    """`segmented_mm` is the CPU form of a segmented matmul: per-expert matmuls launched from Python, which on a GPU
    cost a kernel launch each and a host sync for the block bounds (~4x slower than the fused kernel in a ViT-S
    train step on an H100). On an accelerator the same computation runs with one grouped matmul per projection
    (`sorted_experts_forward` for MLP experts, the `grouped_mm` dispatch for attention experts), except under an
    activation-space expert LoRA, which only the segmented path applies."""
    return x.device.type != "cpu"


def runs_grouped_mm(x: torch.Tensor, groups, names: tuple[str, ...]) -> bool:
    """Whether `segmented_mm` runs these expert groups with grouped matmuls: on an accelerator, when none of
    the tensors `names` of any group carries an activation-space LoRA (see `on_accelerator`)."""
    return on_accelerator(x) and not any(expert_lora(g, name) for g in groups for name in names)


def _pair_sum(y: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """`Σ_j gates[t, j] · y[t, j]`: pair outputs `[T, k, d]`, gates `[T, k]` → `[T, d]`, as a product and a sum over
    the k axis (deterministic; the sum accumulates bf16/fp16 in fp32). On an H200 (bf16 ViT-S train step,
    interleaved) 46.5 against 47.6 ms at batch 8 and 45.6 against 46.3 at batch 64 for T batched `[1, k] × [k, d]`
    matmuls, which cuBLAS runs as small tensor-core tiles."""
    return (y * gates.unsqueeze(-1)).sum(1)


def sorted_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """`segmented_mm` on an accelerator: the same sorted-pairs computation as the CPU path, with each projection one
    grouped matmul over device-side block offsets, and nothing that waits for the device.

    Against transformers' `grouped_mm` backend, which it replaced here, every gather is a `_GatherRows` (whose
    backward is a gather too, summed over each token's k rows for the token gather) instead of advanced indexing,
    whose CUDA backward is a sort-based `index_put_` (on an H200, half of a ViT-S MoE train step's GPU time); each
    expert's up-projection bias is added as `one_hot @ bias`, so its gradient is one matmul instead of
    a scatter-add in the parameters' dtype; the gate-weighted sum over each token's k outputs is a product and a
    sum over k (`_pair_sum`, deterministic); and the down projection's bias joins at token
    level (`gates @ bias`), as on CPU. On an H200 (bf16 ViT-S train step, fused AdamW, interleaved with the old
    hand-off): 54.3 against 91.3 ms per step at batch 64, the same (51.7 against 51.3) at batch 8, where the step is
    bound by kernel launches. In bf16 nothing waits for the device (CUDA's fused grouped kernel takes bf16 only; see
    `grouped_mm`), and every shape is fixed by the batch (tokens × k rows, whatever the routing), so a bf16 train
    step can be captured as one CUDA graph (`benchmarks/cuda_graph_step.py`; 8.2 ms per ViT-S step replayed at
    batch 8 on the H200, against 51.7 eager). Runs on any device (the tests run it on CPU)."""
    plan = ExpertDispatch(top_k_index, self.num_experts)
    x = hidden_states.to(self.up_proj.dtype)
    xs = _GatherRows.apply(x, plan.sorted_tokens, plan.inverse, plan.k, None)  # `[S, d]` in expert order
    h = grouped_mm(xs, self.up_proj, plan.offsets)
    h = torch.addmm(h, plan.one_hot(h.dtype), self.up_proj_bias.to(h.dtype))
    y = grouped_mm(self.act_fn(h), self.down_proj, plan.offsets)
    y = plan.to_pairs(y).view(plan.tokens, plan.k, y.shape[-1])  # pair order: token t's k rows together
    out = _pair_sum(y, top_k_weights.to(y.dtype))
    return _add_token_bias(out, top_k_index, top_k_weights, self.down_proj_bias).to(hidden_states.dtype)


def segmented_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The `segmented_mm` experts backend (our default; registered with transformers' `ExpertsInterface`).

    (token, expert) pairs are sorted by expert; each expert runs one matmul per projection on its contiguous block
    of rows (`segmented_linear`: no padding, no per-pair weight copies, fixed-size buffers, biases added in place
    after the block matmuls), and the gate-weighted sum is one weighted `embedding_bag` on CPU (`_CombineSorted`);
    the down projection's bias joins at token level (`gates @ bias`, one `[tokens, E] × [E, d]` product). Backward
    is written by hand: around the same per-expert matmuls, the token gather's gradient is one `embedding_bag` over
    each token's k rows (an `index_add_` in bf16/fp16) and the combine's a weighted one; a sampled matmul on the
    (token, pair) CSR pattern for the gates' gradient (a batched row-dot off CPU), and no weight gradient for frozen experts (or
    for experts under an activation-space LoRA).

    At ViT-S shape on this project's CPU (1 thread) these cut the layer from 1.40x to 1.25-1.30x a dense MLP of equal
    active width in quiet VM states (1.4-1.6x in loaded ones); the expert matmuls alone cost 1.05-1.19x, the rest
    is the gather and scatter over k-times replicated rows that a fused kernel would avoid. Running each
    projection's 16 block matmuls as one CPU `F.grouped_mm` call instead of a Python loop took another ~3% off.

    On an accelerator (see `on_accelerator`) it runs `sorted_experts_forward` instead (one grouped matmul per
    projection, nothing that waits for the device), unless an activation-space expert LoRA is active.

    (A variant that ran each expert's whole chain before the next was ~7% faster at ViT-S shape but allocates
    per-expert temporaries whose sizes change every step; glibc's heap fragmented and RSS crept up by hundreds of
    MB over a few hundred steps, so it was dropped. Re-tested with every intermediate written into preallocated
    full-size buffers, so nothing is allocated per expert, it ran ~20% slower than this: on this CPU, elementwise
    work between the block matmuls slows the matmuls. Likewise a down projection fused with the combine, whose
    backward gathered each block's gradient rows times gates into one reused buffer instead of forming the
    `[S, d]` gradient with `embedding_bag`: exact, and its backward alone took ~32 ms instead of 33-35 in
    isolation, but the whole layer ran no faster (105.2 vs 105.9 and 108.5 vs 106.1 ms, interleaved), so it was
    dropped. A chain whose per-expert temporaries (the gathered gradient, the activation's gradient, the expert
    outputs before the `index_add_` combine) lived in small scratch buffers reused by every expert, so that they
    stay in cache, was exact and 1-3% faster than the per-expert loop of the time in three interleaved runs, less
    than one-call `F.grouped_mm` gives, with which it cannot combine.)"""
    if runs_grouped_mm(hidden_states, [self], ("up_proj", "down_proj")):
        return sorted_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    plan = ExpertDispatch(top_k_index, self.num_experts)
    x = hidden_states.to(self.up_proj.dtype)
    up = segmented_linear(
        x, plan.sorted_tokens, self.up_proj, self.up_proj_bias, plan.bounds, expert_lora(self, "up_proj"), plan.inverse
    )
    y = segmented_linear(self.act_fn(up), None, self.down_proj, None, plan.bounds, expert_lora(self, "down_proj"))
    out = plan.combine(y, top_k_weights.to(y.dtype))
    return _add_token_bias(out, top_k_index, top_k_weights, self.down_proj_bias).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register("segmented_mm", segmented_mm_experts_forward)

#: every experts backend a config may name (`experts_implementation`); the first is the default
EXPERTS_IMPLEMENTATIONS = ("segmented_mm", "padded_bmm", "grouped_mm", "batched_mm", "eager")


class ExpertGroupSplit:
    """The (token, slot) pairs of a task that routes over several expert groups (`experts` and `extra_experts`),
    split by the group that holds each pair's chosen expert, so that every group runs only its own pairs.

    indices `[tokens, k]` (layer-wide expert ids) and the layer's `group_sizes` → `perm` `[S]` (S = tokens·k; the
    pairs sorted by group, stable, as flat pair positions), `inverse` `[S]`, and `parts`: for each group holding
    at least one pair, (group number, the pairs' expert ids inside the group `[P_g, 1]`). A group then sees its
    pairs as P_g tokens with top-1 routing: `rows` gathers each pair's input row, `gates` its gate, and `combine`
    puts the groups' gate-weighted outputs back in pair order and sums each token's k of them.

    A task routing only within the first group never comes here: it runs the first group on `route.indices`
    directly, the code it ran before later groups were added, so old tasks stay bit-identical after growth.
    The per-group pair counts are read to the host once (`tolist`), and the groups' batch sizes change with the
    routing; a group with no pairs is not called (its tensors get no gradient from that batch)."""

    def __init__(self, indices: torch.Tensor, group_sizes: list[int]):
        self.tokens, self.k = indices.shape
        flat = indices.reshape(-1)
        offsets = [sum(group_sizes[:g]) for g in range(len(group_sizes))]
        starts = torch.tensor(offsets[1:], dtype=flat.dtype, device=flat.device)
        group = torch.bucketize(flat, starts, right=True)  # the group of each pair's expert
        self.perm = group.argsort(stable=True)
        self.inverse = torch.empty_like(self.perm).scatter_(
            0, self.perm, torch.arange(self.perm.numel(), device=self.perm.device)
        )
        self.counts = torch.bincount(group, minlength=len(group_sizes)).tolist()
        local = flat.index_select(0, self.perm).split(self.counts)
        self.parts = [(g, (ids - offsets[g]).unsqueeze(1)) for g, ids in enumerate(local) if ids.numel()]

    def _split(self, rows: torch.Tensor) -> list[torch.Tensor]:
        chunks = rows.split(self.counts)
        return [chunks[g] for g, _ in self.parts]

    def rows(self, x: torch.Tensor, per_slot: bool = False) -> list[torch.Tensor]:
        """Each part's input rows: token rows `[tokens, d]` (or pair rows `[S, d]` if `per_slot`) → `[P_g, d]` per
        part. A gather whose backward is a gather (summed over each token's k pairs), not a scatter-add."""
        if per_slot:
            return self._split(_GatherRows.apply(x, self.perm, self.inverse, 1, None))
        return self._split(_GatherRows.apply(x, self.perm // self.k, self.inverse, self.k, None))

    def gates(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """Each part's gates `[P_g, 1]` from the router's `[tokens, k]`."""
        return self._split(_GatherRows.apply(weights.reshape(-1, 1), self.perm, self.inverse, 1, None))

    def to_pairs(self, ys: list[torch.Tensor]) -> torch.Tensor:
        """The parts' rows `[P_g, ·]` (in `parts` order) → `[S, ·]` in pair order (token t's k rows at t·k ..)."""
        return _GatherRows.apply(torch.cat(ys), self.inverse, self.perm, 1, None)

    def combine(self, ys: list[torch.Tensor]) -> torch.Tensor:
        """The parts' gate-weighted outputs `[P_g, d]` → `[tokens, d]`: each token's k outputs summed."""
        return self.to_pairs(ys).view(self.tokens, self.k, -1).sum(1)


def _add_token_bias(out: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, bias: torch.Tensor):
    """`out[t] += Σ_j w[t, j] · bias[index[t, j]]`: each token's experts' output biases at token level, as one
    `[tokens, E] × [E, d]` product (a pass over the k-times-replicated rows less in the forward, and no per-expert
    bias sums in the backward). The gates are scatter-added into `[tokens, E]`."""
    gates = top_k_weights.to(out.dtype)
    full = torch.zeros(out.shape[0], bias.shape[0], dtype=out.dtype, device=out.device).scatter_add(1, top_k_index, gates)
    return _add_gated_bias(out, full, bias)


def _add_gated_bias(out: torch.Tensor, gates: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`out += gates @ bias` in place (each expert's bias scaled by its gate), in `out`'s dtype (under autocast the
    projection comes out in bf16/fp16 while gates and biases stay fp32)."""
    return out.addmm_(gates.to(out.dtype), bias.to(out.dtype))


def _tracks_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these tensors; when not (inference), the fused dense paths of a slice apply
    their gates in place."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _gates_full(route: RouterOutput, num_experts: int) -> torch.Tensor:
    """Top-k gates scattered into expert order: `[tokens, E]` (zero for unselected experts)."""
    if route.all_experts and route.indices.shape[-1] == num_experts:
        return route.weights  # the router chose every expert and gave the gates in expert order already
    return torch.zeros(
        route.weights.shape[0], num_experts, dtype=route.weights.dtype, device=route.weights.device
    ).scatter(1, route.indices, route.weights)


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
    the backend comes from `config.experts_implementation` (this eager loop is the reference)."""

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

    def forward_all(self, hidden_states: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The first E' experts on every token as one dense MLP: hidden `[T, d]`, gates `[T, E']` → `[T, d]`.

        Used when a router selects all of its E' experts (a sliced layer that kept exactly k): one up and one down
        projection over the concatenated experts, each expert's block scaled by its gate.
        """
        t, e = hidden_states.shape[0], gates.shape[-1]
        check_not_offloaded(self.up_proj, hidden_states, "A MoE layer's MLP experts")
        h = fused_expert_linear(hidden_states, self, "up_proj", e, stack="out").view(t, e, -1)
        bias = self.down_proj_bias[:e]
        if not _tracks_grad(h, gates):
            a = self.act_fn(h).mul_(gates.unsqueeze(-1))  # inference: the gates applied in place
            return _add_gated_bias(fused_expert_linear(a.view(t, -1), self, "down_proj", e, stack="in"), gates, bias)
        w, lora_a, lora_b, scaling = stacked_inputs_operands(self, "down_proj", e)
        if lora_a is not None and not w.requires_grad and not torch.is_autocast_enabled(h.device.type):
            return _add_gated_bias(_GatedLowRankLinear.apply(h, gates, w, lora_a, lora_b, scaling, self.act_fn), gates, bias)
        a = _GatedActivation.apply(h, gates, self.act_fn).view(t, -1)
        y = F.linear(a, w) if lora_a is None else lora_linear(a, w, None, lora_a, lora_b, scaling)
        return _add_gated_bias(y, gates, bias)


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
        num_routed = route.logits.shape[-1]
        if route.indices.shape[-1] == num_routed <= self.group_sizes[0]:  # every expert chosen: dense speed
            out = self.experts.forward_all(flat, _gates_full(route, num_routed))
        elif num_routed <= self.group_sizes[0] and torch.compiler.is_exporting():  # static shapes (torch.export)
            out = self.experts.forward_all(flat, _gates_full(route, num_routed))
        elif num_routed <= self.group_sizes[0]:  # within the first group: the code it ran before later groups
            out = self.experts(flat, route.indices, route.weights)
        else:  # over several groups: each group runs only the pairs whose expert it holds
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
    (+ `o_proj_bias` [E, d])."""

    def __init__(self, config: MoEViTConfig, num_experts: int):
        super().__init__()
        d, h = config.hidden_size, config.attn_expert_head_size
        self.num_experts, self.head_dim = num_experts, h
        self.q_proj = nn.Parameter(torch.empty(num_experts, h, d))
        self.q_proj_bias = nn.Parameter(torch.zeros(num_experts, h))
        self.o_proj = nn.Parameter(torch.empty(num_experts, d, h))
        self.o_proj_bias = nn.Parameter(torch.zeros(num_experts, d))


class MoEViTMoAttention(nn.Module):
    """Mixture of attention heads (multi-query): each token selects k experts; expert e owns its query and output
    projections, and one shared `k_proj`/`v_proj` (d → h) serves every selected head.

    For a token x with chosen experts e_1..e_k and gates g_1..g_k:
    `y = Σ_j g_j · (softmax(q_j K^T / √h) V) W_o^{e_j} + g_j b_o^{e_j}`, with `q_j = x W_q^{e_j}`.
    """

    def __init__(self, config: MoEViTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        d, h = config.hidden_size, config.attn_expert_head_size
        self.router = MoEViTTopKRouter(config, "attn", layer_idx)
        self.group_sizes = config.expert_groups("attn", layer_idx)
        self.experts = MoEViTAttentionExperts(config, self.group_sizes[0])
        self.extra_experts = nn.ModuleList([MoEViTAttentionExperts(config, g) for g in self.group_sizes[1:]])
        self.k_proj = nn.Linear(d, h, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, h, bias=config.qkv_bias)
        self.dropout_p = config.attention_probs_dropout_prob
        self.head_dim = h

    def forward(self, hidden_states, task, top_k=None, expert_mask=None):
        b, n, d = hidden_states.shape
        flat = hidden_states.reshape(b * n, d)
        route = self.router(flat, task, top_k, expert_mask)
        k, h = route.indices.shape[-1], self.head_dim
        impl = self.config._experts_implementation or "segmented_mm"
        groups = [self.experts, *self.extra_experts]
        for ex in groups:
            check_not_offloaded(ex.q_proj, flat, "A MoE layer's attention experts")
        if impl == "segmented_mm" and runs_grouped_mm(flat, groups, ("q_proj", "o_proj")):
            impl = "grouped_mm"  # the dispatch's grouped matmuls, sync-free in bf16 on CUDA (see `on_accelerator`)
        num_routed = route.logits.shape[-1]
        several = num_routed > self.group_sizes[0]
        # every expert selected, or static shapes wanted (torch.export): dense projections over the concatenated
        # heads; under export each token's k queries are gathered from all E_t, and its outputs scattered back
        dense = not several and (k == num_routed or torch.compiler.is_exporting())
        split = ExpertGroupSplit(route.indices, self.group_sizes) if several else None
        if dense:
            ex = self.experts
            gates = _gates_full(route, num_routed)
            q = fused_expert_linear(flat, ex, "q_proj", num_routed, stack="out").view(b * n, num_routed, h)
            if k < num_routed:
                q = q.gather(1, route.indices.unsqueeze(-1).expand(-1, -1, h))
        elif split is None:  # within the first group: the code it ran before later groups were added
            ex, plan = self.experts, ExpertDispatch(route.indices, self.experts.num_experts)
            q = plan.project(flat, ex.q_proj, ex.q_proj_bias, impl, lora=expert_lora(ex, "q_proj"))
        else:  # over several groups: each group projects only the pairs whose expert it holds
            plans = [(groups[g], ExpertDispatch(idx, groups[g].num_experts)) for g, idx in split.parts]
            qs = [
                plan.project(x, ex.q_proj, ex.q_proj_bias, impl, lora=expert_lora(ex, "q_proj")).view(-1, h)
                for (ex, plan), x in zip(plans, split.rows(flat))
            ]
            q = split.to_pairs(qs)
        # One key/value head serves all k queries of a token (multi-query attention), so the k heads need no head
        # axis: each token's k queries are k more query rows against the same keys. `[tokens, k, h]` is already
        # `[b, n·k, h]` in memory; no transpose or copy on the way in or out.
        q = q.reshape(b, 1, n * k, h)
        key = self.k_proj(hidden_states).unsqueeze(1)  # [b, 1, n, h]
        value = self.v_proj(hidden_states).unsqueeze(1)
        attn = F.scaled_dot_product_attention(q, key, value, dropout_p=self.dropout_p if self.training else 0.0)
        attn = attn.view(b * n, k, h)  # [tokens, k, h]
        if dense and k < num_routed:  # static shapes: each token's k outputs scattered into its E_t expert slots
            o = attn.new_zeros(b * n, num_routed, h).scatter(
                1, route.indices.unsqueeze(-1).expand(-1, -1, h), attn * route.weights.unsqueeze(-1).to(attn.dtype)
            )
            o = o.reshape(b * n, num_routed * h)
            out = _add_gated_bias(
                fused_expert_linear(o, ex, "o_proj", num_routed, stack="in"), gates, ex.o_proj_bias[:num_routed]
            )
        elif dense:
            # inference: the gates applied in place on the attention output (one [tokens, k·h] buffer less)
            o = attn * gates.unsqueeze(-1) if _tracks_grad(attn, gates) else attn.mul_(gates.unsqueeze(-1))
            o = o.reshape(b * n, k * h)
            out = _add_gated_bias(fused_expert_linear(o, ex, "o_proj", k, stack="in"), gates, ex.o_proj_bias[:k])
        elif split is None:
            out = plan.project_sum(attn, ex.o_proj, ex.o_proj_bias, route.weights, impl, lora=expert_lora(ex, "o_proj"))
        else:
            parts = zip(plans, split.rows(attn.reshape(b * n * k, h), per_slot=True), split.gates(route.weights))
            ys = [
                plan.project_sum(x.unsqueeze(1), ex.o_proj, ex.o_proj_bias, w, impl, lora=expert_lora(ex, "o_proj"))
                for (ex, plan), x, w in parts
            ]
            out = split.combine(ys)
        return out.view(b, n, d), route


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
    per MoE layer in `config.moe_layer_names()` order, when `output_router_probs=True` (indices highest gate first,
    or in expert order in a layer whose router chooses every expert).
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
        backbone = self if isinstance(self, MoEViTModel) else self.moe_vit
        return MoEViTModel.set_routing(backbone, task, top_k=top_k, expert_mask=expert_mask)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # Our default is segmented_mm: the fastest on CPU here; on an accelerator it runs grouped matmuls over
        # device-side offsets (`on_accelerator`, `sorted_experts_forward`).
        return super().get_correct_experts_implementation(requested_experts or "segmented_mm")

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
        elif isinstance(module, MoEViTModel):
            for emb in module.task_embeddings.values():
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
        strictly.

        - A backbone tensor (embeddings, attention, experts, routers, task embeddings, norms) that is missing,
          unexpected or shaped unlike the config is an error naming it, and a damaged weights file an error naming
          the file: never a silent re-initialisation. This also holds when the backbone sits inside another model
          (`UperNetForSemanticSegmentation`, `DetrForObjectDetection`), whose own `from_pretrained` runs our
          `_init_weights` on whatever the checkpoint did not provide.
        - Task heads: a task model (`MoEViTForImageClassification`, `...ForSemanticSegmentation`,
          `...ForObjectDetection`, `...ForMultiTask`: all store task T's head as `heads.T.*`) loads the heads of
          any checkpoint that has them. A head the checkpoint lacks, or holds in another shape, is an error naming
          it, unless `ignore_mismatched_sizes=True`, which starts such heads fresh (fine-tuning from a backbone
          checkpoint, a new label set). The base model loaded from a task model's checkpoint drops the heads.
        - `strict=True`: every tensor, heads included, must be in the checkpoint and nothing else may be.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("moe_adapt loads weights from safetensors only (pickle is never used).")
        kwargs["use_safetensors"] = True
        want_info = kwargs.pop("output_loading_info", False)
        path = pretrained_model_name_or_path
        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
            path = os.fspath(path)
            config = kwargs.get("config")
            if not isinstance(config, PreTrainedConfig):
                config = cls.config_class.from_pretrained(path)
            _check_checkpoint_shapes(cls, config, path, heads=strict or not kwargs.get("ignore_mismatched_sizes"))
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        # state-dict names per kind (transformers lists mismatched keys as (name, shape, shape))
        keys = {
            key: [str(x[0] if isinstance(x, tuple) else x) for x in info.get(key, [])]
            for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
        }
        problems = []
        for key, names in keys.items():
            items = sorted(n for n in names if strict or _is_backbone_key(model, n))
            if items:
                problems.append(f"{key.replace('_', ' ')}: {', '.join(items[:20])}")
        if problems:
            what = "" if strict else " on the MoE ViT backbone"
            raise ValueError(
                f"Checkpoint {path} does not match the model's config{what} ({'; '.join(problems)}). A missing or "
                "mis-shaped tensor is never re-initialised silently: load a checkpoint that holds it, or fix its "
                "config.json (e.g. the per-layer expert counts)."
            )
        legacy = sorted({n.split(".")[1] for n in keys["unexpected_keys"] if n.startswith("classifiers.")})
        if legacy and hasattr(model, "_init_missing_heads"):
            raise ValueError(
                f"Checkpoint {path} holds classification heads in the layout of moe_adapt before 0.2 "
                f"(classifiers.{legacy[0]}.*: a Linear on the pooled output), for task(s) {legacy}; this version's "
                "heads are heads.T.* (LayerNorm, then Linear) and cannot reuse them. Fine-tune a new head on this "
                "backbone (ignore_mismatched_sizes=True starts one), or load it with the moe_adapt version that saved it."
            )
        if hasattr(model, "_init_missing_heads"):  # heads that initialise themselves, skipped by transformers' init
            model._init_missing_heads(
                {*keys["missing_keys"], *keys["mismatched_keys"]},
                fresh_ok=bool(kwargs.get("ignore_mismatched_sizes")),
            )
        realign_cpu_tensors(model)
        return (model, info) if want_info else model


#: byte alignment of torch's own CPU allocations (c10's `gAlignment`)
CPU_ALIGNMENT = 64


def realign_cpu_tensors(model: nn.Module) -> int:
    """Copy every CPU parameter and buffer whose data does not start on a 64-byte boundary into a fresh torch
    allocation (which does); return how many were copied.

    safetensors stores tensors back to back (8-byte aligned), and a memory-mapped load hands out tensors at those
    offsets. BLAS libraries pick their kernels by operand alignment on some CPUs (seen on AMD EPYC), so the same
    weights at another address can round differently. After this, a loaded model computes bit for bit what the
    saved one did, on any x86 CPU."""
    copied = 0
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or tensor.device.type != "cpu" or tensor.is_meta or not tensor.numel():
                    continue
                if tensor.data_ptr() % CPU_ALIGNMENT:
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = tensor.data.clone()  # same Parameter object: ties and optimisers keep it
                    else:
                        store[name] = tensor.clone()
                    copied += 1
    return copied


#: files that a save writes anew (weights, shards and their index, configs); anything else in the folder is kept
_SAVED_FILES = re.compile(
    r"(model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?"
    r"|config\.json|preprocessor_config\.json|generation_config\.json)$"
)


def _keep_other_files(old: Path, new: Path) -> None:
    """Link (or copy) into `new` every entry of `old` that a save does not write itself, so that saving over a
    folder keeps its other files, as transformers' own `save_pretrained` does."""
    for entry in old.iterdir():
        if _SAVED_FILES.match(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _is_backbone_key(model: nn.Module, key: str) -> bool:
    """Whether state-dict `key` of `model` (a moe_vit model class) names a tensor of the MoE ViT backbone
    (`MoEViTModel`), as opposed to a task head or a backbone adapter such as `MoEViTBackbone`'s pyramid."""
    base = model if isinstance(model, MoEViTModel) else getattr(model, "moe_vit", None)
    if not isinstance(base, MoEViTModel):
        return False
    prefix = model.base_model_prefix + "."
    top = key.removeprefix(prefix).split(".", 1)[0]
    if base is not model and not key.startswith(prefix) and (top in model._modules or top in model._parameters):
        return False  # a task model's own tensor (a head, a pyramid)
    # a task model loading a base checkpoint reports the base's extra tensors without the prefix
    return top in base._modules or top in base._parameters


def _refuse_backbone_reinit(backbone: MoEViTModel, module: nn.Module) -> None:
    """Called from `_init_weights` on the backbone's modules. At the end of a `from_pretrained` (the model was built
    on the meta device and transformers marked each loaded tensor `_is_hf_initialized`), a backbone parameter
    without the mark was not in the checkpoint (or was mis-shaped under `ignore_mismatched_sizes`): raise naming it
    instead of letting transformers initialise it. Covers models that hold the backbone inside their own classes
    (UperNet, DETR), whose `from_pretrained` is transformers' own. Outside a load (a model its user built on the meta
    device, or a loaded model whose submodule its user replaced, then `initialize_weights()`) it lets the
    initialisation run."""
    if not backbone._built_on_meta:
        return
    # parameters offloaded to disk (`device_map=... "disk"`) stay on the meta device, unmarked, until used
    fresh = [p for p in module.parameters(recurse=False) if not getattr(p, "_is_hf_initialized", False) and not p.is_meta]
    if not fresh or not _inside_transformers_load():
        return
    names = {id(p): n for n, p in backbone.named_parameters()}
    raise ValueError(
        f"The checkpoint is missing the MoE ViT backbone's {', '.join(names[id(p)] for p in fresh)} (or holds it "
        "mis-shaped, skipped under ignore_mismatched_sizes). moe_adapt never re-initialises backbone tensors "
        "silently: load a checkpoint that holds them, or fix its config (e.g. the per-layer expert counts)."
    )


def _inside_transformers_load() -> bool:
    """Whether transformers' `from_pretrained` is finishing a load further up the stack (it initialises what the
    checkpoint did not provide there). Only asked when a backbone parameter is about to be initialised, to tell a
    checkpoint that lacks it (an error) from an initialisation its user asked for."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_finalize_model_loading" and "transformers" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _check_checkpoint_shapes(cls, config, folder: str, heads: bool = True) -> None:
    """Compare every tensor shape in the folder's safetensors files with the model `config` builds (on the meta
    device, so nothing is allocated); raise naming the tensor or the unreadable file. `heads=False`: backbone
    tensors only (the heads' shapes may change under `ignore_mismatched_sizes`)."""
    import json

    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return  # transformers reports the missing weights file itself
    with torch.device("meta"):
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if heads or _is_backbone_key(model, k)}
    prefix = cls.base_model_prefix + "."
    mismatched, backbone = [], False
    for name in files:
        file = os.path.join(folder, name)
        try:
            with safe_open(file, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - any parse failure means a damaged file
            raise OSError(f"Could not read weights file {file} (truncated or not safetensors?): {err}") from err
        for key, shape in shapes.items():
            for candidate in (key, key.removeprefix(prefix), prefix + key):
                if candidate in expected:
                    if expected[candidate] != shape:
                        mismatched.append(f"{key}: checkpoint {list(shape)} vs config {list(expected[candidate])}")
                        backbone = backbone or _is_backbone_key(model, candidate)
                    break
    if mismatched:
        fix = (
            "Fix config.json (e.g. the per-layer expert counts): backbone tensors are never re-initialised."
            if backbone else
            "For a new label set, pass ignore_mismatched_sizes=True to get fresh heads."
        )
        raise ValueError(
            f"Checkpoint {folder} disagrees with the config on tensor shapes ({'; '.join(mismatched[:20])}). {fix}"
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
        self.task_embeddings = nn.ParameterDict({t: nn.Parameter(torch.zeros(config.hidden_size)) for t in config.tasks})
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
        _install_expert_lora_hooks(self)
        task = self.resolve_task(task)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        routing = self.routing_plan(task, top_k, expert_mask)
        hidden = self.embeddings(pixel_values)
        check_not_offloaded(self.task_embeddings[task], hidden, f"The task embedding of {task!r}")
        task_embedding = self.task_embeddings[task].to(hidden.dtype)
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
            aux = aux + self.config.balance_loss_weight * sum(load_balancing_loss(r.probs, r.indices) for r in routes) / len(routes)
        if routes and self.config.router_z_loss_weight:
            aux = aux + self.config.router_z_loss_weight * sum(router_z_loss(r.logits) for r in routes) / len(routes)
        return MoEViTModelOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            aux_loss=aux,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            # contiguous, as users may .view() them (a router choosing every expert returns transposed views)
            router_probs=tuple(r.probs.contiguous() for r in routes) if output_router_probs else None,
            router_logits=tuple(r.logits.contiguous() for r in routes) if output_router_probs else None,
            router_indices=tuple(r.indices for r in routes) if output_router_probs else None,
            task=task,
        )

    # -- sparse upcycling ----------------------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls, vit, tasks: list[str], num_experts: int = 8, top_k: int = 2, moe_layers: str = "odd",
        attn_experts: int = 0, attn_top_k: int | None = None, attn_layers: str = "even", **config_kwargs,
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
            cls, vit, tasks, num_experts=num_experts, top_k=top_k, moe_layers=moe_layers,
            attn_experts=attn_experts, attn_top_k=attn_top_k, attn_layers=attn_layers, **config_kwargs,
        )


def _install_expert_lora_hooks(model: MoEViTModel) -> None:
    """peft's `ParamWrapper` applies its LoRA only inside its own forward, while the MoE layers also read expert
    tensors outside it (the attention experts' query and output projections, a slice's fused dense path). When a
    layer's experts are wrapped, as by a plain `get_peft_model(model, LoraConfig(target_parameters=[...]))`, this
    installs `moe_adapt.adaptation.enable_expert_lora`'s hooks on it, which apply the LoRA for the layer's whole
    forward (once per layer; `apply_lora` installs them up front)."""
    for layer in model.moe_layers().values():
        if "_moe_adapt_lora_hooks" in layer.__dict__:
            continue
        if any(hasattr(g, "parameter_name") and hasattr(g, "base_layer") for g in (layer._modules["experts"], *layer.extra_experts)):
            from ...adaptation.lora import enable_expert_lora

            enable_expert_lora(layer)


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

    def forward(self, pixel_values, output_hidden_states=None, output_attentions=None, return_dict=None, task=None, **kwargs):
        p = self.config.patch_size
        h, w = pixel_values.shape[-2:]
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        gh, gw = (h + pad_h) // p, (w + pad_w) // p
        task = task if task is not None else (self.config.backbone_task or self.config.tasks[0])
        out = self.moe_vit(
            pixel_values, task=task, output_hidden_states=True, return_dict=True,
            output_router_probs=self.config.backbone_output_router_probs,
        )
        maps = []
        for name, hs in zip(self.stage_names, out.hidden_states):
            if name in self.out_features:
                maps.append(hs[:, 1:].transpose(1, 2).reshape(hs.shape[0], -1, gh, gw))
        if self.use_fpn:
            maps = [op(m) for op, m in zip(self.fpn, maps)]
        return MoEViTBackboneOutput(
            feature_maps=tuple(maps), hidden_states=out.hidden_states if output_hidden_states else None,
            aux_loss=out.aux_loss, router_probs=out.router_probs, router_indices=out.router_indices, task=out.task,
        )


__all__ = [
    "ExpertDispatch",
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
    "MoEViTTaskRouter",
    "MoEViTTopKRouter",
    "RouterOutput",
    "grouped_mm",
]
