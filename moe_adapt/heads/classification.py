"""Image classification head: pooled features → LayerNorm → dropout → Linear."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationHead(nn.Module):
    """Options (`config.head_configs[task]`): `pooling` ("cls" or "mean" over patch tokens; default
    `config.pooling`), `dropout` (0.0), `label_smoothing` (0.0).

    `forward(backbone_output, grid)` → `{"logits": [batch, num_labels]}`; `loss(outputs, labels [batch])` →
    cross-entropy; `postprocess(outputs)` → predicted class ids `[batch]` (the `accuracy` metric's predictions).
    """

    task_type = "classification"
    defaults: dict[str, Any] = {"pooling": None, "dropout": 0.0, "label_smoothing": 0.0}

    def __init__(
        self, config, num_labels: int, pooling: str | None = None, dropout: float = 0.0, label_smoothing: float = 0.0
    ):
        super().__init__()
        self.pooling = pooling or config.pooling
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"Classification head pooling={self.pooling!r}: expected 'cls' or 'mean'.")
        self.label_smoothing = float(label_smoothing)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    @property
    def needs_hidden_states(self) -> bool:
        return False

    def forward(self, backbone_output, grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        last = backbone_output.last_hidden_state
        pooled = last[:, 0] if self.pooling == "cls" else last[:, 1:].mean(1)
        return {"logits": self.classifier(self.dropout(self.norm(pooled)))}

    def loss(self, outputs: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor:
        logits = outputs["logits"].float()
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ValueError(f"Classification labels must be a LongTensor [batch]; got {_describe(labels)}.")
        return F.cross_entropy(logits, labels.to(logits.device), label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def postprocess(self, outputs: Mapping[str, Any], **kwargs) -> torch.Tensor:
        """Predicted class ids `[batch]`."""
        return outputs["logits"].argmax(-1)


def _describe(x) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


__all__ = ["ClassificationHead"]
