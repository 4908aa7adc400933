"""The `segmented_mm` experts backend (the default), as transformers' `ExpertsInterface` calls it:
`segmented_mm_experts_forward(experts, hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k]) → [T, d]`
for an experts module with fused `up_proj` [E, I, d], `up_proj_bias` [E, I], `down_proj` [E, d, I],
`down_proj_bias` [E, d] and `act_fn`.

- Every expert chosen (a slice that kept exactly k experts), or static shapes wanted (`torch.export`): the experts
  run as one dense MLP over their concatenated weights, each expert's block scaled by its gate (`dense_experts_forward`).
- On CPU: pairs sorted by expert, one matmul per expert block (`SegmentedLinear`), the gate-weighted sum one weighted
  `embedding_bag` (`CombineSorted`); the down projection's bias joins at token level (`gates @ bias`).
- On an accelerator: the same sorted-pairs computation with one grouped matmul per projection over device-side
  offsets, nothing that waits for the device (`sorted_experts_forward`), so that a bf16 train step can be captured
  as a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .dispatch import ExpertDispatch, add_gated_bias, add_token_bias, gates_full, pair_sum
from .grouped import GatherRows, grouped_mm
from .segmented import segmented_linear


def dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """All E experts on every token as one dense MLP: one up projection over the experts' stacked outputs, one down
    projection over their stacked inputs, each expert's block scaled by its gate (zero for experts not chosen)."""
    t, e = hidden_states.shape[0], self.num_experts
    gates = gates_full(top_k_index, top_k_weights, e)
    x = hidden_states.to(self.up_proj.dtype)
    up = F.linear(x, self.up_proj.reshape(-1, x.shape[-1]), self.up_proj_bias.reshape(-1)).view(t, e, -1)
    act, g = self.act_fn(up), gates.unsqueeze(-1).to(up.dtype)
    if torch.is_grad_enabled() and (act.requires_grad or g.requires_grad):
        act = act * g
    else:  # inference: the gates applied in place (one [T, E·I] buffer less)
        act.mul_(g)
    down = self.down_proj.permute(1, 0, 2).reshape(self.down_proj.shape[1], -1)  # [d, E·I]
    out = F.linear(act.view(t, -1), down)
    return add_gated_bias(out, gates, self.down_proj_bias).to(hidden_states.dtype)


def sorted_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """`segmented_mm` on an accelerator: pairs sorted by expert, each projection one grouped matmul over device-side
    block offsets; every gather a `GatherRows` (whose backward is a gather, not a sort-based `index_put_`), the
    up-projection bias added as `one_hot @ bias` and the down projection's as `gates @ bias`. Runs on any device."""
    plan = ExpertDispatch(top_k_index, self.num_experts)
    x = hidden_states.to(self.up_proj.dtype)
    xs = GatherRows.apply(x, plan.sorted_tokens, plan.inverse, plan.k, None)  # `[S, d]` in expert order
    h = grouped_mm(xs, self.up_proj, plan.offsets)
    h = torch.addmm(h, plan.one_hot(h.dtype), self.up_proj_bias.to(h.dtype))
    y = grouped_mm(self.act_fn(h), self.down_proj, plan.offsets)
    y = plan.to_pairs(y).view(plan.tokens, plan.k, y.shape[-1])  # pair order: token t's k rows together
    out = pair_sum(y, top_k_weights)
    return add_token_bias(out, top_k_index, top_k_weights, self.down_proj_bias).to(hidden_states.dtype)


def segmented_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The `segmented_mm` experts backend (see the module docstring for its three paths)."""
    if top_k_index.shape[-1] == self.num_experts or torch.compiler.is_exporting():
        return dense_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if dispatch.on_accelerator(hidden_states):
        return sorted_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    plan = ExpertDispatch(top_k_index, self.num_experts)
    x = hidden_states.to(self.up_proj.dtype)
    up = segmented_linear(x, plan.sorted_tokens, self.up_proj, self.up_proj_bias, plan.bounds, plan.inverse)
    y = segmented_linear(self.act_fn(up), None, self.down_proj, None, plan.bounds)
    out = plan.combine(y, top_k_weights.to(y.dtype))
    return add_token_bias(out, top_k_index, top_k_weights, self.down_proj_bias).to(hidden_states.dtype)
