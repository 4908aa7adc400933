"""Task heads of `MoEViTForMultiTask`: classification, detection (FCOS, plain torch) and semantic segmentation
(UperNet), each with `forward(backbone_output, grid)`, `loss(outputs, labels)` and `postprocess(outputs, ...)`
whose results the metrics (`moe_adapt.metrics`) take directly. No torchvision: box ops and NMS are plain torch."""

from .box_ops import batched_nms, box_area, box_iou, generalized_box_iou, nms
from .classification import ClassificationHead
from .detection import FCOSHead, decode_detections, default_size_ranges, sigmoid_focal_loss
from .factory import HEAD_CLASSES, build_head, head_options
from .postprocess import detection_references, detection_sizes, metric_references
from .pyramid import SimpleFeaturePyramid, default_feature_layers, tokens_to_map
from .segmentation import IGNORE_INDEX, PyramidPoolingModule, UperNetHead, class_maps

__all__ = [
    "HEAD_CLASSES",
    "IGNORE_INDEX",
    "ClassificationHead",
    "FCOSHead",
    "PyramidPoolingModule",
    "SimpleFeaturePyramid",
    "UperNetHead",
    "batched_nms",
    "box_area",
    "box_iou",
    "build_head",
    "class_maps",
    "decode_detections",
    "default_feature_layers",
    "default_size_ranges",
    "detection_references",
    "detection_sizes",
    "generalized_box_iou",
    "head_options",
    "metric_references",
    "nms",
    "sigmoid_focal_loss",
    "tokens_to_map",
]
