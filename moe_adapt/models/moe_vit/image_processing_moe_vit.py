"""`MoEViTImageProcessor`: pre-processing for every moe_adapt model and post-processing for every task type.

Pre-processing is ViT's (resize to the model's `image_size`, rescale, normalise with mean = std = 0.5, the
transforms moe_adapt trains with) on the PIL backend, so it needs no torchvision. Post-processing follows
transformers' signatures, so that its pipelines work on any moe_adapt task model:

```python
>>> from transformers import pipeline
>>> segment = pipeline("image-segmentation", model="runs/demo/extract/fashion-seg")    # a saved slice
>>> segment(image)                                     # [{"label": ..., "mask": PIL image, "score": None}, ...]
```

`import moe_adapt` registers it with `AutoImageProcessor` for `moe_vit` configs; every model's
`save_pretrained` writes one beside the weights (`default_image_processor`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import ViTImageProcessorPil

from ...heads.detection import decode_detections
from ...heads.segmentation import class_maps


class MoEViTImageProcessor(ViTImageProcessorPil):
    """ViT pre-processing plus `post_process_semantic_segmentation` and `post_process_object_detection`.

    Args (beyond `ViTImageProcessorPil`'s): `detection_nms_threshold` (class-wise NMS IoU, 0.6),
    `detection_pre_nms_top_k` (1000) and `detection_max_detections` (100): the detection head's decoding options,
    saved in `preprocessor_config.json` (`default_image_processor` copies them from the model's detection head).
    """

    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_convert_rgb = True  # grey, palette and RGBA images become RGB, as the training transforms make them

    def __init__(
        self,
        detection_nms_threshold: float = 0.6,
        detection_pre_nms_top_k: int = 1000,
        detection_max_detections: int = 100,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.detection_nms_threshold = float(detection_nms_threshold)
        self.detection_pre_nms_top_k = int(detection_pre_nms_top_k)
        self.detection_max_detections = int(detection_max_detections)

    def post_process_semantic_segmentation(self, outputs, target_sizes: Sequence[Sequence[int]] | None = None):
        """Segmentation outputs (`logits` `[batch, C, h, w]`) → one `[height, width]` LongTensor class map per
        image, at `target_sizes[i]` (the original image's (height, width)) when given, else at the model input's
        size."""
        return class_maps(outputs, target_sizes=target_sizes)

    def post_process_object_detection(
        self,
        outputs,
        threshold: float = 0.5,
        target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
        top_k: int | None = None,
    ):
        """Detection outputs (`logits`, `pred_boxes` in input pixels, `pred_centerness`) → per image
        `{"scores": [k], "labels": [k], "boxes": [k, 4]}` (xyxy, in the pixels of `target_sizes[i]` (height,
        width) when given, else of the model input): detections scoring above `threshold` after class-wise NMS, at
        most `top_k` (default `detection_max_detections`)."""
        results = decode_detections(
            outputs,
            target_sizes=target_sizes,
            score_threshold=threshold,
            nms_threshold=self.detection_nms_threshold,
            pre_nms_top_k=self.detection_pre_nms_top_k,
            max_detections=self.detection_max_detections if top_k is None else top_k,
        )
        return [{"scores": r["scores"], "labels": r["labels"], "boxes": r["boxes"]} for r in results]


def default_image_processor(config) -> MoEViTImageProcessor:
    """The image processor for a model of `config`: resize to `config.image_size`, rescale, normalise with
    mean = std = 0.5 (moe_adapt's transforms), and the first detection task's decoding options."""
    from ...heads.factory import head_options

    size = config.image_size
    options = {}
    detection = [t for t in config.tasks if config.task_types.get(t) == "detection"]
    if detection:
        head = head_options(config, detection[0])
        options = {
            "detection_nms_threshold": head["nms_threshold"],
            "detection_pre_nms_top_k": head["pre_nms_top_k"],
            "detection_max_detections": head["max_detections"],
        }
    return MoEViTImageProcessor(
        size={"height": size, "width": size},
        image_mean=[0.5] * config.num_channels,
        image_std=[0.5] * config.num_channels,
        do_convert_rgb=config.num_channels == 3,
        **options,
    )


__all__ = ["MoEViTImageProcessor", "default_image_processor"]
