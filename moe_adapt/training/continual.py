"""Continual learning as one call: add a classification task to a pretrained MoE ViT without changing any old task.

`run_continual(load_continual_config(path, overrides))` loads the model and the new task's data, picks the source
task whose routing of the new images is most concentrated, grows the model (`add_task`: new experts in every MoE
layer, a router over old and new experts, a task embedding and a head; old tasks frozen), trains the new task with
accelerate (`learn_new_task`, which then compares every old task's outputs bit for bit), saves the grown model
before any evaluation, evaluates, and optionally draws the new task's budget curve. `moe-adapt continual` and
`recipes/continual.py` run it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

#: every key of a continual recipe, with its default
CONTINUAL_DEFAULTS = dict(
    model=None, dataset="builtin:digits", task_name=None, image_size=None, new_attn_experts=2, new_mlp_experts=2,
    init="copy_top", source_task="auto", calibration_images=256, steps=800, batch_size=32, lr=5e-3,
    weight_decay=0.3, warmup_ratio=0.05, max_train_images=None, max_eval_images=None, check_images=128,
    budget=True, output_dir=None, num_threads=None, seed=0, log_every=50,
)


def load_continual_config(path: str | None, overrides: list[str]) -> dict:
    """The YAML's keys over `CONTINUAL_DEFAULTS`, then `key=value` overrides (values parsed as YAML). Unknown keys fail."""
    cfg = dict(CONTINUAL_DEFAULTS)
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: write key=value (e.g. steps=50).")
        key, value = item.split("=", 1)
        data[key] = yaml.safe_load(value)
    unknown = sorted(set(data) - set(CONTINUAL_DEFAULTS))
    if unknown:
        raise ValueError(f"{path or 'overrides'}: unknown key(s) {unknown}; known keys: {sorted(CONTINUAL_DEFAULTS)}.")
    cfg.update(data)
    if not cfg["model"]:
        raise ValueError("model is not set: give --model DIR (a pretrained MoE ViT) or model: in the YAML.")
    return cfg


def run_continual(cfg: dict) -> dict:
    """Run the continual recipe `cfg` (from `load_continual_config`); returns the summary it also writes."""
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    from ..adaptation.finetune import (
        FinetuneConfig,
        choose_source_task,
        evaluate_classification,
        load_downstream_data,
        load_moe_model,
    )
    from ..analysis.budget import budget_curve, plot_budget_curve
    from ..analysis.usage import find_backbone
    from ..data import collate_fn_for
    from ..flops import count_parameters
    from ..io import atomic_write_text
    from ..surgery.add_task import add_task, learn_new_task

    # A new task routing over two expert groups runs a group only on the tokens it receives: on a rank whose batch
    # sends none to the new group, DDP must accept parameters without a gradient.
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg["seed"])
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    say = accelerator.print

    model = load_moe_model(cfg["model"]).eval()
    config = find_backbone(model)[0].config
    image_size = cfg["image_size"] or config.image_size
    data_cfg = FinetuneConfig(model=None, dataset=cfg["dataset"], max_train_images=cfg["max_train_images"],
                              max_eval_images=cfg["max_eval_images"])
    spec, train_set, eval_set, labels = load_downstream_data(data_cfg, image_size)
    task = cfg["task_name"] or spec.name
    calib = train_set.pixel_values[: cfg["calibration_images"]].split(64)
    source, _, entropies = choose_source_task(model, calib, cfg["source_task"])
    say(f"source task {source!r} (routing entropy: {', '.join(f'{t} {h:.3f}' for t, h in entropies.items())})")

    params_before = count_parameters(model)["total"]
    grown = add_task(model, task, "classification", labels, new_attn_experts=cfg["new_attn_experts"],
                     new_mlp_experts=cfg["new_mlp_experts"], init=cfg["init"], source_task=source, data=calib)
    del model
    params_after = count_parameters(grown)["total"]
    say(f"grown by {task!r}: {params_after - params_before:,} parameters added "
        f"({(params_after - params_before) / params_before:.1%}); experts per layer: attn {grown.config.attn_experts}, "
        f"mlp {grown.config.mlp_experts}")

    check = eval_set.pixel_values[: cfg["check_images"]]
    result = learn_new_task(grown, task, train_set, check, steps=cfg["steps"], batch_size=cfg["batch_size"],
                            lr=cfg["lr"], weight_decay=cfg["weight_decay"], warmup_ratio=cfg["warmup_ratio"],
                            seed=cfg["seed"], log_every=cfg["log_every"], accelerator=accelerator)
    grown = result.model
    out = Path(cfg["output_dir"]) if cfg["output_dir"] else None
    if out is not None and accelerator.is_main_process:  # saved before any evaluation, which then cannot lose it
        grown.save_pretrained(out / "model")  # written atomically
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=128, collate_fn=collate_fn_for("classification"))
    accuracy = evaluate_classification(grown, eval_loader, task)
    say(f"{task}: accuracy {accuracy:.4f}; old tasks bit-identical: {result.old_tasks_identical} "
        f"(max |logit change| {max(result.old_task_change.values(), default=0.0)})")

    summary = {"task": task, "source_task": source, "accuracy": accuracy, "params_before": params_before,
               "params_added": params_after - params_before,
               "params_added_ratio": (params_after - params_before) / params_before,
               "trained_tensors": len(result.trainable), "old_tasks_identical": result.old_tasks_identical,
               "old_task_max_abs_change": result.old_task_change}
    if cfg["budget"]:
        curve = budget_curve(grown, task, eval_loader, image_size=image_size)
        summary["budget"] = [{"top_k": p.top_k, "gflops": p.gflops, "accuracy": p.metric} for p in curve.points]
        if out is not None and accelerator.is_main_process:
            summary["budget_png"] = str(plot_budget_curve(curve, out / f"budget_{task}.png"))
    if out is not None and accelerator.is_main_process:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        say(f"wrote {out / 'model'} and {out / 'summary.json'}")
    if not result.old_tasks_identical:
        raise RuntimeError(f"An old task changed while training {task!r}: {result.old_task_change}.")
    return summary


__all__ = ["CONTINUAL_DEFAULTS", "load_continual_config", "run_continual"]
