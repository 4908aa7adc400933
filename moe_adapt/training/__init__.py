"""Training: the one training loop (`loop.train_loop`), the recipe configs (`config`), and multi-task heterogeneous
pretraining (task sampling, loss weighting, the step objective, `pretrain`).

`recipes/pretrain.py` is a thin wrapper around `pretrain(load_pretrain_config(path))`; everything it calls lives
here and is usable from Python:

```python
>>> from moe_adapt.training import load_pretrain_config, pretrain
>>> results = pretrain(load_pretrain_config("recipes/configs/mini.yaml", ["train.max_steps=20"]))  # doctest: +SKIP
```
"""

from .config import (
    ContinualConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    PretrainConfig,
    SamplingConfig,
    TaskConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    load_pretrain_config,
)
from .data import TaskBatchStream, TaskData, hash_seed, load_task_data, resolve_specs
from .evaluation import METRIC_FOR, PRIMARY_METRIC, evaluate_task, normalized_task_expert_mi
from .loop import (
    LoopResult,
    adamw,
    build_optimizer,
    build_scheduler,
    checkpoint_dirs,
    make_accelerator,
    parameter_groups,
    resolve_resume,
    train_loop,
)
from .loss_weighting import LOSS_WEIGHTINGS, LossWeighting
from .model import build_model, build_model_config, recipe_specs
from .objective import MultiTaskObjective
from .pretraining import evaluate_all, finish, pretrain
from .sampling import SAMPLING_STRATEGIES, TaskSampler, task_probabilities

__all__ = [
    "LOSS_WEIGHTINGS",
    "METRIC_FOR",
    "PRIMARY_METRIC",
    "SAMPLING_STRATEGIES",
    "ContinualConfig",
    "DataConfig",
    "LoopResult",
    "LossWeighting",
    "ModelConfig",
    "MultiTaskObjective",
    "OptimizerConfig",
    "PretrainConfig",
    "SamplingConfig",
    "TaskBatchStream",
    "TaskConfig",
    "TaskData",
    "TaskSampler",
    "TrainConfig",
    "adamw",
    "apply_overrides",
    "build_model",
    "build_model_config",
    "build_optimizer",
    "build_scheduler",
    "checkpoint_dirs",
    "evaluate_all",
    "evaluate_task",
    "finish",
    "hash_seed",
    "load_config",
    "load_pretrain_config",
    "load_task_data",
    "make_accelerator",
    "normalized_task_expert_mi",
    "parameter_groups",
    "pretrain",
    "recipe_specs",
    "resolve_resume",
    "resolve_specs",
    "task_probabilities",
    "train_loop",
]
