"""`MoEViTForMultiTask`: one shared MoE ViT backbone and one head per task (classification, detection or
semantic segmentation), each task routing with its own routers in every MoE layer.

The tasks, their types, label names and head options all live in the config (`tasks`, `task_types`,
`task_labels`, `head_configs`), so `save_pretrained` / `from_pretrained` round-trip every head. `import moe_adapt`
registers the class with [`AutoModelForMultiTask`], a dedicated Auto class (transformers' `AutoModel` already maps
`moe_vit` to the bare backbone):

```python
>>> import torch
>>> from moe_adapt import MoEViTConfig, MoEViTForMultiTask
>>> config = MoEViTConfig.from_preset(
...     "tiny", tasks=["cls", "det", "seg"],
...     task_types={"cls": "classification", "det": "detection", "seg": "semantic_segmentation"},
...     task_labels={"cls": ["a", "b"], "det": ["digit"], "seg": ["bg", "fg"]},
...     head_configs={"det": {"channels": 16, "num_convs": 1}, "seg": {"channels": 16}})
>>> model = MoEViTForMultiTask(config)
>>> out = model(torch.randn(2, 3, 32, 32), task="cls", labels=torch.tensor([0, 1]))
>>> out.logits.shape, out.loss.dim()
(torch.Size([2, 2]), 0)
>>> model.postprocess(out).shape
torch.Size([2])
```
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _LazyAutoMapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.utils import ModelOutput, can_return_tuple

from ...heads import build_head
from .configuration_moe_vit import MoEViTConfig
from .modeling_moe_vit import MoEViTModel, MoEViTPreTrainedModel


@dataclass
class MoEViTMultiTaskOutput(ModelOutput):
    """Output of [`MoEViTForMultiTask`] for one task's batch.

    - `loss`: `task_loss + aux_loss` when `labels` were given (the step-level MI loss is added by the training
      loop, which sees every task of the step: `moe_adapt.training`).
    - `task_loss`: the head's loss; `aux_loss`: the backbone's configured Switch balance / router z-losses.
    - `logits`: classification `[batch, num_labels]`; segmentation `[batch, num_labels, h, w]` at the head's finest
      stride; detection `[batch, N, num_labels]` over the N locations of all pyramid levels.
    - detection only: `pred_boxes` `[batch, N, 4]` (xyxy, input pixels), `pred_centerness` `[batch, N]` (logits),
      `points` `[N, 2]` and `point_strides` `[N]` (the locations).
    - `hidden_states`, `router_probs`, `router_logits`, `router_indices`: as in `MoEViTModelOutput` (router tensors
      when `output_router_probs=True`, one per MoE layer); `task`: the task name; `input_size`: (H, W) of
      `pixel_values`.
    """

    loss: torch.FloatTensor | None = None
    task_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    pred_centerness: torch.FloatTensor | None = None
    points: torch.FloatTensor | None = None
    point_strides: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    router_probs: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_indices: tuple[torch.LongTensor, ...] | None = None
    task: str | None = None
    input_size: tuple[int, int] | None = None


class MoEViTForMultiTask(MoEViTPreTrainedModel):
    """The MoE ViT (`self.moe_vit`) with one head per task in `self.heads` (an `nn.ModuleDict` keyed by task name):
    `ClassificationHead`, `FCOSHead` or `UperNetHead` from `moe_adapt.heads`, chosen by `config.task_types` and
    configured by `config.head_configs` (see `moe_adapt.heads.factory`).

    `forward(pixel_values, task=..., labels=None)` → [`MoEViTMultiTaskOutput`] with the task's loss (when labels are
    given), its raw predictions and the aux loss. `postprocess(outputs, ...)` turns raw predictions into what the
    metrics take: class ids, per-image `{"boxes", "scores", "labels"}` or full-resolution class maps.
    Labels per task type: classification `LongTensor [batch]`; detection a list of `{"boxes": [n, 4] xyxy pixels,
    "class_labels": [n]}`; segmentation `LongTensor [batch, H, W]` (255 = ignore) — what
    `moe_adapt.data.collate_fn_for` produces.
    """

    def __init__(self, config: MoEViTConfig):
        super().__init__(config)
        self.moe_vit = MoEViTModel(config)
        self.heads = nn.ModuleDict({t: build_head(config, t) for t in config.tasks})
        for module in self.heads.modules():
            module._moe_adapt_head = True
        self.post_init()

    def _init_weights(self, module):
        # The heads initialise themselves (PyTorch defaults; FCOS's prior-probability bias); only the backbone
        # follows the transformers initialisation. A load skips the heads' own initialisation: what the checkpoint
        # lacked gets it from `_init_missing_heads` (called by `from_pretrained`).
        if getattr(module, "_moe_adapt_head", False):
            return
        super()._init_weights(module)

    def _init_missing_heads(self, names: set[str]) -> None:
        """After a load: every head tensor the checkpoint did not provide (`names`: state-dict keys, missing or
        re-shaped under `ignore_mismatched_sizes`) takes the value of a freshly built head of the same config
        (transformers would leave them as allocated: garbage)."""
        for task in sorted({n.split(".")[1] for n in names if n.startswith("heads.")}):
            head = self.heads[task]
            current = head.state_dict()
            missing = {k for k in current if f"heads.{task}.{k}" in names}
            if any(current[k].is_meta for k in missing):
                if any(getattr(m, "_hf_hook", None) is not None for m in head.modules()):
                    raise ValueError(
                        f"heads.{task} is missing from the checkpoint and offloaded by the device_map, so it cannot "
                        "be initialised; keep new heads on a device."
                    )
                continue  # a model on the meta device (device_map="meta"): nothing to initialise
            fresh = build_head(self.config, task).state_dict()
            head.load_state_dict({k: fresh[k] if k in missing else v for k, v in current.items()})

    def task_type(self, task: str) -> str:
        return self.config.task_types.get(task, "classification")

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        task: str | int | None = None,
        labels: Any = None,
        output_router_probs: bool = False,
        output_hidden_states: bool | None = None,
        top_k: int | dict | None = None,
        expert_mask: dict | None = None,
        **kwargs,
    ) -> MoEViTMultiTaskOutput:
        task = self.moe_vit.resolve_task(task)
        head = self.heads[task]
        want_hidden = bool(output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states)
        out = self.moe_vit(
            pixel_values, task=task, output_router_probs=output_router_probs,
            output_hidden_states=want_hidden or head.needs_hidden_states, top_k=top_k, expert_mask=expert_mask,
            return_dict=True,
        )
        p = self.config.patch_size
        grid = (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)
        preds = head(out, grid)
        task_loss = loss = None
        if labels is not None:
            task_loss = head.loss(preds, labels)
            loss = task_loss + out.aux_loss
        return MoEViTMultiTaskOutput(
            loss=loss, task_loss=task_loss, aux_loss=out.aux_loss, **preds,
            hidden_states=out.hidden_states if want_hidden else None,
            router_probs=out.router_probs, router_logits=out.router_logits, router_indices=out.router_indices,
            task=task, input_size=(int(pixel_values.shape[-2]), int(pixel_values.shape[-1])),
        )

    @torch.no_grad()
    def postprocess(self, outputs: MoEViTMultiTaskOutput, target_sizes=None, input_sizes=None, **kwargs):
        """Raw outputs of one task's batch → metric-ready predictions:

        - classification: predicted class ids `LongTensor [batch]` (`accuracy`);
        - detection: per image `{"boxes": [k, 4] xyxy, "scores": [k], "labels": [k]}` in the pixels of
          `target_sizes[i]` (original (h, w); default the input) (`coco_map`); `score_threshold`,
          `nms_threshold`, `max_detections` override the head's options;
        - semantic segmentation: per image a `LongTensor [h_t, w_t]` class map at `target_sizes[i]` (`mean_iou`).

        `input_sizes[i]`: (h, w) of image i inside a padded batch (default: the whole input).
        """
        if outputs.task is None:
            raise ValueError("postprocess needs the outputs of MoEViTForMultiTask.forward (their `task` is unset).")
        return self.heads[outputs.task].postprocess(outputs, target_sizes=target_sizes, input_sizes=input_sizes, **kwargs)


class AutoModelForMultiTask(_BaseAutoModelClass):
    """Auto class for multi-task models: `AutoModelForMultiTask.from_pretrained(path)` builds a
    [`MoEViTForMultiTask`] from a saved `moe_vit` config (registered by `import moe_adapt`)."""

    _model_mapping = _LazyAutoMapping(CONFIG_MAPPING_NAMES, OrderedDict())


__all__ = ["AutoModelForMultiTask", "MoEViTForMultiTask", "MoEViTMultiTaskOutput"]
