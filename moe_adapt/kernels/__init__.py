"""Expert-dispatch kernels of the MoE ViT, kept apart from the model code.

- `dispatch`: the plan of a MoE layer (`ExpertDispatch`: pairs sorted by expert; `ExpertGroupSplit`: pairs split
  over expert groups) and its projections for every backend;
- `segmented`: the CPU block matmuls and combine (`SegmentedLinear`, `CombineSorted`);
- `grouped`: grouped matmuls and row gathers, the accelerator path;
- `experts`: the `segmented_mm` experts backend, registered here in transformers' `ExpertsInterface`
  (`config.experts_implementation="segmented_mm"`, the model's default). transformers' own `grouped_mm`,
  `batched_mm` and the models' `eager` reference forward stay available.
"""

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .dispatch import ExpertDispatch, ExpertGroupSplit
from .experts import segmented_mm_experts_forward

ALL_EXPERTS_FUNCTIONS.register("segmented_mm", segmented_mm_experts_forward)

#: every experts backend a config may name (`experts_implementation`); the first is the default
EXPERTS_IMPLEMENTATIONS = ("segmented_mm", "grouped_mm", "batched_mm", "eager")

__all__ = ["EXPERTS_IMPLEMENTATIONS", "ExpertDispatch", "ExpertGroupSplit", "segmented_mm_experts_forward"]
