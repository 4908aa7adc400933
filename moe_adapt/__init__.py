"""moe_adapt: multi-task mixture-of-experts Vision Transformers that break apart into small task models.

`import moe_adapt` registers the model with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoBackbone`).
"""

from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification

from .models.moe_vit import (
    PRESETS,
    AutoModelForMultiTask,
    ExpertDispatch,
    MoEViTBackbone,
    MoEViTBackboneOutput,
    MoEViTConfig,
    MoEViTForImageClassification,
    MoEViTForMultiTask,
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
    try:
        AutoConfig.register("moe_vit", MoEViTConfig)
    except ValueError:  # already registered (re-import)
        pass
    for auto, cls in (
        (AutoModel, MoEViTModel),
        (AutoModelForImageClassification, MoEViTForImageClassification),
        (AutoBackbone, MoEViTBackbone),
    ):
        try:
            auto.register(MoEViTConfig, cls)
        except ValueError:
            pass


_register()
try:  # the multi-task model gets its own Auto class: AutoModel already maps moe_vit to the backbone
    AutoModelForMultiTask.register(MoEViTConfig, MoEViTForMultiTask)
except ValueError:
    pass

__all__ = [
    "PRESETS",
    "ExpertDispatch",
    "MoEViTBackbone",
    "MoEViTBackboneOutput",
    "MoEViTConfig",
    "MoEViTForImageClassification",
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
