"""Continual learning (issue 7): add_task grows a model by one task and old tasks stay bit-identical."""

import pytest
import torch
from helpers import trained_like

import moe_adapt  # noqa: F401  (registers the Auto classes)
from moe_adapt import MoEViTConfig, MoEViTForImageClassification, MoEViTModel
from moe_adapt.kernels import EXPERTS_IMPLEMENTATIONS
from moe_adapt.models.moe_vit.modeling_moe_vit import MoEViTSparseMLP
from moe_adapt.surgery.add_task import (
    add_task,
    freeze_old_tasks,
    max_output_change,
    outputs_identical,
    source_expert_ranking,
    task_outputs,
    train_new_tasks,
    trainable_optimizer,
)

LABELS = {"a": ["x", "y", "z"], "b": ["p", "q"]}


def tiny_classifier(seed=0, **kw):
    torch.manual_seed(seed)
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"], task_labels=LABELS, **kw)
    return trained_like(MoEViTForImageClassification(config), seed)


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def train_steps(model, task, images, steps=3, weight_decay=0.5, lr=1e-2):
    """A few AdamW steps on `task` only, with heavy weight decay (it would move any tensor left in the optimiser)."""
    freeze_old_tasks(model, [task])
    optimizer = trainable_optimizer(model, lr=lr, weight_decay=weight_decay)
    train_new_tasks(model)
    labels = torch.arange(images.shape[0]) % model.config.num_labels_for(task)
    for _ in range(steps):
        loss = model(images, labels=labels, task=task).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


# ------------------------------------------------------------------------------------------------ structure
def test_add_task_grows_every_moe_layer_and_pins_old_routers(images):
    model = tiny_classifier()
    grown = add_task(model, "c", labels=4, new_attn_experts=2, new_mlp_experts=3, data=images)
    cfg = grown.config
    assert type(grown) is MoEViTForImageClassification and cfg.tasks == ["a", "b", "c"]
    assert cfg.attn_experts == [8, 0, 8, 0] and cfg.mlp_experts == [0, 11, 0, 11]
    assert cfg.attn_expert_groups == [[6, 2], [0], [6, 2], [0]]
    assert cfg.mlp_expert_groups == [[0], [8, 3], [0], [8, 3]]
    assert cfg.task_router_sizes["a"] == {"attn": [6, 0, 6, 0], "mlp": [0, 8, 0, 8]}
    assert cfg.task_router_sizes["c"] == {"attn": [8, 0, 8, 0], "mlp": [0, 11, 0, 11]}
    assert cfg.task_labels["c"] == ["0", "1", "2", "3"] and grown.heads["c"].classifier.out_features == 4
    layer = grown.moe_vit.layers[1].mlp
    assert layer.router.routers["a"].weight.shape == (8, 32) and layer.router.routers["c"].weight.shape == (11, 32)
    assert layer.extra_experts[0].up_proj.shape == (3, 64, 32)
    # The old model is untouched and every old tensor was copied.
    assert model.config.tasks == ["a", "b"]
    grown_state = grown.state_dict()
    assert all(torch.equal(v, grown_state[k]) for k, v in model.state_dict().items())


def test_copy_top_copies_the_source_tasks_most_used_experts(images):
    model = tiny_classifier()
    grown = add_task(model, "c", labels=2, new_attn_experts=2, new_mlp_experts=2, source_task="b", data=images)
    ranking = source_expert_ranking(model, "b", images)
    old_layers, new_layers = model.moe_vit.moe_layers(), grown.moe_vit.moe_layers()
    for name, module in new_layers.items():
        old = old_layers[name]
        n_old = old.router.routers["b"].weight.shape[0]
        for j, src in enumerate(ranking[name][:2]):
            for pname, p in module.extra_experts[0].named_parameters():
                assert torch.equal(p[j], getattr(old.experts, pname)[src]), (name, pname)
            assert torch.equal(module.router.routers["c"].weight[n_old + j], old.router.routers["b"].weight[src])
        assert torch.equal(module.router.routers["c"].weight[:n_old], old.router.routers["b"].weight)
    assert torch.equal(grown.moe_vit.task_embeddings["c"], model.moe_vit.task_embeddings["b"])
    # The ranking counts top-k picks: the first expert is picked at least as often as the last.
    out = model.moe_vit(images, task="b", output_router_probs=True)
    counts = torch.bincount(out.router_indices[0].reshape(-1), minlength=6)
    first = ranking[grown.config.moe_layer_names()[0]]
    assert counts[first[0]] == counts.max() and counts[first[-1]] == counts.min()


def test_random_init_starts_with_uniform_routing():
    grown = add_task(tiny_classifier(), "c", labels=2, init="random")
    for module in grown.moe_vit.moe_layers().values():
        assert not module.router.routers["c"].weight.any()
    assert not grown.moe_vit.task_embeddings["c"].any()


# ------------------------------------------------------------------------------------------------ freezing
def test_freeze_old_tasks_leaves_only_the_new_tasks_tensors_trainable(images):
    grown = add_task(tiny_classifier(), "c", labels=4, data=images)
    trainable = freeze_old_tasks(grown, "c")
    assert set(trainable) == {n for n, p in grown.named_parameters() if p.requires_grad}
    for name in trainable:
        assert ".c." in name or name.endswith(".c") or ".extra_experts.0." in name, name
    frozen = [n for n, p in grown.named_parameters() if not p.requires_grad]
    for must_freeze in (
        "embeddings.projection.weight",
        "layers.0.attention.k_proj.weight",
        "layers.1.attention.q_proj.weight",
        "layers.1.mlp.experts.up_proj",
        "layers.0.attention.router.routers.a.weight",
        "heads.b.classifier.weight",
        "task_embeddings.a",
        "moe_vit.layernorm.weight",
    ):
        assert any(n.endswith(must_freeze) for n in frozen), must_freeze
    optimizer = trainable_optimizer(grown, weight_decay=0.1)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in grown.parameters() if p.requires_grad}


@pytest.mark.parametrize("init", ["copy_top", "random"])
def test_old_tasks_bit_identical_after_training_the_new_task(images, init):
    model = tiny_classifier()
    before = task_outputs(model, images, ["a", "b"])
    grown = add_task(model, "c", labels=4, init=init, data=images)
    assert outputs_identical(before, task_outputs(grown, images, ["a", "b"]))  # growing changes nothing
    frozen = {n: p.detach().clone() for n, p in grown.named_parameters()}
    new_before = task_outputs(grown, images, ["c"])
    train_steps(grown, "c", images)
    after = task_outputs(grown, images, ["a", "b"])
    for task in ("a", "b"):
        assert torch.equal(before[task]["logits"], after[task]["logits"])
        assert torch.equal(before[task]["logits"].argmax(-1), after[task]["logits"].argmax(-1))
    assert max_output_change(before, after) == {"a": 0.0, "b": 0.0}
    # Frozen tensors did not move under AdamW's weight decay; the new task's did.
    for name, p in grown.named_parameters():
        assert torch.equal(p, frozen[name]) != p.requires_grad, name
    assert not torch.equal(new_before["c"]["logits"], task_outputs(grown, images, ["c"])["c"]["logits"])


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_bit_identity_holds_for_other_expert_backends(images, impl):
    model = tiny_classifier(experts_implementation=impl)
    before = task_outputs(model, images, ["a", "b"])
    grown = train_steps(add_task(model, "c", labels=3, init="random"), "c", images, steps=2)
    assert grown.config._experts_implementation == impl
    assert outputs_identical(before, task_outputs(grown, images, ["a", "b"]))


def test_grown_model_on_the_accelerator_code_path(images, monkeypatch):
    """The code segmented_mm runs on a GPU, taken here on CPU, on a grown model: the new task routes over two expert
    groups (each group runs the slots that chose one of its experts). Its loss and every gradient
    equal the CPU path's, and training it there leaves the old tasks bit-identical."""
    import moe_adapt.kernels.dispatch as M

    grown = add_task(tiny_classifier(), "c", labels=4, init="random", data=images)
    labels = torch.arange(images.shape[0]) % 4
    results = {}
    for accelerator in (False, True):
        monkeypatch.setattr(M, "on_accelerator", lambda x, on=accelerator: on)
        grown.zero_grad(set_to_none=True)
        loss = grown(images, labels=labels, task="c").loss
        loss.backward()
        results[accelerator] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in grown.named_parameters() if p.grad is not None},
        )
    torch.testing.assert_close(results[True][0], results[False][0])
    assert results[True][1].keys() == results[False][1].keys()
    assert any("extra_experts" in n for n in results[True][1])  # the second group is reached and trained
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    grown.zero_grad(set_to_none=True)
    before = task_outputs(grown, images, ["a", "b"])
    train_steps(grown, "c", images, steps=2)
    assert outputs_identical(before, task_outputs(grown, images, ["a", "b"]))


def test_growing_twice_keeps_every_earlier_task_identical(images):
    model = tiny_classifier()
    before = task_outputs(model, images, ["a", "b"])
    grown = train_steps(add_task(model, "c", labels=4, data=images), "c", images, steps=2)
    before_c = task_outputs(grown, images, ["c"])
    twice = add_task(
        grown, "d", labels=5, new_attn_experts=1, new_mlp_experts=[0, 2, 0, 0], source_task="c", data=images
    )
    assert twice.config.attn_expert_groups[0] == [6, 2, 1] and twice.config.mlp_expert_groups[1] == [8, 2, 2]
    assert twice.config.mlp_expert_groups[3] == [8, 2] and twice.config.task_router_sizes["c"]["mlp"] == [0, 10, 0, 10]
    trainable = freeze_old_tasks(twice, "d")
    assert not any("extra_experts.0." in n for n in trainable)  # task c's experts stay frozen
    train_steps(twice, "d", images, steps=2)
    assert outputs_identical({**before, **before_c}, task_outputs(twice, images, ["a", "b", "c"]))


def test_backbone_only_model_grows_too(images):
    torch.manual_seed(0)
    model = trained_like(MoEViTModel(MoEViTConfig.from_preset("tiny", tasks=["a"])))
    before = task_outputs(model, images, ["a"])
    grown = add_task(model, "b", task_type="semantic_segmentation", labels=["bg", "fg"], init="random")
    assert type(grown) is MoEViTModel and grown.config.task_types["b"] == "semantic_segmentation"
    assert outputs_identical(before, task_outputs(grown, images, ["a"]))
    assert "last_hidden_state" in before["a"]


def test_growing_a_slice_that_kept_exactly_k_experts_is_bit_identical(images):
    model = tiny_classifier(attn_experts=[2, 0, 2, 0], mlp_experts=[0, 2, 0, 2])
    before = task_outputs(model, images, ["a", "b"])
    grown = add_task(model, "c", labels=2, init="random")
    assert outputs_identical(before, task_outputs(grown, images, ["a", "b"]))


def grown_with_random_routers(impl="segmented_mm"):
    """A tiny model grown by task c (2 attention and 3 MLP experts per layer) whose routers are all random, so the
    new task routes over both expert groups; every tensor trainable."""
    model = tiny_classifier(experts_implementation=impl)
    grown = add_task(model, "c", labels=4, new_attn_experts=2, new_mlp_experts=3, init="random")
    trained_like(grown, seed=7)
    for p in grown.parameters():
        p.requires_grad_(True)
    return grown


def reference_layer(module, x, task, top_k=None):
    """A MoE layer's output written out from its definition, all expert groups concatenated: for each token,
    `Σ_j g_j · expert_{e_j}(x)` over its k chosen experts (attention experts: per slot a query and an output
    projection around multi-query attention against the shared keys and values)."""
    b, n, d = x.shape
    flat = x.reshape(b * n, d)
    route = module.router(flat, task, top_k)
    idx, k = route.indices, route.indices.shape[-1]
    groups = [module.experts, *module.extra_experts]

    def chosen(name):  # each (token, slot)'s expert tensor
        return torch.cat([getattr(g, name) for g in groups])[idx]

    if isinstance(module, MoEViTSparseMLP):
        h = module.experts.act_fn(torch.einsum("tkid,td->tki", chosen("up_proj"), flat) + chosen("up_proj_bias"))
        y = torch.einsum("tkdi,tki->tkd", chosen("down_proj"), h) + chosen("down_proj_bias")
    else:
        q = torch.einsum("tkhd,td->tkh", chosen("q_proj"), flat) + chosen("q_proj_bias")
        q = q.reshape(b, n * k, -1)
        att = torch.softmax(q @ module.k_proj(x).transpose(1, 2) / q.shape[-1] ** 0.5, -1) @ module.v_proj(x)
        y = torch.einsum("tkdh,tkh->tkd", chosen("o_proj"), att.reshape(b * n, k, -1)) + chosen("o_proj_bias")
    return (route.weights.unsqueeze(-1) * y).sum(1).view(b, n, d), route


@pytest.mark.parametrize("impl", [*EXPERTS_IMPLEMENTATIONS, "accelerator"])
@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_new_task_over_two_expert_groups_equals_the_reference(impl, top_k, monkeypatch):
    """The new task's MoE layers (each expert group run on only the slots that chose one of its experts) equal the
    layer written out from its definition: outputs, and gradients of the input, the router and every expert group.
    'accelerator': the code segmented_mm runs on a GPU, taken here on CPU."""
    import moe_adapt.kernels.dispatch as M

    if impl == "accelerator":
        monkeypatch.setattr(M, "on_accelerator", lambda x: True)
    grown = grown_with_random_routers("segmented_mm" if impl == "accelerator" else impl)
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(2))
    for name, module in grown.moe_vit.moe_layers().items():
        results = []
        for reference in (False, True):
            module.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            y, route = reference_layer(module, xi, "c", top_k) if reference else module(xi, "c", top_k)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
            results.append((y.detach(), route.indices, xi.grad, grads))
        (y, idx, dx, grads), (y_ref, idx_ref, dx_ref, grads_ref) = results
        assert torch.equal(idx, idx_ref), name
        first = module.group_sizes[0]
        assert (idx < first).any() and (idx >= first).any(), name  # both groups are reached
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5, msg=name)
        assert any(n.startswith("extra_experts.0.") for n in grads), name  # the new group is trained
        for n, g_ref in grads_ref.items():
            if n != "k_proj.bias":  # zero but for rounding: the softmax over keys ignores a shift shared by all keys
                # the eager loop leaves the experts no token chose without a gradient (None, not zeros)
                g = grads.get(n, torch.zeros_like(g_ref))
                torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=f"{name} {n}")


def test_each_mlp_expert_group_runs_only_its_own_slots(images):
    """Every (token, slot) pair of the new task reaches exactly one MLP expert group: the groups' calls together
    see tokens × k pairs, each with an expert of that group (not every group all tokens × k)."""
    grown = grown_with_random_routers().eval()
    seen = {}

    def hook(module, args, out):
        seen.setdefault(id(module), []).append(args[1].clone())

    mlp_layers = [m for m in grown.moe_vit.moe_layers().values() if m.router.kind == "mlp"]
    handles = [g.register_forward_hook(hook) for m in mlp_layers for g in [m.experts, *m.extra_experts]]
    with torch.no_grad():
        out = grown.moe_vit(images, task="c", output_router_probs=True)
    for h in handles:
        h.remove()
    tokens = images.shape[0] * 17
    for layer, module in grown.moe_vit.moe_layers().items():
        if module.router.kind != "mlp":
            continue
        calls = [seen.get(id(g), []) for g in [module.experts, *module.extra_experts]]
        assert all(len(c) == 1 for c in calls), layer
        pairs = [c[0] for c in calls]
        assert sum(p.numel() for p in pairs) == tokens * 2 and all(p.shape[1] == 1 for p in pairs)
        for p, size in zip(pairs, module.group_sizes):
            assert 0 <= p.min() and p.max() < size
        routed = out.router_indices[grown.config.moe_layer_names().index(layer)]
        first = module.group_sizes[0]
        assert [int((routed < first).sum()), int((routed >= first).sum())] == [p.numel() for p in pairs]


# ------------------------------------------------------------------------------------------------ save / load
def test_grown_model_saves_and_loads_with_its_new_expert_counts(tmp_path, images):
    from transformers import AutoModelForImageClassification

    model = tiny_classifier()
    grown = train_steps(add_task(model, "c", labels=4, new_mlp_experts=[0, 1, 0, 3], data=images), "c", images, steps=1)
    grown.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.mlp_experts == [0, 9, 0, 11] != model.config.mlp_experts
    assert loaded.config.mlp_expert_groups == [[0], [8, 1], [0], [8, 3]]
    assert loaded.config.task_router_sizes == grown.config.task_router_sizes
    tasks = ["a", "b", "c"]
    assert outputs_identical(task_outputs(grown, images, tasks), task_outputs(loaded, images, tasks))
    # A loaded grown model grows again.
    again = add_task(loaded, "d", labels=2, init="random")
    assert again.config.mlp_expert_groups[3] == [8, 3, 2]


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="a"), "already exists"),
        (dict(new_mlp_experts=-7), "fewer than\\s+mlp_top_k=2"),
        (dict(new_attn_experts=[-5, 0, 0, 0]), "fewer than\\s+attn_top_k=2"),
        (dict(new_attn_experts=-1), "only adds experts"),
        (dict(new_attn_experts=[1, 1, 1, 1]), "layer 1's attn is dense"),
        (dict(new_mlp_experts=[0, 1]), "one per layer"),
        (dict(init="zeros"), "init='zeros'"),
        (dict(init="copy_top", data=None), "pass data="),
        (dict(source_task="nope"), "source_task='nope'"),
        (dict(labels=None), "needs labels"),
        (dict(task_type="captioning"), "task_type='captioning'"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message, images):
    args = dict(name="c", labels=3, init="copy_top", data=images) | kwargs
    with pytest.raises(ValueError, match=message):
        add_task(tiny_classifier(), **args)


def test_freeze_names_unknown_tasks():
    with pytest.raises(ValueError, match="unknown tasks"):
        freeze_old_tasks(tiny_classifier(), "zzz")
    with pytest.raises(ValueError, match="no trainable parameters"):
        model = tiny_classifier()
        for p in model.parameters():
            p.requires_grad_(False)
        trainable_optimizer(model)


# ------------------------------------------------------------------------------------------------ task models
def test_multitask_model_keeps_detection_and_classification_predictions_identical(images):
    from moe_adapt.models.moe_vit.modeling_multitask import MoEViTForMultiTask

    torch.manual_seed(0)
    config = MoEViTConfig.from_preset(
        "tiny",
        tasks=["cls", "det"],
        task_types={"cls": "classification", "det": "detection"},
        task_labels={"cls": ["a", "b"], "det": ["digit"]},
        head_configs={"det": {"channels": 16, "num_convs": 1}},
    )
    model = trained_like(MoEViTForMultiTask(config))

    def predictions(m):
        with torch.no_grad():
            cls = m.postprocess(m(images, task="cls"))
            det = m.postprocess(m(images, task="det"), score_threshold=0.0)
        return cls, det

    before, preds_before = task_outputs(model, images, ["cls", "det"]), predictions(model)
    grown = add_task(model, "seg", "semantic_segmentation", ["bg", "fg"], head_config={"channels": 16}, data=images)
    assert grown.config.head_configs["seg"] == {"channels": 16} and "seg" in grown.heads
    freeze_old_tasks(grown, "seg")
    optimizer = trainable_optimizer(grown, lr=1e-2, weight_decay=0.5)
    train_new_tasks(grown)
    masks = torch.randint(0, 2, (images.shape[0], 32, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        grown(images, task="seg", labels=masks).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    grown.eval()
    assert outputs_identical(before, task_outputs(grown, images, ["cls", "det"]))
    cls_after, det_after = predictions(grown)
    assert torch.equal(cls_after, preds_before[0])
    for a, b in zip(det_after, preds_before[1]):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


@pytest.mark.slow
def test_continual_recipe_end_to_end(tmp_path, monkeypatch, capsys):
    """`moe-adapt continual` (what recipes/continual.py runs) on a tiny model: the summary line, the grown model."""
    import json
    from pathlib import Path

    from moe_adapt.adaptation.continual import load_continual_config
    from moe_adapt.cli import main

    monkeypatch.setenv("MOE_ADAPT_DATA", str(tmp_path / "data"))
    root = Path(__file__).resolve().parents[1]
    tiny_classifier().save_pretrained(tmp_path / "model")
    code = main(
        [
            "continual",
            "--config",
            str(root / "recipes" / "configs" / "continual.yaml"),
            "--model",
            str(tmp_path / "model"),
            "--output-dir",
            str(tmp_path / "out"),
            "train.max_steps=4",
            "batch_size=16",
            "max_train_images=64",
            "max_eval_images=32",
            "calibration_images=32",
            "check_images=16",
            "train.log_every=0",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["old_tasks_identical"] and summary["old_task_max_abs_change"] == {"a": 0.0, "b": 0.0}
    assert summary["task"] == "digits" and 0.0 <= summary["accuracy"] <= 1.0 and summary["budget"]
    grown = MoEViTForImageClassification.from_pretrained(tmp_path / "out" / "model")
    assert grown.config.tasks == ["a", "b", "digits"] and grown.config.attn_experts == [8, 0, 8, 0]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\]; valid keys: .*'train'"):
        load_continual_config(None, ["model=x", "stepz=3"])
    with pytest.raises(ValueError, match=r"optimizer: unknown key\(s\) \['rl'\]; valid keys: .*'lr'"):
        load_continual_config(None, ["model=x", "optimizer.rl=3"])
    assert (
        load_continual_config(None, ["model=x", "optimizer.lr=0.1"]).optimizer.weight_decay == 0.3
    )  # the recipe's default kept


# ------------------------------------------------------------------------------- the default path is the safe one
def _plain_adamw_steps(model, task, images, steps=3):
    """What a user writes after add_task: AdamW over every parameter, with weight decay, no freezing call."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    labels = torch.arange(images.shape[0]) % model.config.num_labels_for(task)
    for _ in range(steps):
        model(images, labels=labels, task=task).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_add_task_alone_protects_old_tasks_from_plain_adamw(images):
    grown = add_task(tiny_classifier(), "c", labels=4, data=images)
    before = task_outputs(grown, images, ["a", "b"])
    new_before = task_outputs(grown, images, ["c"])
    _plain_adamw_steps(grown, "c", images)
    after = task_outputs(grown, images, ["a", "b"])
    assert outputs_identical(before, after), max_output_change(before, after)
    assert max_output_change(new_before, task_outputs(grown, images, ["c"]))["c"] > 0  # the new task did train
    assert not grown.moe_vit.embeddings.projection.weight.requires_grad


def test_add_task_freeze_false_leaves_everything_trainable(images):
    grown = add_task(tiny_classifier(), "c", labels=4, data=images, freeze=False)
    assert all(p.requires_grad for p in grown.parameters())


def test_add_task_alone_protects_old_tasks_under_transformers_trainer(images, tmp_path):
    from transformers import Trainer, TrainingArguments

    grown = add_task(tiny_classifier(), "c", labels=4, data=images)
    before = task_outputs(grown, images, ["a", "b"])
    rows = [{"pixel_values": x, "labels": torch.tensor(i % 4)} for i, x in enumerate(images)]

    def collate(items):
        return {
            "pixel_values": torch.stack([r["pixel_values"] for r in items]),
            "labels": torch.stack([r["labels"] for r in items]),
            "task": "c",
        }

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=3,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    Trainer(model=grown, args=args, train_dataset=rows, data_collator=collate).train()
    after = task_outputs(grown.eval(), images, ["a", "b"])
    assert outputs_identical(before, after), max_output_change(before, after)
