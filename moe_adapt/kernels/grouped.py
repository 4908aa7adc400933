"""Grouped matmuls over expert blocks: torch's `F.grouped_mm` where it runs (CUDA from compute capability 8.0, CPU
where it accepts the operands), a per-expert loop elsewhere; and `GatherRows`, a row gather whose backward is a
gather too. The accelerator path of the `segmented_mm` backend is built from these."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


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


class GatherRows(torch.autograd.Function):
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
    """int32 end offsets of the expert blocks when `SegmentedLinear` can run its per-expert matmuls as one CPU
    `F.grouped_mm` call (the same MKL matmul on each block, so bit-identical to the loop, without one Python-level
    call per expert: ~3% of the ViT-S MoE layer), else None (another device or dtype, operands it rejects, or output
    rows that are not a multiple of 16 bytes, which it would pad)."""
    if (
        xs.device.type != "cpu"
        or xs.dtype != weight.dtype
        or xs.dtype not in (torch.float32, torch.bfloat16, torch.float16)
        or (weight.shape[1] * weight.element_size()) % 16
        or not _cpu_grouped_mm_ok(xs, weight, weight.transpose(1, 2))
    ):
        return None
    return torch.tensor([t for _, t in bounds], dtype=torch.int32)
