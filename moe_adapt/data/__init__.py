"""Data for moe_adapt: dataset specs, loaders, transforms, collators and the embedded mini benchmark.

```python
>>> from moe_adapt.data import build_mini_benchmark, load_task_dataset, collate_fn_for
>>> specs = build_mini_benchmark("data/mini", small=True)       # or load_specs("data/mini/specs.yaml")
>>> train = load_task_dataset(specs["digits-det"], transform="train")
>>> item = train[0]   # {"pixel_values": [3, 64, 64], "labels": {"boxes", "class_labels", "image_id", ...}}
```

Item and batch formats: `moe_adapt.data.loaders` and `moe_adapt.data.collate`; spec fields and on-disk
formats: `moe_adapt.data.specs`; the mini benchmark: `moe_adapt.data.mini`.
"""

from .collate import collate_fn_for
from .errors import BadSampleError, BadSampleWarning
from .loaders import TaskDataset, load_task_dataset
from .mini import build_mini_benchmark, load_fashion_mnist, load_mnist_digits
from .specs import FORMATS, IGNORE_INDEX, TASK_TYPES, DatasetSpec, load_specs, save_specs
from .transforms import (
    AUGMENT_OPTIONS,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    augment_options,
    build_transforms,
    check_augment_keys,
    scale_boxes,
)

__all__ = [
    "AUGMENT_OPTIONS",
    "FORMATS",
    "IGNORE_INDEX",
    "TASK_TYPES",
    "BadSampleError",
    "BadSampleWarning",
    "Compose",
    "DatasetSpec",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "TaskDataset",
    "augment_options",
    "build_mini_benchmark",
    "build_transforms",
    "check_augment_keys",
    "collate_fn_for",
    "load_fashion_mnist",
    "load_mnist_digits",
    "load_specs",
    "load_task_dataset",
    "save_specs",
    "scale_boxes",
]
