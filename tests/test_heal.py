"""Healing a slice toward its parent (`heal_submodel`): what it trains, what it leaves, that it helps, bad input."""

from __future__ import annotations

import pytest
import torch
from test_extract import make_model

from moe_adapt.analysis import collect_expert_usage, select_experts
from moe_adapt.surgery import extract_submodel, heal_submodel
from moe_adapt.surgery.heal import healable_parameters


@pytest.fixture(scope="module")
def calib():
    return [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]


def spread_parent(seed=0):
    """A parent whose routing is spread (weak routers) over experts that matter (weights of trained size, not
    the 0.02 init): a slice that keeps k experts misses much of what the parent computes."""
    model = make_model(seed=seed)
    with torch.no_grad():
        for module in model.moe_vit.moe_layers().values():
            for router in module.router.routers.values():
                router.weight.mul_(0.1)
            for name, p in module.named_parameters():
                if ".experts." in f".{name}" and not name.endswith("bias"):
                    p.mul_(10)
    return model


def k_slice(model, calib, task="a"):
    usage = collect_expert_usage(model, calib, task=task)
    return extract_submodel(model, select_experts(usage, "top_n"), tasks=[task])  # k experts: dense layers


def test_heal_fits_routers_norms_biases_only_and_brings_the_slice_closer(calib):
    parent = spread_parent()
    sub = k_slice(parent, calib)
    before = {n: p.detach().clone() for n, p in sub.named_parameters()}
    flags = {n: p.requires_grad for n, p in sub.named_parameters()}
    x = calib[0]
    with torch.no_grad():
        gap_before = (
            (sub.moe_vit(x, task="a").last_hidden_state - parent.moe_vit(x, task="a").last_hidden_state).pow(2).mean()
        )
    report = heal_submodel(parent, sub, calib, steps=60, lr=1e-2, batch_size=16)
    with torch.no_grad():
        gap_after = (
            (sub.moe_vit(x, task="a").last_hidden_state - parent.moe_vit(x, task="a").last_hidden_state).pow(2).mean()
        )
    assert 0 < report.loss_after < report.loss_before
    assert gap_after < gap_before  # measured independently of the report
    trained = healable_parameters(sub.moe_vit)
    assert report.trained_params == sum(p.numel() for p in trained.values()) > 0
    changed = {n for n, p in sub.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {f"moe_vit.{n}" for n in trained}
    assert any(".router.routers." in n for n in changed) and any("layernorm" in n for n in changed)
    assert not any(n.startswith("heads") for n in changed)  # heads stay
    assert all(n.endswith("bias") or "layernorm" in n or ".router.routers." in n for n in changed)  # no matrix moved
    assert {n: p.requires_grad for n, p in sub.named_parameters()} == flags and all(
        p.grad is None for p in sub.parameters()
    )
    assert not sub.training and report.images == {"a": 32} and not report.restored


def test_heal_that_does_not_help_leaves_the_slice_as_it_was(calib):
    parent = make_model()  # peaked routing: the k-slice already matches the parent to float precision
    sub = k_slice(parent, calib)
    before = {n: p.detach().clone() for n, p in sub.named_parameters()}
    report = heal_submodel(parent, sub, calib, steps=20, lr=1e-2, batch_size=16)
    assert report.restored and report.loss_after == report.loss_before < 1e-4
    assert all(torch.equal(p, before[n]) for n, p in sub.named_parameters())


def test_heal_groups_and_per_task_data(calib):
    parent = spread_parent(seed=1)
    usage = {t: collect_expert_usage(parent, calib, task=t) for t in ("a", "b")}
    sel = select_experts(usage["a"], "top_n").union(select_experts(usage["b"], "top_n"))
    sub = extract_submodel(parent, sel, tasks=["a", "b"])
    routers_only = {n: p.detach().clone() for n, p in sub.named_parameters()}
    report = heal_submodel(parent, sub, {"a": calib, "b": calib[:1]}, steps=4, train=["routers"])
    changed = {n for n, p in sub.named_parameters() if not torch.equal(p, routers_only[n])}
    assert not report.restored and changed and all(".router.routers." in n for n in changed)
    assert set(report.per_task) == {"a", "b"} and report.images == {"a": 32, "b": 16} and report.train == ["routers"]


def test_heal_weights_distills_the_whole_backbone_closer_than_the_small_groups(calib):
    """`train` with "weights": every backbone tensor may move (heads stay), at the default rate 3e-4, and the slice
    ends closer to the parent than with the small groups alone."""
    parent = spread_parent(seed=2)
    small, whole = k_slice(parent, calib), k_slice(parent, calib)
    before = {n: p.detach().clone() for n, p in whole.named_parameters()}
    r_small = heal_submodel(parent, small, calib, steps=40, batch_size=16)
    r_whole = heal_submodel(
        parent, whole, calib, steps=40, batch_size=16, train=["routers", "norms", "biases", "weights"]
    )
    assert r_small.lr == 3e-3 and r_whole.lr == 3e-4 and not r_whole.restored
    assert r_whole.trained_params == sum(p.numel() for p in whole.moe_vit.parameters())
    changed = {n for n, p in whole.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.endswith(("up_proj", "q_proj.weight", "projection.weight")) for n in changed)  # matrices moved
    assert not any(n.startswith("heads") for n in changed)
    assert r_whole.loss_after < r_small.loss_after < r_small.loss_before
    weights_only = healable_parameters(whole.moe_vit, "weights")
    assert weights_only and not any(n.endswith("bias") or ".router.routers." in n for n in weights_only)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be at least 1"),
        (dict(train=["matrices"]), r"train=\['matrices'\].*routers"),
        (dict(tasks=["zebra"]), "no task 'zebra'"),
        (dict(data=[]), "calibration data of task 'a' is empty"),
        (dict(data={"b": [torch.randn(2, 3, 32, 32)]}), "no calibration data for task 'a'"),
    ],
)
def test_heal_bad_input_is_a_clear_error(calib, kwargs, message):
    parent = make_model()
    sub = k_slice(parent, calib)
    data = kwargs.pop("data", calib)
    untouched = {n: p.detach().clone() for n, p in sub.named_parameters()}
    with pytest.raises(ValueError, match=message):
        heal_submodel(parent, sub, data, **kwargs)
    assert all(torch.equal(p, untouched[n]) for n, p in sub.named_parameters())


def test_heal_lowers_the_distillation_loss_across_parents(calib):
    """How much healing helps depends on the random parent: over four of them it removes a quarter of the loss or
    more on average (each fit either lowers the loss or is restored)."""
    ratios = []
    for seed in range(4):
        parent = spread_parent(seed)
        report = heal_submodel(parent, k_slice(parent, calib), calib, steps=60, lr=1e-2, batch_size=16)
        assert report.loss_after <= report.loss_before
        ratios.append(report.loss_after / report.loss_before)
    assert sum(ratios) / len(ratios) < 0.8, ratios
