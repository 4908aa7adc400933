from .configuration_moe_vit import PRESETS, TASK_TYPES, MoEViTConfig
from .losses import MutualInformationLoss, load_balancing_loss, mutual_information_loss, router_z_loss
from .modeling_moe_vit import (
    ExpertDispatch,
    MoEViTBackbone,
    MoEViTBackboneOutput,
    MoEViTForImageClassification,
    MoEViTImageClassifierOutput,
    MoEViTModel,
    MoEViTModelOutput,
    MoEViTPreTrainedModel,
    RouterOutput,
)
from .modeling_multitask import AutoModelForMultiTask, MoEViTForMultiTask, MoEViTMultiTaskOutput
