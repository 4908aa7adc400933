"""Multi-task heterogeneous pretraining: `pretrain(config, resume=None)` runs the recipe of a `PretrainConfig`.

1. data (`load_task_data`), model (`build_model`), `MultiTaskObjective` (all micro-batches of a step, one task each,
   + loss weighting + MI loss), AdamW and transformers' schedule (`optimizer` section);
2. the one training loop (`train_loop`): each step the sampler names the step's tasks, each task's
   `TaskBatchStream` serves its next batch, and one forward of the objective over all of them gives the step's
   loss: the MI statistics span every task of the step, and its gradient is accumulated over the tasks in one
   backward; periodic evaluation (`moe_adapt.metrics.evaluate`) and accelerate checkpoints (`output_dir/checkpoints`);
3. at the end: the model (`save_pretrained`, with its image processor), `metrics.json`, each task's expert usage
   (`usage/<task>.json`) and the heatmap `expert_usage.png`.

Exact resume: everything random is a pure function of the seed and the position in the run — the sampler's draws
(seed, step), each batch's items and augmentation (seed, task, draw, item, rank: `TaskBatchStream`), the model's
drop-path / dropout RNG (reseeded per step by the loop); the learning rate is a function of the step — and the
model, optimizer, scheduler and loss-weighting states come back from the checkpoint, so an interrupted and resumed
run ends with the same weights as an uninterrupted one. (`train.max_minutes`, a wall-clock budget for demos on
shared machines, makes the run's length depend on time and so gives up that exactness.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from ..io import atomic_write_json
from ..metrics import PRIMARY_METRIC, evaluate
from ..models.moe_vit.losses import MutualInformationLoss
from .config import PretrainConfig
from .data import TaskBatchStream, load_task_data
from .evaluation import normalized_task_expert_mi
from .loop import (
    build_optimizer,
    build_scheduler,
    compile_model,
    cpu_fsdp_requested,
    gather_model,
    make_accelerator,
    train_loop,
)
from .loss_weighting import LossWeighting
from .model import build_model
from .objective import MultiTaskObjective
from .sampling import TaskSampler


def _to_device(batch: dict, device: torch.device) -> dict:
    labels = batch["labels"]
    if isinstance(labels, torch.Tensor):
        labels = labels.to(device)
    elif isinstance(labels, list):
        labels = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in labels]
    return {"pixel_values": batch["pixel_values"].to(device), "labels": labels}


def evaluate_all(model, data: dict, config: PretrainConfig) -> dict[str, dict[str, float]]:
    return {
        task: evaluate(model, d.eval_loader(config.tasks[task].eval_max_samples), task)
        for task, d in data.items()
        if d.eval is not None
    }


def step_batches(sampler: TaskSampler, streams: dict[str, TaskBatchStream], start: int, device, counter: list[int]):
    """The steps' micro-batches from step `start` on: `[(task, batch), ...]` per step (the sampler's tasks, each
    task's next batch). Each task's position is replayed from the sampler (a pure function of the step), so a
    resumed run draws what the uninterrupted one drew. `counter[0]` counts the images served."""
    draws = dict.fromkeys(streams, 0)
    for step in range(start):
        for task in sampler.tasks_for_step(step):
            draws[task] += 1
    batches = {t: s.batches(start=draws[t]) for t, s in streams.items()}
    step = start
    while True:
        micro = []
        for task in sampler.tasks_for_step(step):
            batch = next(batches[task])
            counter[0] += batch["pixel_values"].shape[0]
            micro.append((task, _to_device(batch, device)))
        yield micro
        step += 1


def objective_loss(objective, micro_batches) -> dict:
    """One step's loss through the objective, with each task's loss and the MI loss as logs."""
    out = objective(micro_batches)
    log = {f"loss/{t}": float(v) for t, v in out["task_losses"]}
    return {"loss": out["loss"], "log": {**log, "mi_loss": float(out["mi_loss"])}}


def _load_data(config: PretrainConfig, accelerator) -> dict:
    """Each task's data; the main process builds the mini benchmark if needed, the others read it after."""
    if accelerator.is_main_process:
        data = load_task_data(config, main_process=True)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        data = load_task_data(config, main_process=False)
    return data


def _loss_weighting(config: PretrainConfig) -> LossWeighting:
    return LossWeighting(list(config.tasks), config.loss_weighting, {t: s.loss_weight for t, s in config.tasks.items()})


def _build_objective(config: PretrainConfig, model, accelerator) -> MultiTaskObjective:
    """The `MultiTaskObjective` over `model`: the configured loss weighting and the model's MI loss."""
    weighting = _loss_weighting(config)
    # DDP needs every parameter in every step's graph (the objective's 0 x sum(p) term); FSDP reduces each block's
    # gradients whole, and its sharded parameters cannot enter a sum outside their block's forward
    sharded = accelerator.distributed_type == DistributedType.FSDP or cpu_fsdp_requested(accelerator)
    return MultiTaskObjective(
        model,
        weighting,
        MutualInformationLoss.from_config(model.config, device=accelerator.device),
        touch_all_parameters=not sharded,
    )


def _build_sampler(config: PretrainConfig, data: dict) -> TaskSampler:
    return TaskSampler(
        list(config.tasks),
        config.sampling.strategy,
        sizes={t: len(d.train) for t, d in data.items()},
        temperature=config.sampling.temperature,
        micro_batches_per_step=config.sampling.micro_batches_per_step,
        rounds=config.sampling.rounds,
        seed=config.seed,
    )


def _build_streams(config: PretrainConfig, data: dict, accelerator) -> dict[str, TaskBatchStream]:
    """Each task's `TaskBatchStream`: this rank's share of its batches, a pure function of the seed and position."""
    return {
        t: TaskBatchStream(
            d.train,
            d.batch_size,
            d.collate_fn,
            seed=config.seed,
            task_index=i,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            num_workers=config.data.num_workers,
        )
        for i, (t, d) in enumerate(data.items())
    }


def _periodic_evaluation(config: PretrainConfig, data: dict, objective, accelerator) -> Callable[[int, dict], None]:
    """The loop's `on_step`: every `train.eval_every` steps (not the last) the main process evaluates every task and
    prints each task's primary metric; the other processes wait for it."""

    def evaluate_every(step: int, out: dict) -> None:
        if config.train.eval_every and step % config.train.eval_every == 0 and step < config.train.max_steps:
            if accelerator.is_main_process:
                scores = evaluate_all(accelerator.unwrap_model(objective).model, data, config)
                accelerator.print(
                    f"step {step}: "
                    + ", ".join(
                        f"{t} {PRIMARY_METRIC[data[t].task_type]}={s[PRIMARY_METRIC[data[t].task_type]]:.4f}"
                        for t, s in scores.items()
                    )
                )
            accelerator.wait_for_everyone()

    return evaluate_every


def _fresh_objective(config: PretrainConfig, data: dict) -> MultiTaskObjective:
    """The objective's structure, for the weights FSDP gathers from its shards."""
    fresh = build_model(config, label_names={t: d.label_names for t, d in data.items()})
    return MultiTaskObjective(fresh, _loss_weighting(config), MutualInformationLoss.from_config(fresh.config))


def pretrain(config: PretrainConfig, resume: str | bool | None = None, accelerator=None) -> dict[str, Any]:
    """Run the recipe. Returns the final metrics (also written to `output_dir/metrics.json`) on the main process,
    and on every process `"model"` (the trained `MoEViTForMultiTask`; under FSDP on the main process only, None on
    the others) and `"history"` (the logged losses).

    `resume`: True / "latest" for the newest checkpoint in `output_dir/checkpoints` (a fresh start when there is
    none), or a checkpoint folder.
    """
    from accelerate.utils import set_seed

    out_dir = Path(config.output_dir)
    accelerator = accelerator or make_accelerator(config.train, out_dir)
    main = accelerator.is_main_process
    set_seed(config.seed)
    data = _load_data(config, accelerator)

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = compile_model(build_model(config, label_names={t: d.label_names for t, d in data.items()}), config.train)
    objective = _build_objective(config, model, accelerator)
    optimizer = build_optimizer(objective, config.optimizer, accelerator.device)
    scheduler = build_scheduler(optimizer, config.optimizer, config.train.max_steps)
    sampler = _build_sampler(config, data)
    streams = _build_streams(config, data, accelerator)
    world = accelerator.num_processes
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "recipe.json", config.to_dict())
        accelerator.print(
            f"MoEViTForMultiTask: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
            f"tasks {list(config.tasks)}; {sampler}; {world} process(es) x {torch.get_num_threads()} thread(s)."
        )

    images = [0]
    objective.train()
    result = train_loop(
        objective,
        optimizer,
        scheduler,
        lambda start: step_batches(sampler, streams, start, accelerator.device, images),
        objective_loss,
        accelerator,
        max_steps=config.train.max_steps,
        seed=config.seed,
        max_grad_norm=config.optimizer.max_grad_norm,
        resume=resume,
        save_every=config.train.save_every,
        log_every=max(1, config.train.log_every),
        max_minutes=config.train.max_minutes,
        on_step=_periodic_evaluation(config, data, objective, accelerator),
        progress_bar=config.train.progress_bar,
        desc="pretrain",
    )

    # the whole model: under FSDP gathered from the shards, on the main process only (None on the others)
    unwrapped = gather_model(accelerator, result.model, lambda: _fresh_objective(config, data))
    results: dict[str, Any] = {}
    if main:
        results = finish(
            unwrapped.model,
            data,
            config,
            out_dir,
            history=result.history,
            steps=result.step,
            steps_this_run=result.step - result.start_step,
            stopped_by=result.stopped_by,
            train_seconds=result.train_seconds,
            loop_seconds=result.loop_seconds,
            images_per_second=images[0] * world / result.train_seconds if result.train_seconds > 0 else None,
            loss_weights=unwrapped.loss_weighting.weights(),
            processes=world,
            threads=torch.get_num_threads(),
        )
    accelerator.wait_for_everyone()
    results.update(model=unwrapped.model if unwrapped is not None else None, history=result.history)
    return results


def finish(model, data: dict, config: PretrainConfig, out_dir: Path, **extra) -> dict[str, Any]:
    """End of a run: save the model (first, in one step: an evaluation that fails cannot lose it), evaluate every
    task, save the expert usage (JSON per task + heatmap PNG) and `metrics.json`. Returns the metrics dict."""
    from ..analysis import collect_expert_usage, plot_usage_heatmap

    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)  # one step: the previous complete folder or the new one
    scores = evaluate_all(model, data, config)
    usages = {}
    for task, d in data.items():
        if d.eval is None or not model.config.moe_layer_names():  # a dense model has no expert usage
            continue
        loader = d.eval_loader(config.tasks[task].eval_max_samples)
        usages[task] = collect_expert_usage(
            model, loader, task, max_batches=config.train.usage_max_batches, output_norms=False
        )
        usages[task].save(out_dir / "usage" / f"{task}.json")
    heatmap = plot_usage_heatmap(usages, out_dir / "expert_usage.png", criterion="frequency") if usages else None
    nmi = normalized_task_expert_mi(usages) if len(usages) > 1 else None
    results = {
        "metrics": scores,
        "primary": {t: s[PRIMARY_METRIC[data[t].task_type]] for t, s in scores.items()},
        "primary_metric": {t: PRIMARY_METRIC[data[t].task_type] for t in scores},
        "normalized_mi": nmi,
        "model_dir": str(model_dir),
        "heatmap": str(heatmap) if heatmap else None,
        **extra,
    }
    atomic_write_json(out_dir / "metrics.json", results)
    return results


__all__ = ["evaluate_all", "finish", "pretrain", "step_batches"]
