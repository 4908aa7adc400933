from ...kernels import ExpertDispatch  # noqa: F401  (kept importable from here)
from .configuration_moe_vit import PRESETS, TASK_TYPES, MoEViTConfig
from .image_processing_moe_vit import MoEViTImageProcessor, default_image_processor
from .losses import MutualInformationLoss, load_balancing_loss, mutual_information_loss, router_z_loss
from .modeling_moe_vit import (
    MoEViTBackbone,
    MoEViTBackboneOutput,
    MoEViTModel,
    MoEViTModelOutput,
    MoEViTPreTrainedModel,
    RouterOutput,
    backbone_of,
    find_backbone,
)
from .modeling_multitask import (
    TASK_MODEL_CLASSES,
    AutoModelForMultiTask,
    MoEViTForImageClassification,
    MoEViTForMultiTask,
    MoEViTForObjectDetection,
    MoEViTForSemanticSegmentation,
    MoEViTImageClassifierOutput,
    MoEViTMultiTaskOutput,
    MoEViTObjectDetectionOutput,
    MoEViTSemanticSegmenterOutput,
    MoEViTTaskModel,
)
