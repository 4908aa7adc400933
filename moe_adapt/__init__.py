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
    # The segmentation and detection pipelines check the model's class name against copies of these name tables,
    # which drop the registrations above, and log "not supported" for any other class. The entries are safe for the
    # Auto classes: they look up registered configs first and skip model types transformers does not know.
    from transformers.models.auto import modeling_auto

    modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault("moe_vit", "MoEViTForSemanticSegmentation")
    modeling_auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault("moe_vit", "MoEViTForObjectDetection")


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

#: the workflow's verbs, imported on first use (LoRA pulls in peft, which `import moe_adapt` does not load)
_LAZY = {
    "collect_expert_usage": "moe_adapt.analysis",
    "select_experts": "moe_adapt.analysis",
    "ExpertSelection": "moe_adapt.analysis",
    "plot_usage_heatmap": "moe_adapt.analysis",
    "budget_curve": "moe_adapt.analysis.budget",
    "evaluate": "moe_adapt.metrics",
    "pretrain": "moe_adapt.training",
    "load_model": "moe_adapt.hub",
    "build_model_card": "moe_adapt.hub",
    "extract_submodel": "moe_adapt.surgery",
    "heal_submodel": "moe_adapt.surgery",
    "verify_submodel": "moe_adapt.surgery",
    "add_task": "moe_adapt.surgery.add_task",
    "learn_new_task": "moe_adapt.surgery.add_task",
    "finetune": "moe_adapt.adaptation.finetune",
    "lora_config": "moe_adapt.adaptation.lora",
    "apply_lora": "moe_adapt.adaptation.lora",
    "merge_lora": "moe_adapt.adaptation.lora",
    "load_lora": "moe_adapt.adaptation.lora",
}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moe_adapt' has no attribute {name!r}")
