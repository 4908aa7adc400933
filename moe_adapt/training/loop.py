"""The multi-task pretraining loop, on accelerate: readable in one sitting, no Trainer class.

`pretrain(config, resume=None)` runs the recipe of a `PretrainConfig`:

1. data (`load_task_data`), model (`build_model`), `MultiTaskObjective` (all micro-batches of a step + loss
   weighting + MI loss), AdamW with linear warm-up and cosine decay;
2. `accelerator.prepare` (mixed precision; DDP / FSDP when launched with several processes);
3. per step: the sampler names the step's tasks, each task's `TaskBatchStream` serves its next batch, one forward of
   the objective over them all, one backward, clip, AdamW step; a progress bar shows each task's loss;
4. periodic evaluation (`evaluate_task`) and `accelerator.save_state` checkpoints (`output_dir/checkpoints/step_N`);
5. at the end: the model (`save_pretrained`, with its image processor), `metrics.json`, each task's expert usage
   (`usage/<task>.json`) and the heatmap `expert_usage.png`.

Exact resume: everything random is a pure function of the seed and the position in the run — the sampler's draws
(seed, step), each batch's items and augmentation (seed, task, draw, item, rank: `TaskBatchStream`), the model's
drop-path / dropout RNG (reseeded per step); the learning rate is a pure
function of the step — and the model, optimizer and loss-weighting states come back from the checkpoint, so an
interrupted and resumed run ends with the same weights as an uninterrupted one. (`train.max_minutes`, a wall-clock
budget for demos on shared machines, makes the schedule depend on time and so gives up that exactness.)
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from ..io import atomic_write_text, replace_dir
from ..models.moe_vit.losses import MutualInformationLoss
from .config import OptimizerConfig, PretrainConfig
from .data import TaskBatchStream, hash_seed, load_task_data
from .evaluation import PRIMARY_METRIC, evaluate_task, normalized_task_expert_mi
from .loss_weighting import LossWeighting
from .model import build_model
from .objective import MultiTaskObjective
from .sampling import TaskSampler

CHECKPOINT_PREFIX = "step_"


# ----------------------------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------------------------


def parameter_groups(module: torch.nn.Module, weight_decay: float, no_decay_router: bool = True) -> list[dict]:
    """Two AdamW groups: weight-decayed matrices, and the rest (biases, norms, embeddings, position / CLS tokens,
    task embeddings, loss weights, and — with `no_decay_router` — routers, whose decay would pull routing back
    towards uniform)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = (
            p.ndim <= 1
            or name.endswith("bias")  # fused experts' biases are [E, out]
            or any(key in name for key in ("position_embeddings", "cls_token", "task_embeddings", "loss_weighting"))
            or (no_decay_router and ".router." in name)
        )
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """`torch.optim.AdamW`, fused where torch has a fused kernel for every parameter (floating-point tensors on CPU,
    CUDA and the other devices torch lists; transformers' default optimizer, `adamw_torch_fused`, with torch >=
    2.8), else the plain one. On CPU the fused step updates every tensor in one kernel instead of a Python loop over
    them. Passing `fused` or `foreach` (or `differentiable=True`) leaves the choice to torch as given.

    `params` is anything `torch.optim.AdamW` takes (tensors, `(name, tensor)` pairs, or groups of either). The
    choice is kept across `load_state_dict` (see `_keep_kind`): a checkpoint of the other kind, e.g. one written
    before training loops used the fused optimizer, loads and resumes."""
    params = _one_pass_to_list(params)
    if isinstance(params, (list, tuple)):
        params = [{**g, "params": _one_pass_to_list(g["params"])} if isinstance(g, dict) else g for g in params]
    if {"fused", "foreach"} & set(kwargs) or kwargs.get("differentiable"):
        return torch.optim.AdamW(params, **kwargs)  # the caller chose; torch takes it as given
    try:
        tensors = [] if isinstance(params, (torch.Tensor, dict)) else _tensors_of(params)
    except (KeyError, TypeError):  # not parameters torch takes: torch's own error follows
        tensors = []
    fused = bool(tensors) and all(isinstance(t, torch.Tensor) and _has_fused_adam(t) for t in tensors)
    optimizer = torch.optim.AdamW(params, **kwargs, **({"fused": True} if fused else {}))
    optimizer.register_load_state_dict_post_hook(functools.partial(_keep_kind, fused=fused))
    return optimizer


def _tensors_of(params) -> list:
    """The parameters of an optimizer's `params` argument: tensors, `(name, tensor)` pairs, or groups of either."""
    out = []
    for g in params:
        entries = g["params"] if isinstance(g, dict) else [g]
        entries = [entries] if isinstance(entries, torch.Tensor) else entries
        out += [e[1] if isinstance(e, tuple) and len(e) == 2 else e for e in entries]
    return out


def _has_fused_adam(t: torch.Tensor) -> bool:
    """Whether torch's fused Adam kernels take this tensor (a floating-point tensor on a supported device); torch
    itself checks only at the first step."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without it: the plain optimizer
        return False
    return torch.is_floating_point(t) and t.device.type in _get_fused_kernels_supported_devices()


def _one_pass_to_list(x):
    """A generator (or other one-pass iterable) as a list, so that it can be read twice; tensors, lists, tuples,
    sets and dicts as they are (torch itself rejects what it does not take)."""
    return x if isinstance(x, (torch.Tensor, list, tuple, set, dict)) else list(x)


def _keep_kind(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """After `load_state_dict`, the kind `adamw` chose stays: a checkpoint of the other kind (e.g. one written before
    the optimizer was fused) would otherwise set the groups' `fused` flag, so that torch runs one update while a
    gradient scaler treats the optimizer as the other (and fails). Each step counter moves to where that kind reads
    it: a float32 tensor on the parameter's device when fused, on the CPU otherwise."""
    for group in optimizer.param_groups:
        group["fused"] = True if fused else None
        group["foreach"] = None
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and torch.is_tensor(state.get("step")) and not group.get("capturable"):
                state["step"] = state["step"].to(device=p.device if fused else "cpu", dtype=torch.float32)


def build_optimizer(module: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    return adamw(
        parameter_groups(module, cfg.weight_decay, cfg.no_decay_router), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps
    )


def warmup_cosine_lr(progress: float, step: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """The learning rate at `step`: linear warm-up from lr/warmup_steps to `lr` over `warmup_steps` steps, then
    cosine decay from `lr` to `min_lr` as `progress` (the fraction of the run done, in [0, 1]) goes to 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def run_progress(step: int, config: PretrainConfig, elapsed_s: float) -> float:
    """Fraction of the run done before `step`: `step / max_steps`, or, with `train.max_minutes`, the larger of that
    and the share of the time budget spent (the schedule then anneals by the deadline; the run stops at 1)."""
    warm = config.optimizer.warmup_steps
    frac = (step - warm) / max(1, config.train.max_steps - warm) if step >= warm else 0.0
    if config.train.max_minutes:
        frac = max(frac, elapsed_s / (60.0 * config.train.max_minutes))
    return frac


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(output_dir: str | Path, resume: str | bool | None) -> Path | None:
    """`resume=True` / "latest" → the newest checkpoint of `output_dir` (None when there is none: a fresh start);
    a path → that checkpoint (must exist)."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint folder (no trainer_state.json); see {Path(output_dir) / 'checkpoints'}.")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, keep: int) -> Path:
    """`accelerator.save_state` into `checkpoints/step_<step>` plus `trainer_state.json`; keeps the newest `keep`
    checkpoints. Every process writes into a hidden `.step_<step>.tmp` folder, which the main process renames into
    place once all are done (`replace_dir`), so a run killed while saving leaves the previous complete checkpoint,
    never a half-written one."""
    path = Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    stage = path.with_name(f".{path.name}.tmp")  # one name on every process: each adds its own RNG state
    if accelerator.is_main_process:
        shutil.rmtree(stage, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(stage))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(stage / "trainer_state.json", {"step": step})
        replace_dir(stage, path)
        if keep > 0:
            for old in checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False, default=float))


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def _to_device(batch: dict, device: torch.device) -> dict:
    labels = batch["labels"]
    if isinstance(labels, torch.Tensor):
        labels = labels.to(device)
    elif isinstance(labels, list):
        labels = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in labels]
    return {"pixel_values": batch["pixel_values"].to(device), "labels": labels}


def evaluate_all(model, data: dict, config: PretrainConfig) -> dict[str, dict[str, float]]:
    return {
        task: evaluate_task(model, d, task, max_samples=config.tasks[task].eval_max_samples)
        for task, d in data.items()
        if d.eval is not None
    }


def _has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def configure_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads: an int, or None (torch's default). Returns the thread count in use."""
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    return torch.get_num_threads()


def pretrain(config: PretrainConfig, resume: str | bool | None = None, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Run the recipe. Returns the final metrics (also written to `output_dir/metrics.json`) on the main process,
    and on every process `"model"` (the trained `MoEViTForMultiTask`) and `"history"` (the logged losses).

    `resume`: True / "latest" for the newest checkpoint in `output_dir/checkpoints` (a fresh start when there is
    none), or a checkpoint folder.
    """
    threads = configure_threads(config.train.num_threads)
    accelerator = accelerator or Accelerator(
        # Without a GPU (or other accelerator), `cpu=True` makes accelerate run torchrun / `accelerate launch`
        # processes as MULTI_CPU with gloo, instead of one independent process each.
        cpu=not _has_accelerator(),
        mixed_precision=config.train.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    main = accelerator.is_main_process
    out_dir = Path(config.output_dir)
    set_seed(config.seed)

    # Data: the main process builds the mini benchmark if needed, the others read it after.
    if main:
        data = load_task_data(config, main_process=True)
    accelerator.wait_for_everyone()
    if not main:
        data = load_task_data(config, main_process=False)
    tasks = list(config.tasks)

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config, label_names={t: d.label_names for t, d in data.items()})
    mc = model.config
    mi_loss = MutualInformationLoss.from_config(mc, device=accelerator.device)
    weighting = LossWeighting(tasks, config.loss_weighting, {t: s.loss_weight for t, s in config.tasks.items()})
    objective = MultiTaskObjective(model, weighting, mi_loss)
    optimizer = build_optimizer(objective, config.optimizer)
    objective, optimizer = accelerator.prepare(objective, optimizer)

    sampler = TaskSampler(
        tasks, config.sampling.strategy, sizes={t: len(d.train) for t, d in data.items()},
        temperature=config.sampling.temperature, micro_batches_per_step=config.sampling.micro_batches_per_step,
        rounds=config.sampling.rounds, seed=config.seed,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    streams = {
        t: TaskBatchStream(d.train, d.batch_size, d.collate_fn, seed=config.seed, task_index=i, rank=rank,
                           world_size=world, num_workers=config.data.num_workers)
        for i, (t, d) in enumerate(data.items())
    }

    start_step = 0
    checkpoint = resolve_resume(out_dir, resume)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        start_step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
        if main:
            print(f"Resumed from {checkpoint} at step {start_step}.", flush=True)
    # Draw counters are a pure function of the sampler: replay them up to the start step.
    draws = dict.fromkeys(tasks, 0)
    for step in range(start_step):
        for task in sampler.tasks_for_step(step):
            draws[task] += 1
    batches = {t: streams[t].batches(start=draws[t]) for t in tasks}

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "recipe.json", config.to_dict())
        n_params = sum(p.numel() for p in model.parameters())
        print(f"MoEViTForMultiTask: {n_params / 1e6:.2f}M parameters; tasks {tasks}; {sampler}; "
              f"{world} process(es) x {threads} thread(s).", flush=True)

    from tqdm.auto import tqdm

    bar = tqdm(total=config.train.max_steps, initial=start_step, disable=not (main and config.train.progress_bar),
               desc="pretrain", dynamic_ncols=True, mininterval=2.0)
    opt_cfg = config.optimizer
    smooth: dict[str, float] = {}
    history: list[dict] = []
    images, train_time, step = 0, 0.0, start_step
    t_start = time.perf_counter()
    stopped_by = "max_steps"
    objective.train()
    for step in range(start_step, config.train.max_steps):
        progress = run_progress(step, config, time.perf_counter() - t_start)
        if progress >= 1.0 and step >= opt_cfg.warmup_steps:
            stopped_by = "max_minutes"
            break
        lr = warmup_cosine_lr(progress, step, opt_cfg.warmup_steps, opt_cfg.lr, opt_cfg.min_lr)
        set_learning_rate(optimizer, lr)
        t0 = time.perf_counter()
        micro_batches = []
        for task in sampler.tasks_for_step(step):
            batch = next(batches[task])
            images += batch["pixel_values"].shape[0]
            micro_batches.append((task, _to_device(batch, accelerator.device)))
        torch.manual_seed(hash_seed(config.seed, step, rank))  # the step's drop-path / dropout draws (all devices)
        out = objective(micro_batches)
        accelerator.backward(out["loss"])
        if opt_cfg.max_grad_norm:
            accelerator.clip_grad_norm_(objective.parameters(), opt_cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t0

        for task, value in out["task_losses"]:
            v = float(value)
            smooth[task] = v if task not in smooth else 0.9 * smooth[task] + 0.1 * v
        bar.update(1)
        last = step + 1 == config.train.max_steps
        if (step + 1) % max(1, config.train.log_every) == 0 or last:
            history.append({"step": step + 1, "lr": lr, "mi_loss": float(out["mi_loss"]), **{f"loss/{t}": v for t, v in smooth.items()}})
            bar.set_postfix({**{t: f"{v:.3f}" for t, v in smooth.items()}, "mi": f"{float(out['mi_loss']):.4f}"}, refresh=False)
            if not config.train.progress_bar and main:
                print(f"step {step + 1}: lr {lr:.2e} " + " ".join(f"{t} {v:.3f}" for t, v in smooth.items()), flush=True)
        if config.train.eval_every and (step + 1) % config.train.eval_every == 0 and not last:
            if main:
                scores = evaluate_all(accelerator.unwrap_model(objective).model, data, config)
                bar.write(f"step {step + 1}: " + ", ".join(
                    f"{t} {PRIMARY_METRIC[data[t].task_type]}={s[PRIMARY_METRIC[data[t].task_type]]:.4f}" for t, s in scores.items()
                ))
            accelerator.wait_for_everyone()
        if config.train.save_every and (step + 1) % config.train.save_every == 0 and not last:
            save_checkpoint(accelerator, out_dir, step + 1, config.train.keep_checkpoints)
    else:
        step = config.train.max_steps
    bar.close()
    wall = time.perf_counter() - t_start

    steps_run = step - start_step
    if config.train.save_every and steps_run > 0:
        save_checkpoint(accelerator, out_dir, step, config.train.keep_checkpoints)
    unwrapped = accelerator.unwrap_model(objective)
    results: dict[str, Any] = {}
    if main:
        results = finish(
            unwrapped.model, data, config, out_dir, history=history, steps=step, steps_this_run=steps_run,
            stopped_by=stopped_by, train_seconds=train_time, loop_seconds=wall,
            images_per_second=images * world / train_time if train_time > 0 else None,
            loss_weights=unwrapped.loss_weighting.weights(), processes=world, threads=threads,
        )
    accelerator.wait_for_everyone()
    results.update(model=unwrapped.model, history=history)
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
        usages[task] = collect_expert_usage(model, loader, task, max_batches=config.train.usage_max_batches, output_norms=False)
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
    _write_json(out_dir / "metrics.json", results)
    return results


__all__ = [
    "adamw",
    "build_optimizer",
    "checkpoint_dirs",
    "evaluate_all",
    "finish",
    "parameter_groups",
    "pretrain",
    "resolve_resume",
    "configure_threads",
    "run_progress",
    "save_checkpoint",
    "set_learning_rate",
    "warmup_cosine_lr",
]
