"""Fine-tune a pretrained multi-task MoE ViT (or an extracted sub-model) on a new downstream task.

The path, each step taking the previous step's object (`finetune(FinetuneConfig(...))` runs them all):

1. **Calibrate**: route the new task's training images with a source task's routers and measure expert usage
   (`collect_expert_usage`). With `source_task="auto"` every task of the model is measured and the one whose
   routing is most concentrated wins: the lowest mean normalised entropy of the expert-usage distribution
   (`H(mean gate) / log E_t`, averaged over MoE layers), i.e. the task that needs the fewest experts for these
   images.
2. **Select and extract**: `select_experts` (Mod-Squad's threshold rule by default) and `extract_submodel`
   keep the source task's experts and router rows only (`slice: false` keeps every expert).
3. **Attach the new task**: a single-task model for the new task whose router in every MoE layer starts as the
   source router's kept rows, whose task embedding starts as the source task's, and whose head is new
   (`attach_task`).
4. **Train** in one of three modes (the project's one training loop): `lora` (peft LoRA on the fused expert tensors and the
   attention projections, head and router in `modules_to_save`), `router` (router and head only) or `full`.
5. **Evaluate** (`moe_adapt.metrics.evaluate`), **report, save**: the efficiency report (`report.json`), the adapter (`adapter/`, with the frozen
   task model it applies to in `base/`) or the whole model (`model/`), and with `merge=True` a standalone merged
   model (`merged/`) that `from_pretrained` loads without peft.

```python
>>> from moe_adapt.adaptation.finetune import FinetuneConfig, finetune
>>> from moe_adapt.training import TrainConfig
>>> result = finetune(FinetuneConfig(model="runs/mini/model", dataset="builtin:digits", output_dir="runs/digits",
...                                  mode="lora", train=TrainConfig(max_steps=300), merge=True))
>>> print(result.report.to_console())
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis import ExpertSelection, ExpertUsage, collect_expert_usage, select_experts
from ..data import (
    AUGMENT_OPTIONS,
    augment_options,
    build_transforms,
    check_augment_keys,
    collate_fn_for,
    load_task_dataset,
)
from ..heads import ClassificationHead
from ..hub.loading import load_model
from ..io import atomic_dir, atomic_write_text
from ..kernels import EXPERTS_IMPLEMENTATIONS
from ..metrics import evaluate
from ..models.moe_vit import TASK_MODEL_CLASSES, MoEViTConfig, MoEViTForImageClassification, find_backbone
from ..training.config import OptimizerConfig, TrainConfig, config_to_dict, load_config
from ..training.loop import (
    adamw,
    build_scheduler,
    compile_model,
    make_accelerator,
    repeat_loader,
    shuffled_loader,
    train_loop,
)
from .downstream import resolve_dataset_spec
from .lora import apply_lora, lora_config, merge_lora
from .report import (
    EfficiencyReport,
    MemoryMeter,
    SavedTensorMeter,
    Throughput,
    efficiency_report,
    model_flops,
)

MODES = ("lora", "router", "full")
DEFAULT_LR = {"lora": 1e-2, "router": 1e-2, "full": 5e-4}
# The new task's head and routers start from scratch (or from another task's rows) and learn faster than what they
# sit on: `head_lr`'s default is `lr` times this factor, per mode. Chosen on held-out digits images
# (`validation_fraction` 0.2, docs/adaptation.md): a head at 20 x 5e-4 = 1e-2 lifted full fine-tuning from 90.3% to
# 92.8%, one at 3 x 1e-2 LoRA from 87.4% to 89.2% (6 seeds). In router mode everything trained belongs to the new
# task, so the factor is 1.
HEAD_LR_SCALE = {"lora": 3.0, "router": 1.0, "full": 20.0}
# Every module dict keyed by task whose entry is the new task's own (its head, its router rows, its embedding).
TASK_CONTAINERS = ("heads", "routers", "task_embeddings")


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs (the recipe's YAML has the same keys).

    Args:
        model: path (or Hub id) of a pretrained multi-task model or an extracted sub-model, or a model object.
        dataset: `"builtin:digits"`, `{"builtin": "textures"}`, or a dataset spec mapping (imagefolder / hf; see
            `moe_adapt.adaptation.downstream`).
        output_dir: where adapter, model, report and selection are written.
        task_name: name of the new task (default: the dataset's name).
        num_labels: optional check: the number of classes you expect; must match the dataset.
        source_task: the task whose routers route the new images, or `"auto"` (lowest routing entropy).
        slice: extract the sub-network the source task uses on the new images (False: keep every expert).
        selection: `select_experts` arguments (`policy`, `threshold`, `n`, `coverage`, `criterion`).
        calibration_images: training images used to measure expert usage.
        mode: `"lora"`, `"router"` or `"full"`.
        lora: `lora_config` arguments (`r`, `alpha`, `include_attention`, `include_mlp`, `include_dense_mlp`, ...).
        batch_size: images per step (per process).
        optimizer: the shared `optimizer` section (`OptimizerConfig`): `lr` (null: the mode's default, lora 1e-2,
            router 1e-2, full 5e-4), `weight_decay`, `warmup_ratio`, `scheduler`, ... (AdamW over trainable
            parameters only; warm-up then cosine decay by default).
        train: the shared `train` section (`TrainConfig`): `max_steps`, `mixed_precision`, `num_threads` (on a CPU
            shared with other jobs, 1 thread per process is often several times faster), `log_every`, `compile`.
        head_lr: the learning rate of the new task's own tensors. In `lora` mode: of everything LoRA trains whole
            (the head, the routers, and the LayerNorms with `train_norms`); in `full` mode: of the new task's head,
            router rows and task embedding, the backbone training at `lr`; in `router` mode everything trained is
            the new task's, so a given `head_lr` is the rate of all of it. Default: `lr` x `HEAD_LR_SCALE[mode]`
            (lora 3, full 20, router 1: 3e-2, 1e-2 and 1e-2 with the default rates).
        augment: train with random resized crops and flips (default off: fixed-size images, cached in memory).
            True takes the classification defaults (crops of 25–100% of the image, flips with p 0.5); a mapping
            sets `scale`, `ratio` and `hflip_p` as in pretraining's task settings, e.g. `{scale: [0.8, 1.0],
            hflip_p: 0.0}` for digits, where a mirrored digit is another symbol.
        eval_batch_size, max_train_images, max_eval_images: evaluation and data caps.
        validation_fraction: hold out this fraction of the training images (a fixed, seeded draw, the same for every
            `seed`) and evaluate on them instead of the eval split, so that hyperparameters can be chosen without
            looking at the test images; training uses the rest. None (default): evaluate on the eval split.
        merge: also write `merged/` (LoRA folded in; `mode: lora` only).
        experts_implementation: `segmented_mm`, `grouped_mm`, `batched_mm` or `eager` (default: the model's).
        seed: reproducibility.

    The recipe YAML has the same keys (nested for `optimizer` and `train`); `load_config(FinetuneConfig, path,
    ["train.max_steps=50"])` reads it.
    """

    model: Any
    dataset: Any
    output_dir: str | None = None
    task_name: str | None = None
    num_labels: int | None = None
    source_task: str = "auto"
    slice: bool = True
    selection: dict = dataclasses.field(default_factory=lambda: {"policy": "threshold", "threshold": 3.0})
    calibration_images: int = 256
    mode: str = "lora"
    lora: dict = dataclasses.field(default_factory=lambda: {"r": 4})
    batch_size: int = 32
    head_lr: float | None = None
    augment: bool | dict = False
    eval_batch_size: int = 128
    max_train_images: int | None = None
    max_eval_images: int | None = None
    validation_fraction: float | None = None
    merge: bool = False
    experts_implementation: str | None = None
    seed: int = 0
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(lr=None, warmup_ratio=0.05))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(max_steps=300, log_every=50))

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {MODES}.")
        if isinstance(self.train, TrainConfig):
            self.train.refuse_pretraining_only("finetune")
        if self.merge and self.mode != "lora":
            raise ValueError(
                f"merge=True needs a LoRA adapter to merge, but mode={self.mode!r} trains the model's own tensors "
                "(there is no adapter): drop --merge, or use mode: lora."
            )
        for name in ("batch_size", "eval_batch_size", "calibration_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if isinstance(self.augment, Mapping) and not self.augment:
            self.augment = True  # an empty mapping: the defaults
        if isinstance(self.augment, Mapping):
            check_augment_keys(self.augment)
        elif not isinstance(self.augment, bool):
            raise ValueError(f"augment={self.augment!r} must be true, false or a mapping of {sorted(AUGMENT_OPTIONS)}.")
        f = self.validation_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1):
            raise ValueError(f"validation_fraction={f!r} must be a number strictly between 0 and 1 (or None).")
        if self.experts_implementation not in (None, *EXPERTS_IMPLEMENTATIONS):
            raise ValueError(
                f"experts_implementation={self.experts_implementation!r}: choose one of {', '.join(EXPERTS_IMPLEMENTATIONS)}."
            )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> FinetuneConfig:
        """Read a recipe YAML and apply dotted `overrides` (`train.max_steps=50`); an unknown key is an error that
        names it and the valid ones (`moe_adapt.training.config.load_config`)."""
        return load_config(cls, path, list(overrides))

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.mode] if self.optimizer.lr is None else float(self.optimizer.lr)

    @property
    def whole_module_learning_rate(self) -> float:
        """The learning rate of the new task's own tensors (see `head_lr`): `head_lr`, else `lr` times the mode's
        `HEAD_LR_SCALE`."""
        if self.head_lr is not None:
            return float(self.head_lr)
        return self.learning_rate * HEAD_LR_SCALE[self.mode]


@dataclasses.dataclass
class FinetuneResult:
    """What `finetune` returns: the trained model (peft-wrapped in LoRA mode), the report, the source task and
    selection used, and the files written."""

    model: nn.Module
    report: EfficiencyReport
    task: str
    source_task: str
    selection: ExpertSelection | None
    entropies: dict[str, float]
    files: dict[str, str]


# ----------------------------------------------------------------------------------------------------------------
# Model loading and the new task
# ----------------------------------------------------------------------------------------------------------------


def _task_model_class(task_type: str):
    """The model class a new task of `task_type` is fine-tuned in (its transformers task class)."""
    return TASK_MODEL_CLASSES[task_type]


def _check_task(config: MoEViTConfig, task: str, what: str = "source task") -> str:
    if task not in config.tasks:
        raise ValueError(
            f"The model has no task {task!r} to use as the {what}; its tasks are {config.tasks}. "
            "Set source_task to one of them, or to 'auto'."
        )
    return task


def attach_task(
    model: nn.Module,
    source_task: str,
    task: str,
    label_names: list[str],
    task_type: str = "classification",
    seed: int = 0,
) -> nn.Module:
    """A single-task model for `task` built from `model`'s backbone and `source_task`'s routing.

    Every backbone tensor is copied; in every MoE layer the new router is `source_task`'s router (of a slice: its
    kept rows), the new task embedding is `source_task`'s; the head is new (or, when `model` already has a head
    for `task` with `len(label_names)` outputs, kept, so a fine-tuned model can be fine-tuned further).

    `seed` seeds the new head's initialisation (`torch.manual_seed(seed)`; what follows draws from that state too).

    Raises:
        ValueError: `source_task` not in the model, or an existing head for `task` of another size.
    """
    backbone, _ = find_backbone(model)
    config = backbone.config
    _check_task(config, source_task)
    old_head = None
    heads = getattr(model, "heads", None)
    if task_type == "classification" and isinstance(heads, nn.ModuleDict) and task in heads:
        old_head = heads[task]
        if not isinstance(old_head, ClassificationHead):
            raise ValueError(
                f"The model's task {task!r} is not a classification task; give the new task another name (task_name)."
            )
        if old_head.classifier.out_features != len(label_names):
            raise ValueError(
                f"The dataset has {len(label_names)} classes but the model's head for task {task!r} has "
                f"{old_head.classifier.out_features} outputs. Give the new task another name (task_name) or fix the dataset."
            )
    data = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "architectures", "id2label", "label2id"):
        data.pop(key, None)
    sizes = (config.task_router_sizes or {}).get(source_task)
    data.update(
        tasks=[task],
        task_types={task: task_type},
        task_labels={task: list(label_names)},
        task_router_sizes={task: sizes} if sizes else None,
        default_task=task,
        backbone_task=None,
        head_configs=None,  # the new task's head is new; the source tasks' head options do not apply
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
    )
    new_config = MoEViTConfig.from_dict(data)
    impl = getattr(config, "_experts_implementation", None)
    if impl is not None:
        new_config._experts_implementation = impl
    torch.manual_seed(seed)  # the new head's initialisation
    new = _task_model_class(task_type)(new_config)
    source = backbone.state_dict()
    state = {}
    for key in new.moe_vit.state_dict():
        parts = key.split(".")
        if key == f"task_embeddings.{task}":
            state[key] = source[f"task_embeddings.{source_task}"]
        elif len(parts) > 2 and parts[-3:-1] == ["routers", task]:
            state[key] = source[".".join(parts[:-2] + [source_task, parts[-1]])]
        else:
            state[key] = source[key]
    new.moe_vit.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    if old_head is not None:
        new.heads[task].load_state_dict(old_head.state_dict())
    param = next(backbone.parameters())
    return new.to(device=param.device, dtype=param.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Calibration and source task
# ----------------------------------------------------------------------------------------------------------------


def usage_entropy(usage: ExpertUsage) -> float:
    """Mean over MoE layers of `H(mean gate) / log(E_t)` ∈ [0, 1]: 0 = every token on the same experts, 1 = spread
    evenly over all experts."""
    values = []
    for name in usage.layers:
        p = usage.mean_gate(name).double()
        p = p / p.sum().clamp(min=1e-12)
        e = p.numel()
        h = -(p * p.clamp(min=1e-12).log()).sum().item()
        values.append(h / math.log(e) if e > 1 else 0.0)
    return sum(values) / max(len(values), 1)


def choose_source_task(
    model: nn.Module, data: Iterable, source_task: str = "auto", candidates: list[str] | None = None
) -> tuple[str, dict[str, ExpertUsage], dict[str, float]]:
    """Measure expert usage of `data` under each candidate task's routers (`source_task="auto"`: every task of the
    model) and pick the task of lowest `usage_entropy`. Returns (task, usages, entropies)."""
    backbone, _ = find_backbone(model)
    config = backbone.config
    if source_task != "auto":
        tasks = [_check_task(config, source_task)]
    else:
        tasks = [_check_task(config, t) for t in (candidates or config.tasks)]
    data = list(data)
    usages = {t: collect_expert_usage(model, data, t, output_norms=False) for t in tasks}
    entropies = {t: usage_entropy(u) for t, u in usages.items()}
    best = min(tasks, key=lambda t: (entropies[t], tasks.index(t)))
    return best, usages, entropies


# ----------------------------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------------------------


def prepare_for_mode(
    model: nn.Module, mode: str, task: str, lora: Mapping | None = None, verbose: bool = True
) -> nn.Module:
    """Set what trains: `lora` → a peft model (`lora_config(model, tasks=[task], **lora)`); `router` → only `task`'s
    routers and head; `full` → everything. Returns the model to train."""
    if mode == "lora":
        return apply_lora(model, lora_config(model, tasks=[task], verbose=verbose, **dict(lora or {})), verbose=verbose)
    if mode == "router":
        model.requires_grad_(False)
        backbone, _ = find_backbone(model)
        for module in backbone.moe_layers().values():
            module.router.routers[task].requires_grad_(True)
        for name, module in model.named_children():
            if name != "moe_vit" and isinstance(module, nn.ModuleDict) and task in module:
                module[task].requires_grad_(True)
        return model
    if mode == "full":
        return model.requires_grad_(True)
    raise ValueError(f"mode={mode!r}: choose one of {MODES}.")


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


class InMemoryDataset(torch.utils.data.Dataset):
    """Fixed (already transformed) items kept as two tensors: pixel_values `[N, C, H, W]`, labels `[N]`."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor):
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixel_values[i], "labels": int(self.labels[i])}


def evaluated_on(validation_fraction: float | None) -> str:
    """Which images a run is scored on (its report's `extra.evaluated_on`)."""
    if validation_fraction is None:
        return "eval split"
    return f"validation: {validation_fraction} of the training images"


def _train_transform(spec, augment):
    """The training split's transform: "eval" without augmentation, "train" (the task type's defaults) for True,
    and `build_transforms` with the mapping's `scale` / `ratio` / `hflip_p` otherwise."""
    if not augment:
        return "eval"
    if augment is True:
        return "train"
    return build_transforms(spec.task_type, spec.image_size, train=True, **augment_options(augment))


def _seeded_order(n: int, limit: int | None = None) -> list[int]:
    """A fixed, class-mixed order of n items (seed 0, whatever the run's seed; imagefolders list files class by
    class), cut to the first `limit`."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return (order if limit is None else order[:limit]).tolist()


def _cache_items(dataset, indices: list[int]) -> InMemoryDataset:
    items = [dataset[i] for i in indices]
    return InMemoryDataset(
        torch.stack([it["pixel_values"] for it in items]),
        torch.tensor([int(it["labels"]) for it in items], dtype=torch.long),
    )


def _cache(dataset, limit: int | None) -> InMemoryDataset:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError(f"dataset {getattr(dataset, 'spec', None) and dataset.spec.name!r} has no samples.")
    return _cache_items(dataset, _seeded_order(len(dataset), n))  # a fixed, class-mixed subset when capped


def _train_images(train_raw, indices: list[int], augment: bool):
    """The training set over `indices` of the training split: augmented on the fly (a `Subset`), or cached."""
    return torch.utils.data.Subset(train_raw, indices) if augment else _cache_items(train_raw, indices)


def _unaugmented(spec, train_raw, augment) -> torch.utils.data.Dataset:
    """The training split read without augmentation: `train_raw` itself unless it augments."""
    return load_task_dataset(spec, split=spec.split, transform="eval") if augment else train_raw


def _hold_out_validation(spec, train_raw, cfg: FinetuneConfig):
    """(train, validation) for `cfg.validation_fraction`: the training split in a fixed order (seed 0, not
    `cfg.seed`, so that every run of a sweep sees the same split), capped at `max_train_images`; its first
    `validation_fraction` (capped at `max_eval_images`) is the evaluation set, read without augmentation, the rest
    trains. The eval split is not used."""
    pool = _seeded_order(len(train_raw), cfg.max_train_images)
    n, n_val = len(pool), round(len(pool) * cfg.validation_fraction)
    if not 1 <= n_val < n:
        raise ValueError(
            f"validation_fraction={cfg.validation_fraction!r} of dataset {spec.name!r}'s {n} training "
            f"images leaves {n_val} for validation and {n - n_val} for training: both need at least one."
        )
    held = pool[:n_val][: cfg.max_eval_images or None]
    return _train_images(train_raw, pool[n_val:], cfg.augment), _cache_items(
        _unaugmented(spec, train_raw, cfg.augment), held
    )


def load_downstream_data(cfg: FinetuneConfig, image_size: int):
    """→ (spec, train dataset, eval dataset, label names). Checks the labels against the number of classes."""
    spec = resolve_dataset_spec(cfg.dataset, image_size=image_size)
    if spec.task_type != "classification":
        raise ValueError(
            f"dataset {spec.name!r} is {spec.task_type}; the fine-tuning recipe supports classification so far."
        )
    train_raw = load_task_dataset(spec, split=spec.split, transform=_train_transform(spec, cfg.augment))
    label_names = list(train_raw.label_names)
    if cfg.num_labels is not None and cfg.num_labels != len(label_names):
        raise ValueError(
            f"dataset {spec.name!r} has {len(label_names)} classes ({label_names[:12]}) but num_labels="
            f"{cfg.num_labels} was asked for: fix num_labels or the dataset's label_names / class folders."
        )
    if cfg.validation_fraction is not None:
        train_set, eval_set = _hold_out_validation(spec, train_raw, cfg)
    elif spec.eval_split:
        eval_raw = load_task_dataset(spec, split=spec.eval_split, transform="eval")
        if list(eval_raw.label_names) != label_names:
            raise ValueError(
                f"dataset {spec.name!r}: the {spec.eval_split!r} split's classes {eval_raw.label_names} differ from the "
                f"{spec.split!r} split's {label_names}."
            )
        eval_set = _cache(eval_raw, cfg.max_eval_images)
        if not len(train_raw):
            raise ValueError(f"dataset {spec.name!r} has no samples in split {spec.split!r}.")
        train_set = _train_images(train_raw, _seeded_order(len(train_raw), cfg.max_train_images), cfg.augment)
    else:  # hold out a fixed 10% of the training split
        full = _cache(_unaugmented(spec, train_raw, cfg.augment), None)
        n_eval = max(1, len(full) // 10)
        eval_set = InMemoryDataset(full.pixel_values[:n_eval], full.labels[:n_eval])
        train_set = InMemoryDataset(full.pixel_values[n_eval:], full.labels[n_eval:])
        if cfg.max_eval_images:
            eval_set = InMemoryDataset(
                eval_set.pixel_values[: cfg.max_eval_images], eval_set.labels[: cfg.max_eval_images]
            )
        if cfg.max_train_images:
            train_set = InMemoryDataset(
                train_set.pixel_values[: cfg.max_train_images], train_set.labels[: cfg.max_train_images]
            )
    for name, ds in (("train", train_set), ("eval", eval_set)):
        if isinstance(ds, InMemoryDataset) and len(ds) and (ds.labels.min() < 0 or ds.labels.max() >= len(label_names)):
            raise ValueError(
                f"dataset {spec.name!r} ({name}): labels span {int(ds.labels.min())}..{int(ds.labels.max())} but there are "
                f"{len(label_names)} classes: every label must be in 0..{len(label_names) - 1}."
            )
    return spec, train_set, eval_set, label_names


def _calibration_batches(dataset, n: int, batch_size: int) -> list[torch.Tensor]:
    n = min(n, len(dataset))
    if isinstance(dataset, InMemoryDataset):
        pixels = dataset.pixel_values[:n]
    else:
        pixels = torch.stack([dataset[i]["pixel_values"] for i in range(n)])
    return list(pixels.split(batch_size))


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------------


def _lora_factor_ids(model: nn.Module) -> set[int]:
    """ids of the LoRA factors (and DoRA magnitudes) of every peft tuner layer in `model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    ids = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
                part = getattr(module, name, None)
                if isinstance(part, nn.Module):
                    ids.update(id(p) for p in part.parameters())
    return ids


def _task_parameter_ids(model: nn.Module, task: str) -> set[int]:
    """ids of `task`'s own tensors: its entries in every `TASK_CONTAINERS` module dict of `model`."""
    ids = set()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TASK_CONTAINERS and isinstance(module, (nn.ModuleDict, nn.ParameterDict)):
            if task in module:
                entry = module[task]
                if isinstance(entry, nn.Module):
                    ids.update(id(p) for p in entry.parameters())
                else:
                    ids.add(id(entry))
    return ids


def lr_groups(model: nn.Module, task: str, lr: float, head_lr: float | None) -> list[dict]:
    """The trainable parameters in AdamW groups by learning rate: with `head_lr`, on a LoRA model the factors
    (parameters named `lora_*`) at `lr` and every other trainable tensor (heads, routers, norms trained whole) at
    `head_lr`; on any other model the tensors of `task` (its entries in the `TASK_CONTAINERS` module dicts: its
    head, router rows and task embedding) at `head_lr` and the rest at `lr`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("Nothing to train: every parameter of the model is frozen.")
    if head_lr is None or head_lr == lr:
        return [{"params": [p for _, p in named], "lr": lr}]
    factors = _lora_factor_ids(model)
    if factors:
        fast = {id(p) for _, p in named if id(p) not in factors}
    else:
        fast = _task_parameter_ids(model, task) & {id(p) for _, p in named}
        if not fast:
            raise ValueError(
                f"head_lr={head_lr} is given, but the model has no trainable tensor of task {task!r} "
                f"(in {', '.join(TASK_CONTAINERS)}) to train at it."
            )
    return [
        g
        for g in (
            {"params": [p for _, p in named if id(p) not in fast], "lr": lr},
            {"params": [p for _, p in named if id(p) in fast], "lr": head_lr},
        )
        if g["params"]
    ]


def train(
    model: nn.Module,
    train_set,
    task: str,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.05,
    seed: int = 0,
    log_every: int = 50,
    accelerator=None,
    memory: MemoryMeter | None = None,
    head_lr: float | None = None,
    optimizer: OptimizerConfig | None = None,
) -> tuple[nn.Module, Throughput, list[float]]:
    """Fine-tune `model` on classification `task` through the one training loop (`train_loop`): AdamW over the
    trainable parameters only (a frozen tensor never moves, weight decay included; groups by `lr_groups`), warm-up
    then cosine decay (or the `optimizer` section given, whose `lr` is then ignored for `lr`), `steps` optimizer
    steps of shuffled `batch_size`-image batches. Returns (prepared model, throughput, losses)."""
    accelerator = accelerator or make_accelerator(TrainConfig(max_steps=steps))
    opt_cfg = optimizer or OptimizerConfig(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio)
    opt = adamw(
        lr_groups(model, task, lr, head_lr),
        accelerator.device,
        lr=lr,
        weight_decay=opt_cfg.weight_decay,
        betas=opt_cfg.betas,
        eps=opt_cfg.eps,
    )
    scheduler = build_scheduler(opt, opt_cfg, steps)
    loader = accelerator.prepare(shuffled_loader(train_set, batch_size, seed, collate_fn_for("classification")))
    speed, saved, first = Throughput(warmup=1), SavedTensorMeter(model), [True]

    def loss_fn(m, batch):
        with saved if first[0] else contextlib.nullcontext():
            out = m(pixel_values=batch["pixel_values"], labels=batch["labels"], task=task, return_dict=True)
        first[0] = False
        return {"loss": out.loss, "images": len(batch["labels"]) * accelerator.num_processes}

    def on_step(step, out):
        if speed.train_state_mb is None:  # after the first step: the optimizer state exists
            speed.train_state_mb = saved.train_state_mb(model, opt)
        speed.add(out["images"], accelerator.device)

    model.train()
    with memory.track() if memory is not None else contextlib.nullcontext(), speed:
        result = train_loop(
            model,
            opt,
            scheduler,
            lambda start: repeat_loader(loader, start),
            loss_fn,
            accelerator,
            max_steps=steps,
            seed=seed,
            max_grad_norm=opt_cfg.max_grad_norm,
            log_every=log_every,
            on_step=on_step,
            progress_bar=False,
            desc=f"finetune {task}",
        )
    return result.model, speed, result.losses


# ----------------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------------


def _save_dir(model: nn.Module, path: Path) -> str:
    """`model.save_pretrained` into `path` in one step (`atomic_dir`): the previous complete folder or the new one."""
    with atomic_dir(path) as stage:
        model.save_pretrained(stage)
    return str(path)


def _model_image_size(model: str | os.PathLike | nn.Module) -> int:
    """The image size of `model` (a module, or a checkpoint location checked before its config is read)."""
    if isinstance(model, nn.Module):
        return find_backbone(model)[0].config.image_size
    from ..hub.loading import check_model_location

    check_model_location(model)
    return MoEViTConfig.from_pretrained(model).image_size


def _new_task_model(cfg: FinetuneConfig, parent: nn.Module, train_set, task: str, label_names, say):
    """Steps 1 to 3 of the path: choose the source task on calibration images of `train_set`, slice `parent` to
    its experts (with `cfg.slice`) and attach `task`; returns `(model, source, entropies, selection)`."""
    backbone, _ = find_backbone(parent)  # a clear error for anything that is not a MoE ViT
    if cfg.experts_implementation:
        parent.config._experts_implementation = cfg.experts_implementation
        backbone.config._experts_implementation = cfg.experts_implementation
    if cfg.source_task != "auto":
        _check_task(backbone.config, cfg.source_task)

    calib = _calibration_batches(train_set, cfg.calibration_images, cfg.eval_batch_size)
    source, usages, entropies = choose_source_task(parent, calib, cfg.source_task)
    say(
        f"source task: {source!r} (routing entropy per task: "
        + ", ".join(f"{t} {h:.3f}" for t, h in entropies.items())
        + ")"
    )
    selection = None
    if cfg.slice:
        selection = select_experts(usages[source], **dict(cfg.selection))
        from ..surgery import extract_submodel

        sliced = extract_submodel(parent, selection, tasks=[source])
        kept = {n: len(ids) for n, ids in selection.experts.items()}
        say(f"sub-network: experts kept per MoE layer {kept}")
    else:
        sliced = parent
    model = attach_task(sliced, source, task, label_names, seed=cfg.seed)
    return model, source, entropies, selection


def _save_before_training(cfg: FinetuneConfig, model: nn.Module, selection, out_dir: Path) -> dict[str, str]:
    """Create `out_dir` and write what is fixed before training: the expert selection (when sliced) and, in
    LoRA mode, the frozen task model the adapter applies to. Returns the files written, by role."""
    files: dict[str, str] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    if selection is not None:
        files["selection"] = str(selection.save(out_dir / "selection.json"))
    if cfg.mode == "lora":  # the frozen task model the adapter applies to
        files["base"] = _save_dir(model, out_dir / "base")
    return files


def _train_for_config(cfg: FinetuneConfig, model: nn.Module, train_set, task: str, accelerator, memory, verbose: bool):
    """`train` with the step count, batch size, learning rates, optimizer and seed `cfg` names; returns what
    `train` returns."""
    return train(
        model,
        train_set,
        task,
        cfg.train.max_steps,
        cfg.batch_size,
        cfg.learning_rate,
        seed=cfg.seed,
        log_every=cfg.train.log_every if verbose else 0,
        accelerator=accelerator,
        memory=memory,
        head_lr=cfg.whole_module_learning_rate,
        optimizer=cfg.optimizer,
    )


def _finetune_report(
    cfg: FinetuneConfig,
    model: nn.Module,
    task: str,
    source: str,
    *,
    accuracy: float,
    speed,
    memory,
    flops,
    losses: list[float],
    entropies: dict[str, float],
    selection,
    train_images: int,
    eval_images: int,
    device: str,
):
    """The run's `efficiency_report`: accuracy, speed, memory and FLOPs, with the source task, routing entropies,
    experts kept, final loss (mean of the last 10 steps), data sizes and learning rates under `extra`."""
    return efficiency_report(
        model,
        task,
        name=f"{task} <- {source}" + (" (sliced)" if cfg.slice else ""),
        mode=cfg.mode,
        images_per_s=speed.images_per_s,
        memory=memory,
        metric_name="accuracy",
        metric=accuracy,
        flops=flops,
        train_state_mb=speed.train_state_mb,
        images_per_cpu_s=speed.images_per_cpu_s,
        train_steps=cfg.train.max_steps,
        batch_size=cfg.batch_size,
        device=device,
        extra={
            "source_task": source,
            "routing_entropy": {t: round(h, 4) for t, h in entropies.items()},
            "experts_kept": None if selection is None else {n: len(v) for n, v in selection.experts.items()},
            "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "train_images": train_images,
            "eval_images": eval_images,
            "evaluated_on": evaluated_on(cfg.validation_fraction),
            "lr": cfg.learning_rate,
            "head_lr": cfg.whole_module_learning_rate,
        },
    )


def finetune(
    cfg: FinetuneConfig, verbose: bool = True, memory: MemoryMeter | type[MemoryMeter] | None = None
) -> FinetuneResult:
    """Run the whole path (see the module docstring); returns a `FinetuneResult` and writes `cfg.output_dir`.

    `memory`: how the report's peak memory is measured: a `MemoryMeter` (its baseline already taken), or a
    `MemoryMeter` class, created on the run's device once the data is loaded and before the model is (default:
    `MemoryMeter` itself: torch's CUDA peak, or the process's peak RSS on CPU)."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg.train)
    say = accelerator.print if verbose else (lambda *a, **k: None)
    set_seed(cfg.seed)

    image_size = _model_image_size(cfg.model)
    spec, train_set, eval_set, label_names = load_downstream_data(cfg, image_size)
    # the memory baseline: the process with its libraries and the data, before any model is loaded
    if memory is None or isinstance(memory, type):
        memory = (memory or MemoryMeter)(accelerator.device)
    parent = cfg.model if isinstance(cfg.model, nn.Module) else load_model(cfg.model)  # the one loader
    task = cfg.task_name or spec.name
    model, source, entropies, selection = _new_task_model(cfg, parent, train_set, task, label_names, say)
    del parent
    gc.collect()
    flops = model_flops(model, task, image_size=spec.image_size)

    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    files: dict[str, str] = {}
    if out_dir is not None and accelerator.is_main_process:
        files.update(_save_before_training(cfg, model, selection, out_dir))

    model = prepare_for_mode(model, cfg.mode, task, cfg.lora, verbose=verbose and accelerator.is_main_process)
    model = compile_model(model, cfg.train)
    trained, speed, losses = _train_for_config(cfg, model, train_set, task, accelerator, memory, verbose)
    model = accelerator.unwrap_model(trained)
    if (
        out_dir is not None and accelerator.is_main_process
    ):  # the trained weights first: a failing evaluation keeps them
        if cfg.mode == "lora":
            files["adapter"] = _save_dir(model, out_dir / "adapter")
        else:
            files["model"] = _save_dir(model, out_dir / "model")
    accelerator.wait_for_everyone()
    eval_loader = accelerator.prepare(
        torch.utils.data.DataLoader(
            eval_set, batch_size=cfg.eval_batch_size, collate_fn=collate_fn_for("classification")
        )
    )
    accuracy = evaluate(trained, eval_loader, task, accelerator=accelerator)["accuracy"]
    report = _finetune_report(
        cfg,
        model,
        task,
        source,
        accuracy=accuracy,
        speed=speed,
        memory=memory,
        flops=flops,
        losses=losses,
        entropies=entropies,
        selection=selection,
        train_images=len(train_set),
        eval_images=len(eval_set),
        device=str(accelerator.device),
    )
    if accelerator.is_main_process:
        say(report.to_console())
        say("report: " + report.to_json())
        if out_dir is not None:
            if cfg.mode == "lora" and cfg.merge:
                merged = merge_lora(model)
                files["merged"] = _save_dir(merged, out_dir / "merged")
                model = merged
            files["report"] = str(report.save(out_dir / "report.json"))
            atomic_write_text(out_dir / "finetune_config.json", json.dumps(_jsonable(cfg), indent=2))
    accelerator.wait_for_everyone()
    return FinetuneResult(
        model=model, report=report, task=task, source_task=source, selection=selection, entropies=entropies, files=files
    )


def _jsonable(cfg: FinetuneConfig) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        out[f.name] = value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else repr(value)
    return out


def load_finetuned(output_dir: str | os.PathLike) -> nn.Module:
    """The model a `finetune` run wrote: `merged/` if present, else `base/` + `adapter/` (peft), else `model/`."""
    from .lora import load_lora

    out = Path(output_dir)
    if (out / "merged").is_dir():
        return MoEViTForImageClassification.from_pretrained(out / "merged")
    if (out / "adapter").is_dir():
        return load_lora(MoEViTForImageClassification.from_pretrained(out / "base"), out / "adapter")
    if (out / "model").is_dir():
        return MoEViTForImageClassification.from_pretrained(out / "model")
    raise FileNotFoundError(f"{out} holds no fine-tuned model (no merged/, adapter/ or model/ folder).")


__all__ = [
    "MODES",
    "FinetuneConfig",
    "FinetuneResult",
    "InMemoryDataset",
    "attach_task",
    "choose_source_task",
    "finetune",
    "load_downstream_data",
    "load_finetuned",
    "prepare_for_mode",
    "lr_groups",
    "train",
    "usage_entropy",
]
