"""How per-task losses combine into one: fixed weights or learned uncertainty weighting.

- `fixed`: L = Σ_i w_i · L_i over the micro-batches of the step.
- `uncertainty` (Kendall et al., 2018, in the form Mod-Squad used): L = Σ_i [ 0.5 / σ_i² · w_i L_i + log(1 + σ_i²) ],
  with one learned σ_i per task, initialised to 1. Parametrised as s_i = log σ_i² (s_i = 0 at the start) so σ²
  stays positive; log(1 + σ²) (rather than log σ²) keeps the regulariser positive, so σ cannot run to 0.

A task present in several micro-batches of the step contributes each of them. The module holds parameters (the
s_i) even when fixed (then none), so it can sit inside the DDP-wrapped training module and its state is saved
and restored with the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

LOSS_WEIGHTINGS = ("fixed", "uncertainty")


class LossWeighting(nn.Module):
    """`forward([(task, loss), ...]) → total loss`; `weights()` → the current effective weight per task.

    Args:
        tasks: task names.
        method: "fixed" or "uncertainty".
        weights: fixed weight w_i per task (default 1); under "uncertainty" they scale L_i before weighting.
    """

    def __init__(self, tasks: Sequence[str], method: str = "fixed", weights: Mapping[str, float] | None = None):
        super().__init__()
        if method not in LOSS_WEIGHTINGS:
            raise ValueError(f"Unknown loss weighting {method!r}; choose one of {LOSS_WEIGHTINGS}.")
        self.tasks, self.method = list(tasks), method
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"Loss weights name unknown tasks {unknown}; tasks: {self.tasks}.")
        self.fixed = {t: float(weights.get(t, 1.0)) for t in self.tasks}
        if method == "uncertainty":
            # [1], not a 0-d tensor: FSDP's fully_shard shards 1-d and larger parameters only
            self.log_variance = nn.ParameterDict({t: nn.Parameter(torch.zeros(1)) for t in self.tasks})

    def forward(self, task_losses: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
        total = None
        for task, loss in task_losses:
            if task not in self.fixed:
                raise ValueError(f"Loss of unknown task {task!r}; tasks: {self.tasks}.")
            term = self.fixed[task] * loss
            if self.method == "uncertainty":
                s = self.log_variance[task][0]
                term = 0.5 * torch.exp(-s) * term + torch.log1p(torch.exp(s))
            total = term if total is None else total + term
        if total is None:
            raise ValueError("LossWeighting got no task losses for this step.")
        return total

    @torch.no_grad()
    def weights(self) -> dict[str, float]:
        """The factor each task's loss is multiplied by now: w_i, or 0.5 · w_i / σ_i² under uncertainty."""
        if self.method == "fixed":
            return dict(self.fixed)
        return {t: 0.5 * self.fixed[t] * float(torch.exp(-self.log_variance[t])) for t in self.tasks}

    def sigmas(self) -> dict[str, float]:
        """σ_i per task (1.0 for fixed weighting)."""
        if self.method == "fixed":
            return dict.fromkeys(self.tasks, 1.0)
        return {t: float(torch.exp(0.5 * self.log_variance[t].detach())) for t in self.tasks}


__all__ = ["LOSS_WEIGHTINGS", "LossWeighting"]
