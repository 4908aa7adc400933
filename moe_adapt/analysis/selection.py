"""Pick the experts a task keeps: `select_experts(usage, policy=...)` → `ExpertSelection`.

Policies (every one keeps at least the layer's top-k experts, so the slice can still route):

- `"top_n"`: the `n` best experts per layer by `criterion` (default n = top-k).
- `"threshold"`: Mod-Squad's rule: keep an expert whose share of the criterion is more than `threshold` percent
  (default 3). For `criterion="frequency"` the share is the fraction of the task's tokens that select the
  expert (as in Mod-Squad); for `"gate_mass"` and `"reap"` it is the expert's fraction of the layer's total.
- `"coverage"`: the smallest set per layer whose criterion covers a fraction `coverage` (default 0.9) of the
  layer's total.

Criteria: `"frequency"` (default for threshold), `"gate_mass"` (default for top_n and coverage) and `"reap"`.
For `top_n` gate mass is the default because the slices it picks start closer to the parent: with n = top-k on
the mini models, 5 of 6 task slices kept more of the parent's metric before healing than with frequency (up to
5.3 points), the sixth 0.15 points less; once healed the two are within 0.5 points but for one slice (+1.2 for
gate mass) (docs/decomposition.md).
Ties go to the lower expert id. Selections of several tasks combine with `ExpertSelection.union` (or `|`).

```python
>>> import torch
>>> from moe_adapt import MoEViTConfig, MoEViTModel
>>> from moe_adapt.analysis import collect_expert_usage, select_experts
>>> model = MoEViTModel(MoEViTConfig.from_preset("tiny", tasks=["a", "b"]))
>>> usage = collect_expert_usage(model, [torch.randn(2, 3, 32, 32)], task="a")
>>> sel = select_experts(usage, policy="top_n", n=3)
>>> [len(sel.experts[name]) for name in sel.layers]
[3, 3, 3, 3]
```
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import atomic_write_text, read_json
from ..models.moe_vit.configuration_moe_vit import parse_moe_layer_name
from .usage import CRITERIA, ExpertUsage, model_signature

POLICIES = ("top_n", "threshold", "coverage")
FORMAT_VERSION = 1

__all__ = ["POLICIES", "ExpertSelection", "select_experts"]


@dataclass
class ExpertSelection:
    """The experts kept per MoE layer, for one or several tasks.

    `experts`: `{layer_name: sorted parent expert ids}` for every MoE layer of the model (names as in
    `config.moe_layer_names()`); `tasks`: the tasks the selection was made for; `model`: the
    `model_signature` of the model it applies to (layer count, expert counts, top-k); `policy`: how it was
    made (for the record and the model card); `scores`: optional `{layer: [criterion per expert]}`.
    """

    experts: dict[str, list[int]]
    tasks: list[str]
    model: dict
    policy: dict = field(default_factory=dict)
    scores: dict[str, list[float]] | None = None

    def __post_init__(self):
        self.experts = {n: sorted({int(e) for e in ids}) for n, ids in self.experts.items()}
        self.tasks = list(dict.fromkeys(self.tasks))
        self.check()

    @property
    def layers(self) -> list[str]:
        return list(self.experts)

    def top_k(self, layer: str) -> int:
        return int(self.model[f"{parse_moe_layer_name(layer)[1]}_top_k"])

    def layer_size(self, layer: str) -> int:
        """The parent layer's expert count."""
        i, kind = parse_moe_layer_name(layer)
        return int(self.model[f"{kind}_experts"][i])

    def num_kept(self) -> int:
        return sum(len(v) for v in self.experts.values())

    # -- checks ------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Self-consistency: every MoE layer of the model named, ids in range, at least top-k kept per layer."""
        expected = _moe_layer_names(self.model)
        if list(self.experts) != expected:
            missing = [n for n in expected if n not in self.experts]
            extra = [n for n in self.experts if n not in expected]
            raise ValueError(
                f"This expert selection does not match its model's MoE layers (missing {missing}, unexpected {extra}); "
                "give kept expert ids for every MoE layer, in forward order."
            )
        for name, ids in self.experts.items():
            k, size = self.top_k(name), self.layer_size(name)
            if ids and (ids[0] < 0 or ids[-1] >= size):
                raise ValueError(
                    f"Selection for {name} keeps expert ids {ids}, but that layer has experts 0..{size - 1}."
                )
            if len(ids) < k:
                raise ValueError(
                    f"Selection keeps {len(ids)} expert(s) in {name} ({ids}), fewer than its top_k={k}: a sliced layer "
                    f"must keep at least k experts. Add experts to {name} or use select_experts, which keeps at least k."
                )

    def check_model(self, config, tasks: Iterable[str] | None = None) -> None:
        """Raise a clear `ValueError` unless this selection fits the model of `config` (same MoE layers and expert
        counts) and keeps at least top-k experts that each of `tasks` can route to, in every layer."""
        mine, theirs = self.model, model_signature(config)
        for key in ("num_hidden_layers", "attn_experts", "mlp_experts", "attn_top_k", "mlp_top_k"):
            if mine.get(key) != theirs[key]:
                raise ValueError(
                    f"This expert selection was made for another model: its {key} is {mine.get(key)} but the model's is "
                    f"{theirs[key]}. Collect usage and select experts on this model instead."
                )
        for task in tasks or []:
            config.task_index(task)
            for name, ids in self.experts.items():
                i, kind = parse_moe_layer_name(name)
                e_t = config.router_size(task, kind, i)
                reach = [e for e in ids if e < e_t]
                if len(reach) < self.top_k(name):
                    raise ValueError(
                        f"Selection keeps only {len(reach)} expert(s) of {name} that task {task!r} can route to "
                        f"({reach}; its router covers experts 0..{e_t - 1}), fewer than top_k={self.top_k(name)}."
                    )

    def expert_mask(self, config, task: str) -> dict[str, torch.Tensor]:
        """`{layer: bool [E_t]}` masks that restrict the parent's `task` to the kept experts — the parent then
        computes exactly what the slice computes (`model(pixels, task=task, expert_mask=sel.expert_mask(...))`)."""
        masks = {}
        for name, ids in self.experts.items():
            i, kind = parse_moe_layer_name(name)
            e_t = config.router_size(task, kind, i)
            mask = torch.zeros(e_t, dtype=torch.bool)
            mask[[e for e in ids if e < e_t]] = True
            masks[name] = mask
        return masks

    # -- combining ---------------------------------------------------------------------------------------------
    @classmethod
    def union(cls, *selections: ExpertSelection) -> ExpertSelection:
        """Keep every expert any of `selections` keeps (to slice one model serving several tasks)."""
        if len(selections) == 1 and not isinstance(selections[0], ExpertSelection):
            selections = tuple(selections[0])
        if not selections:
            raise ValueError("ExpertSelection.union needs at least one selection.")
        first = selections[0]
        for s in selections[1:]:
            if s.model != first.model:
                raise ValueError(
                    "Cannot combine selections made for different models (their layer or expert counts differ)."
                )
        experts = {n: sorted(set().union(*(s.experts[n] for s in selections))) for n in first.layers}
        tasks = [t for s in selections for t in s.tasks]
        return cls(
            experts=experts,
            tasks=tasks,
            model=dict(first.model),
            policy={"policy": "union", "of": [s.policy for s in selections]},
        )

    def __or__(self, other: ExpertSelection) -> ExpertSelection:
        return ExpertSelection.union(self, other)

    # -- JSON --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {
            "format": "moe_adapt.expert_selection",
            "version": FORMAT_VERSION,
            "tasks": self.tasks,
            "model": self.model,
            "policy": self.policy,
            "experts": self.experts,
        }
        if self.scores is not None:
            out["scores"] = self.scores
        return copy.deepcopy(out)

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "selection data") -> ExpertSelection:
        if not isinstance(data, Mapping) or data.get("format") != "moe_adapt.expert_selection":
            raise ValueError(f"{source} is not an expert selection (expected 'format': 'moe_adapt.expert_selection').")
        try:
            return cls(
                experts=dict(data["experts"]),
                tasks=list(data["tasks"]),
                model=dict(data["model"]),
                policy=dict(data.get("policy", {})),
                scores=data.get("scores"),
            )
        except KeyError as err:
            raise ValueError(f"{source} lacks the field {err}.") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExpertSelection:
        return cls.from_dict(read_json(path), source=str(path))


def _moe_layer_names(signature: Mapping) -> list[str]:
    names = []
    for i in range(int(signature["num_hidden_layers"])):
        if signature["attn_experts"][i]:
            names.append(f"layers.{i}.attn")
        if signature["mlp_experts"][i]:
            names.append(f"layers.{i}.mlp")
    return names


def _ranked(scores: torch.Tensor) -> list[int]:
    """Expert ids by descending score; ties to the lower id."""
    return sorted(range(scores.numel()), key=lambda e: (-float(scores[e]), e))


#: the criterion each policy ranks by unless told (threshold: Mod-Squad's share of tokens)
DEFAULT_CRITERION = {"top_n": "gate_mass", "threshold": "frequency", "coverage": "gate_mass"}


def select_experts(
    usage: ExpertUsage,
    policy: str = "threshold",
    *,
    n: int | Mapping[str, int] | None = None,
    threshold: float = 3.0,
    coverage: float = 0.9,
    criterion: str | None = None,
) -> ExpertSelection:
    """Choose the experts `usage.task` keeps in every MoE layer (see the module docstring for the policies).

    Args:
        usage: from `collect_expert_usage`.
        policy: `"top_n"`, `"threshold"` or `"coverage"`.
        n: for top_n, experts per layer (an int, or `{"attn": n, "mlp": n}`); default the layer's top-k.
        threshold: for threshold, in percent (Mod-Squad's default 3: keep experts chosen by > 3% of tokens).
        coverage: for coverage, the fraction of the criterion's total to cover, in (0, 1].
        criterion: `"frequency"`, `"gate_mass"` or `"reap"`; default frequency for threshold, gate_mass for top_n
            and coverage.

    Returns:
        an [`ExpertSelection`] for `[usage.task]`, keeping at least top-k experts per layer.
    """
    if policy not in POLICIES:
        raise ValueError(f"Unknown selection policy {policy!r}; choose one of {POLICIES}.")
    criterion = criterion or DEFAULT_CRITERION[policy]
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown usage criterion {criterion!r}; choose one of {CRITERIA}.")
    if usage.num_tokens <= 0:
        raise ValueError(f"The usage of task {usage.task!r} saw no tokens; collect it on non-empty data first.")
    if policy == "coverage" and not 0 < coverage <= 1:
        raise ValueError(f"coverage={coverage} must be in (0, 1] (a fraction of the layer's {criterion}).")
    if policy == "threshold" and not 0 <= threshold < 100:
        raise ValueError(f"threshold={threshold} must be a percentage in [0, 100).")
    experts, scores = {}, {}
    for name in usage.layers:
        k = usage.top_k[name]
        s = usage.scores(criterion, name)
        ranked = _ranked(s)
        if policy == "top_n":
            want = n.get(name.rsplit(".", 1)[-1]) if isinstance(n, Mapping) else n
            want = k if want is None else int(want)
            if not 1 <= want <= len(ranked):
                raise ValueError(f"n={want} for top_n in {name} must be between 1 and its {len(ranked)} experts.")
            keep = ranked[:want]
        elif policy == "threshold":
            share = s if criterion == "frequency" else usage.shares(criterion, name)
            keep = [e for e in ranked if float(share[e]) * 100.0 > threshold]
        else:
            total = float(s.sum())
            keep, covered = [], 0.0
            for e in ranked:
                if total <= 0 or covered >= coverage * total * (1 - 1e-9):
                    break
                keep.append(e)
                covered += float(s[e])
        for e in ranked:  # every policy keeps at least top-k
            if len(keep) >= k:
                break
            if e not in keep:
                keep.append(e)
        experts[name] = sorted(keep)
        scores[name] = [round(float(v), 6) for v in s.tolist()]
    params = {"policy": policy, "criterion": criterion, "task": usage.task, "num_images": usage.num_images}
    if policy == "top_n":
        params["n"] = dict(n) if isinstance(n, Mapping) else ("top_k" if n is None else int(n))
    elif policy == "threshold":
        params["threshold_percent"] = threshold
    else:
        params["coverage"] = coverage
    model = {k: v for k, v in usage.model.items() if k != "name_or_path"}
    return ExpertSelection(experts=experts, tasks=[usage.task], model=model, policy=params, scores=scores)
