"""Build the `MoEViTForMultiTask` a recipe describes.

The model config comes from `model.preset` / `model.layout` / `model.overrides`; the tasks, their types and label
names from the dataset specs (or the data, once read); each task's head options from `tasks.<name>.head`.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..data import DatasetSpec, load_specs
from ..data.mini import mini_specs
from ..models.moe_vit import MoEViTConfig, MoEViTForMultiTask
from ..models.moe_vit.configuration_moe_vit import UnknownConfigFieldError
from .config import PretrainConfig


def recipe_specs(config: PretrainConfig) -> dict[str, DatasetSpec]:
    """The recipe's dataset specs without reading any data (the mini benchmark's specs need no build)."""
    if config.data.mini is not None:
        return {s.name: s for s in mini_specs()}
    return load_specs(config.data.specs)


def build_model_config(
    config: PretrainConfig,
    label_names: Mapping[str, list[str]] | None = None,
    specs: Mapping[str, DatasetSpec] | None = None,
) -> MoEViTConfig:
    """The `MoEViTConfig` of the recipe. `label_names` (per task, e.g. read from the data) win over the specs'
    `label_names`, which win over `tasks.<name>.num_labels` (then named "0", "1", ...)."""
    specs = dict(specs) if specs is not None else recipe_specs(config)
    label_names = dict(label_names or {})
    task_types, task_labels = {}, {}
    for task, settings in config.tasks.items():
        if task not in specs:
            raise ValueError(f"Task {task!r} of the recipe has no dataset spec; the specs define {sorted(specs)}.")
        spec = specs[task]
        task_types[task] = spec.task_type
        names = label_names.get(task) or spec.label_names
        if not names:
            if not settings.num_labels:
                raise ValueError(
                    f"Task {task!r}: its label names are unknown before reading the data; set tasks.{task}.num_labels "
                    "or label_names in its dataset spec."
                )
            names = [str(i) for i in range(settings.num_labels)]
        task_labels[task] = list(names)
    overrides = dict(config.model.overrides)
    head_configs = {t: dict(s.head) for t, s in config.tasks.items() if s.head}
    head_configs.update(overrides.pop("head_configs", {}) or {})
    try:
        return MoEViTConfig.from_preset(
            config.model.preset,
            tasks=list(config.tasks),
            layout=config.model.layout,
            task_types=task_types,
            task_labels=task_labels,
            head_configs=head_configs,
            **overrides,
        )
    except UnknownConfigFieldError as err:
        # a misspelt key can only have come from the recipe's model section: say so
        raise ValueError(
            f"model.overrides of the recipe (preset {config.model.preset!r}, keys {sorted(overrides)}): {err}"
        ) from err


def build_model(
    config: PretrainConfig, label_names: Mapping[str, list[str]] | None = None, specs=None
) -> MoEViTForMultiTask:
    """A freshly initialised `MoEViTForMultiTask` for the recipe, or the one saved at `model.init_from` (strict
    load: its tasks and heads must match the recipe's)."""
    model_config = build_model_config(config, label_names, specs)
    if config.model.init_from:
        return MoEViTForMultiTask.from_pretrained(config.model.init_from, config=model_config, strict=True)
    return MoEViTForMultiTask(model_config)


__all__ = ["build_model", "build_model_config", "recipe_specs"]
