"""COCO box mean average precision (pycocotools' COCOeval), on per-image xyxy boxes."""

import contextlib
import io

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """COCO-style box mAP computed by pycocotools' COCOeval (iouType "bbox", maxDets 1/10/100,
101-point interpolated precision, IoU thresholds 0.50:0.05:0.95). Areas for small / medium / large are the
reference box areas (w * h) with COCO's limits 32² and 96²."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of dicts, one per image): `{"boxes": [[x1, y1, x2, y2], ...], "scores": [...],
        "labels": [...]}`, boxes as absolute pixels of the ORIGINAL image (map them back with
        `moe_adapt.data.scale_boxes(boxes, size, orig_size)`), any number of boxes (0 is fine).
    references (`list` of dicts, one per image): `{"boxes": [[x1, y1, x2, y2], ...], "labels": [...]}`.
    class_metrics (`bool`, default False): also return `map_per_class`.
Returns:
    map, map_50, map_75, map_small, map_medium, map_large (`float`): average precision; and
    mar_1, mar_10, mar_100 (`float`): average recall with at most 1 / 10 / 100 detections per image.
    A value is -1.0 when no reference box falls in its area range (COCO's convention).
    map_per_class (`np.ndarray` [num classes], with class_metrics): AP per label id 0..max label, -1 for
    labels without reference boxes.
Example:
    >>> m = moe_adapt.metrics.load("coco_map")
    >>> m.compute(predictions=[{"boxes": [[10, 10, 50, 50]], "scores": [0.9], "labels": [1]}],
    ...           references=[{"boxes": [[10, 10, 50, 50]], "labels": [1]}])["map"]
    1.0
"""

_STATS = [
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
]


def _boxes(value, i, what):
    boxes = np.asarray(value if value is not None else [], dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 4))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"coco_map: image {i}: {what} boxes must be [n, 4] (x1, y1, x2, y2), got shape {boxes.shape}")
    return boxes


def _annotations(boxes, labels, image_id, start_id, scores=None):
    out = []
    for j, (box, label) in enumerate(zip(boxes, labels)):
        w, h = float(box[2] - box[0]), float(box[3] - box[1])
        ann = {
            "id": start_id + j,
            "image_id": image_id,
            "category_id": int(label),
            "bbox": [float(box[0]), float(box[1]), w, h],
            "area": w * h,
            "iscrowd": 0,
        }
        if scores is not None:
            ann["score"] = float(scores[j])
        out.append(ann)
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoMap(evaluate.Metric):
    def _info(self):
        boxes = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))
        labels = datasets.Sequence(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "boxes": boxes,
                        "scores": datasets.Sequence(datasets.Value("float64")),
                        "labels": labels,
                    },
                    "references": {"boxes": boxes, "labels": labels},
                }
            ),
        )

    def _compute(self, predictions, references, class_metrics=False):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        images, gts, dts, categories = [], [], [], set()
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            p_boxes, r_boxes = _boxes(pred["boxes"], i, "predicted"), _boxes(ref["boxes"], i, "reference")
            p_labels, r_labels, scores = list(pred["labels"]), list(ref["labels"]), list(pred["scores"])
            if not len(p_boxes) == len(p_labels) == len(scores):
                raise ValueError(
                    f"coco_map: image {i}: {len(p_boxes)} predicted boxes, {len(scores)} scores and "
                    f"{len(p_labels)} labels; they must be equally many"
                )
            if len(r_boxes) != len(r_labels):
                raise ValueError(f"coco_map: image {i}: {len(r_boxes)} reference boxes but {len(r_labels)} labels")
            for what, b in (("predicted", p_boxes), ("reference", r_boxes)):
                if len(b) and ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).any():
                    raise ValueError(
                        f"coco_map: image {i}: {what} boxes must be x1, y1, x2, y2 with x2 >= x1, y2 >= y1"
                    )
            images.append({"id": i})
            gts += _annotations(r_boxes, r_labels, i, len(gts) + 1)
            dts += _annotations(p_boxes, p_labels, i, len(dts) + 1, scores)
            categories.update(int(c) for c in r_labels + p_labels)
        cats = [{"id": c} for c in sorted(categories)]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
            coco_gt, coco_dt = COCO(), COCO()
            coco_gt.dataset = {"images": images, "annotations": gts, "categories": cats}
            coco_dt.dataset = {"images": images, "annotations": dts, "categories": cats}
            coco_gt.createIndex()
            coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        out = {name: float(v) for name, v in zip(_STATS, evaluator.stats)}
        if class_metrics:
            # precision: [iou thresholds, recall points, classes, area ranges, max dets]; area "all", 100 dets.
            per_class = np.full(max(categories, default=-1) + 1, -1.0)
            precision = evaluator.eval["precision"][:, :, :, 0, -1]
            for k, cat in enumerate(evaluator.params.catIds):
                p = precision[:, :, k]
                per_class[cat] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
            out["map_per_class"] = per_class
        return out
