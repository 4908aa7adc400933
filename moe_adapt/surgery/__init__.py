"""Model surgery: slice a task's sub-model out of a multi-task MoE ViT (`extract_submodel`) and check it
(`verify_submodel`). Adding a task to a model lives in `add_task.py` (continual learning)."""

from .extract import extract_submodel, sliced_config
from .verify import VerificationReport, verify_submodel

__all__ = ["VerificationReport", "extract_submodel", "sliced_config", "verify_submodel"]
