"""Selection policies on hand-made usage, the top-k floor, criteria, union, JSON and bad selections."""

from __future__ import annotations

import pytest
import torch

from moe_adapt import MoEViTConfig
from moe_adapt.analysis import ExpertSelection, ExpertUsage, select_experts
from moe_adapt.analysis.usage import model_signature

CONFIG = MoEViTConfig.from_preset("tiny", tasks=["a", "b"])  # attn: 6 experts top-2 (layers 0, 2); mlp: 8 top-2
TOKENS = 1000


def make_usage(task="a", counts=None, mass=None, reap=None) -> ExpertUsage:
    """Usage with given per-expert token counts / gate masses / REAP sums, the same in every layer."""
    layers = CONFIG.moe_layer_names()
    sizes = {n: 6 if n.endswith("attn") else 8 for n in layers}

    def per_layer(values, default):
        return {n: torch.tensor((values or default)[: sizes[n]], dtype=torch.float64) for n in layers}

    counts = per_layer(counts, [500, 20, 900, 40, 30, 10, 300, 200])
    return ExpertUsage(
        task=task,
        layers=layers,
        top_k=dict.fromkeys(layers, 2),
        token_count=counts,
        gate_mass=per_layer(mass, [300, 50, 400, 100, 20, 30, 60, 40]),
        reap_sum=per_layer(reap, [500, 20, 900, 4000, 30, 10, 300, 200]),
        num_tokens=TOKENS,
        num_images=10,
        model=model_signature(CONFIG),
    )


def test_top_n_keeps_the_best_and_at_least_k():
    usage = make_usage()
    sel = select_experts(usage, "top_n", n=3, criterion="frequency")
    assert sel.experts["layers.0.attn"] == [0, 2, 3]  # 6 attention experts: counts 500, 20, 900, 40, 30, 10
    assert sel.experts["layers.1.mlp"] == [0, 2, 6]
    assert select_experts(usage, "top_n").experts["layers.1.mlp"] == [0, 2]  # default n = top-k
    assert select_experts(usage, "top_n", n=1).experts["layers.1.mlp"] == [0, 2]  # never fewer than k
    per_kind = select_experts(usage, "top_n", n={"attn": 2, "mlp": 4}, criterion="frequency")
    assert per_kind.experts["layers.0.attn"] == [0, 2] and per_kind.experts["layers.1.mlp"] == [0, 2, 6, 7]
    assert sel.policy["policy"] == "top_n" and sel.tasks == ["a"]


def test_default_criterion_is_gate_mass_for_top_n_and_coverage_and_frequency_for_threshold():
    usage = make_usage()
    # the third-best MLP expert is e6 by tokens (300) but e3 by gate mass (100 against 60)
    default = select_experts(usage, "top_n", n=3)
    assert default.policy["criterion"] == "gate_mass" and default.experts["layers.1.mlp"] == [0, 2, 3]
    assert select_experts(usage, "top_n", n=3, criterion="frequency").experts["layers.1.mlp"] == [0, 2, 6]
    assert select_experts(usage, "coverage").policy["criterion"] == "gate_mass"
    threshold = select_experts(usage, "threshold", threshold=25)
    assert threshold.policy["criterion"] == "frequency" and threshold.experts["layers.1.mlp"] == [0, 2, 6]


def test_threshold_is_mod_squads_percentage_of_tokens():
    usage = make_usage()
    # frequencies: 0.5, 0.02, 0.9, 0.04, 0.03, 0.01, 0.3, 0.2 -> more than 3 %: 0, 2, 3, 6, 7 (0.03 is not > 3 %)
    assert select_experts(usage, "threshold", threshold=3).experts["layers.1.mlp"] == [0, 2, 3, 6, 7]
    assert select_experts(usage, "threshold", threshold=0).experts["layers.1.mlp"] == list(range(8))
    assert select_experts(usage, "threshold", threshold=95).experts["layers.1.mlp"] == [0, 2]  # top-k floor
    # other criteria use the expert's share of the layer's total: gate mass 0.3, 0.05, 0.4, 0.1, 0.02, 0.03, ...
    by_mass = select_experts(usage, "threshold", threshold=9, criterion="gate_mass")
    assert by_mass.experts["layers.1.mlp"] == [0, 2, 3]


def test_coverage_takes_the_smallest_covering_set():
    usage = make_usage()
    # gate mass sorted: 400 (e2), 300 (e0), 100 (e3), 60 (e6), 50 (e1), 40 (e7), 30, 20; total 1000
    assert select_experts(usage, "coverage", coverage=0.7).experts["layers.1.mlp"] == [0, 2]
    assert select_experts(usage, "coverage", coverage=0.8).experts["layers.1.mlp"] == [0, 2, 3]
    assert select_experts(usage, "coverage", coverage=0.86).experts["layers.1.mlp"] == [0, 2, 3, 6]
    assert select_experts(usage, "coverage", coverage=1.0).experts["layers.1.mlp"] == list(range(8))
    assert select_experts(usage, "coverage", coverage=0.1).experts["layers.1.mlp"] == [0, 2]  # top-k floor


def test_criterion_changes_the_choice():
    usage = make_usage()
    # REAP = reap_sum / token_count: e3 = 4000 / 40 = 100 dominates although few tokens choose it
    assert select_experts(usage, "top_n", criterion="reap").experts["layers.1.mlp"] == [0, 3]
    assert select_experts(usage, "top_n", criterion="frequency").experts["layers.1.mlp"] == [0, 2]


def test_ties_go_to_the_lower_id():
    usage = make_usage(counts=[100] * 8)
    assert select_experts(usage, "top_n", n=3, criterion="frequency").experts["layers.1.mlp"] == [0, 1, 2]
    assert select_experts(make_usage(mass=[5] * 8), "top_n", n=3).experts["layers.1.mlp"] == [0, 1, 2]


def test_union_and_json(tmp_path):
    a = select_experts(make_usage("a"), "top_n", criterion="frequency")
    b = select_experts(make_usage("b", counts=[0, 0, 0, 0, 10, 900, 5, 800]), "top_n", criterion="frequency")
    both = a | b
    assert both.tasks == ["a", "b"]
    assert both.experts["layers.1.mlp"] == [0, 2, 5, 7]
    assert both.experts["layers.0.attn"] == [0, 2, 4, 5]
    assert ExpertSelection.union([a, b]).experts == both.experts
    loaded = ExpertSelection.load(both.save(tmp_path / "sel.json"))
    assert loaded == both
    masks = both.expert_mask(CONFIG, "a")
    assert masks["layers.1.mlp"].tolist() == [True, False, True, False, False, True, False, True]


def test_bad_selections_are_refused():
    sig = model_signature(CONFIG)
    good = {"layers.0.attn": [0, 1], "layers.1.mlp": [0, 1], "layers.2.attn": [0, 1], "layers.3.mlp": [0, 1]}
    ExpertSelection(experts=good, tasks=["a"], model=sig)
    with pytest.raises(ValueError, match=r"keeps 1 expert\(s\) in layers.1.mlp .*fewer than its top_k=2"):
        ExpertSelection(experts={**good, "layers.1.mlp": [3]}, tasks=["a"], model=sig)
    with pytest.raises(ValueError, match="has experts 0..7"):
        ExpertSelection(experts={**good, "layers.1.mlp": [0, 8]}, tasks=["a"], model=sig)
    with pytest.raises(ValueError, match="missing \\['layers.3.mlp'\\]"):
        ExpertSelection(experts={k: v for k, v in good.items() if k != "layers.3.mlp"}, tasks=["a"], model=sig)
    other = MoEViTConfig.from_preset("tiny", tasks=["a"], mlp_experts=[0, 4, 0, 4])
    sel = ExpertSelection(experts=good, tasks=["a"], model=sig)
    with pytest.raises(ValueError, match="made for another model: its mlp_experts"):
        sel.check_model(other)
    with pytest.raises(ValueError, match="Unknown task 'zzz'"):
        sel.check_model(CONFIG, ["zzz"])
    with pytest.raises(ValueError, match="different models"):
        sel | ExpertSelection(experts=good, tasks=["a"], model={**sig, "attn_top_k": 1})
    with pytest.raises(ValueError, match="policy"):
        select_experts(make_usage(), "best")
    with pytest.raises(ValueError, match="criterion"):
        select_experts(make_usage(), "top_n", criterion="loudest")
    with pytest.raises(ValueError, match="coverage"):
        select_experts(make_usage(), "coverage", coverage=1.5)
    with pytest.raises(ValueError, match="not an expert selection"):
        ExpertSelection.from_dict({"experts": good})


def test_top_n_larger_than_the_layer_is_an_error_naming_the_layer():
    usage = make_usage()
    with pytest.raises(ValueError, match=r"n=99 for top_n in layers\.\d\.\w+ must be between 1 and its \d+ experts"):
        select_experts(usage, "top_n", n=99)
