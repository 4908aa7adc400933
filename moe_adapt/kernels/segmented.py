"""The CPU form of the `segmented_mm` experts backend: (token, expert) pairs sorted by expert, one matmul per
expert on its contiguous block of rows (`SegmentedLinear`), and the gate-weighted combine of each token's k outputs
(`CombineSorted`), both with hand-written backwards that form only the gradients asked for and avoid scatter-adds
into zero-filled buffers (gathers and `embedding_bag`s instead)."""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from .grouped import _cpu_grouped_mm_ok, _cpu_grouped_offsets


class SegmentedLinear(torch.autograd.Function):
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
                grad.split(sizes),
                weight.unbind(0),
                none if dxs is None else dxs.split(sizes),
                none if dw is None else xs.split(sizes),
                none if dw is None else dw.unbind(0),
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
    """Around the CPU `embedding_bag`s and `CombineSorted`'s sparse sampled matmul: autocast off, so the sums
    stay in y's dtype as the `index_add_` path keeps them (CPU autocast would cast them to bf16/fp16, which these
    kernels do not take), and torch's "sparse CSR support is in beta" warning silenced (these matmuls are long
    stable)."""
    with warnings.catch_warnings(), torch.autocast("cpu", enabled=False):
        warnings.simplefilter("ignore")
        yield


def _cpu_bag_ok(y: torch.Tensor) -> bool:
    """Whether rows of y may be gathered and summed with `embedding_bag` (CPU, fp32/fp64): `CombineSorted` in one pass
    over the expert outputs, where `y * gate` then `index_add_` makes three; `SegmentedLinear`'s bias gradients."""
    return y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64)


class CombineSorted(torch.autograd.Function):
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
                    dy = F.embedding_bag(
                        sorted_tokens, grad, rows, mode="sum", per_sample_weights=g_pairs.index_select(0, perm)
                    )
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
                        1, order, vals.view(ctx.gates_shape)
                    )
        else:  # per sorted pair: the token's gradient, then (for the gates) a row-dot before scaling
            dy = grad.index_select(0, sorted_tokens)
            if need_gates:
                dgate = _rowdot(dy, y).index_select(0, inverse).view(ctx.gates_shape)
            dy.mul_(g_pairs.index_select(0, perm).unsqueeze(1))
        return dy, dgate, None, None, None


def segmented_linear(x, index, weight, bias, bounds, inverse=None) -> torch.Tensor:
    """`y[s] = W[e] · x[index[s]] + b[e]` for rows sorted by expert (see `SegmentedLinear`)."""
    return SegmentedLinear.apply(x, index, weight, bias, bounds, inverse)
