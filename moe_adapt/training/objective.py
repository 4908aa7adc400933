"""One optimisation step's loss: every micro-batch of the step, the loss weighting and the MI loss, in one module.

`MultiTaskObjective(model, loss_weighting, mi_loss)` is what the training loop hands to `accelerator.prepare`
(and so what DDP / FSDP wrap). Its `forward(micro_batches)` runs every micro-batch of the step (one task each),
accumulates the MI statistics over all of them (keeping the graph), and returns

    loss = LossWeighting([(task_i, L_i)]) + Σ aux_i + MutualInformationLoss.compute()

so `loss.backward()` once per step gives the exact gradient of the step's loss, the MI term included (its M is
all-reduced across ranks before the MI is taken).

Why one module and one forward per step: DDP reduces gradients in hooks armed by the wrapped module's forward. A
step touches only the heads (and task embeddings, routers) of its tasks, and proportional / round-robin sampling
leaves some tasks out. Instead of `find_unused_parameters=True` (a graph walk every step, and unusable with
several forwards per backward), the objective adds `0 · Σ p` over every trainable parameter, so each receives a
(possibly zero) gradient every step; DDP then runs with `find_unused_parameters=False` and fixed buckets.
Consequence, identical on one process and many: AdamW updates every parameter every step (momentum and weight
decay move a head whose task sat the step out, just as with zeroed rather than `None` gradients).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..models.moe_vit.losses import MutualInformationLoss
from .loss_weighting import LossWeighting


class MultiTaskObjective(nn.Module):
    """`forward([(task, {"pixel_values", "labels"}), ...])` → `{"loss", "task_losses", "mi_loss", "aux_loss"}`.

    `task_losses`: `[(task, detached loss)]` per micro-batch; `mi_loss`, `aux_loss`: detached scalars.
    `mi_loss=None` (or weight 0 and no concentration term) skips the MI loss and the router probabilities it needs.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_weighting: LossWeighting,
        mi_loss: MutualInformationLoss | None = None,
        touch_all_parameters: bool = True,
    ):
        super().__init__()
        self.model = model
        self.loss_weighting = loss_weighting
        active = mi_loss is not None and (mi_loss.weight > 0 or mi_loss.concentration > 0)
        self.mi_loss = mi_loss if active else None
        self.touch_all_parameters = touch_all_parameters

    @property
    def _no_split_modules(self):
        """The model's blocks, which FSDP shards one by one (accelerate's and `shard_on_cpu`'s wrap policy)."""
        return getattr(self.model, "_no_split_modules", None)

    def forward(self, micro_batches: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
        if not micro_batches:
            raise ValueError("MultiTaskObjective got an empty step (no micro-batches).")
        config = self.model.config
        mi = self.mi_loss
        if mi is not None:
            mi.reset()
        task_losses, aux = [], None
        for task, batch in micro_batches:
            out = self.model(
                batch["pixel_values"],
                task=task,
                labels=batch["labels"],
                output_router_probs=mi is not None,
                return_dict=True,
            )
            if mi is not None and out.router_probs:
                mi.accumulate(out.router_probs, config.task_index(task))
            task_losses.append((task, out.task_loss))
            aux = out.aux_loss if aux is None else aux + out.aux_loss
        loss = self.loss_weighting(task_losses) + aux
        mi_value = loss.new_zeros(())
        if mi is not None:
            mi_value = mi.compute().to(loss.device)
            loss = loss + mi_value
            mi.reset()  # frees the statistics (and the graph they hold) once the loss owns them
        if self.touch_all_parameters:
            loss = loss + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)
        return {
            "loss": loss,
            "task_losses": [(t, v.detach()) for t, v in task_losses],
            "mi_loss": mi_value.detach(),
            "aux_loss": aux.detach(),
        }


__all__ = ["MultiTaskObjective"]
