"""Mean intersection-over-union for semantic segmentation, with an ignore index."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Mean IoU over classes for semantic segmentation.

Pixels whose reference is `ignore_index` are left out of everything (their predictions too). Per class c,
over all images together: IoU_c = |pred = c and ref = c| / |pred = c or ref = c|. A class that appears in
neither predictions nor references has IoU NaN and is left out of the mean; a class predicted but absent
from the references has IoU 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of int arrays [H, W]): predicted class per pixel, one array per image.
    references (`list` of int arrays [H, W]): reference class per pixel (same shapes as predictions).
    num_labels (`int`): number of classes; required here or in `load("mean_iou", num_labels=...)`.
    ignore_index (`int`, default 255): reference value to leave out.
Returns:
    mean_iou (`float`): mean of per_category_iou over classes that are not NaN.
    mean_accuracy (`float`): mean over classes present in the references of |pred = c and ref = c| / |ref = c|.
    overall_accuracy (`float`): pixel accuracy over the pixels that are not ignored.
    per_category_iou (`np.ndarray` [num_labels]): IoU per class, NaN for absent classes.
    per_category_accuracy (`np.ndarray` [num_labels]): recall per class, NaN for classes absent from the references.
Example:
    >>> miou = moe_adapt.metrics.load("mean_iou", num_labels=3)
    >>> miou.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [255, 0]]])["mean_iou"]
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def __init__(self, num_labels=None, ignore_index=255, **kwargs):
        super().__init__(**kwargs)
        self.default_num_labels = num_labels
        self.default_ignore_index = ignore_index

    def _info(self):
        mask = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": mask, "references": mask}),
        )

    def _compute(self, predictions, references, num_labels=None, ignore_index=None):
        num_labels = num_labels if num_labels is not None else self.default_num_labels
        ignore_index = ignore_index if ignore_index is not None else self.default_ignore_index
        if num_labels is None:
            raise ValueError("mean_iou: pass num_labels (the number of classes) to compute() or to load()")
        intersect = np.zeros(num_labels, dtype=np.int64)
        area_pred = np.zeros(num_labels, dtype=np.int64)
        area_ref = np.zeros(num_labels, dtype=np.int64)
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            pred, ref = np.asarray(pred, dtype=np.int64), np.asarray(ref, dtype=np.int64)
            if pred.shape != ref.shape:
                raise ValueError(
                    f"mean_iou: image {i}: prediction shape {pred.shape} differs from reference "
                    f"shape {ref.shape}; resize predictions to the reference size first"
                )
            valid = ref != ignore_index
            pred, ref = pred[valid], ref[valid]
            for what, values in (("prediction", pred), ("reference", ref)):
                bad = (values < 0) | (values >= num_labels)
                if bad.any():
                    raise ValueError(
                        f"mean_iou: image {i}: {what} holds class ids {np.unique(values[bad])[:8].tolist()} "
                        f"outside 0..{num_labels - 1} (ignore_index {ignore_index})"
                    )
            intersect += np.bincount(pred[pred == ref], minlength=num_labels)
            area_pred += np.bincount(pred, minlength=num_labels)
            area_ref += np.bincount(ref, minlength=num_labels)
        union = area_pred + area_ref - intersect
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, intersect / np.maximum(union, 1), np.nan)
            acc = np.where(area_ref > 0, intersect / np.maximum(area_ref, 1), np.nan)
        valid_pixels = area_ref.sum()
        return {
            "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "mean_accuracy": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
            "overall_accuracy": float(intersect.sum() / valid_pixels) if valid_pixels else float("nan"),
            "per_category_iou": iou,
            "per_category_accuracy": acc,
        }
