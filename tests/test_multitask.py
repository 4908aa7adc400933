"""MoEViTForMultiTask: one backbone, one head per task type, outputs, save / load through the Auto class, and the
step objective that DDP wraps (every parameter gets a gradient, the MI loss spans the step's micro-batches)."""

from __future__ import annotations

import pytest
import torch

from moe_adapt import AutoModelForMultiTask, MoEViTConfig, MoEViTForMultiTask, MutualInformationLoss
from moe_adapt.models.moe_vit.losses import mutual_information_loss
from moe_adapt.training import LossWeighting, MultiTaskObjective

TASK_TYPES = {"cls": "classification", "det": "detection", "seg": "semantic_segmentation"}


def make_config(**kwargs) -> MoEViTConfig:
    return MoEViTConfig.from_preset(
        "tiny",
        tasks=list(TASK_TYPES),
        task_types=TASK_TYPES,
        task_labels={"cls": ["a", "b", "c"], "det": ["x", "y"], "seg": ["bg", "fg", "edge"]},
        head_configs={
            "det": {"channels": 16, "num_convs": 1, "scales": [2, 1]},
            "seg": {"channels": 16, "pool_scales": [1, 2]},
        },
        **kwargs,
    )


def batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    det = [
        {"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]]), "class_labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.long)},
    ]
    return {
        "cls": {"pixel_values": x, "labels": torch.tensor([0, 2])},
        "det": {"pixel_values": x, "labels": det},
        "seg": {"pixel_values": x, "labels": torch.randint(0, 3, (2, 32, 32), generator=g)},
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoEViTForMultiTask(make_config())


def test_one_head_per_task_and_forward_outputs(model):
    assert set(model.heads) == set(TASK_TYPES)
    assert type(model.heads["det"]).__name__ == "FCOSHead" and type(model.heads["seg"]).__name__ == "UperNetHead"
    data = batches()
    out = model(**data["cls"], task="cls", output_router_probs=True)
    assert out.logits.shape == (2, 3) and out.loss.dim() == 0 and out.task == "cls"
    assert torch.allclose(out.loss, out.task_loss + out.aux_loss)
    assert len(out.router_probs) == len(model.config.moe_layer_names())
    out = model(**data["det"], task="det")
    assert out.logits.shape[0] == 2 and out.logits.shape[-1] == 2 and out.pred_boxes.shape[-1] == 4
    assert out.points.shape[0] == out.logits.shape[1] == out.point_strides.shape[0]
    out = model(**data["seg"], task="seg")
    assert out.logits.shape[:2] == (2, 3) and out.loss.isfinite()
    no_labels = model(data["cls"]["pixel_values"], task="cls")
    assert no_labels.loss is None and no_labels.task_loss is None


def test_tasks_route_with_their_own_routers(model):
    x = batches()["cls"]["pixel_values"]
    router = next(iter(model.moe_vit.moe_layers().values())).router.routers
    with torch.no_grad():
        router["det"].weight.normal_()
    try:
        a = model(x, task="cls", output_router_probs=True).router_probs[0]
        b = model(x, task="det", output_router_probs=True).router_probs[0]
        assert not torch.allclose(a, b)
    finally:
        with torch.no_grad():
            router["det"].weight.zero_()


def test_save_and_load_rebuilds_every_head(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = AutoModelForMultiTask.from_pretrained(tmp_path)
    assert isinstance(loaded, MoEViTForMultiTask)
    assert loaded.config.head_configs == model.config.head_configs
    model.eval()
    loaded.eval()
    data = batches()
    for task in TASK_TYPES:
        a = model(data[task]["pixel_values"], task=task).logits
        b = loaded(data[task]["pixel_values"], task=task).logits
        assert torch.equal(a, b), task
    model.train()


def test_heads_missing_from_a_checkpoint_get_their_own_initialisation(model, tmp_path):
    """A multi-task model loaded from a base checkpoint (or with a new label set under ignore_mismatched_sizes):
    transformers leaves the tensors it did not load as allocated; the heads get the values a fresh head has."""
    import math

    from moe_adapt import MoEViTModel
    from moe_adapt.heads import build_head

    base = MoEViTModel(model.config)
    base.load_state_dict(model.moe_vit.state_dict())
    base.save_pretrained(tmp_path / "base")
    loaded = MoEViTForMultiTask.from_pretrained(tmp_path / "base", ignore_mismatched_sizes=True).eval()
    for name, t in loaded.heads.state_dict().items():
        assert torch.isfinite(t.float()).all(), name
    fresh = {task: build_head(model.config, task).state_dict() for task in TASK_TYPES}
    constant = 0
    for task, head in loaded.heads.items():
        for name, t in head.state_dict().items():
            want = fresh[task][name]
            if want.numel() and (want == want.reshape(-1)[0]).all():  # a deterministic init (norms, stats, priors)
                assert torch.equal(t, want), (task, name)
                constant += 1
    assert constant >= 6
    prior = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(
        loaded.heads["det"].cls_logits.bias, torch.full_like(loaded.heads["det"].cls_logits.bias, prior)
    )
    data = batches()
    for task in TASK_TYPES:
        out = loaded(**data[task], task=task)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss), task
    # an empty model (device_map="meta") has nothing to initialise and loads as transformers' models do
    empty = MoEViTForMultiTask.from_pretrained(tmp_path / "base", device_map="meta", ignore_mismatched_sizes=True)
    assert empty.heads["det"].cls_logits.bias.is_meta
    # a new label set for one task: that head is fresh, the others as saved
    model.save_pretrained(tmp_path / "full")
    relabelled = make_config()
    relabelled.task_labels["cls"] = ["a", "b", "c", "d", "e"]
    five = MoEViTForMultiTask.from_pretrained(tmp_path / "full", config=relabelled, ignore_mismatched_sizes=True).eval()
    assert (
        five.heads["cls"].classifier.weight.shape[0] == 5 and torch.isfinite(five.heads["cls"].classifier.weight).all()
    )
    assert torch.equal(
        five.heads["seg"].state_dict()["classifier.weight"], model.heads["seg"].state_dict()["classifier.weight"]
    )
    assert torch.isfinite(five(**data["cls"], task="cls").logits).all()


def test_errors_name_the_problem(model):
    x = batches()["cls"]["pixel_values"]
    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        model(x, task="nope")
    with pytest.raises(ValueError, match="LongTensor \\[batch, H, W\\]"):
        model(x, task="seg", labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="no labels"):
        MoEViTForMultiTask(MoEViTConfig.from_preset("tiny", tasks=["cls"], num_labels=0))


def test_objective_gives_every_parameter_a_gradient_and_mi_spans_the_step():
    """The DDP contract: with a task missing from the step, every trainable parameter still gets a (zero) gradient;
    the MI loss equals the loss of the statistics summed over all micro-batches of the step."""
    torch.manual_seed(0)
    model = MoEViTForMultiTask(make_config())
    # Non-uniform routers, so the MI is not trivially zero.
    for module in model.moe_vit.moe_layers().values():
        for router in module.router.routers.values():
            torch.nn.init.normal_(router.weight, std=0.5)
    mi = MutualInformationLoss(3, weight=0.01)
    objective = MultiTaskObjective(model, LossWeighting(list(TASK_TYPES)), mi)
    data = batches()
    out = objective([("cls", data["cls"]), ("seg", data["seg"])])
    out["loss"].backward()
    missing = [n for n, p in objective.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(float(p.grad.abs().sum()) == 0 for p in model.heads["det"].parameters())

    with torch.no_grad():
        joint = None
        for task in ("cls", "seg"):
            probs = model(data[task]["pixel_values"], task=task, output_router_probs=True).router_probs
            rows = [
                torch.zeros(3, p.shape[-1]).index_copy(
                    0, torch.tensor([model.config.task_index(task)]), p.sum(0, keepdim=True)
                )
                for p in probs
            ]
            joint = rows if joint is None else [a + b for a, b in zip(joint, rows)]
        expected = 0.01 * sum(mutual_information_loss(m) for m in joint)
    assert float(out["mi_loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(out["mi_loss"]) < 0
