"""Routing analysis: how each task uses the experts (`collect_expert_usage`, `plot_usage_heatmap`) and which
experts it keeps (`select_experts`). Data flows one way: model → `ExpertUsage` → `ExpertSelection` → sub-model
(`moe_adapt.surgery.extract_submodel`)."""

from .selection import POLICIES, ExpertSelection, select_experts
from .usage import CRITERIA, ExpertUsage, collect_expert_usage, plot_usage_heatmap

__all__ = [
    "CRITERIA",
    "POLICIES",
    "ExpertSelection",
    "ExpertUsage",
    "collect_expert_usage",
    "plot_usage_heatmap",
    "select_experts",
]
