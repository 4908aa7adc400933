"""moe_adapt: multi-task mixture-of-experts Vision Transformers that break apart into small task models.

`import moe_adapt` registers the model with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoModelForSemanticSegmentation`, `AutoModelForObjectDetection`,
`AutoBackbone`, `AutoImageProcessor`), so a saved model or slice loads and runs through transformers' public API:

```python
>>> import moe_adapt
>>> from transformers import pipeline
>>> pipeline("image-classification", model="runs/demo/extract/fashion")(image)
```
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
)

from .models.moe_vit import (
    PRESETS,
    AutoModelForMultiTask,
    ExpertDispatch,
    MoEViTBackbone,
    MoEViTBackboneOutput,
    MoEViTConfig,
    MoEViTForImageClassification,
    MoEViTForMultiTask,
    MoEViTForObjectDetection,
    MoEViTForSemanticSegmentation,
    MoEViTImageProcessor,
    MoEViTModel,
    MoEViTMultiTaskOutput,
    MoEViTPreTrainedModel,
    MutualInformationLoss,
    load_balancing_loss,
    mutual_information_loss,
    router_z_loss,
)

__version__ = "0.1.0"


def _register() -> None:
    """Map `moe_vit` configs to our classes in transformers' Auto classes (idempotent: a re-import keeps them)."""
    AutoConfig.register("moe_vit", MoEViTConfig, exist_ok=True)
    for auto, cls in (
        (AutoModel, MoEViTModel),
        (AutoModelForImageClassification, MoEViTForImageClassification),
        (AutoModelForSemanticSegmentation, MoEViTForSemanticSegmentation),
        (AutoModelForObjectDetection, MoEViTForObjectDetection),
        (AutoBackbone, MoEViTBackbone),
        (AutoModelForMultiTask, MoEViTForMultiTask),  # its own Auto class: AutoModel maps moe_vit to the backbone
    ):
        auto.register(MoEViTConfig, cls, exist_ok=True)
    AutoImageProcessor.register(MoEViTConfig, image_processor_classes={"pil": MoEViTImageProcessor}, exist_ok=True)


_register()

__all__ = [
    "PRESETS",
    "ExpertDispatch",
    "MoEViTBackbone",
    "MoEViTBackboneOutput",
    "MoEViTConfig",
    "MoEViTForImageClassification",
    "MoEViTForObjectDetection",
    "MoEViTForSemanticSegmentation",
    "MoEViTImageProcessor",
    "MoEViTModel",
    "MoEViTPreTrainedModel",
    "MutualInformationLoss",
    "load_balancing_loss",
    "mutual_information_loss",
    "router_z_loss",
]
__all__ += ["AutoModelForMultiTask", "MoEViTForMultiTask", "MoEViTMultiTaskOutput"]

from .adaptation.lora import lora_config  # noqa: E402  (peft LoRA config for the MoE layout, issue 6)

__all__ += ["lora_config"]
from .runtime import keep_freed_memory  # noqa: E402  (glibc keeps freed buffers between training steps)
from .surgery.add_task import add_task  # noqa: E402,F401  (continual learning, issue 7)

__all__ += ["keep_freed_memory"]
