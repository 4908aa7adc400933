"""The recipes' configuration: one YAML file per run, parsed into typed, checked, nested dataclasses.

Every recipe (`PretrainConfig`, `moe_adapt.adaptation.finetune.FinetuneConfig`, `ContinualConfig`) has the same
`optimizer` (`OptimizerConfig`) and `train` (`TrainConfig`) sections and is read by the same loader,
`load_config(cls, path, overrides)`: dotted overrides (`train.max_steps=100`, values parsed as YAML) on top of the
file, every section's keys over the recipe's defaults, and an unknown key is an error that names it and lists the
valid ones. The pretraining recipe:

```yaml
seed: 0
output_dir: runs/mini
data:                       # where the tasks' data lives: a spec file, inline specs, or the mini benchmark
  mini: {out: data/mini, small: false}          # built with moe_adapt.data.build_mini_benchmark when missing
  # specs: path/to/specs.yaml   or   specs: [{name: ..., task_type: ..., format: ..., path: ...}, ...]
model:
  preset: mini              # MoEViTConfig.from_preset name: tiny | mini | vit-s | vit-b
  layout: mod-squad         # or "all"
  overrides: {pooling: mean, mi_loss_weight: 0.005}   # any MoEViTConfig field
tasks:                      # task name (= dataset spec name) → per-task settings, in model order
  fashion: {batch_size: 64, image_size: 32, loss_weight: 1.0, head: {}, augment: {scale: [0.5, 1.0]}}
sampling: {strategy: all_tasks, temperature: 2.0, micro_batches_per_step: null, rounds: 1}
loss_weighting: fixed       # or uncertainty
optimizer: {lr: 1.0e-3, weight_decay: 0.05, scheduler: cosine_with_min_lr, warmup_steps: 50, min_lr: 1.0e-6,
            max_grad_norm: 1.0}
train: {max_steps: 600, mixed_precision: "no", compile: false, eval_every: 200, save_every: 200, log_every: 10}
```

`load_pretrain_config(path, overrides=["train.max_steps=20", ...])` is `load_config(PretrainConfig, ...)`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..data.transforms import check_augment_keys
from .loss_weighting import LOSS_WEIGHTINGS
from .sampling import SAMPLING_STRATEGIES


def _number(value, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number; got {value!r}.") from None


@dataclasses.dataclass
class DataConfig:
    """Where the data comes from. `mini`: `{out: DIR, small: bool, seed: int}` builds the embedded mini benchmark
    into DIR when DIR has no `specs.yaml`; `specs`: a spec YAML file (or folder holding `specs.yaml`) or a list of
    inline spec dicts (see `moe_adapt.data.specs`). Relative paths are relative to the working directory."""

    mini: dict | None = None
    specs: str | list | None = None
    num_workers: int = 0  # DataLoader workers per task (batches are identical for any number)

    def __post_init__(self):
        if (self.mini is None) == (self.specs is None):
            raise ValueError("data: give exactly one of 'mini' (build the mini benchmark) or 'specs' (your datasets).")
        if self.mini is not None:
            unknown = sorted(set(self.mini) - {"out", "small", "seed"})
            if unknown or "out" not in self.mini:
                raise ValueError(f"data.mini must be {{out: DIR, small: bool, seed: int}}; got {self.mini}.")


@dataclasses.dataclass
class ModelConfig:
    preset: str = "mini"
    layout: str = "mod-squad"
    overrides: dict = dataclasses.field(default_factory=dict)
    init_from: str | None = None  # a saved MoEViTForMultiTask / MoEViTModel folder to start from


@dataclasses.dataclass
class TaskConfig:
    """Per-task settings. `image_size` overrides the spec's; `augment` goes to `build_transforms` (`scale`, `ratio`,
    `hflip_p`); `head` goes to `config.head_configs[task]`; `num_labels` is used only when the label names cannot
    be read from the data (building a model without data, e.g. to check a paper-scale config)."""

    batch_size: int = 32
    image_size: int | None = None
    loss_weight: float = 1.0
    augment: dict = dataclasses.field(default_factory=dict)
    head: dict = dataclasses.field(default_factory=dict)
    eval_batch_size: int | None = None
    eval_max_samples: int | None = None
    num_labels: int | None = None

    def __post_init__(self):
        self.loss_weight = _number(self.loss_weight, "loss_weight")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {self.batch_size}.")
        check_augment_keys(self.augment)


@dataclasses.dataclass
class SamplingConfig:
    """`strategy`: `all_tasks` (each step = `rounds` micro-batches of every task), `proportional` (tasks drawn ∝
    dataset size), `temperature` (∝ size^(1/temperature)) or `round_robin` (tasks in turn);
    `micro_batches_per_step` for the last three (default: the number of tasks, so a step costs about the same)."""

    strategy: str = "all_tasks"
    temperature: float = 2.0
    micro_batches_per_step: int | None = None
    rounds: int = 1

    def __post_init__(self):
        self.temperature = _number(self.temperature, "sampling.temperature")
        if self.strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"sampling.strategy={self.strategy!r}: choose one of {list(SAMPLING_STRATEGIES)}.")
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be positive; got {self.temperature}.")
        if self.rounds < 1 or (self.micro_batches_per_step is not None and self.micro_batches_per_step < 1):
            raise ValueError("sampling.rounds and sampling.micro_batches_per_step must be at least 1.")


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW (torch's, fused where the device has a fused kernel) and a transformers learning-rate schedule; the same
    section in every recipe.

    `lr`: the peak learning rate, used as given (no batch scaling); `None` takes the recipe's default (fine-tuning:
    one per mode). `scheduler`: a `transformers.get_scheduler` name (`cosine_with_min_lr` decays to `min_lr`,
    `cosine`, `linear`, `constant_with_warmup`, ...). Warm-up: `warmup_steps` steps, or, when that is null,
    `warmup_ratio` of the run. `max_grad_norm`: clip the gradient norm (null: no clipping)."""

    lr: float | None = 1e-3
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: str = "cosine_with_min_lr"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    min_lr: float = 0.0
    max_grad_norm: float | None = None
    no_decay_router: bool = True  # routers, norms, biases, embeddings and loss weights get no weight decay

    def __post_init__(self):
        # YAML reads "2e-3" (no dot) as a string: accept it.
        for name in ("lr", "weight_decay", "eps", "min_lr", "max_grad_norm", "warmup_ratio"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _number(value, f"optimizer.{name}"))
        self.betas = tuple(_number(b, "optimizer.betas") for b in self.betas)
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive; got {self.lr}.")
        if (self.warmup_steps is not None and self.warmup_steps < 0) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(
                f"optimizer: warmup_steps must be >= 0 and warmup_ratio in [0, 1); got "
                f"{self.warmup_steps}, {self.warmup_ratio}."
            )
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        if self.scheduler not in names:
            raise ValueError(f"optimizer.scheduler={self.scheduler!r}: choose one of {names}.")

    def warmup(self, max_steps: int) -> int:
        """Warm-up steps of a run of `max_steps` steps."""
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * max_steps)


@dataclasses.dataclass
class TrainConfig:
    """How the loop runs; the same section in every recipe.

    `max_steps`: optimizer steps. `max_minutes`: optional wall-clock budget: the loop stops when it is spent (the
    schedule still follows `max_steps`; exact resume no longer holds). `num_threads`: torch threads per process (a
    positive int; fewer when the launcher's processes would then outnumber the cores), or null (torch's default).
    `mixed_precision`: accelerate's "no", "bf16" or "fp16". `gradient_accumulation_steps`: batches per optimizer step
    (accelerate's `accumulate`; pretraining accumulates over the tasks of a step in its objective instead and keeps
    1). `compile`: `torch.compile` the model (off by default). `eval_every` /
    `save_every`: steps between evaluations / checkpoints (0: only at the end / none); `keep_checkpoints`: how many
    checkpoints accelerate keeps. `usage_max_batches`: pretraining's calibration batches per task for the final
    expert-usage statistics."""

    max_steps: int = 600
    max_minutes: float | None = None
    num_threads: int | None = None
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    compile: bool = False
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2
    progress_bar: bool = True
    usage_max_batches: int | None = 8

    #: settings only pretraining's loop acts on (checkpoints, evaluations, a wall-clock cap)
    PRETRAINING_ONLY = ("max_minutes", "eval_every", "save_every", "keep_checkpoints")

    def refuse_pretraining_only(self, recipe: str) -> None:
        """Raise naming a pretraining-only setting that the `recipe` (finetune, continual) would silently ignore."""
        default = TrainConfig()
        for name in self.PRETRAINING_ONLY:
            if getattr(self, name) != getattr(default, name):
                raise ValueError(
                    f"train.{name}={getattr(self, name)!r}: the {recipe} recipe does not use it (pretraining does); "
                    "remove it from the recipe."
                )

    def __post_init__(self):
        if self.max_minutes is not None:
            self.max_minutes = _number(self.max_minutes, "train.max_minutes")
        for name in ("max_steps", "gradient_accumulation_steps", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer; got {value!r}.")
        if self.num_threads is not None and (
            isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int) or self.num_threads < 1
        ):
            raise ValueError(f"train.num_threads={self.num_threads!r}: give a positive int or null.")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision={self.mixed_precision!r}: choose 'no', 'bf16' or 'fp16'.")


@dataclasses.dataclass
class PretrainConfig:
    """The whole pretraining recipe; see the module docstring for the YAML layout."""

    data: DataConfig
    tasks: dict[str, TaskConfig]
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(
            lr=1e-3, weight_decay=0.05, warmup_steps=50, min_lr=1e-6, max_grad_norm=1.0
        )
    )
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    loss_weighting: str = "fixed"
    seed: int = 0
    output_dir: str = "runs/pretrain"
    source: str | None = None  # the YAML file it was read from

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks: list at least one task (its name must match a dataset spec).")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={self.loss_weighting!r}: choose one of {list(LOSS_WEIGHTINGS)}.")
        if self.optimizer.lr is None:
            raise ValueError("optimizer.lr: give the pretraining learning rate.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> PretrainConfig:
        return config_from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


@dataclasses.dataclass
class ContinualConfig:
    """The continual-learning recipe (`moe_adapt.adaptation.continual.run_continual`): grow `model` by the classification
    task of `dataset` and train it, every old task frozen.

    `model`: a pretrained MoE ViT folder. `dataset`: what fine-tuning reads (`builtin:digits`, a spec mapping).
    `task_name`: the new task's name (default: the dataset's). `image_size`: its input size (default: the model's).
    `new_attn_experts` / `new_mlp_experts`: experts added per MoE layer (an int, or one per layer). `init`:
    `copy_top` (copy the source task's most used experts) or `random`. `source_task`: whose routing ranks them,
    `auto` = lowest routing entropy. `check_images`: old tasks' outputs are compared on this many images. `budget`:
    also draw the new task's metric-vs-FLOPs curve."""

    model: str | None = None
    dataset: Any = "builtin:digits"
    task_name: str | None = None
    image_size: int | None = None
    new_attn_experts: Any = 2
    new_mlp_experts: Any = 2
    init: str = "copy_top"
    source_task: str = "auto"
    calibration_images: int = 256
    batch_size: int = 32
    max_train_images: int | None = None
    max_eval_images: int | None = None
    check_images: int = 128
    budget: bool = True
    output_dir: str | None = None
    seed: int = 0
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(lr=5e-3, weight_decay=0.3, warmup_ratio=0.05)
    )
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(max_steps=800, log_every=50))
    source: str | None = None

    def __post_init__(self):
        if not self.model:
            raise ValueError("model is not set: give --model DIR (a pretrained MoE ViT) or model: in the YAML.")
        if self.optimizer.lr is None:
            raise ValueError("optimizer.lr: give the new task's learning rate.")
        self.train.refuse_pretraining_only("continual")


# ----------------------------------------------------------------------------------------------------------------
# One loader for every recipe: nested dataclasses from YAML, dotted overrides, unknown keys named
# ----------------------------------------------------------------------------------------------------------------

_INTERNAL = ("source",)  # fields a recipe file does not set


def _dataclass_in(hint) -> type | None:
    """The dataclass `hint` names (`X`, `X | None`), else None."""
    options = (
        typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
    )
    for option in (hint, *options):
        if dataclasses.is_dataclass(option):
            return option
    return None


def _build(cls, data, where: str, base=None):
    """Dataclass `cls` from mapping `data` (over the values of `base`, an instance, when given): nested dataclass
    fields from their sub-mappings, `dict[str, Dataclass]` fields entry by entry. An unknown key is an error that
    names it and lists the valid ones."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or 'the config'} must be a mapping of key: value; got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _INTERNAL}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where or 'top level'}: unknown key(s) {unknown}; valid keys: {sorted(fields)}.")
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        sub = _dataclass_in(hints[name])
        args = typing.get_args(hints[name])
        if sub is not None and isinstance(value, Mapping):
            field = fields[name]
            default = (
                getattr(base, name)
                if base is not None
                else (field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
            )
            kwargs[name] = _build(sub, value, path, default if dataclasses.is_dataclass(default) else None)
        elif typing.get_origin(hints[name]) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
            if not isinstance(value, Mapping):
                raise ValueError(f"{path} must map names to their settings; got {type(value).__name__}.")
            kwargs[name] = {str(k): _build(args[1], v or {}, f"{path}.{k}") for k, v in value.items()}
        else:
            kwargs[name] = value
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{where or 'top level'}: missing required key(s) {missing}.")
    return cls(**kwargs)


def config_from_dict(cls, data: Mapping[str, Any], source: str | None = None):
    """Recipe dataclass `cls` from a nested mapping (as read from YAML); errors start with `source`."""
    try:
        config = _build(cls, dict(data), "")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source or 'the recipe config'}: {err}") from None
    if "source" in {f.name for f in dataclasses.fields(cls)}:
        config.source = source
    return config


def config_to_dict(config) -> dict[str, Any]:
    """A recipe dataclass as plain YAML/JSON-able data (what `config_from_dict` reads back)."""
    out = dataclasses.asdict(config)
    out.pop("source", None)
    if "optimizer" in out:
        out["optimizer"]["betas"] = list(out["optimizer"]["betas"])
    return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a nested dict, in place; returns it."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} must look like section.key=value (e.g. train.max_steps=20).")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"Override {item!r}: {part!r} is not a section.")
        node[parts[-1]] = yaml.safe_load(value)
    return data


def load_config(cls, path: str | Path | None, overrides: Sequence[str] = ()):
    """Recipe dataclass `cls` (`PretrainConfig`, `FinetuneConfig`, `ContinualConfig`) from a YAML file (None: no
    file, only overrides) with dotted `overrides` applied; raises `ValueError` naming the bad key and the valid
    ones."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No recipe config at {path}; see recipes/configs/ for examples.")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a YAML mapping.")
    return config_from_dict(cls, apply_overrides(data, overrides), source=str(path) if path else "overrides")


def load_pretrain_config(path: str | Path, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Read a pretraining recipe YAML file and apply dotted `overrides` (`load_config(PretrainConfig, ...)`)."""
    return load_config(PretrainConfig, path, overrides)


__all__ = [
    "ContinualConfig",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PretrainConfig",
    "SamplingConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "load_pretrain_config",
]
