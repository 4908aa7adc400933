"""The pretraining recipe's configuration: one YAML file, parsed into typed, checked dataclasses.

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
optimizer: {lr: 1.0e-3, weight_decay: 0.05, betas: [0.9, 0.999], warmup_steps: 50, min_lr: 1.0e-6, max_grad_norm: 1.0}
train: {max_steps: 600, mixed_precision: "no", eval_every: 200, save_every: 200, log_every: 10}
```

`load_pretrain_config(path, overrides=["train.max_steps=20", ...])` reads the file and applies dotted overrides
(values parsed as YAML). Every unknown key is an error naming the section, the key and the known keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..data.transforms import check_augment_keys
from .loss_weighting import LOSS_WEIGHTINGS
from .sampling import SAMPLING_STRATEGIES


def _from_mapping(cls, data: Mapping[str, Any] | None, where: str):
    """Build dataclass `cls` from `data`, rejecting unknown keys with a message naming `where`."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of key: value; got {type(data).__name__}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}.")
    return cls(**data)


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
    """AdamW with linear warm-up then cosine decay to `min_lr`. `lr` is used as given (no batch scaling)."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr: float = 1e-6
    max_grad_norm: float | None = 1.0
    no_decay_router: bool = True  # routers, norms, biases, embeddings and loss weights get no weight decay

    def __post_init__(self):
        # YAML reads "2e-3" (no dot) as a string: accept it.
        for name in ("lr", "weight_decay", "eps", "min_lr", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _number(value, f"optimizer.{name}"))
        self.betas = tuple(_number(b, "optimizer.betas") for b in self.betas)
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"optimizer.lr must be positive and warmup_steps >= 0; got {self.lr}, {self.warmup_steps}.")


@dataclasses.dataclass
class TrainConfig:
    """`max_minutes`: optional wall-clock budget of the loop (the cosine schedule follows whichever of steps and time
    runs out first; exact resume then no longer holds). `num_threads`: torch threads (a positive int), or null
    (torch's default)."""

    max_steps: int = 600
    max_minutes: float | None = None
    num_threads: int | None = None
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (accelerate)
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    log_every: int = 10
    keep_checkpoints: int = 2
    progress_bar: bool = True
    usage_max_batches: int | None = 8  # calibration batches per task for the final expert-usage statistics

    def __post_init__(self):
        if self.max_minutes is not None:
            self.max_minutes = _number(self.max_minutes, "train.max_minutes")
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps must be at least 1; got {self.max_steps}.")
        if self.num_threads is not None and (isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int)
                                             or self.num_threads < 1):
            raise ValueError(f"train.num_threads={self.num_threads!r}: give a positive int or null.")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision={self.mixed_precision!r}: choose 'no', 'bf16' or 'fp16'.")


@dataclasses.dataclass
class PretrainConfig:
    """The whole recipe; see the module docstring for the YAML layout."""

    data: DataConfig
    tasks: dict[str, TaskConfig]
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> PretrainConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(data) - known)
        where = source or "the recipe config"
        if unknown:
            raise ValueError(f"{where}: unknown top-level key(s) {unknown}; known keys: {sorted(known)}.")
        if "data" not in data or "tasks" not in data:
            raise ValueError(f"{where}: 'data' and 'tasks' are required.")
        tasks = data.pop("tasks")
        if not isinstance(tasks, Mapping):
            raise ValueError(f"{where}: 'tasks' must map task names to their settings.")
        try:
            return cls(
                data=_from_mapping(DataConfig, data.pop("data"), "data"),
                tasks={str(t): _from_mapping(TaskConfig, v, f"tasks.{t}") for t, v in tasks.items()},
                model=_from_mapping(ModelConfig, data.pop("model", None), "model"),
                sampling=_from_mapping(SamplingConfig, data.pop("sampling", None), "sampling"),
                optimizer=_from_mapping(OptimizerConfig, data.pop("optimizer", None), "optimizer"),
                train=_from_mapping(TrainConfig, data.pop("train", None), "train"),
                source=source,
                **data,
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
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


def load_pretrain_config(path: str | Path, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Read a recipe YAML file and apply dotted `overrides`; raises `ValueError` naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No recipe config at {path}; see recipes/configs/ for examples.")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a YAML mapping.")
    return PretrainConfig.from_dict(apply_overrides(data, overrides), source=str(path))


__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PretrainConfig",
    "SamplingConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "load_pretrain_config",
]
