"""Quickstart: build a small multi-task MoE ViT, classify a real image, and see which experts each task chose.

    python examples/quickstart.py

The model is untrained (random experts, zero-initialised routers with a little noise so tasks differ), so the
label is arbitrary; what this shows is the API: per-task routing, router probabilities, chosen experts, and a
Hugging Face `pipeline` over the saved folder.
"""

from __future__ import annotations

import tempfile

import torch
from PIL import Image
from transformers import pipeline

from moe_adapt import MoEViTConfig, MoEViTForImageClassification


def real_image() -> Image.Image:
    """A photo from scikit-image's sample data (installed with the dev extras); no download."""
    from skimage import data

    return Image.fromarray(data.astronaut())


def main() -> None:
    torch.manual_seed(0)
    tasks = ["objects", "scenes", "textures"]
    labels = {
        "objects": ["person", "rocket", "flag", "other"],
        "scenes": ["indoor", "outdoor", "space"],
        "textures": ["smooth", "striped", "dotted"],
    }
    config = MoEViTConfig.from_preset("mini", tasks=tasks, task_labels=labels, image_size=64)
    model = MoEViTForImageClassification(config).eval()
    with torch.no_grad():  # give each task's routers a different small preference
        for layer in model.moe_vit.moe_layers().values():
            for router in layer.router.routers.values():
                router.weight.normal_(0, 0.5)

    image = real_image()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)  # weights (safetensors), config and an image processor
        classify = pipeline("image-classification", model=folder)
        pixel_values = classify.image_processor(image, return_tensors="pt")["pixel_values"]
        print(f"pipeline on a {image.size[0]}x{image.size[1]} photo (task '{config.tasks[0]}'):", classify(image)[:2])

    names = config.moe_layer_names()
    print(f"\n{len(names)} MoE layers: {names}")
    with torch.no_grad():
        for task in tasks:
            out = model(pixel_values, task=task, output_router_probs=True)
            top = labels[task][out.logits.argmax(-1).item()]
            print(f"\ntask {task!r}: predicts {top!r}")
            for name, probs, idx in zip(names, out.router_probs, out.router_indices):
                share = torch.bincount(idx.reshape(-1), minlength=probs.shape[-1]).float() / idx.numel()
                chosen = share.topk(3).indices.tolist()
                print(
                    f"  {name:<14} experts most chosen: {chosen}  token shares "
                    f"{[round(float(v), 2) for v in share[chosen]]}  (k={idx.shape[-1]} of {probs.shape[-1]})"
                )


if __name__ == "__main__":
    main()
