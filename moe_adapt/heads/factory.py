"""Which head a task gets, with which options: `build_head(config, task)`.

A task's head follows from `config.task_types[task]` (`ClassificationHead`, `FCOSHead` or `UperNetHead`) and
is sized by `config.num_labels_for(task)`. Options come from the head class's `defaults`, overridden by
`config.head_configs[task]` (a plain dict stored in `config.json`, so `from_pretrained` rebuilds every head):

```python
config = MoEViTConfig.from_preset("mini", tasks=["cls", "det"], task_types={"det": "detection"},
                                  head_configs={"det": {"channels": 64, "scales": [2]}})
```
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .classification import ClassificationHead
from .detection import FCOSHead
from .segmentation import UperNetHead

HEAD_CLASSES: dict[str, type[nn.Module]] = {
    "classification": ClassificationHead,
    "detection": FCOSHead,
    "semantic_segmentation": UperNetHead,
}


def head_options(config, task: str) -> dict[str, Any]:
    """The options `task`'s head is built with: the head class's defaults, then `config.head_configs[task]`.
    Unknown option names raise a `ValueError` naming the task and the known options."""
    head_cls = HEAD_CLASSES[config.task_types.get(task, "classification")]
    given = dict((getattr(config, "head_configs", None) or {}).get(task) or {})
    unknown = sorted(set(given) - set(head_cls.defaults))
    if unknown:
        raise ValueError(
            f"config.head_configs[{task!r}] has unknown option(s) {unknown} for a {head_cls.__name__}; "
            f"known options: {sorted(head_cls.defaults)}."
        )
    options = {k: v for k, v in head_cls.defaults.items() if v is not None}
    options.update({k: v for k, v in given.items() if v is not None})
    return options


def build_head(config, task: str) -> nn.Module:
    """The head of `task`, as described in this module's docstring."""
    kind = config.task_types.get(task, "classification")
    num_labels = config.num_labels_for(task)
    if num_labels < 1:
        raise ValueError(f"Task {task!r} has no labels: set config.task_labels[{task!r}] to its class names.")
    return HEAD_CLASSES[kind](config, num_labels, **head_options(config, task))


__all__ = ["HEAD_CLASSES", "build_head", "head_options"]
