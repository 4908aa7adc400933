"""Routing losses: the task–expert mutual-information loss (Mod-Squad), Switch load balance and router z-loss."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...kernels.distributed import all_reduce_sum


def mutual_information_loss(joint_counts: torch.Tensor, task_prior: str = "token_share") -> torch.Tensor:
    r"""−I(T; E) for one MoE layer from soft routing mass.

    `joint_counts` `[tasks, experts]`: M[t, e] = Σ over tokens x of task t of p_e(x), the router's softmax
    probability of expert e (soft, not top-k counts). Tasks with no tokens (an all-zero row) are ignored.

    - `task_prior="token_share"` (Mod-Squad): P(t, e) = M[t, e] / Σ M, so P(t) is task t's share of tokens.
    - `task_prior="uniform"`: P(t, e) = (1/T') · M[t, e] / Σ_e M[t, e] over the T' tasks present, so every task
      counts equally however many tokens its micro-batches held.

    Then P(t) = Σ_e P(t, e), P(e) = Σ_t P(t, e) and

        L_MI = − Σ_{t,e} P(t, e) · log( P(t, e) / (P(t) · P(e)) )

    (0 · log 0 = 0). Minimising it maximises I(T;E) = H(E) − H(E|T): load spreads over all experts while each
    task concentrates on few.
    """
    m = joint_counts.float()
    m = m[m.sum(1) > 0]
    if m.numel() == 0:
        return joint_counts.new_zeros(())
    if task_prior == "uniform":
        p = m / m.sum(1, keepdim=True) / m.shape[0]
    elif task_prior == "token_share":
        p = m / m.sum()
    else:
        raise ValueError(f"task_prior={task_prior!r}: expected 'token_share' or 'uniform'.")
    p_t = p.sum(1, keepdim=True)
    p_e = p.sum(0, keepdim=True)
    ratio = p / (p_t * p_e).clamp_min(1e-30)
    terms = torch.where(p > 0, p * torch.log(ratio.clamp_min(1e-30)), torch.zeros_like(p))
    return -terms.sum()


def home_experts(num_tasks: int, num_experts: int, top_k: int) -> torch.Tensor:
    """`[tasks, experts]`: 0.1 / E on each task's k "home" experts (k consecutive ids from round(t·E/T), wrapping),
    else 0 — the tie-breaker `routing_concentration_loss` adds to p(e|t) when it picks a task's experts. Routers
    start at zero, so at first every task's p(e|t) is uniform and a plain top-k would give every task the same k
    experts, which the term would then hold them to; the offsets spread the tasks over the experts instead, and
    routing that differs by more than 0.1 / E overrides them."""
    prior = torch.zeros(num_tasks, num_experts)
    for t in range(num_tasks):
        start = round(t * num_experts / num_tasks)
        prior[t, [(start + j) % num_experts for j in range(top_k)]] = 0.1 / num_experts
    return prior


def routing_concentration_loss(
    joint_counts: torch.Tensor, log_prob_sums: torch.Tensor, token_counts: torch.Tensor, top_k: int
) -> torch.Tensor:
    r"""How far each task's tokens are from routing to one fixed set of k experts, in one MoE layer; mean over the
    tasks present, ≥ 0.

    `joint_counts` `[tasks, experts]` as for `mutual_information_loss` (M[t, e] = Σ_x p_e(x)); `log_prob_sums`
    `[tasks, experts]`: L[t, e] = Σ_x log p_e(x) over the same tokens; `token_counts` `[tasks]`: their numbers.
    For every task t with tokens, S_t is its `top_k` experts of largest p(e|t) = M[t, e] / Σ_e M[t, e] (near-ties
    broken toward the task's `home_experts`, so that tasks starting from uniform routing do not all take the same
    experts) and the term is the cross-entropy
    of its tokens' router distributions against the uniform distribution on S_t, less its minimum log k:

        −(1/k) Σ_{e∈S_t} L[t, e] / n_t − log k

    It is 0 exactly when every token of t gives each expert of S_t probability 1/k, i.e. every token routes to
    S_t and the slice keeping S_t computes what the parent computes (with renormalised gates). Unlike a penalty on
    the mass outside S_t, which softmax dynamics satisfy by growing one expert until it takes all the gate, the
    log pulls up every member of S_t for every token, most where a token gives one the least. Every task weighs
    the same however many tokens it had, so a task whose loss reaches the routers weakly (a mean-pooled
    classification loss) is pulled as hard as the others.
    """
    present = token_counts > 0
    if not bool(present.any()) or joint_counts.shape[1] <= top_k:
        return log_prob_sums.new_zeros(())
    m, logs, n = joint_counts[present].detach(), log_prob_sums[present], token_counts[present].to(log_prob_sums)
    prior = home_experts(joint_counts.shape[0], m.shape[1], top_k).to(m.device)[present]
    chosen = (m / m.sum(1, keepdim=True) + prior).topk(top_k, dim=1).indices
    ce = -logs.gather(1, chosen).sum(1) / (top_k * n)
    return (ce - math.log(top_k)).mean()


class MutualInformationLoss:
    """Accumulates the task–expert statistics of one optimisation step and turns them into the MI loss.

    The step boundary is explicit:

    ```python
    mi = MutualInformationLoss.from_config(config)  # tasks, mi_loss_weight, mi_task_prior, experts per layer
    loss = 0
    for task, pixel_values, labels in step_micro_batches:    # each micro-batch holds one task
        out = model(pixel_values, task=task, labels=labels, output_router_probs=True)
        mi.accumulate(out.router_probs, config.task_index(task))  # keeps the autograd graph
        loss = loss + out.loss
    loss = loss + mi.compute()                                # all-reduces M across ranks first
    loss.backward(); mi.reset()
    ```

    `compute()` returns `weight · Σ_layers mutual_information_loss(M_layer)`, plus
    `concentration · Σ_layers routing_concentration_loss(M_layer, L_layer, n, k_layer)` when `concentration` (the config's
    `routing_concentration_weight`) is above 0; `top_k` (one set size per MoE layer: `from_config` gives the layer's
    top-k plus the config's `routing_concentration_extra`) is then required. Under `torch.distributed`, M is
    summed across ranks with a differentiable all-reduce, so every rank sees the statistics of the global step
    and (with DDP's gradient averaging) receives the exact gradient of the global loss.

    `num_experts` (one count per MoE layer; `from_config` fills it in) lets a rank that ran no micro-batch in a
    step still join the all-reduce, with zero statistics on `device` (default: the current GPU under NCCL, else the
    CPU); without it such a rank cannot know the shapes and raises instead of leaving the others waiting.
    """

    def __init__(
        self,
        num_tasks: int,
        weight: float = 0.005,
        task_prior: str = "token_share",
        sync: bool = True,
        num_experts: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        concentration: float = 0.0,
        top_k: Sequence[int] | None = None,
    ):
        self.num_tasks, self.weight, self.task_prior, self.sync = num_tasks, weight, task_prior, sync
        self.concentration = float(concentration)
        self.top_k = None if top_k is None else [int(k) for k in top_k]
        if self.concentration and self.top_k is None:
            raise ValueError("MutualInformationLoss: concentration > 0 needs top_k, the k of every MoE layer.")
        self.num_experts = None if num_experts is None else [int(e) for e in num_experts]
        self.device = device  # for a rank without statistics; see `_collective_device`
        self.joint: list[torch.Tensor] | None = None
        self.log_sums: list[torch.Tensor] | None = None  # Σ log p per (task, expert), for the concentration term
        self.token_counts: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config, **kwargs) -> MutualInformationLoss:
        """Sized and weighted by a `MoEViTConfig`: its tasks, `mi_loss_weight`, `mi_task_prior`,
        `routing_concentration_weight` and the expert count of every MoE layer; the concentration term's set per
        layer is its top-k plus `routing_concentration_extra`, at most its expert count (`kwargs` override, e.g.
        `sync=False`)."""
        widths = [getattr(config, f"{kind}_experts")[index] for _, index, kind in config.moe_layers()]
        extra = int(getattr(config, "routing_concentration_extra", 0))
        top_k = [
            min(getattr(config, f"{kind}_top_k") + extra, width)
            for (_, _, kind), width in zip(config.moe_layers(), widths)
        ]
        options = {
            "weight": config.mi_loss_weight,
            "task_prior": config.mi_task_prior,
            "num_experts": widths,
            "concentration": getattr(config, "routing_concentration_weight", 0.0),
            "top_k": top_k,
        }
        return cls(len(config.tasks), **(options | kwargs))

    def accumulate(self, router_probs: Sequence[torch.Tensor], task: int) -> None:
        """Add one micro-batch of task index `task`: `router_probs[l]` is `[tokens, E_t]` for MoE layer l."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task index {task} out of range for {self.num_tasks} tasks.")
        layers = self.joint if self.joint is not None else self.num_experts
        if layers is not None and len(router_probs) != len(layers):
            raise ValueError(f"Expected router probabilities for {len(layers)} MoE layers, got {len(router_probs)}.")
        if self.joint is None:
            widths = self.num_experts or [0] * len(router_probs)
            self.joint = [
                p.new_zeros(self.num_tasks, max(p.shape[-1], w), dtype=torch.float32)
                for p, w in zip(router_probs, widths)
            ]
        for layer, probs in enumerate(router_probs):
            mass = probs.float().sum(0)
            n = self.joint[layer].shape[1]
            if mass.shape[0] > n:  # a task routing over more experts than seen so far (grown model)
                self.joint[layer] = torch.cat([self.joint[layer], mass.new_zeros(self.num_tasks, mass.shape[0] - n)], 1)
            elif mass.shape[0] < n:
                mass = torch.cat([mass, mass.new_zeros(n - mass.shape[0])])
            row = torch.zeros_like(self.joint[layer]).index_copy(
                0, torch.tensor([task], device=mass.device), mass[None]
            )
            self.joint[layer] = self.joint[layer] + row
        if self.concentration:
            self._accumulate_log_probs(router_probs, task)

    def _accumulate_log_probs(self, router_probs: Sequence[torch.Tensor], task: int) -> None:
        """Σ_x log p_e(x) per layer and the token count of `task` (this rank's tokens only; see `compute`)."""
        if self.log_sums is None:
            self.log_sums = [torch.zeros_like(m) for m in self.joint]
            self.token_counts = torch.zeros(self.num_tasks, device=self.joint[0].device)
        index = torch.tensor([task], device=self.joint[0].device)
        for layer, probs in enumerate(router_probs):
            logs = probs.float().clamp_min(1e-6).log().sum(0)
            width = self.joint[layer].shape[1]
            if self.log_sums[layer].shape[1] < width:
                self.log_sums[layer] = F.pad(self.log_sums[layer], (0, width - self.log_sums[layer].shape[1]))
            logs = F.pad(logs, (0, width - logs.shape[0]), value=math.log(1e-6))
            self.log_sums[layer] = self.log_sums[layer] + torch.zeros_like(self.log_sums[layer]).index_copy(
                0, index, logs[None]
            )
        self.token_counts = self.token_counts.index_add(
            0, index, torch.tensor([float(router_probs[0].shape[0])], device=index.device)
        )

    def joint_counts(self) -> list[torch.Tensor]:
        """The accumulated M per layer, summed across ranks when distributed (differentiable). Distributed, every
        rank joins the collective calls: a rank that ran no micro-batch in the step joins with zero statistics
        (this needs `num_experts`), and the ranks agree first on each layer's width and on whether its sum needs
        a backward, so that every rank runs the backward's all-reduce or none does."""
        distributed = self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed:
            return [] if self.joint is None else list(self.joint)
        if self.joint is None:
            if self.num_experts is None:
                raise RuntimeError(
                    "MutualInformationLoss: this rank accumulated no micro-batch in the step, so it cannot join the "
                    "other ranks' all-reduce; build the loss with num_experts (MutualInformationLoss.from_config)."
                )
            joint = [torch.zeros(self.num_tasks, e, device=self._collective_device()) for e in self.num_experts]
        else:
            joint = list(self.joint)
        if not joint:  # a model without MoE layers
            return []
        # One small MAX all-reduce: per layer, the widest expert axis (in a grown model a rank that saw only old
        # tasks holds fewer columns) and whether any rank's statistics carry a gradient (the router may be frozen
        # on one rank's task and not on another's).
        info = torch.tensor([m.shape[1] for m in joint] + [int(m.requires_grad) for m in joint], device=joint[0].device)
        dist.all_reduce(info, op=dist.ReduceOp.MAX)
        values = info.tolist()
        widths, grads = values[: len(joint)], values[len(joint) :]
        out = []
        for m, width, grad in zip(joint, widths, grads):
            m = F.pad(m, (0, int(width) - m.shape[1]))
            if grad and not m.requires_grad:  # a leaf, so this rank's backward runs the all-reduce too
                m = m.detach().requires_grad_(True)
            out.append(all_reduce_sum(m))
        return out

    def _collective_device(self) -> torch.device:
        """Where a rank without statistics puts its zeros: `self.device` when given, else the current GPU when the
        process group runs NCCL (XPU/HPU: their current accelerator), else the CPU (gloo)."""
        if self.device is not None:
            return torch.device(self.device)
        backend = str(dist.get_backend())  # e.g. "nccl", "gloo", "cuda:nccl,cpu:gloo", "undefined"
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if (
            any(b in backend for b in ("xccl", "hccl"))
            and hasattr(torch, "accelerator")
            and torch.accelerator.is_available()
        ):
            return torch.accelerator.current_accelerator()
        return torch.device("cpu")

    def compute(self) -> torch.Tensor:
        """weight · Σ over MoE layers of −I(T;E) (plus concentration · Σ over layers of `routing_concentration_loss`)
        for everything accumulated since the last `reset()`."""
        joint = self.joint_counts()
        if not joint:
            return torch.zeros(())
        loss = self.weight * sum(mutual_information_loss(m, self.task_prior) for m in joint)
        if self.concentration and self.log_sums is not None:
            # S_t comes from the global M; the log terms are this rank's tokens (DDP averages their gradients)
            loss = loss + self.concentration * sum(
                routing_concentration_loss(m, logs, self.token_counts, k)
                for m, logs, k in zip(joint, self.log_sums, self.top_k)
            )
        return loss

    def reset(self) -> None:
        self.joint = self.log_sums = self.token_counts = None


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Switch Transformer balance loss for one layer: `E · Σ_e f_e · P_e`, where f_e is the fraction of
    (token, slot) assignments that went to expert e and P_e the mean router probability. probs `[T, E]`,
    indices `[T, k]`. Equals 1 under perfectly uniform routing."""
    num_experts = probs.shape[-1]
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.numel()
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)². logits `[T, E]`."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


__all__ = [
    "MutualInformationLoss",
    "load_balancing_loss",
    "mutual_information_loss",
    "router_z_loss",
    "routing_concentration_loss",
]
