"""Slicing: equivalence with the parent, dense collapse, non-renormalised gates, save/load without the parent,
per-task modules, expert groups, slices of slices, verification report and bad input."""

from __future__ import annotations

import pytest
import torch

from moe_adapt import MoEViTConfig, MoEViTForImageClassification, MoEViTModel
from moe_adapt.analysis import ExpertSelection, collect_expert_usage, select_experts
from moe_adapt.analysis.usage import model_signature
from moe_adapt.hub import load_model
from moe_adapt.surgery import extract_submodel, verify_submodel

LABELS = {"a": ["x", "y", "z"], "b": ["u", "v"]}


def make_model(seed=0, cls=MoEViTForImageClassification, **overrides):
    """A tiny two-task model with random routers (zero routers tie every expert and routing is arbitrary)."""
    torch.manual_seed(seed)
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"], task_labels=LABELS, **overrides)
    model = cls(config).eval()
    backbone = model if isinstance(model, MoEViTModel) else model.moe_vit
    with torch.no_grad():
        for module in backbone.moe_layers().values():
            for router in module.router.routers.values():
                router.weight.normal_(0, 2.0)
        for emb in backbone.task_embeddings.values():
            emb.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_slice_equals_parent_masked_to_the_kept_experts(images):
    model = make_model()
    usage = collect_expert_usage(model, [images], task="a")
    for n in (3, 2):  # 3: routed top-2 of 3 kept; 2 (= k): fused dense layers
        sel = select_experts(usage, "top_n", n=n)
        sub = extract_submodel(model, sel)
        masked = model(images, task="a", expert_mask=sel.expert_mask(model.config, "a")).logits
        torch.testing.assert_close(sub(images, task="a").logits, masked, atol=1e-5, rtol=1e-5)
        assert sub.config.mlp_experts == [0, n, 0, n] and sub.config.attn_experts == [n, 0, n, 0]
        ids = sub.config.parent_expert_ids
        assert ids["mlp"][1] == sel.experts["layers.1.mlp"] and ids["attn"][1] == []


@torch.no_grad()
def test_slice_equals_unmasked_parent_when_routing_stays_inside(images):
    model = make_model()
    usage = collect_expert_usage(model, [images], task="a")
    sel = select_experts(usage, "threshold", threshold=0.0)  # every expert any token chose: routing stays inside
    sub = extract_submodel(model, sel)
    assert sub.num_parameters() < model.num_parameters() or sel.num_kept() == 28
    torch.testing.assert_close(sub(images, task="a").logits, model(images, task="a").logits, atol=1e-5, rtol=1e-5)
    report = verify_submodel(model, sub, [(images, torch.zeros(6, dtype=torch.long))])
    t = report.tasks["a"]
    assert t["routing_left_kept_set"]["any_layer"] == 0 and t["top1_agreement"] == 1.0 and t["max_abs_diff"] < 1e-4
    assert t["metric"]["delta"] == 0 and t["metric"]["name"] == "accuracy"


@torch.no_grad()
def test_dense_collapse_runs_the_fused_path(images):
    model = make_model()
    sel = select_experts(collect_expert_usage(model, [images], task="b"), "top_n")  # exactly k per layer
    sub = extract_submodel(model, sel, tasks=["b"])
    calls = {"parent": 0, "slice": 0}

    def counter(key):
        def hook(module, args, _):
            calls[key] += args[1].shape[-1] < module.num_experts  # k < E: routed; k = E: the fused dense path

        return hook

    # the routed path dispatches tokens to experts; every expert chosen, the experts run as one fused dense layer
    handles = [m.mlp.experts.register_forward_hook(counter("slice")) for m in sub.moe_vit.layers if m.mlp_is_moe]
    handles += [m.mlp.experts.register_forward_hook(counter("parent")) for m in model.moe_vit.layers if m.mlp_is_moe]
    out = sub(images, task="b").logits
    ref = model(images, task="b", expert_mask=sel.expert_mask(model.config, "b")).logits
    for h in handles:
        h.remove()
    assert calls == {"parent": 2, "slice": 0}
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for module in sub.moe_vit.moe_layers().values():
        assert module.router.routers["b"].out_features == module.router.top_k


@torch.no_grad()
def test_non_renormalised_gates_scale_by_the_kept_mass(images):
    """Without renormalisation a slice's gates are the parent's / P_kept(x): a layer's output scales by 1/P_kept."""
    model = make_model(cls=MoEViTModel, router_renormalize=False)
    usage = collect_expert_usage(model, [images], task="a")
    sel = select_experts(usage, "threshold", threshold=10.0)
    sub = extract_submodel(model, sel)
    x = torch.randn(2, 17, 32)
    parent_layer, sub_layer = model.layers[1].mlp, sub.layers[1].mlp
    y_parent, route = parent_layer(x, "a")
    y_sub, _ = sub_layer(x, "a")
    kept = torch.tensor(sel.experts["layers.1.mlp"])
    inside = torch.isin(route.indices, kept).all(-1)
    p_kept = route.probs[:, kept].sum(-1)
    assert inside.any()
    expected = y_parent.reshape(-1, 32)[inside] / p_kept[inside, None]
    torch.testing.assert_close(y_sub.reshape(-1, 32)[inside], expected, atol=1e-5, rtol=1e-4)
    report = verify_submodel(model, sub, [images])
    assert report.renormalized is False and report.tasks["a"]["max_gate_scale"] > 1.0
    assert report.tasks["a"]["top1_agreement"] is None  # a bare backbone has no logits


def test_save_and_load_without_the_parent(tmp_path, images):
    model = make_model()
    sel = select_experts(collect_expert_usage(model, [images], task="a"), "top_n", n=3)
    sub = extract_submodel(model, sel, tasks=["a"])
    sub.save_pretrained(tmp_path / "slice")
    del model
    for loaded in (MoEViTForImageClassification.from_pretrained(tmp_path / "slice"), load_model(tmp_path / "slice")):
        assert type(loaded) is MoEViTForImageClassification
        assert loaded.config.tasks == ["a"] and loaded.config.parent_expert_ids == sub.config.parent_expert_ids
        with torch.no_grad():
            torch.testing.assert_close(loaded(images).logits, sub(images).logits)


@torch.no_grad()
def test_only_the_chosen_tasks_modules_are_kept(images):
    model = make_model()
    sel_a = select_experts(collect_expert_usage(model, [images], task="a"), "top_n")
    sel_b = select_experts(collect_expert_usage(model, [images], task="b"), "top_n")
    both = sel_a | sel_b
    sub = extract_submodel(model, both)
    assert list(sub.heads) == ["a", "b"] and set(sub.moe_vit.task_embeddings) == {"a", "b"}
    for task in ("a", "b"):
        ref = model(images, task=task, expert_mask=both.expert_mask(model.config, task)).logits
        torch.testing.assert_close(sub(images, task=task).logits, ref, atol=1e-5, rtol=1e-5)
    only_b = extract_submodel(model, both, tasks=["b"])
    assert list(only_b.heads) == ["b"] and list(only_b.moe_vit.task_embeddings) == ["b"]
    assert only_b.config.id2label == {0: "u", 1: "v"}
    assert all(list(m.router.routers) == ["b"] for m in only_b.moe_vit.moe_layers().values())
    torch.testing.assert_close(only_b(images).logits, sub(images, task="b").logits)
    torch.testing.assert_close(only_b.heads["b"].classifier.weight, model.heads["b"].classifier.weight)


@torch.no_grad()
def test_expert_groups_task_router_sizes_and_slices_of_slices(images):
    """A grown parent: experts in two groups, task b routing over the first 4 attention / 6 MLP experts only."""
    model = make_model(
        attn_expert_groups=[[4, 2], [], [4, 2], []],
        mlp_expert_groups=[[], [6, 2], [], [6, 2]],
        task_router_sizes={"b": {"attn": [4, 0, 4, 0], "mlp": [0, 6, 0, 6]}},
    )
    experts = {
        "layers.0.attn": [1, 2, 3, 5],
        "layers.1.mlp": [0, 4, 5, 6, 7],
        "layers.2.attn": [0, 2, 3, 4],
        "layers.3.mlp": [2, 4, 5, 7],
    }
    sel = ExpertSelection(experts=experts, tasks=["a", "b"], model=model_signature(model.config))
    sub = extract_submodel(model, sel)
    assert sub.config.task_router_sizes == {"b": {"attn": [3, 0, 3, 0], "mlp": [0, 3, 0, 3]}}
    assert sub.config.attn_expert_groups is None
    for task in ("a", "b"):
        ref = model(images, task=task, expert_mask=sel.expert_mask(model.config, task)).logits
        torch.testing.assert_close(sub(images, task=task).logits, ref, atol=1e-5, rtol=1e-5)
    # slice the slice: ids map back to the first parent
    last_two = {n: list(range(m.router.num_experts))[-2:] for n, m in sub.moe_vit.moe_layers().items()}
    subsub = extract_submodel(sub, ExpertSelection(experts=last_two, tasks=["a"], model=model_signature(sub.config)))
    assert subsub.config.parent_expert_ids["mlp"][1] == [6, 7]
    assert subsub.config.parent_expert_ids["attn"][2] == [3, 4]
    ref = model(
        images,
        task="a",
        expert_mask=ExpertSelection(
            experts={n: subsub.config.parent_expert_ids[n.rsplit(".", 1)[1]][int(n.split(".")[1])] for n in experts},
            tasks=["a"],
            model=model_signature(model.config),
        ).expert_mask(model.config, "a"),
    ).logits
    torch.testing.assert_close(subsub(images, task="a").logits, ref, atol=1e-5, rtol=1e-5)
    report = verify_submodel(sub, subsub, [images])
    assert report.kept_experts["layers.1.mlp"] == [2, 5]


@torch.no_grad()
def test_task_reaching_exactly_k_of_more_kept_experts(images):
    """Task b reaches only k of a layer's kept experts (fused dense path over the first k)."""
    model = make_model(task_router_sizes={"b": {"attn": [4, 0, 4, 0], "mlp": [0, 6, 0, 6]}})
    experts = {
        "layers.0.attn": [1, 3, 4, 5],
        "layers.1.mlp": [0, 5, 6, 7],
        "layers.2.attn": [0, 2, 4, 5],
        "layers.3.mlp": [2, 4, 6, 7],
    }
    sel = ExpertSelection(experts=experts, tasks=["a", "b"], model=model_signature(model.config))
    sub = extract_submodel(model, sel)
    ref = model(images, task="b", expert_mask=sel.expert_mask(model.config, "b")).logits
    torch.testing.assert_close(sub(images, task="b").logits, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_verification_report(tmp_path, images):
    model = make_model()
    sel = select_experts(collect_expert_usage(model, [images], task="a"), "top_n")
    sub = extract_submodel(model, sel)
    report = verify_submodel(model, sub, {"a": [(images, torch.tensor([0, 1, 2, 0, 1, 2]))]})
    t = report.tasks["a"]
    assert t["num_images"] == 6 and t["num_tokens"] == 6 * 17
    assert 0 <= t["top1_agreement"] <= 1 and t["max_abs_diff"] >= t["mean_abs_diff"] >= 0
    assert set(t["routing_left_kept_set"]["per_layer"]) == set(model.config.moe_layer_names())
    assert t["routing_left_kept_set"]["any_layer"] >= max(t["routing_left_kept_set"]["per_layer"].values())
    assert report.params["ratio"] < 0.6 and report.flops["a"]["submodel"] < report.flops["a"]["parent"]
    loaded = type(report).load(report.save(tmp_path / "verification.json"))
    assert loaded.tasks["a"]["num_images"] == 6
    assert "top-1 agreement" in report.summary() and "| parameters |" in report.to_markdown()
    from moe_adapt.cli.extract import kept_line  # what `moe-adapt extract` prints last: the shares kept

    m = t["metric"]
    assert kept_line(report) == (
        f"slice: {100 * report.params['ratio']:.1f}% of the parameters; a keeps "
        f"{100 * m['submodel'] / m['parent']:.1f}% of its {m['name']}"
    )


def test_bad_input_gives_clear_errors(images):
    model = make_model()
    sel = select_experts(collect_expert_usage(model, [images], task="a"), "top_n")
    with pytest.raises(ValueError, match="no task 'c'"):
        extract_submodel(model, sel, tasks=["c"])
    other = make_model(mlp_experts=[0, 4, 0, 4], attn_experts=[6, 0, 6, 0])
    with pytest.raises(ValueError, match="made for another model"):
        extract_submodel(other, sel)
    deeper = make_model(num_hidden_layers=6, mlp_experts=[0, 8, 0, 8, 0, 8], attn_experts=[6, 0, 6, 0, 6, 0])
    with pytest.raises(ValueError, match="num_hidden_layers"):
        extract_submodel(deeper, sel)
    data = sel.to_dict()
    data["experts"]["layers.3.mlp"] = [1]
    with pytest.raises(ValueError, match="fewer than its top_k=2"):
        extract_submodel(model, ExpertSelection.from_dict(data))
    router_limited = make_model(task_router_sizes={"b": {"attn": [4, 0, 4, 0], "mlp": [0, 8, 0, 8]}})
    narrow = ExpertSelection(experts={**sel.experts, "layers.0.attn": [0, 4, 5]}, tasks=["b"], model=sel.model)
    with pytest.raises(ValueError, match="task 'b' can route to"):
        extract_submodel(router_limited, narrow)
    sub = extract_submodel(model, sel)
    with pytest.raises(ValueError, match="empty"):
        verify_submodel(model, sub, [])
    with pytest.raises(ValueError, match="slice has no task 'b'"):
        verify_submodel(model, sub, [images], tasks=["b"])


@torch.no_grad()
def test_multitask_model_with_detection_and_segmentation_heads(tmp_path, images):
    from moe_adapt.flops import flops_per_image
    from moe_adapt.models.moe_vit import TASK_MODEL_CLASSES, MoEViTForMultiTask

    config = MoEViTConfig.from_preset(
        "tiny",
        tasks=["cls", "det", "seg"],
        task_types={"cls": "classification", "det": "detection", "seg": "semantic_segmentation"},
        task_labels={"cls": ["a", "b"], "det": ["digit"], "seg": ["bg", "fg"]},
        head_configs={"det": {"channels": 16, "num_convs": 1}, "seg": {"channels": 16}},
    )
    torch.manual_seed(0)
    model = MoEViTForMultiTask(config).eval()
    for module in model.moe_vit.moe_layers().values():
        for router in module.router.routers.values():
            router.weight.normal_(0, 2.0)
    for task in ("det", "seg"):
        sel = select_experts(collect_expert_usage(model, [images], task=task), "top_n")
        sub = extract_submodel(model, sel)
        assert list(sub.heads) == [task] and list(sub.config.head_configs) == [task]
        ref = model(images, task=task, expert_mask=sel.expert_mask(config, task))
        out = sub(images, task=task)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
        sub.save_pretrained(tmp_path / task)
        assert type(load_model(tmp_path / task)) is TASK_MODEL_CLASSES[config.task_types[task]]  # a one-task slice
        masks = torch.randint(0, 2, (6, 32, 32))
        report = verify_submodel(model, sub, [(images, masks)] if task == "seg" else [images])
        assert report.tasks[task]["top1_agreement"] is not None
        assert (report.tasks[task].get("metric") or {}).get("name") == ("mean_iou" if task == "seg" else None)
        head = flops_per_image(sub, task=task)["head"]
        assert head is not None and head > 0
