"""Compute control at inference (issue 7): top-k overrides, expert masks, their FLOPs, and combined sub-models."""

import pytest
import torch
from helpers import trained_like

import moe_adapt  # noqa: F401  (registers the Auto classes)
from moe_adapt import MoEViTConfig, MoEViTForImageClassification
from moe_adapt.analysis import collect_expert_usage, select_experts
from moe_adapt.analysis.selection import ExpertSelection
from moe_adapt.flops import flops_per_image
from moe_adapt.surgery import add_task, extract_submodel

LABELS = {"a": ["x", "y", "z"], "b": ["p", "q"]}
ATTN, MLP = "layers.0.attn", "layers.1.mlp"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"], task_labels=LABELS)
    return trained_like(MoEViTForImageClassification(config))


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run(model, images, task="a", **kw):
    return model(images, task=task, output_router_probs=True, **kw)


# ------------------------------------------------------------------------------------------------ top-k
def test_top_k_override_through_forward(model, images):
    default = run(model, images)
    assert [i.shape[-1] for i in default.router_indices] == [2, 2, 2, 2]
    one = run(model, images, top_k=1)
    assert [i.shape[-1] for i in one.router_indices] == [1, 1, 1, 1]
    assert not torch.equal(one.logits, default.logits)
    # Per kind: only the MLP layers change their k; attention outputs of layer 0 are untouched.
    mlp_only = run(model, images, top_k={"mlp": 1})
    assert [i.shape[-1] for i in mlp_only.router_indices] == [2, 1, 2, 1]
    assert torch.equal(mlp_only.router_indices[0], default.router_indices[0])
    # top-1 picks each token's best expert of the default top-2.
    assert torch.equal(one.router_indices[0][:, 0], default.router_indices[0][:, 0])
    # All experts of a layer (E_t == k) runs the fused dense path.
    every = run(model, images, top_k={"attn": 6, "mlp": 8})
    assert [i.shape[-1] for i in every.router_indices] == [6, 8, 6, 8]


def test_model_level_routing_equals_forward_override_and_is_per_task(model, images):
    backbone = model.moe_vit
    mask = torch.tensor([True, True, False, True, False, True])
    forward_level = run(model, images, top_k={"attn": 1}, expert_mask={ATTN: mask})
    b_default = run(model, images, task="b")
    try:
        backbone.set_routing("a", top_k={"attn": 1}, expert_mask={ATTN: mask})
        model_level = run(model, images)
        assert torch.equal(model_level.logits, forward_level.logits)
        assert torch.equal(run(model, images, task="b").logits, b_default.logits)  # task b is not affected
        # An explicit forward argument takes precedence over the model-level setting.
        assert [i.shape[-1] for i in run(model, images, top_k=2).router_indices] == [2, 2, 2, 2]
    finally:
        backbone.set_routing("a")
    assert "a" not in backbone.routing_overrides
    assert torch.equal(run(model, images).logits, model(images, task="a").logits)


# ------------------------------------------------------------------------------------------------ masks
def test_masked_experts_are_never_chosen_and_equal_a_slice(model, images):
    keep = {ATTN: [0, 2, 5], MLP: [1, 3, 4, 6], "layers.2.attn": [1, 4], "layers.3.mlp": [0, 7]}
    masks = {name: torch.tensor([e in ids for e in range(6 if "attn" in name else 8)]) for name, ids in keep.items()}
    out = run(model, images, expert_mask=masks)
    for name, idx in zip(model.config.moe_layer_names(), out.router_indices):
        assert set(idx.unique().tolist()) <= set(keep[name]), name
    for name, probs in zip(model.config.moe_layer_names(), out.router_probs):
        assert torch.all(probs[:, ~masks[name]] == 0)
    # The masked parent computes what the slice keeping exactly those experts computes.
    selection = ExpertSelection(experts=keep, tasks=["a"], model=_signature(model.config))
    sub = extract_submodel(model, selection, tasks=["a"]).eval()
    assert torch.allclose(sub(images, task="a").logits, out.logits, atol=1e-5, rtol=1e-5)


def _signature(config):
    from moe_adapt.analysis.usage import model_signature

    return model_signature(config)


# ------------------------------------------------------------------------------------------------ FLOPs
def test_flops_reflect_top_k_and_masks(model):
    base = flops_per_image(model, task="a")
    one = flops_per_image(model, task="a", top_k=1)
    for i in (1, 3):  # MoE MLP layers: FLOPs proportional to k
        assert one["layers"][i]["mlp"] * 2 == base["layers"][i]["mlp"]
    assert one["attention"] < base["attention"] and one["total"] < base["total"]
    assert one["router"] == base["router"] and one["patch_embed"] == base["patch_embed"]
    assert [r["mlp_experts_active"] for r in one["layers"]] == [0, 1, 0, 1]
    curve = [flops_per_image(model, task="a", top_k={"attn": k, "mlp": k})["total"] for k in range(1, 7)]
    assert curve == sorted(curve) and len(set(curve)) == 6
    # FLOPs accept exactly what forward accepts: a mask leaving fewer experts than the asked k is an error in both.
    two = [True, True, False, False, False, False]
    masked = flops_per_image(model, task="a", top_k=2, expert_mask={ATTN: two})
    assert masked["layers"][0]["attn_experts_active"] == 2 and masked["layers"][2]["attn_experts_active"] == 2
    for kwargs in ({"top_k": 4, "expert_mask": {ATTN: two}}, {"expert_mask": {ATTN: [False] * 6}}, {"top_k": 0}):
        with pytest.raises(ValueError) as flops_error:
            flops_per_image(model, task="a", **kwargs)
        with pytest.raises(ValueError) as forward_error:
            model(torch.zeros(1, 3, 32, 32), task="a", **kwargs)
        assert str(flops_error.value) == str(forward_error.value)
    # set_routing is what the model runs, so it is what FLOPs count
    model.set_routing("a", top_k=1)
    try:
        assert flops_per_image(model, task="a")["total"] == one["total"]
    finally:
        model.set_routing("a")


def test_flops_of_a_grown_model_count_each_tasks_own_router(model, images):
    grown = add_task(model, "c", labels=2, new_attn_experts=2, new_mlp_experts=4, data=images)
    old, new = flops_per_image(grown, task="a"), flops_per_image(grown, task="c")
    assert old["total"] == flops_per_image(model, task="a")["total"]  # same experts, router and head size for a
    assert new["router"] > old["router"] and new["mlp"] == old["mlp"]  # more experts to score, same active k
    # The new task may use up to its larger expert count; old tasks keep theirs.
    assert [i.shape[-1] for i in run(grown, images, task="c", top_k=8).router_indices] == [8, 8, 8, 8]
    with pytest.raises(ValueError, match="between 1 and the 6 experts"):
        run(grown, images, task="a", top_k=7)


# ------------------------------------------------------------------------------------------------ combined
def test_combined_submodel_equals_full_model_for_each_task(images):
    torch.manual_seed(3)
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"], task_labels=LABELS)
    model = trained_like(MoEViTForImageClassification(config), seed=3)
    grown = add_task(model, "c", labels=4, data=images)
    trained_like(grown, seed=4)  # routers of the new task over old and new experts, as after training
    tasks = ["a", "c"]
    # Keep every expert the tasks choose on these images: routing stays inside the kept set.
    usages = [collect_expert_usage(grown, [images], t, output_norms=False) for t in tasks]
    selection = ExpertSelection.union(*[select_experts(u, policy="threshold", threshold=0.0) for u in usages])
    sub = extract_submodel(grown, selection, tasks=tasks).eval()
    assert sub.config.tasks == tasks and set(sub.heads) == set(tasks)
    assert sum(sub.config.mlp_experts) < sum(grown.config.mlp_experts)
    for task in tasks:
        full = grown(images, task=task, output_router_probs=True)
        part = sub(images, task=task, output_router_probs=True)
        assert torch.allclose(part.logits, full.logits, atol=1e-5, rtol=1e-5), task
        assert torch.equal(part.logits.argmax(-1), full.logits.argmax(-1))
        for name, full_idx, part_idx in zip(grown.config.moe_layer_names(), full.router_indices, part.router_indices):
            parent_ids = torch.tensor(sub.config.parent_expert_ids[name.rsplit(".", 1)[-1]][int(name.split(".")[1])])
            assert torch.equal(parent_ids[part_idx].sort(-1).values, full_idx.sort(-1).values), (task, name)
    # Where routing leaves the kept set, the parent restricted by masks still equals the slice.
    narrow = ExpertSelection.union(*[select_experts(u, policy="top_n") for u in usages])
    small = extract_submodel(grown, narrow, tasks=tasks).eval()
    for task in tasks:
        masked = grown(images, task=task, expert_mask=narrow.expert_mask(grown.config, task)).logits
        assert torch.allclose(small(images, task=task).logits, masked, atol=1e-5, rtol=1e-5), task


def test_combined_submodel_where_an_old_task_keeps_exactly_k_experts(model, images):
    grown = add_task(model, "c", labels=2, init="random")
    trained_like(grown, seed=7)
    keep = {name: [0, 1, 6, 7] if "attn" in name else [0, 1, 8, 9] for name in grown.config.moe_layer_names()}
    selection = ExpertSelection(experts=keep, tasks=["a", "c"], model=_signature(grown.config))
    sub = extract_submodel(grown, selection, tasks=["a", "c"]).eval()
    for task in ("a", "c"):
        masked = grown(images, task=task, expert_mask=selection.expert_mask(grown.config, task)).logits
        assert torch.allclose(sub(images, task=task).logits, masked, atol=1e-5, rtol=1e-5), task


@pytest.fixture(scope="module")
def grown_fashion_model(tmp_path_factory):
    """A 64-pixel tiny classifier of the mini benchmark's `fashion`, grown by a task `shirts`, saved."""
    torch.manual_seed(5)
    labels = {"fashion": [str(i) for i in range(10)]}
    config = MoEViTConfig.from_preset("tiny", tasks=["fashion"], image_size=64, task_labels=labels)
    model = trained_like(MoEViTForImageClassification(config), seed=5)
    grown = trained_like(add_task(model, "shirts", labels=10, init="random"), seed=6)
    path = tmp_path_factory.mktemp("grown") / "model"
    grown.save_pretrained(path)
    return path


def test_cli_extract_keeps_the_union_of_several_tasks(grown_fashion_model, mini_data_dir, tmp_path):
    import json

    from moe_adapt.cli import main

    out = tmp_path / "combined"
    rc = main(
        [
            "extract",
            str(grown_fashion_model),
            "--data",
            str(mini_data_dir),
            "--task",
            "fashion",
            "--task",
            "shirts",
            "--dataset",
            "shirts=fashion",
            "--policy",
            "threshold",
            "--threshold",
            "0",
            "--max-images",
            "16",
            "--verify-images",
            "16",
            "--batch-size",
            "16",
            "--no-norms",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    sub = MoEViTForImageClassification.from_pretrained(out)
    assert sub.config.tasks == ["fashion", "shirts"] and set(sub.heads) == {"fashion", "shirts"}
    report = json.loads((out / "verification.json").read_text())
    for task in ("fashion", "shirts"):
        assert report["tasks"][task]["top1_agreement"] == 1.0
        assert report["tasks"][task]["max_abs_diff"] < 1e-4


# ------------------------------------------------------------------------------------------------ budget
def test_budget_curve_sweeps_top_k_with_model_level_routing(model, tmp_path):
    from moe_adapt.analysis.budget import budget_curve, default_top_k_sweep, plot_budget_curve

    seen = []

    def evaluate(m):  # runs with the setting in place at model level
        seen.append(dict(m.moe_vit.routing_overrides["a"]["top_k"]))
        return float(len(seen))

    model.moe_vit.set_routing("a", expert_mask={ATTN: [True] * 6})
    try:
        curve = budget_curve(model, "a", evaluate)
        assert model.moe_vit.routing_overrides["a"] == {"top_k": None, "expert_mask": {ATTN: [True] * 6}}  # restored
    finally:
        model.moe_vit.set_routing("a")
    sweep = default_top_k_sweep(model.config, "a")
    assert seen == sweep and sweep[0] == {"attn": 1, "mlp": 1} and sweep[-1] == {"attn": 6, "mlp": 8}
    flops = [p.flops for p in curve.points]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    assert [p.top_k for p in curve.points if p.is_default] == [{"attn": 2, "mlp": 2}]
    assert curve.points[0].flops == flops_per_image(model, task="a", top_k=1)["total"]
    png = plot_budget_curve(curve, tmp_path / "budget.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="between 1 and the 6 experts"):
        budget_curve(model, "a", evaluate, top_ks=[1, 7])
    assert len(seen) == len(sweep)  # nothing was evaluated for the invalid sweep


def test_cli_inspect_budget_writes_the_curve(grown_fashion_model, mini_data_dir, tmp_path):
    import json

    from moe_adapt.cli import main

    out = tmp_path / "inspect"
    rc = main(
        [
            "inspect",
            str(grown_fashion_model),
            "--data",
            str(mini_data_dir),
            "--task",
            "shirts",
            "--dataset",
            "shirts=fashion",
            "--max-images",
            "16",
            "--batch-size",
            "16",
            "--no-norms",
            "--budget",
            "--budget-top-k",
            "1,2:1,2,6:8",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    curve = json.loads((out / "budget_shirts.json").read_text())
    assert curve["metric_name"] == "accuracy" and len(curve["points"]) == 4
    assert all(0.0 <= p["metric"] <= 1.0 for p in curve["points"])
    assert (out / "budget.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=0), "top_k=0 .*between 1 and the 6 experts"),
        (dict(top_k=7), "top_k=7 .*between 1 and the 6 experts"),
        (dict(top_k={"mlp": 9}), "top_k=9 for layers.1.mlp"),
        (dict(top_k=-1), "between 1 and"),
        (dict(expert_mask={ATTN: [False] * 6}), "removes every expert"),
        (dict(expert_mask={ATTN: [True] * 5}), "must have shape \\(6,\\)"),
        (dict(expert_mask={"layers.1.attn": [True] * 6}), "unknown MoE layers"),
        (dict(expert_mask={ATTN: [True] + [False] * 5}), "fewer than top_k=2"),
        (dict(top_k=3, expert_mask={ATTN: [True, True] + [False] * 4}), "top_k=3 .*between 1 and the 2 experts"),
    ],
)
def test_bad_routing_is_a_clear_error_in_forward_and_set_routing(model, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(images, task="a", **kwargs)
    with pytest.raises(ValueError, match=message):
        model.moe_vit.set_routing("a", **kwargs)
    assert "a" not in model.moe_vit.routing_overrides


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=0), "between 1 and"),
        (dict(top_k=9), "between 1 and"),
        (dict(top_k={"atn": 1}), "'attn' and/or 'mlp'"),
    ],
)
def test_bad_routing_is_a_clear_error_in_the_flop_counter(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        flops_per_image(model, task="a", **kwargs)


def test_top_k_with_a_misspelt_kind_is_an_error(model, images):
    with pytest.raises(ValueError, match="attn"):
        model(images, task="a", top_k={"atn": 1})


@pytest.mark.parametrize("top_k", [1.5, "2", True])
def test_top_k_must_be_an_integer(model, images, top_k):
    with pytest.raises(ValueError, match="top_k"):
        model(images, task="a", top_k=top_k)
