"""Task heads: box ops and NMS, FCOS assignment and decoding, each head's loss falling on a tiny batch, and
post-processing in the formats the metrics take."""

from __future__ import annotations

import pytest
import torch

from moe_adapt import MoEViTConfig, MoEViTForMultiTask, metrics
from moe_adapt.heads import (
    FCOSHead,
    batched_nms,
    box_iou,
    build_head,
    default_size_ranges,
    detection_references,
    generalized_box_iou,
    head_options,
    nms,
)

TASK_TYPES = {"cls": "classification", "det": "detection", "seg": "semantic_segmentation"}


def tiny_config(**heads) -> MoEViTConfig:
    return MoEViTConfig.from_preset(
        "tiny",
        tasks=list(TASK_TYPES),
        task_types=TASK_TYPES,
        task_labels={"cls": ["a", "b", "c"], "det": ["x", "y"], "seg": ["bg", "fg"]},
        head_configs={
            "det": {"channels": 16, "num_convs": 1, "scales": [2, 1]},
            "seg": {"channels": 16, "pool_scales": [1, 2]},
            **heads,
        },
    )


# -- box ops ---------------------------------------------------------------------------------------------------
def test_box_iou_and_giou_known_values():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    iou = box_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[50 / 150, 0.0]]))
    giou = generalized_box_iou(a.expand(2, 4), b)
    # Disjoint boxes: IoU 0, enclosing box 30x30 = 900, union 200 → GIoU = -(900 - 200) / 900.
    assert torch.allclose(giou, torch.tensor([50 / 150, -700 / 900]))
    assert torch.allclose(generalized_box_iou(a, a), torch.ones(1))


def test_nms_keeps_best_of_overlapping_and_separates_classes():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0.5, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    classes = torch.tensor([0, 1, 0, 0])
    assert sorted(batched_nms(boxes, scores, classes, 0.5).tolist()) == [1, 2, 3]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


# -- FCOS ------------------------------------------------------------------------------------------------------
def test_fcos_assignment_centre_sampling_and_centerness():
    head = FCOSHead(tiny_config(), num_labels=2, channels=8, scales=[1], num_convs=1, center_radius=1.0)
    stride = head.strides[0]  # 8 px
    points = torch.tensor([[12.0, 12.0], [4.0, 4.0], [28.0, 28.0]])
    strides = torch.full((3,), stride)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [0.0, 0.0, 32.0, 32.0]])
    assigned = head.assign(points, strides, boxes)
    # The centre of box 0 takes the smaller box; (4, 4) sits on box 0's border and away from box 1's centre.
    assert assigned.tolist() == [0, -1, -1]
    ctr = FCOSHead.centerness_target(points[:1], boxes[:1])
    assert torch.allclose(ctr, torch.ones(1))
    assert default_size_ranges([4, 8])[0] == (0.0, 32.0)


def test_fcos_postprocess_rescales_to_original_size_and_feeds_coco_map():
    head = build_head(tiny_config(), "det")
    n = 4
    outputs = {
        "logits": torch.full((1, n, 2), -10.0),
        "pred_centerness": torch.full((1, n), 10.0),
        "pred_boxes": torch.tensor([[[2.0, 2.0, 10.0, 12.0], [2.5, 2.0, 10.0, 12.0], [20, 20, 30, 30], [0, 0, 1, 1]]]),
        "input_size": (32, 32),
    }
    outputs["logits"][0, 0, 1] = 5.0  # best box, class 1
    outputs["logits"][0, 1, 1] = 4.0  # its duplicate: suppressed by NMS
    outputs["logits"][0, 2, 0] = 3.0
    preds = head.postprocess(outputs, target_sizes=[(64, 64)], input_sizes=[(32, 32)])
    assert len(preds) == 1 and set(preds[0]) == {"boxes", "scores", "labels"}
    assert preds[0]["labels"].tolist() == [1, 0]
    assert torch.allclose(preds[0]["boxes"][0], torch.tensor([4.0, 4.0, 20.0, 24.0]))  # ×2 to the original
    refs = detection_references(
        [
            {
                "boxes": torch.tensor([[2.0, 2.0, 10.0, 12.0], [20, 20, 30, 30]]),
                "class_labels": torch.tensor([1, 0]),
                "size": torch.tensor([32, 32]),
                "orig_size": torch.tensor([64, 64]),
            }
        ]
    )
    result = metrics.load("coco_map").compute(
        predictions=[{k: v.tolist() for k, v in p.items()} for p in preds],
        references=[{k: v.tolist() for k, v in r.items()} for r in refs],
    )
    assert result["map"] == pytest.approx(1.0)


# -- every head learns, and post-processes into the metrics' formats ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    boxes = [
        torch.tensor([[4.0, 4.0, 20.0, 22.0]]),
        torch.tensor([[10.0, 2.0, 30.0, 14.0], [2, 18, 12, 30]]),
        torch.tensor([[0.0, 0.0, 16.0, 16.0]]),
        torch.zeros(0, 4),
    ]
    classes = [torch.tensor([0]), torch.tensor([1, 0]), torch.tensor([1]), torch.zeros(0, dtype=torch.long)]
    det = [
        {"boxes": b, "class_labels": c, "size": torch.tensor([32, 32]), "orig_size": torch.tensor([48, 48])}
        for b, c in zip(boxes, classes)
    ]
    seg = torch.zeros(4, 32, 32, dtype=torch.long)
    for i, (top, left) in enumerate([(4, 4), (8, 16), (16, 2), (12, 12)]):
        seg[i, top : top + 14, left : left + 14] = 1
    x = x + 2.0 * seg[:, None].float()  # the foreground is brighter: learnable
    seg[:, :2] = 255  # ignored rows
    return {"cls": (x, torch.tensor([0, 1, 2, 1])), "det": (x, det), "seg": (x, seg)}


@pytest.mark.parametrize("task", ["cls", "det", "seg"])
def test_head_loss_decreases_on_a_tiny_batch(task, tiny_batches):
    torch.manual_seed(0)
    model = MoEViTForMultiTask(tiny_config())
    x, labels = tiny_batches[task]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(x, task=task, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_postprocess_formats_are_what_the_metrics_take(tiny_batches):
    torch.manual_seed(0)
    model = MoEViTForMultiTask(tiny_config()).eval()
    x, labels = tiny_batches["cls"]
    pred = model.postprocess(model(x, task="cls"))
    assert pred.dtype == torch.long and pred.shape == (4,)
    assert 0 <= metrics.load("accuracy").compute(predictions=pred.tolist(), references=labels.tolist())["accuracy"] <= 1

    x, det = tiny_batches["det"]
    preds = model.postprocess(model(x, task="det"), target_sizes=[(48, 48)] * 4, input_sizes=[(32, 32)] * 4)
    for p in preds:
        assert p["boxes"].shape[-1] == 4 and p["boxes"].shape[0] == p["scores"].shape[0] == p["labels"].shape[0]
        assert p["boxes"].shape[0] <= 100 and (p["boxes"][:, 2:] <= 48).all() and (p["boxes"] >= 0).all()
        assert (p["scores"][:-1] >= p["scores"][1:]).all()
    result = metrics.load("coco_map").compute(
        predictions=[{k: v.tolist() for k, v in p.items()} for p in preds],
        references=[{k: v.tolist() for k, v in r.items()} for r in detection_references(det)],
    )
    assert 0 <= result["map"] <= 1

    x, seg = tiny_batches["seg"]
    masks = model.postprocess(model(x, task="seg"), target_sizes=[(40, 36)] * 4)
    assert [tuple(m.shape) for m in masks] == [(40, 36)] * 4 and masks[0].dtype == torch.long
    full = model.postprocess(model(x, task="seg"))
    miou = metrics.load("mean_iou", num_labels=2).compute(
        predictions=[m.numpy() for m in full], references=[m.numpy() for m in seg]
    )
    assert 0 <= miou["mean_iou"] <= 1


def test_head_options_come_from_the_config_and_unknown_ones_fail():
    config = tiny_config()
    assert head_options(config, "det")["channels"] == 16 and head_options(config, "det")["max_detections"] == 100
    assert head_options(config, "cls") == {"dropout": 0.0, "label_smoothing": 0.0}
    with pytest.raises(ValueError, match="unknown option.*'chanels'"):
        build_head(tiny_config(seg={"chanels": 8}), "seg")


# -- one image -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [8, 16, 32, 48, 64])
def test_dense_heads_run_on_a_single_image_in_train_and_eval_mode(channels):
    """The pyramid pooling module's 1-bin stage normalises a 1×1 map: with one channel per GroupNorm group that is a
    single value, which PyTorch refuses for one image (and would turn into the bias for any batch)."""
    torch.manual_seed(0)
    model = MoEViTForMultiTask(
        tiny_config(
            seg={"channels": channels, "pool_scales": [1, 2]},
            det={"channels": channels, "num_convs": 1, "scales": [1, 0.25]},
        )
    )
    x = torch.randn(1, 3, 32, 32)
    for training in (True, False):
        model.train(training)
        seg = model(x, task="seg", labels=torch.zeros(1, 32, 32, dtype=torch.long))
        assert seg.logits.shape[0] == 1 and torch.isfinite(seg.logits).all() and torch.isfinite(seg.loss)
        det = model(x, task="det")
        assert det.logits.shape[0] == 1 and torch.isfinite(det.logits).all()
    # the pooled stage still depends on its input (a one-channel group would output its bias whatever the image)
    pooled = model.heads["seg"].ppm.stages[0]
    a, b = pooled(torch.randn(1, channels, 1, 1)), pooled(torch.randn(1, channels, 1, 1))
    assert not torch.equal(a, b)


def test_group_norm_groups_hold_at_least_two_channels():
    from moe_adapt.heads.pyramid import group_norm

    for channels in range(2, 300):
        norm = group_norm(channels)
        assert norm.num_groups <= 32 and channels // norm.num_groups >= 2, channels
        most = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        if most < channels:  # the groups every head had before: trained heads load unchanged
            assert norm.num_groups == most, channels
    assert [group_norm(c).num_groups for c in (2, 4, 8, 16, 32, 48, 64, 256)] == [1, 1, 2, 4, 8, 16, 32, 32]
    with pytest.raises(ValueError, match="at least 2 channels"):
        group_norm(1)
