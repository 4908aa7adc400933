"""Model surgery: slice a task's sub-model out of a multi-task MoE ViT (`extract_submodel`), optionally heal it
toward the parent on calibration images (`heal_submodel`), and check it (`verify_submodel`). Adding a task to a
model lives in `add_task.py` (continual learning)."""

from .add_task import add_task, freeze_old_tasks, trainable_optimizer
from .extract import extract_submodel, sliced_config
from .heal import HealReport, heal_submodel
from .verify import VerificationReport, verify_submodel

__all__ = [
    "HealReport",
    "VerificationReport",
    "add_task",
    "extract_submodel",
    "freeze_old_tasks",
    "heal_submodel",
    "sliced_config",
    "trainable_optimizer",
    "verify_submodel",
]
