"""`moe_adapt.metrics.evaluate` on a tiny three-task model and the mini benchmark: its numbers equal the metrics
computed by hand from the model's own post-processed predictions, whatever the batching; it restores train mode;
it reads a peft-wrapped model, a slice and (two gloo processes) an accelerate-prepared one."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_two_processes, trained_like
from torch.utils.data import DataLoader, Subset

from moe_adapt import MoEViTConfig, MoEViTForMultiTask, metrics
from moe_adapt.data import build_transforms, collate_fn_for, load_task_dataset, scale_boxes
from moe_adapt.metrics import PRIMARY_METRIC, evaluate

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"fashion": "classification", "digits-det": "detection", "fashion-seg": "semantic_segmentation"}
NUM_IMAGES = 11  # batches of 4 leave an odd last batch of 3


def tiny_model(mini_specs, seed: int = 0) -> MoEViTForMultiTask:
    """The tiny preset with one head per mini task, routers randomised. The detection head scores every class
    alike (zero class weights, class probability 0.3), so that each random box is offered under the right class
    too: some then overlap a digit at IoU >= 0.5 and the metric has matches to count."""
    torch.manual_seed(seed)
    config = MoEViTConfig.from_preset(
        "tiny",
        tasks=list(TASKS),
        task_types=TASKS,
        task_labels={t: list(mini_specs[t].label_names) for t in TASKS},
        head_configs={
            "digits-det": {"channels": 16, "num_convs": 1, "prior_prob": 0.3},
            "fashion-seg": {"channels": 16},
        },
    )
    model = trained_like(MoEViTForMultiTask(config), seed=seed)
    torch.nn.init.zeros_(model.heads["digits-det"].cls_logits.weight)
    return model


def eval_items(spec, image_size=32):
    ds = load_task_dataset(spec, spec.eval_split, transform=build_transforms(spec.task_type, image_size, train=False))
    return Subset(ds, range(NUM_IMAGES))


def loader(spec, batch_size):
    return DataLoader(eval_items(spec), batch_size=batch_size, collate_fn=collate_fn_for(spec.task_type))


@pytest.fixture(scope="module")
def model(mini_specs):
    return tiny_model(mini_specs)


def hand_predictions(model, items, task, batch_size, **postprocess_kwargs):
    """The model's post-processed prediction for each image, batched as the evaluator's loader batches them (so the
    forward is bit-identical) but without it: stacked pixels, `postprocess` called here. `postprocess_kwargs`:
    `{name: fn(item)}`, collected per image."""
    preds = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = [items[i] for i in range(start, min(start + batch_size, len(items)))]
            out = model(torch.stack([it["pixel_values"] for it in chunk]), task=task)
            kwargs = {k: [fn(it) for it in chunk] for k, fn in postprocess_kwargs.items()}
            preds += list(model.postprocess(out, **kwargs))
    return preds


# --- each task type against the metric computed by hand ---------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4])
def test_classification_equals_hand_accuracy(model, mini_specs, batch_size):
    items = eval_items(mini_specs["fashion"])
    preds = [int(p) for p in hand_predictions(model, items, "fashion", batch_size)]
    labels = [int(item["labels"]) for item in items]
    result = evaluate(model, loader(mini_specs["fashion"], batch_size), "fashion")
    assert result == {"accuracy": pytest.approx(np.mean(np.array(preds) == np.array(labels)), abs=1e-12)}
    assert result.primary == "accuracy" and result.score == result["accuracy"] and result.num_samples == NUM_IMAGES
    assert 0 < len(set(preds)) and json.loads(json.dumps(result)) == dict(result)  # a plain dict of floats


@pytest.mark.parametrize("batch_size", [1, 4])
def test_segmentation_equals_hand_mean_iou(model, mini_specs, batch_size):
    spec = mini_specs["fashion-seg"]
    items = eval_items(spec)
    preds = hand_predictions(model, items, "fashion-seg", batch_size, target_sizes=lambda it: it["labels"].shape)
    num = len(spec.label_names)
    inter, union, ref_area = np.zeros(num), np.zeros(num), np.zeros(num)
    for pred, item in zip(preds, items):
        pred, ref = pred.numpy().ravel(), item["labels"].numpy().ravel()
        pred, ref = pred[ref != 255], ref[ref != 255]
        for c in range(num):
            inter[c] += np.sum((pred == c) & (ref == c))
            union[c] += np.sum((pred == c) | (ref == c))
            ref_area[c] += np.sum(ref == c)
    present = union > 0
    result = evaluate(model, loader(spec, batch_size), "fashion-seg")
    assert set(result) == {"mean_iou", "mean_accuracy", "overall_accuracy"} and result.primary == "mean_iou"
    assert result["mean_iou"] == pytest.approx(np.mean(inter[present] / union[present]), abs=1e-12)
    assert result["overall_accuracy"] == pytest.approx(inter.sum() / ref_area.sum(), abs=1e-12)
    assert 0 < result["mean_iou"] < 1


@pytest.mark.parametrize("batch_size", [1, 4])
def test_detection_equals_coco_map_of_the_predictions_on_original_images(model, mini_specs, batch_size):
    spec = mini_specs["digits-det"]
    items = eval_items(spec)
    original = load_task_dataset(spec, spec.eval_split, transform=build_transforms("detection", None, train=False))
    preds = hand_predictions(model, items, "digits-det", batch_size)  # boxes in the 32-pixel input
    coco = metrics.load("coco_map")
    for i, (pred, item) in enumerate(zip(preds, items)):
        target = item["labels"]
        boxes = scale_boxes(pred["boxes"], target["size"], target["orig_size"])  # → the 64-pixel original
        coco.add(
            prediction={"boxes": boxes.numpy(), "scores": pred["scores"].numpy(), "labels": pred["labels"].numpy()},
            reference={
                "boxes": original[i]["labels"]["boxes"].numpy(),
                "labels": original[i]["labels"]["class_labels"].numpy(),
            },
        )
    expected = coco.compute()
    result = evaluate(model, loader(spec, batch_size), "digits-det")
    assert result.primary == "map" and set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    assert result["map_50"] > 0  # the detections are scored, not all missed


# --- limits, modes, wrappers ----------------------------------------------------------------------------------


def test_max_samples_cuts_the_batch_that_crosses_it_and_max_batches_stops(model, mini_specs):
    spec = mini_specs["fashion-seg"]
    first5 = DataLoader(Subset(eval_items(spec), range(5)), batch_size=5, collate_fn=collate_fn_for(spec.task_type))
    cut = evaluate(model, loader(spec, 4), "fashion-seg", max_samples=5)
    assert cut == evaluate(model, first5, "fashion-seg") and cut.num_samples == 5
    two = evaluate(model, loader(spec, 2), "fashion-seg", max_batches=2)
    first4 = DataLoader(Subset(eval_items(spec), range(4)), batch_size=4, collate_fn=collate_fn_for(spec.task_type))
    assert two == evaluate(model, first4, "fashion-seg") and two.num_samples == 4


def test_train_mode_is_restored_module_by_module(mini_specs):
    model = tiny_model(mini_specs).train()
    model.heads["fashion"].eval()  # a caller's frozen part stays as it was
    seen = []
    handle = model.moe_vit.register_forward_hook(
        lambda m, args, out: seen.append((m.training, torch.is_inference_mode_enabled()))
    )
    try:
        evaluate(model, loader(mini_specs["fashion"], 4), "fashion")
    finally:
        handle.remove()
    assert seen == [(False, True)] * 3  # ran in eval mode, without autograd
    assert model.training and model.moe_vit.training and not model.heads["fashion"].training
    assert model.heads["digits-det"].training
    batch = next(iter(loader(mini_specs["fashion-seg"], 2)))  # training goes on after an evaluation mid-run
    model(batch["pixel_values"], task="fashion-seg", labels=batch["labels"]).loss.backward()
    assert model.heads["fashion-seg"].classifier.weight.grad is not None


def test_wrong_task_names_it_and_the_valid_tasks(model, mini_specs):
    with pytest.raises(
        ValueError, match=r"has no task 'fashoin'; its tasks are \['fashion', 'digits-det', 'fashion-seg'\]"
    ):
        evaluate(model, loader(mini_specs["fashion"], 4), "fashoin")


def test_bad_batches_and_models_get_one_clear_error(model, mini_specs):
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"batch 0 of task 'fashion' is a tuple; expected a dict with 'pixel_values'"):
        evaluate(model, [(images, torch.tensor([0, 1]))], "fashion")
    with pytest.raises(ValueError, match=r"needs a moe_adapt task model .* got MoEViTModel"):
        evaluate(model.moe_vit, [{"pixel_values": images, "labels": torch.tensor([0, 1])}], "fashion")
    with pytest.raises(ValueError, match=r"data of task 'fashion' gave no labelled sample"):
        evaluate(model, [], "fashion")


def test_peft_wrapped_model_and_slice_score_their_own_predictions(mini_specs):
    from moe_adapt.adaptation.lora import apply_lora
    from moe_adapt.analysis import collect_expert_usage, select_experts
    from moe_adapt.surgery import extract_submodel

    model = tiny_model(mini_specs)
    spec = mini_specs["fashion"]
    plain = evaluate(model, loader(spec, 4), "fashion")
    usage = collect_expert_usage(model, loader(spec, 4), task="fashion")
    sub = extract_submodel(model, select_experts(usage, "top_n"))
    items = eval_items(spec)
    sliced = evaluate(sub, loader(spec, 4), "fashion")
    hand = np.mean([int(p) == int(it["labels"]) for p, it in zip(hand_predictions(sub, items, "fashion", 4), items)])
    assert type(sub).__name__ == "MoEViTForImageClassification" and sliced["accuracy"] == pytest.approx(hand, abs=1e-12)
    peft_model = apply_lora(model, verbose=False)  # fresh LoRA factors (B = 0): the outputs of the model itself
    assert type(peft_model).__name__.startswith("Peft")
    assert evaluate(peft_model, loader(spec, 4), "fashion") == plain


# --- its callers: slice verification and budget curves ---------------------------------------------------------


@pytest.mark.parametrize("task", ["digits-det", "fashion-seg"])
def test_verify_submodel_reports_evaluate_of_parent_and_slice(model, mini_specs, task):
    from moe_adapt.analysis import collect_expert_usage, select_experts
    from moe_adapt.surgery import extract_submodel, verify_submodel

    batches = list(loader(mini_specs[task], 4))
    sub = extract_submodel(model, select_experts(collect_expert_usage(model, batches, task=task), "top_n"))
    metric = verify_submodel(model, sub, {task: batches}).tasks[task]["metric"]
    parent, sliced = evaluate(model, batches, task), evaluate(sub, batches, task)
    assert metric["name"] == PRIMARY_METRIC[TASKS[task]] == parent.primary
    assert metric["parent"] == parent.score and metric["submodel"] == sliced.score
    assert metric["delta"] == sliced.score - parent.score


def test_budget_curve_scores_batches_with_evaluate(model, mini_specs):
    from moe_adapt.analysis.budget import budget_curve

    batches = list(loader(mini_specs["fashion-seg"], 4))
    k = {"attn": model.config.attn_top_k, "mlp": model.config.mlp_top_k}
    curve = budget_curve(model, "fashion-seg", batches, top_ks=[1, k])
    assert curve.metric_name == "mean_iou"
    assert [p.metric for p in curve.points if p.is_default] == [evaluate(model, batches, "fashion-seg").score]
    model.moe_vit.set_routing("fashion-seg", top_k=1)
    try:
        one = evaluate(model, batches, "fashion-seg").score
    finally:
        model.moe_vit.set_routing("fashion-seg")
    assert [p.metric for p in curve.points if p.top_k == {"attn": 1, "mlp": 1}] == [one]


# --- two processes -------------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys

    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    sys.path.insert(0, sys.argv[3])
    from test_evaluate import TASKS, loader, tiny_model

    from moe_adapt.data.specs import load_specs
    from moe_adapt.metrics import evaluate

    specs = load_specs(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(tiny_model(specs))  # the same seed on both ranks; DDP-wrapped
    results = {}
    for task in TASKS:
        data = accelerator.prepare(loader(specs[task], 2))  # each rank gets its own shard
        result = evaluate(model, data, task, accelerator=accelerator)
        results[task] = {"values": dict(result), "num_samples": result.num_samples}
    with open(f"{sys.argv[2]}/rank{accelerator.process_index}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()  # a live gloo group at interpreter exit can abort the process (SIGABRT)
    """
)


@pytest.mark.slow
def test_two_processes_gather_every_sample_once(model, mini_data_dir, mini_specs, tmp_path):
    """11 images in batches of 2 over 2 ranks: accelerate pads the last round with a repeated image, which
    `gather_for_metrics` drops; each rank reports the single-process metric over all 11."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(mini_data_dir / "specs.yaml"),
        str(tmp_path),
        str(Path(__file__).parent),
    ]
    run_two_processes(cmd)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for task in TASKS:
        single = evaluate(model, loader(mini_specs[task], 4), task)
        for rank in ranks:
            assert rank[task]["num_samples"] == NUM_IMAGES
            assert rank[task]["values"] == pytest.approx(dict(single), abs=1e-9), task
        assert single[PRIMARY_METRIC[TASKS[task]]] == single.score
