"""Continual learning as one call: add a classification task to a pretrained MoE ViT without changing any old task.

`run_continual(load_continual_config(path, overrides))` loads the model and the new task's data, picks the source
task whose routing of the new images is most concentrated, grows the model (`add_task`: new experts in every MoE
layer, a router over old and new experts, a task embedding and a head; old tasks frozen), trains the new task with
accelerate (`learn_new_task`, which then compares every old task's outputs bit for bit), saves the grown model
before any evaluation, evaluates, and optionally draws the new task's budget curve. `moe-adapt continual` and
`recipes/continual.py` run it.
"""

from __future__ import annotations

from pathlib import Path

from ..training.config import ContinualConfig, load_config


def load_continual_config(path: str | None, overrides: list[str] = ()) -> ContinualConfig:
    """The continual recipe from a YAML file (None: defaults) and dotted overrides (`train.max_steps=50`); an unknown
    key is an error that names it and the valid ones."""
    return load_config(ContinualConfig, path, list(overrides))


def _grow(model, cfg: ContinualConfig, task: str, labels, calib, source: str, say):
    """`add_task` the new classification `task` to `model` (new experts, router, task embedding, head; old tasks
    frozen), reporting the parameters added. Returns `(grown, params_before, params_after)`."""
    from ..flops import count_parameters
    from ..surgery.add_task import add_task

    params_before = count_parameters(model)["total"]
    grown = add_task(
        model,
        task,
        "classification",
        labels,
        new_attn_experts=cfg.new_attn_experts,
        new_mlp_experts=cfg.new_mlp_experts,
        init=cfg.init,
        source_task=source,
        data=calib,
    )
    params_after = count_parameters(grown)["total"]
    say(
        f"grown by {task!r}: {params_after - params_before:,} parameters added "
        f"({(params_after - params_before) / params_before:.1%}); experts per layer: attn {grown.config.attn_experts}, "
        f"mlp {grown.config.mlp_experts}"
    )
    return grown, params_before, params_after


def _write_summary(summary: dict, grown, task: str, eval_loader, image_size: int, cfg: ContinualConfig, main: bool):
    """Add the new task's budget curve to `summary` when `cfg.budget` (its plot too, when there is an output folder),
    and on the main process write `summary.json` to the output folder, if any."""
    from ..analysis.budget import budget_curve, plot_budget_curve
    from ..io import atomic_write_json

    out = Path(cfg.output_dir) if cfg.output_dir else None
    if cfg.budget:
        curve = budget_curve(grown, task, eval_loader, image_size=image_size)
        summary["budget"] = [{"top_k": p.top_k, "gflops": p.gflops, "accuracy": p.metric} for p in curve.points]
        if out is not None and main:
            summary["budget_png"] = str(plot_budget_curve(curve, out / f"budget_{task}.png"))
    if out is not None and main:
        atomic_write_json(out / "summary.json", summary, indent=2)


def run_continual(cfg: ContinualConfig) -> dict:
    """Run the continual recipe `cfg` (from `load_continual_config`); returns the summary it also writes."""
    import torch
    from accelerate.utils import set_seed

    from ..data import collate_fn_for
    from ..hub.loading import load_model
    from ..metrics import evaluate
    from ..models.moe_vit import find_backbone
    from ..surgery.add_task import learn_new_task
    from ..training.loop import compile_model, make_accelerator
    from .finetune import FinetuneConfig, choose_source_task, load_downstream_data

    # A new task routing over two expert groups runs a group only on the tokens it receives: on a rank whose batch
    # sends none to the new group, DDP must accept parameters without a gradient.
    accelerator = make_accelerator(cfg.train, find_unused_parameters=True)
    set_seed(cfg.seed)
    say = accelerator.print

    model = load_model(cfg.model).eval()
    config = find_backbone(model)[0].config
    image_size = cfg.image_size or config.image_size
    data_cfg = FinetuneConfig(
        model=None, dataset=cfg.dataset, max_train_images=cfg.max_train_images, max_eval_images=cfg.max_eval_images
    )
    spec, train_set, eval_set, labels = load_downstream_data(data_cfg, image_size)
    task = cfg.task_name or spec.name
    calib = train_set.pixel_values[: cfg.calibration_images].split(64)
    source, _, entropies = choose_source_task(model, calib, cfg.source_task)
    say(f"source task {source!r} (routing entropy: {', '.join(f'{t} {h:.3f}' for t, h in entropies.items())})")
    grown, params_before, params_after = _grow(model, cfg, task, labels, calib, source, say)
    del model

    check = eval_set.pixel_values[: cfg.check_images]
    result = learn_new_task(
        compile_model(grown, cfg.train),
        task,
        train_set,
        check,
        steps=cfg.train.max_steps,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        log_every=cfg.train.log_every,
        accelerator=accelerator,
        optimizer=cfg.optimizer,
    )
    grown = result.model
    out = Path(cfg.output_dir) if cfg.output_dir else None
    if out is not None and accelerator.is_main_process:  # saved before any evaluation, which then cannot lose it
        grown.save_pretrained(out / "model")  # written atomically
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=128, collate_fn=collate_fn_for("classification"))
    accuracy = evaluate(grown, eval_loader, task)["accuracy"]
    say(
        f"{task}: accuracy {accuracy:.4f}; old tasks bit-identical: {result.old_tasks_identical} "
        f"(max |logit change| {max(result.old_task_change.values(), default=0.0)})"
    )

    summary = {
        "task": task,
        "source_task": source,
        "accuracy": accuracy,
        "params_before": params_before,
        "params_added": params_after - params_before,
        "params_added_ratio": (params_after - params_before) / params_before,
        "trained_tensors": len(result.trainable),
        "old_tasks_identical": result.old_tasks_identical,
        "old_task_max_abs_change": result.old_task_change,
    }
    _write_summary(summary, grown, task, eval_loader, image_size, cfg, accelerator.is_main_process)
    if out is not None and accelerator.is_main_process:
        say(f"wrote {out / 'model'} and {out / 'summary.json'}")
    if not result.old_tasks_identical:
        raise RuntimeError(f"An old task changed while training {task!r}: {result.old_task_change}.")
    return summary


__all__ = ["load_continual_config", "run_continual"]
