"""The packaged evaluate metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_adapt import metrics
from moe_adapt.data import build_transforms, load_task_dataset, scale_boxes


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match=r"unknown metric 'f1'.*accuracy"):
        metrics.load("f1")


# --- accuracy --------------------------------------------------------------------------------------


def test_accuracy_over_batches():
    acc = metrics.load("accuracy")
    acc.add_batch(predictions=[0, 1, 2], references=[0, 1, 1])
    acc.add_batch(predictions=torch.tensor([3, 3]), references=torch.tensor([3, 0]))
    assert acc.compute() == {"accuracy": pytest.approx(3 / 5)}


# --- mean_iou --------------------------------------------------------------------------------------


def test_mean_iou_hand_computed_with_ignore_and_absent_class():
    # valid pixels (ref != 255): pred [0, 1, 1], ref [0, 1, 0]
    # class 0: inter 1, union 2 → 0.5; class 1: inter 1, union 2 → 0.5; class 2: absent → NaN, left out
    out = metrics.load("mean_iou", num_labels=3).compute(
        predictions=[np.array([[0, 1], [1, 1]])], references=[np.array([[0, 1], [255, 0]])]
    )
    assert out["mean_iou"] == pytest.approx(0.5)
    assert out["overall_accuracy"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(out["per_category_iou"], [0.5, 0.5, np.nan])
    np.testing.assert_allclose(out["per_category_accuracy"], [0.5, 1.0, np.nan])
    assert out["mean_accuracy"] == pytest.approx(0.75)


def test_mean_iou_aggregates_pixels_over_images_of_different_sizes():
    # image 1: 2x2 all class 1, correct. image 2: 1x1, ref 1 predicted 0.
    # class 1: inter 4, union 5 → 0.8; class 0: inter 0, union 1 → 0; class 2 absent → NaN
    miou = metrics.load("mean_iou")
    miou.add_batch(predictions=[np.ones((2, 2), int)], references=[np.ones((2, 2), int)])
    miou.add_batch(predictions=[[[0]]], references=[[[1]]])
    out = miou.compute(num_labels=3)
    np.testing.assert_allclose(out["per_category_iou"], [0.0, 0.8, np.nan])
    assert out["mean_iou"] == pytest.approx(0.4) and out["overall_accuracy"] == pytest.approx(0.8)


def test_mean_iou_predicted_class_absent_from_reference_counts_as_zero():
    out = metrics.load("mean_iou", num_labels=3).compute(predictions=[[[2, 2]]], references=[[[0, 0]]])
    np.testing.assert_allclose(out["per_category_iou"], [0.0, np.nan, 0.0])
    assert out["mean_iou"] == 0.0


def test_mean_iou_custom_ignore_index_and_all_ignored():
    out = metrics.load("mean_iou", num_labels=2).compute(predictions=[[[1, 1]]], references=[[[0, 1]]], ignore_index=0)
    assert out["mean_iou"] == 1.0 and out["overall_accuracy"] == 1.0
    out = metrics.load("mean_iou", num_labels=2).compute(predictions=[[[1, 1]]], references=[[[255, 255]]])
    assert math.isnan(out["mean_iou"]) and math.isnan(out["overall_accuracy"])


def test_mean_iou_errors_name_the_image():
    with pytest.raises(ValueError, match=r"image 1: prediction shape \(1, 2\) differs"):
        metrics.load("mean_iou", num_labels=2).compute(predictions=[[[0]], [[0, 1]]], references=[[[0]], [[0]]])
    with pytest.raises(ValueError, match=r"image 0: reference holds class ids \[5\]"):
        metrics.load("mean_iou", num_labels=2).compute(predictions=[[[0]]], references=[[[5]]])
    with pytest.raises(ValueError, match="pass num_labels"):
        metrics.load("mean_iou").compute(predictions=[[[0]]], references=[[[0]]])


# --- coco_map --------------------------------------------------------------------------------------


def _pred(boxes, scores, labels):
    return {"boxes": boxes, "scores": scores, "labels": labels}


def _ref(boxes, labels):
    return {"boxes": boxes, "labels": labels}


def test_coco_map_perfect_predictions():
    out = metrics.load("coco_map").compute(
        predictions=[_pred([[10, 10, 50, 50], [0, 0, 5, 8]], [0.9, 0.3], [1, 0]), _pred([[1, 2, 3, 4]], [0.5], [0])],
        references=[_ref([[10, 10, 50, 50], [0, 0, 5, 8]], [1, 0]), _ref([[1, 2, 3, 4]], [0])],
    )
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "mar_100"):  # 40x40 box: medium
        assert out[key] == pytest.approx(1.0), key
    assert out["map_large"] == -1.0  # no reference box above 96² pixels


def test_coco_map_iou_062_counts_at_three_of_ten_thresholds():
    # IoU = (100 * 62) / (100 * 100) = 0.62: a match at thresholds 0.50, 0.55, 0.60 only → mAP = 3 / 10
    out = metrics.load("coco_map").compute(
        predictions=[_pred([[0, 0, 100, 62]], [0.8], [3])], references=[_ref([[0, 0, 100, 100]], [3])]
    )
    assert out["map"] == pytest.approx(0.3)
    assert out["map_50"] == pytest.approx(1.0) and out["map_75"] == 0.0
    assert out["map_large"] == pytest.approx(0.3) and out["map_small"] == -1.0  # area 10000 > 96²


def test_coco_map_false_positive_ranked_first_halves_precision():
    # ranked: FP (0.9) then TP (0.8) → precision 1/2 at every recall level → AP = 0.5
    out = metrics.load("coco_map").compute(
        predictions=[_pred([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])],
        references=[_ref([[0, 0, 10, 10]], [0])],
    )
    assert out["map"] == pytest.approx(0.5) and out["map_small"] == pytest.approx(0.5)
    assert out["mar_1"] == 0.0 and out["mar_10"] == pytest.approx(1.0)


def test_coco_map_empty_predictions_and_wrong_labels_score_zero():
    refs = [_ref([[0, 0, 10, 10]], [0]), _ref([], [])]
    empty = metrics.load("coco_map").compute(predictions=[_pred([], [], []), _pred([], [], [])], references=refs)
    assert empty["map"] == 0.0 and empty["mar_100"] == 0.0
    wrong = metrics.load("coco_map").compute(
        predictions=[_pred([[0, 0, 10, 10]], [0.9], [1]), _pred([], [], [])], references=refs
    )
    assert wrong["map"] == 0.0


def test_coco_map_classes_absent_from_an_image_and_per_class():
    # class 0 only in image 0, class 2 only in image 1; class 1 is predicted but never in a reference
    out = metrics.load("coco_map").compute(
        predictions=[_pred([[0, 0, 10, 10]], [0.9], [0]), _pred([[5, 5, 20, 20], [0, 0, 3, 3]], [0.7, 0.95], [2, 1])],
        references=[_ref([[0, 0, 10, 10]], [0]), _ref([[5, 5, 20, 20]], [2])],
        class_metrics=True,
    )
    assert out["map"] == pytest.approx(1.0)  # COCO leaves classes without references out of the mean
    np.testing.assert_allclose(out["map_per_class"], [1.0, -1.0, 1.0])


def test_coco_map_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="image 0: 1 predicted boxes, 2 scores and 1 labels"):
        metrics.load("coco_map").compute(
            predictions=[_pred([[0, 0, 1, 1]], [0.1, 0.2], [0])], references=[_ref([], [])]
        )


def test_coco_map_on_loader_targets_mapped_back_to_the_original_size(mini_specs):
    # the references from the dataset, resized to 48 px and mapped back, are perfect predictions
    spec = mini_specs["digits-det"]
    resized = load_task_dataset(spec, "test", transform=build_transforms("detection", 48, train=False))
    original = load_task_dataset(spec, "test", transform=build_transforms("detection", None, train=False))
    coco = metrics.load("coco_map")
    for i in range(20):
        t, ref = resized[i]["labels"], original[i]["labels"]
        boxes = scale_boxes(t["boxes"], t["size"], t["orig_size"])
        coco.add(
            prediction=_pred(boxes.numpy(), np.linspace(1, 0.5, len(boxes)), t["class_labels"]),
            reference=_ref(ref["boxes"], ref["class_labels"]),
        )
    out = coco.compute()
    assert out["map"] == pytest.approx(1.0)
