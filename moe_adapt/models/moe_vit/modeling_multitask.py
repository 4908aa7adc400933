"""The task models: one shared MoE ViT backbone and one head per task (classification, detection or semantic
segmentation), each task routing with its own routers in every MoE layer. `MoEViTForMultiTask` holds every task's
head; `MoEViTForImageClassification`, `MoEViTForSemanticSegmentation` and `MoEViTForObjectDetection` hold the heads
of their task type, with transformers' outputs, so that its Auto classes and pipelines take them. All of them store
task T's head as `heads.T.*`: any of them loads the heads of any checkpoint that has them.

The tasks, their types, label names and head options all live in the config (`tasks`, `task_types`,
`task_labels`, `head_configs`), so `save_pretrained` / `from_pretrained` round-trip every head. `import moe_adapt`
registers the classes with `AutoModelForImageClassification`, `AutoModelForSemanticSegmentation`,
`AutoModelForObjectDetection` and [`AutoModelForMultiTask`], a dedicated Auto class (transformers' `AutoModel`
already maps `moe_vit` to the bare backbone):

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

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput, SemanticSegmenterOutput
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


@dataclass
class MoEViTImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus the MoE extras: aux_loss, router_probs, router_indices and the task name."""

    aux_loss: torch.FloatTensor | None = None
    router_probs: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_indices: tuple[torch.LongTensor, ...] | None = None
    task: str | None = None
    input_size: tuple[int, int] | None = None


@dataclass
class MoEViTSemanticSegmenterOutput(SemanticSegmenterOutput):
    """`SemanticSegmenterOutput` (`logits` `[batch, num_labels, h, w]` at the head's finest stride) plus the MoE
    extras and `input_size` (H, W) of `pixel_values`, which post-processing upsamples the logits to."""

    aux_loss: torch.FloatTensor | None = None
    router_probs: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_indices: tuple[torch.LongTensor, ...] | None = None
    task: str | None = None
    input_size: tuple[int, int] | None = None


@dataclass
class MoEViTObjectDetectionOutput(ModelOutput):
    """Object detection output (what `MoEViTImageProcessor.post_process_object_detection` and transformers'
    object-detection pipeline read): `logits` `[batch, N, num_labels]` (sigmoid class scores) and `pred_boxes`
    `[batch, N, 4]` (xyxy, input pixels) over the N locations of all pyramid levels, `pred_centerness` `[batch, N]`,
    `points` `[N, 2]`, `point_strides` `[N]`, `input_size` (H, W), plus the MoE extras."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    pred_centerness: torch.FloatTensor | None = None
    points: torch.FloatTensor | None = None
    point_strides: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    router_probs: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_indices: tuple[torch.LongTensor, ...] | None = None
    task: str | None = None
    input_size: tuple[int, int] | None = None


class MoEViTTaskModel(MoEViTPreTrainedModel):
    """The MoE ViT (`self.moe_vit`) with one head per task in `self.heads` (an `nn.ModuleDict` keyed by task name):
    `ClassificationHead`, `FCOSHead` or `UperNetHead` from `moe_adapt.heads`, chosen by `config.task_types` and
    configured by `config.head_configs` (see `moe_adapt.heads.factory`). Every task model stores task T's head as
    `heads.T.*`, so each loads the heads of any checkpoint that has them.

    A subclass with `task_type` set keeps the heads of that type's tasks only; its `forward` without `task=` uses
    `config.default_task` when it is of that type, else the first such task (`self.default_task`), whose labels
    become `config.id2label` (what pipelines name their predictions with).
    """

    task_type: str | None = None  # None: every task (MoEViTForMultiTask)
    output_class: type[ModelOutput] = None

    def __init__(self, config: MoEViTConfig):
        tasks = [t for t in config.tasks if self.task_type in (None, config.task_types.get(t, "classification"))]
        if not tasks:
            types = {t: config.task_types.get(t, "classification") for t in config.tasks}
            raise ValueError(
                f"{type(self).__name__} needs a {self.task_type} task, but this config's tasks are {types}. Load it "
                "with the class of one of those task types, or MoEViTForMultiTask."
            )
        default_task = config.default_task if config.default_task in tasks else tasks[0]
        labels = config.task_labels.get(default_task)
        if labels and [config.id2label.get(i) for i in range(len(config.id2label))] != list(labels):
            config = copy.deepcopy(config)  # the caller's config (maybe shared with another model) stays as it was
            config.id2label = dict(enumerate(labels))
            config.label2id = {name: i for i, name in config.id2label.items()}
        super().__init__(config)
        self.default_task = default_task
        self.moe_vit = MoEViTModel(config)
        self.heads = nn.ModuleDict({t: build_head(config, t) for t in tasks})
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

    def _init_missing_heads(self, names: set[str], fresh_ok: bool = False) -> None:
        """After a load: `names` are the state-dict keys the checkpoint did not provide (or held in another shape,
        under `ignore_mismatched_sizes`). A head among them is an error naming its task unless `fresh_ok`; then
        its tensors take the values of a freshly built head of the same config (transformers would leave them as
        allocated)."""
        tasks = sorted({n.split(".")[1] for n in names if n.startswith("heads.")})
        if tasks and not fresh_ok:
            raise ValueError(
                f"The checkpoint holds no trained head for task(s) {tasks} (heads.{tasks[0]}.* and the like): "
                f"{type(self).__name__} would predict with a random head. Load a checkpoint that has the head, or "
                "pass ignore_mismatched_sizes=True to start fresh heads (e.g. to fine-tune a backbone checkpoint)."
            )
        for task in tasks:
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

    def task_type_of(self, task: str) -> str:
        return self.config.task_types.get(task, "classification")

    def resolve_head(self, task: str | int | None) -> str:
        """The task a forward runs (`task`, else `self.default_task`); an error naming the tasks this model has a
        head for when it has none for `task`."""
        task = self.moe_vit.resolve_task(self.default_task if task is None else task)
        if task not in self.heads:
            raise ValueError(
                f"Task {task!r} has no head in {type(self).__name__} (a {self.task_type_of(task)} task); "
                f"its tasks: {list(self.heads)}."
            )
        return task

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Any = None,
        task: str | int | None = None,
        output_router_probs: bool = False,
        output_hidden_states: bool | None = None,
        top_k: int | dict | None = None,
        expert_mask: dict | None = None,
        **kwargs,
    ):
        """One task's batch → its head's outputs (`self.output_class`), with `loss` = head loss + aux loss when
        `labels` are given (classification `LongTensor [batch]`; detection a list of `{"boxes": [n, 4] xyxy
        pixels, "class_labels": [n]}`; segmentation `LongTensor [batch, H, W]`, 255 = ignore)."""
        task = self.resolve_head(task)
        head = self.heads[task]
        want_hidden = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        out = self.moe_vit(
            pixel_values,
            task=task,
            output_router_probs=output_router_probs,
            output_hidden_states=want_hidden or head.needs_hidden_states,
            top_k=top_k,
            expert_mask=expert_mask,
            return_dict=True,
        )
        p = self.config.patch_size
        grid = (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)
        preds = head(out, grid)
        task_loss = loss = None
        if labels is not None:
            task_loss = head.loss(preds, labels)
            loss = task_loss + out.aux_loss
        fields = dict(
            loss=loss,
            task_loss=task_loss,
            aux_loss=out.aux_loss,
            **preds,
            hidden_states=out.hidden_states if want_hidden else None,
            router_probs=out.router_probs,
            router_logits=out.router_logits,
            router_indices=out.router_indices,
            task=task,
            input_size=(int(pixel_values.shape[-2]), int(pixel_values.shape[-1])),
        )
        cls = self.output_class
        return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})

    @torch.no_grad()
    def postprocess(self, outputs, target_sizes=None, input_sizes=None, **kwargs):
        """Raw outputs of one task's batch → metric-ready predictions:

        - classification: predicted class ids `LongTensor [batch]` (`accuracy`);
        - detection: per image `{"boxes": [k, 4] xyxy, "scores": [k], "labels": [k]}` in the pixels of
          `target_sizes[i]` (original (h, w); default the input) (`coco_map`); `score_threshold`,
          `nms_threshold`, `max_detections` override the head's options;
        - semantic segmentation: per image a `LongTensor [h_t, w_t]` class map at `target_sizes[i]` (`mean_iou`).

        `input_sizes[i]`: (h, w) of image i inside a padded batch (default: the whole input).
        """
        if outputs.task is None:
            raise ValueError(
                "postprocess needs the outputs of a moe_adapt task model's forward (their `task` is unset)."
            )
        return self.heads[outputs.task].postprocess(
            outputs, target_sizes=target_sizes, input_sizes=input_sizes, **kwargs
        )


class MoEViTForMultiTask(MoEViTTaskModel):
    """One head per task, of every type: `forward(pixel_values, task=..., labels=None)` → [`MoEViTMultiTaskOutput`]
    with the task's loss (when labels are given), its raw predictions and the aux loss; `postprocess(outputs)` turns
    them into what the metrics take. Labels per task type are what `moe_adapt.data.collate_fn_for` produces."""

    output_class = MoEViTMultiTaskOutput

    def forward(self, pixel_values: torch.Tensor, task: str | int | None = None, labels: Any = None, **kwargs):
        """As `MoEViTTaskModel.forward`, with `task` second (the task matters for every call here)."""
        return super().forward(pixel_values, labels=labels, task=task, **kwargs)


class MoEViTForImageClassification(MoEViTTaskModel):
    """The MoE ViT with a classification head per classification task (`heads[task]`: pooled → LayerNorm →
    Linear, sized by `config.task_labels`). `forward(pixel_values, labels=None, task=None)` →
    [`MoEViTImageClassifierOutput`]; `pipeline("image-classification")` uses `self.default_task` and its labels."""

    task_type = "classification"
    output_class = MoEViTImageClassifierOutput


class MoEViTForSemanticSegmentation(MoEViTTaskModel):
    """The MoE ViT with a UperNet head per segmentation task. `forward` → [`MoEViTSemanticSegmenterOutput`];
    `pipeline("image-segmentation")` gives one mask per class present, named by the task's labels."""

    task_type = "semantic_segmentation"
    output_class = MoEViTSemanticSegmenterOutput


class MoEViTForObjectDetection(MoEViTTaskModel):
    """The MoE ViT with an FCOS head per detection task. `forward` → [`MoEViTObjectDetectionOutput`];
    `pipeline("object-detection")` gives `{"score", "label", "box"}` per detection above its threshold."""

    task_type = "detection"
    output_class = MoEViTObjectDetectionOutput


#: the task model class of each task type (a one-task slice is saved as its task's class)
TASK_MODEL_CLASSES: dict[str, type[MoEViTTaskModel]] = {
    "classification": MoEViTForImageClassification,
    "semantic_segmentation": MoEViTForSemanticSegmentation,
    "detection": MoEViTForObjectDetection,
}


class AutoModelForMultiTask(_BaseAutoModelClass):
    """Auto class for multi-task models: `AutoModelForMultiTask.from_pretrained(path)` builds a
    [`MoEViTForMultiTask`] from a saved `moe_vit` config (registered by `import moe_adapt`)."""

    _model_mapping = _LazyAutoMapping(CONFIG_MAPPING_NAMES, OrderedDict())


__all__ = [
    "TASK_MODEL_CLASSES",
    "AutoModelForMultiTask",
    "MoEViTForImageClassification",
    "MoEViTForMultiTask",
    "MoEViTForObjectDetection",
    "MoEViTForSemanticSegmentation",
    "MoEViTImageClassifierOutput",
    "MoEViTMultiTaskOutput",
    "MoEViTObjectDetectionOutput",
    "MoEViTSemanticSegmenterOutput",
    "MoEViTTaskModel",
]
