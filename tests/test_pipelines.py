"""A slice is a first-class transformers model: a one-task slice of a multi-task model, saved, then used in a fresh
process through transformers' public API only (`AutoModelFor...`, `AutoImageProcessor`, `pipeline(...)`), gives
the multi-task parent's own predictions on PIL images of several sizes; any task class loads the trained heads of
any checkpoint that has them, or fails naming the head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import trained_like
from PIL import Image

import moe_adapt  # noqa: F401
from moe_adapt import (
    MoEViTConfig,
    MoEViTForImageClassification,
    MoEViTForMultiTask,
    MoEViTForObjectDetection,
    MoEViTForSemanticSegmentation,
)
from moe_adapt.analysis import collect_expert_usage, select_experts
from moe_adapt.models.moe_vit import default_image_processor
from moe_adapt.surgery import extract_submodel

TYPES = {"cls": "classification", "det": "detection", "seg": "semantic_segmentation"}
LABELS = {"cls": ["cat", "dog", "owl"], "det": ["one", "two"], "seg": ["ground", "sky", "edge"]}
SIZES = [(40, 50), (32, 32), (77, 31)]  # (width, height) of the PIL images
TASK_CLASSES = {
    "cls": MoEViTForImageClassification,
    "det": MoEViTForObjectDetection,
    "seg": MoEViTForSemanticSegmentation,
}


def parent_model(seed=0) -> MoEViTForMultiTask:
    torch.manual_seed(seed)
    config = MoEViTConfig.from_preset(
        "tiny",
        tasks=list(TYPES),
        task_types=TYPES,
        task_labels=LABELS,
        head_configs={
            "det": {"channels": 16, "num_convs": 1, "scales": [2, 1]},
            "seg": {"channels": 16, "pool_scales": [1, 2]},
        },
    )
    model = trained_like(MoEViTForMultiTask(config), seed)
    with torch.no_grad():  # detection scores spread over (0, 1), so that some clear any threshold
        model.heads["det"].cls_logits.bias.normal_(0, 2.0)
    return model.eval()


def images() -> list[Image.Image]:
    g = np.random.default_rng(0)
    return [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The parent and its one-task slices (every expert a task routes to kept: routed slices, exact), saved."""
    root = tmp_path_factory.mktemp("pipelines")
    parent = parent_model()
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    paths = {}
    for task in TYPES:
        selection = select_experts(collect_expert_usage(parent, calib, task), "threshold", threshold=0.0)
        sub = extract_submodel(parent, selection, tasks=[task])
        assert type(sub) is TASK_CLASSES[task]
        sub.save_pretrained(root / task)
        paths[task] = str(root / task)
    parent.save_pretrained(root / "parent")
    return parent, paths, str(root / "parent")


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from PIL import Image
    import moe_adapt  # registers the classes; nothing else of moe_adapt is used below
    from transformers import (AutoImageProcessor, AutoModelForImageClassification, AutoModelForObjectDetection,
                              AutoModelForSemanticSegmentation, pipeline)

    paths, sizes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    g = np.random.default_rng(0)
    images = [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    out = {"classes": {}, "grey": None}
    for task, auto in (("cls", AutoModelForImageClassification), ("det", AutoModelForObjectDetection),
                       ("seg", AutoModelForSemanticSegmentation)):
        out["classes"][task] = [type(auto.from_pretrained(paths[task])).__name__,
                                type(AutoImageProcessor.from_pretrained(paths[task])).__name__]
    classify = pipeline("image-classification", model=paths["cls"])
    out["cls"] = [classify(im, top_k=1)[0] for im in images]
    detect = pipeline("object-detection", model=paths["det"])
    out["det"] = [detect(im, threshold=0.3) for im in images]
    segment = pipeline("image-segmentation", model=paths["seg"])
    out["seg"] = [[{"label": s["label"], "mask": np.asarray(s["mask"]).tolist()} for s in segment(im)] for im in images]
    grey = Image.fromarray(g.integers(0, 256, (20, 24), dtype=np.uint8))  # mode "L", through the image processor
    out["grey"] = list(AutoImageProcessor.from_pretrained(paths["cls"])(grey, return_tensors="pt")["pixel_values"].shape)
    print("RESULT " + json.dumps(out))
    """
)


def run_fresh(paths: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, json.dumps(paths), json.dumps(SIZES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "is not supported for" not in proc.stderr  # transformers' pipelines accept the classes without a warning
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@torch.no_grad()
def parent_predictions(parent: MoEViTForMultiTask) -> dict:
    """The parent's own predictions on the same images, through its own forward and post-processing."""
    processor = default_image_processor(parent.config)
    result = {"cls": [], "det": [], "seg": []}
    for im in images():
        x = processor(im, return_tensors="pt")["pixel_values"]
        size = [(im.height, im.width)]
        probs = parent(x, task="cls").logits.softmax(-1)[0]
        result["cls"].append({"label": LABELS["cls"][int(probs.argmax())], "score": float(probs.max())})
        result["det"].append(parent.postprocess(parent(x, task="det"), target_sizes=size, score_threshold=0.3)[0])
        result["seg"].append(parent.postprocess(parent(x, task="seg"), target_sizes=size)[0])
    return result


@pytest.mark.slow
def test_three_pipelines_in_a_fresh_process_give_the_parents_predictions(saved):
    parent, paths, _ = saved
    fresh = run_fresh(paths)
    assert fresh["classes"] == {
        "cls": ["MoEViTForImageClassification", "MoEViTImageProcessor"],
        "det": ["MoEViTForObjectDetection", "MoEViTImageProcessor"],
        "seg": ["MoEViTForSemanticSegmentation", "MoEViTImageProcessor"],
    }
    assert fresh["grey"] == [1, 3, 32, 32]  # a grey image becomes RGB, as in training
    want = parent_predictions(parent)
    for got, exp in zip(fresh["cls"], want["cls"]):  # same top-1 label (a name from the config) and score
        assert got["label"] == exp["label"] and got["score"] == pytest.approx(exp["score"], abs=1e-4)
    assert sum(len(d) for d in fresh["det"]) > 0  # the comparison below is not vacuous
    for got, exp in zip(fresh["det"], want["det"]):  # same boxes, scores and labels, in the original pixels
        assert [d["label"] for d in got] == [LABELS["det"][int(i)] for i in exp["labels"]]
        assert [d["score"] for d in got] == pytest.approx(exp["scores"].tolist(), abs=1e-4)
        boxes = [[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in got]
        assert np.abs(np.array(boxes) - exp["boxes"].round().numpy()).max(initial=0) <= 1  # the pipeline rounds
    for (w, h), got, exp in zip(SIZES, fresh["seg"], want["seg"]):  # the same class map, one mask per class present
        assert sorted(s["label"] for s in got) == sorted(LABELS["seg"][int(c)] for c in exp.unique())
        for s in got:
            mask = np.array(s["mask"]) > 0
            assert mask.shape == (h, w)
            assert np.array_equal(mask, (exp == LABELS["seg"].index(s["label"])).numpy())


def test_any_task_class_loads_the_trained_heads_of_a_multitask_checkpoint(saved):
    parent, _, parent_dir = saved
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for task, cls in TASK_CLASSES.items():
        model = cls.from_pretrained(parent_dir).eval()
        assert list(model.heads) == [task] and model.default_task == task
        assert model.config.id2label == dict(enumerate(LABELS[task]))
        with torch.no_grad():
            assert torch.equal(model(x).logits, parent(x, task=task).logits)


def test_a_missing_head_is_an_error_naming_it_or_a_fresh_head_when_asked(saved, tmp_path):
    parent, paths, _ = saved
    with pytest.raises(ValueError, match=r"MoEViTForObjectDetection needs a detection task.*'cls': 'classification'"):
        MoEViTForObjectDetection.from_pretrained(paths["cls"])
    base = parent.moe_vit
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"no trained head for task\(s\) \['cls'\].*ignore_mismatched_sizes=True"):
        MoEViTForImageClassification.from_pretrained(tmp_path / "base")
    fresh = MoEViTForImageClassification.from_pretrained(tmp_path / "base", ignore_mismatched_sizes=True)
    assert torch.isfinite(fresh.heads["cls"].classifier.weight).all()


def test_segmentation_and_detection_outputs_are_transformers_outputs(saved):
    from transformers.modeling_outputs import SemanticSegmenterOutput

    parent, paths, _ = saved
    seg = MoEViTForSemanticSegmentation.from_pretrained(paths["seg"]).eval()
    out = seg(torch.randn(1, 3, 32, 32), labels=torch.zeros(1, 32, 32, dtype=torch.long))
    assert isinstance(out, SemanticSegmenterOutput) and out.loss.dim() == 0 and out.logits.shape[:2] == (1, 3)
    det = MoEViTForObjectDetection.from_pretrained(paths["det"]).eval()
    out = det(torch.randn(3, 3, 32, 32))
    assert out.logits.shape[0] == 3 and out.pred_boxes.shape[-1] == 4 and out.input_size == (32, 32)


@pytest.mark.parametrize("keep", ["routed", "dense"])
def test_every_slice_exports_with_a_dynamic_batch_and_eager_outputs(saved, keep):
    """torch.export on routed slices (more than k experts kept: under export their MoE layers run every kept
    expert weighted by the gates, static shapes) and on k-expert slices (dense layers); the exported program
    runs at other batch sizes and matches eager mode within 1e-5."""
    parent, paths, _ = saved
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    batch = torch.export.Dim("batch", min=1, max=1024)
    for task in TYPES:
        if keep == "routed":
            sub = TASK_CLASSES[task].from_pretrained(paths[task]).eval()
            cfg = sub.config
            assert max(cfg.attn_experts) > cfg.attn_top_k or max(cfg.mlp_experts) > cfg.mlp_top_k  # routed layers
        else:
            selection = select_experts(collect_expert_usage(parent, calib, task), "top_n")
            sub = extract_submodel(parent, selection, tasks=[task]).eval()
        program = torch.export.export(sub, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},)).module()
        for n in (1, 3):
            x = torch.randn(n, 3, 32, 32)
            with torch.no_grad():
                want, got = sub(x), program(x)
            for field in ("logits", "pred_boxes"):
                if getattr(want, field, None) is not None:
                    torch.testing.assert_close(got[field], want[field], atol=1e-5, rtol=1e-5, msg=f"{task} {field}")


def test_a_task_model_leaves_a_shared_config_as_it_was():
    config = parent_model().config
    before = dict(config.id2label)
    classify, segment = MoEViTForImageClassification(config), MoEViTForSemanticSegmentation(config)
    assert config.id2label == before
    assert classify.config.id2label == dict(enumerate(LABELS["cls"]))
    assert segment.config.id2label == dict(enumerate(LABELS["seg"]))


def test_old_classifier_heads_are_refused_with_their_own_message(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, paths, _ = saved
    folder = tmp_path / "old"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_bytes((__import__("pathlib").Path(paths["cls"]) / name).read_bytes())
    state = load_file(f"{paths['cls']}/model.safetensors")
    old = {k: v for k, v in state.items() if not k.startswith("heads.")}
    old["classifiers.cls.weight"] = state["heads.cls.classifier.weight"]
    old["classifiers.cls.bias"] = state["heads.cls.classifier.bias"]
    save_file(old, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"classification heads in the layout of moe_adapt before 0\.2 \(classifiers\.cls"
    ):
        MoEViTForImageClassification.from_pretrained(folder)


def test_trainer_scales_our_losses_itself(tmp_path):
    """Our forwards take **kwargs but average the loss themselves: transformers' Trainer must then divide by the
    accumulation steps and not multiply by the process count, as for any such model."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert (
        Trainer(model=MoEViTForImageClassification(parent_model().config), args=args).model_accepts_loss_kwargs is False
    )
