"""The dispatch plan of a MoE layer: which (token, slot) pairs go to which expert, sorted by expert
(`ExpertDispatch`), and the split of a task's pairs over several expert groups (`ExpertGroupSplit`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouped import GatherRows, grouped_mm
from .segmented import CombineSorted, segmented_linear


def on_accelerator(x: torch.Tensor) -> bool:
    """Whether `segmented_mm` takes its accelerator path for `x`: on a GPU the per-expert matmuls launched from Python
    cost a kernel launch each and a host sync for the block bounds, so the same sorted-pairs computation runs as one
    grouped matmul per projection over device-side offsets instead. (Tests patch this to run that path on CPU.)"""
    return x.device.type != "cpu"


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
    token of each sorted pair).
    """

    def __init__(self, indices: torch.Tensor, num_experts: int):
        self.indices, self.num_experts = indices, num_experts
        self.tokens, self.k = indices.shape
        flat = indices.reshape(-1)
        self.sorted_ids, self.perm = flat.sort(stable=True)
        # by device type, not `on_accelerator` (which tests patch to run the GPU code on CPU): bincount is exact on
        # CPU and only costs a host sync elsewhere
        self.offsets = block_ends(self.sorted_ids, num_experts, sync_free=flat.device.type != "cpu")
        # scatter_/index_select rather than advanced indexing: on CPU, tensor[index] costs far more here
        self.inverse = torch.empty_like(self.perm).scatter_(
            0, self.perm, torch.arange(self.perm.numel(), device=self.perm.device)
        )
        self.sorted_tokens = self.perm // self.k  #: the token of each sorted pair `[S]`
        self._bounds = None

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """(start, end) of each expert's block of sorted pairs."""
        if self._bounds is None:
            ends = self.offsets.tolist()
            self._bounds = list(zip([0] + ends[:-1], ends))
        return self._bounds

    def one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """`[S, E]` one-hot rows of the sorted pairs' experts: `one_hot @ bias` adds each pair's expert bias, and its
        backward sums each expert's block in one matmul (no atomics, no host sync)."""
        return (self.sorted_ids.unsqueeze(1) == torch.arange(self.num_experts, device=self.sorted_ids.device)).to(dtype)

    def to_pairs(self, y_sorted: torch.Tensor) -> torch.Tensor:
        """Rows in sorted pair order `[S, ·]` → flat pair order (token t's k rows at t·k ..)."""
        return GatherRows.apply(y_sorted, self.inverse, self.perm, 1, None)

    def combine(self, y_sorted: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Expert outputs in sorted pair order `[S, d]` and gates `[tokens, k]` → `Σ_j gate_j · y_j` `[tokens, d]`."""
        return CombineSorted.apply(y_sorted, gates, self.perm, self.inverse, self.sorted_tokens)

    def project(self, x: torch.Tensor, weight, bias, impl: str, per_slot: bool = False) -> torch.Tensor:
        """Apply each pair's expert: x `[tokens, in]` (or `[tokens, k, in]` if `per_slot`), weight `[E, out, in]`,
        bias `[E, out]` → `[tokens, k, out]`. `impl`: "eager" (a loop over the experts hit), "batched_mm" (gathered
        weights), "grouped_mm" (one grouped matmul over the sorted pairs) or "segmented_mm" (per-expert block
        matmuls on CPU; grouped matmuls on an accelerator)."""
        n_in = x.shape[-1]
        pairs = x.reshape(-1, n_in) if per_slot else None
        flat_ids = self.indices.reshape(-1)
        if impl == "segmented_mm" and on_accelerator(x):
            impl = "grouped_mm"
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
            index = self.perm if per_slot else self.sorted_tokens
            out = segmented_linear(x.to(weight.dtype).reshape(-1, n_in), index, weight, bias, self.bounds, self.inverse)
            out = self.to_pairs(out)
        else:  # grouped_mm
            if per_slot:
                src = GatherRows.apply(pairs, self.perm, self.inverse, 1, None)
            else:  # backward: a gather and a sum over each token's k rows, not a scatter-add
                src = GatherRows.apply(x, self.sorted_tokens, self.inverse, self.k, None)
            out = grouped_mm(src, weight, self.offsets)
            if bias is not None:
                out = torch.addmm(out, self.one_hot(out.dtype), bias.to(out.dtype))
            out = self.to_pairs(out)
        return out.view(self.tokens, self.k, -1)

    def project_sum(self, pairs: torch.Tensor, weight, bias, gates: torch.Tensor, impl: str) -> torch.Tensor:
        """`Σ_j gate_j · expert_j(pairs_j)`: pair inputs `[tokens, k, in]` → `[tokens, out]`."""
        if impl != "segmented_mm" or on_accelerator(pairs):
            return pair_sum(self.project(pairs, weight, bias, impl, per_slot=True), gates)
        src = pairs.reshape(-1, pairs.shape[-1]).to(weight.dtype).index_select(0, self.perm)
        return self.combine(segmented_linear(src, None, weight, bias, self.bounds), gates)


def pair_sum(y: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """`Σ_j gates[t, j] · y[t, j]`: pair outputs `[T, k, d]`, gates `[T, k]` → `[T, d]` (deterministic)."""
    return (y * gates.unsqueeze(-1).to(y.dtype)).sum(1)


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
            return self._split(GatherRows.apply(x, self.perm, self.inverse, 1, None))
        return self._split(GatherRows.apply(x, self.perm // self.k, self.inverse, self.k, None))

    def gates(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """Each part's gates `[P_g, 1]` from the router's `[tokens, k]`."""
        return self._split(GatherRows.apply(weights.reshape(-1, 1), self.perm, self.inverse, 1, None))

    def to_pairs(self, ys: list[torch.Tensor]) -> torch.Tensor:
        """The parts' rows `[P_g, ·]` (in `parts` order) → `[S, ·]` in pair order (token t's k rows at t·k ..)."""
        return GatherRows.apply(torch.cat(ys), self.inverse, self.perm, 1, None)

    def combine(self, ys: list[torch.Tensor]) -> torch.Tensor:
        """The parts' gate-weighted outputs `[P_g, d]` → `[tokens, d]`: each token's k outputs summed."""
        return self.to_pairs(ys).view(self.tokens, self.k, -1).sum(1)


def add_token_bias(out: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, bias: torch.Tensor):
    """`out[t] += Σ_j w[t, j] · bias[index[t, j]]`: each token's experts' output biases at token level, as one
    `[tokens, E] × [E, d]` product (no per-expert bias sums in the backward)."""
    return add_gated_bias(out, gates_full(top_k_index, top_k_weights, bias.shape[0]), bias)


def add_gated_bias(out: torch.Tensor, gates: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`out += gates @ bias` in place (each expert's bias scaled by its gate), in `out`'s dtype."""
    return out.addmm_(gates.to(out.dtype), bias.to(out.dtype))


def gates_full(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Top-k gates summed into expert order: `[tokens, E]` (zero for unselected experts; a token that reaches an
    expert in two slots, as the clamped slots of another expert group do, gets both gates)."""
    full = torch.zeros(top_k_weights.shape[0], num_experts, dtype=top_k_weights.dtype, device=top_k_weights.device)
    return full.scatter_add(1, top_k_index, top_k_weights)
