"""The one training loop of moe_adapt, on accelerate: pretraining, fine-tuning, healing and continual learning all
call `train_loop`. No Trainer class: the loop below is the whole of it.

    accelerator = make_accelerator(config.train, output_dir)        # device, mixed precision, accumulation, DDP/FSDP
    optimizer = adamw(parameter_groups(model, 0.05), accelerator.device, lr=1e-3)
    scheduler = build_scheduler(optimizer, config.optimizer, config.train.max_steps)
    result = train_loop(model, optimizer, scheduler, batches_from, loss_fn, accelerator, max_steps=..., seed=0)

- `batches_from(start_step)` returns an iterator of the batches from optimizer step `start_step` on (after a resume,
  the step the checkpoint reached), `gradient_accumulation_steps` batches per step;
- `loss_fn(model, batch)` returns the loss, or a dict with `"loss"`, optionally `"log"` (`{name: float}`: smoothed,
  shown on the progress bar and kept in `history`) and anything else the caller's `on_step(step, out)` reads.

Per step: reseed torch's RNG from (seed, step, rank) (dropout / drop-path draws are then a function of the position
in the run), forward + `accelerator.backward` under `accelerator.accumulate`, clip, AdamW step, scheduler step,
progress bar, `on_step`, and every `save_every` steps `accelerator.save_state` (accelerate names the checkpoints
`output_dir/checkpoints/checkpoint_<i>` and keeps the newest `keep_checkpoints`). `resume` ("latest" or a checkpoint
folder) brings back the model, optimizer, scheduler, RNG states and the step (`LoopState`). With `seed` set and
batches that are a function of their step, a resumed run continues bit for bit (tested on pretraining).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
)
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from .config import OptimizerConfig, TrainConfig
from .data import hash_seed

CUSTOM_STATE = (
    "custom_checkpoint_0.pkl"  # accelerate writes the registered `LoopState` last: a complete checkpoint has it
)


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or other accelerator)."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def threads_per_process(requested: int) -> int:
    """`requested` torch threads, or fewer when this machine's processes would then run more threads than it has
    cores: with `LOCAL_WORLD_SIZE` processes (set by `torchrun` and `accelerate launch`) on C usable cores, each takes
    at most max(1, C // processes). A note says so on the first process."""
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested * processes <= cores:
        return requested
    fitted = max(1, cores // processes)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            f"train.num_threads={requested}: {processes} process(es) on {cores} core(s), so {fitted} thread(s) each.",
            flush=True,
        )
    return fitted


def make_accelerator(
    train: TrainConfig, output_dir: str | Path | None = None, find_unused_parameters: bool = False, **kwargs
) -> Accelerator:
    """The run's `Accelerator`: `train.mixed_precision`, `train.gradient_accumulation_steps`, checkpoints under
    `output_dir/checkpoints` (accelerate's automatic naming, the newest `train.keep_checkpoints` kept), the scheduler
    stepped once per optimizer step on any number of processes. Without a GPU, `cpu=True` makes `torchrun` /
    `accelerate launch` processes run as MULTI_CPU (gloo). DDP or FSDP come from the launcher (`accelerate launch
    --use_fsdp`, `accelerate config`)."""
    if train.num_threads is not None:
        torch.set_num_threads(threads_per_process(train.num_threads))
    project = None
    if output_dir is not None:
        project = ProjectConfiguration(
            project_dir=str(output_dir), automatic_checkpoint_naming=True, total_limit=train.keep_checkpoints
        )
    return Accelerator(
        cpu=not has_accelerator(),
        mixed_precision=train.mixed_precision,
        # a loader that repeats (`repeat_loader`) must not force an extra optimizer step at each epoch's end
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=train.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,
        project_config=project,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------------------------


def parameter_groups(module: torch.nn.Module, weight_decay: float, no_decay_router: bool = True) -> list[dict]:
    """Two AdamW groups of the trainable parameters: weight-decayed matrices, and the rest (biases, norms,
    embeddings, position / CLS tokens, task embeddings, loss weights, and — with `no_decay_router` — routers, whose
    decay would pull routing back towards uniform). Empty groups are left out."""
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
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(params, device: torch.device | str = "cpu", **kwargs) -> torch.optim.AdamW:
    """`torch.optim.AdamW`, fused where torch has a fused kernel for `device` (CPU, CUDA, ...)."""
    return torch.optim.AdamW(
        params, fused=torch.device(device).type in _get_fused_kernels_supported_devices(), **kwargs
    )


def build_optimizer(
    module: torch.nn.Module, cfg: OptimizerConfig, device: torch.device | str = "cpu", lr: float | None = None
) -> torch.optim.AdamW:
    """AdamW over `parameter_groups(module)` with the section's settings (`lr` overrides `cfg.lr`)."""
    groups = parameter_groups(module, cfg.weight_decay, cfg.no_decay_router)
    if not groups:
        raise ValueError("Nothing to train: every parameter of the model is frozen.")
    return adamw(groups, device, lr=lr if lr is not None else cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, max_steps: int):
    """transformers' `get_scheduler(cfg.scheduler)`: `cfg.warmup(max_steps)` warm-up steps, then the schedule over
    `max_steps` (`cosine_with_min_lr` decays every group to `min_lr / lr` of its own rate)."""
    from transformers import get_scheduler

    extra = {"min_lr": cfg.min_lr} if cfg.scheduler == "cosine_with_min_lr" else None
    return get_scheduler(
        cfg.scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup(max_steps),
        num_training_steps=max_steps,
        scheduler_specific_kwargs=extra,
    )


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


class LoopState:
    """The loop's own checkpointed state (`accelerator.register_for_checkpointing`): the optimizer steps done."""

    def __init__(self, step: int = 0):
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first (a run killed while saving leaves one
    without the loop state, which accelerate writes last: it is skipped)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint_*") if (p / CUSTOM_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.rsplit("_", 1)[1]))


def resolve_resume(output_dir: str | Path | None, resume: str | bool | None) -> Path | None:
    """`resume=True` / "latest" → the newest complete checkpoint of `output_dir` (None when there is none: a fresh
    start); a path → that checkpoint (must be complete)."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        found = checkpoint_dirs(output_dir) if output_dir is not None else []
        return found[-1] if found else None
    path = Path(resume)
    if not (path / CUSTOM_STATE).is_file():
        raise FileNotFoundError(
            f"--resume {path}: not a complete checkpoint folder (no {CUSTOM_STATE}); "
            f"see {Path(output_dir or '.') / 'checkpoints'}."
        )
    return path


def cpu_fsdp_requested(accelerator: Accelerator) -> bool:
    """Whether FSDP was asked for (`accelerate launch --use_fsdp`) on CPU processes, where accelerate runs DDP-style
    MULTI_CPU only: `shard_on_cpu` then shards the model with torch's own `fully_shard`."""
    return (
        accelerator.distributed_type == DistributedType.MULTI_CPU
        and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    )


def shard_on_cpu(model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> None:
    """FSDP on CPU processes (gloo) with torch's `fully_shard`: each module of a class in the model's
    `_no_split_modules` (its blocks) and the root are sharded, the optimizer's groups moved onto the sharded
    parameters, and `accelerator.save_state` / `load_state` save and load the model and optimizer shards on every
    rank with `torch.distributed.checkpoint` (in `<checkpoint>/fsdp`); accelerate keeps the scheduler, the RNG
    states and the loop state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = dict(model.named_parameters())
    for group in optimizer.param_groups:  # fully_shard replaced the parameters with sharded (DTensor) ones
        group["params"] = [params[names[id(p)]] for p in group["params"]]

    def save(models, weights, output_dir):
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(output_dir, "fsdp"))

    def load(models, input_dir):
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=os.path.join(input_dir, "fsdp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def gather_model(accelerator: Accelerator, model: torch.nn.Module, build: Callable[[], torch.nn.Module]):
    """The trained `model` whole, for saving and evaluating: the unwrapped model itself (on every process), or,
    when FSDP sharded it, `build()` (a fresh model of the same structure) loaded with the full state dict gathered
    from the shards, on the main process (None on the others). Every process must call it (the gather is
    collective)."""
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type != DistributedType.FSDP and not cpu_fsdp_requested(accelerator):
        return unwrapped
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(unwrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    whole = build()
    whole.load_state_dict(state)
    return whole


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoopResult:
    """What `train_loop` returns: the prepared `model` / `optimizer` (unwrap with `accelerator.unwrap_model`), the
    step reached and the one it started from, why it stopped (`max_steps` / `max_minutes`), every step's loss,
    the logged `history` (`{"step", "lr", **smoothed logs}`), and the seconds spent in steps and in the loop."""

    model: torch.nn.Module
    optimizer: Any
    step: int
    start_step: int
    stopped_by: str
    losses: list[float]
    history: list[dict]
    train_seconds: float
    loop_seconds: float


def _loss_and_out(out) -> tuple[torch.Tensor, dict]:
    return (out["loss"], out) if isinstance(out, dict) else (out, {"loss": out})


def _prepare_and_resume(model, optimizer, scheduler, accelerator: Accelerator, resume: str | bool | None):
    """`accelerator.prepare` the model, optimizer and scheduler (torch's `fully_shard` for FSDP on CPU), register a
    `LoopState` for checkpointing and restore it (and them) from `resume`; new checkpoints number on after every old
    one. Returns `(model, optimizer, scheduler, state)`."""
    if cpu_fsdp_requested(accelerator):  # accelerate's FSDP needs GPUs; on CPU torch's fully_shard does it
        shard_on_cpu(model, optimizer, accelerator)
        scheduler = accelerator.prepare(scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = LoopState()
    accelerator.register_for_checkpointing(state)
    checkpoint = resolve_resume(
        accelerator.project_dir if accelerator.project_configuration.automatic_checkpoint_naming else None, resume
    )
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"Resumed from {checkpoint} at step {state.step}.")
    if accelerator.project_configuration.automatic_checkpoint_naming:  # new checkpoints number on after every old one
        numbers = [
            int(p.name.rsplit("_", 1)[1]) for p in (Path(accelerator.project_dir) / "checkpoints").glob("checkpoint_*")
        ]
        accelerator.project_configuration.iteration = max(numbers, default=-1) + 1
    return model, optimizer, scheduler, state


def _progress_bar(max_steps: int, start: int, desc: str, show: bool):
    """The loop's tqdm bar over `max_steps` steps, from `start` on; hidden unless `show`."""
    from tqdm.auto import tqdm

    return tqdm(total=max_steps, initial=start, desc=desc, dynamic_ncols=True, mininterval=2.0, disable=not show)


def _log_line(step: int, max_steps: int, lr: float, smooth: dict[str, float]) -> str:
    """The log line printed every `log_every` steps when there is no progress bar."""
    return f"step {step}/{max_steps}: lr {lr:.2e} " + " ".join(f"{k} {v:.4f}" for k, v in smooth.items())


def train_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batches_from: Callable[[int], Iterator],
    loss_fn: Callable[[torch.nn.Module, Any], Any],
    accelerator: Accelerator,
    *,
    max_steps: int,
    seed: int | None = None,
    max_grad_norm: float | None = None,
    resume: str | bool | None = None,
    save_every: int = 0,
    log_every: int = 0,
    max_minutes: float | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    progress_bar: bool = True,
    desc: str = "train",
) -> LoopResult:
    """Train `model` for `max_steps` optimizer steps (see the module docstring). The model's train / eval mode is
    the caller's. Checkpoints need the accelerator's `project_dir` (`make_accelerator(..., output_dir)`)."""
    model, optimizer, scheduler, state = _prepare_and_resume(model, optimizer, scheduler, accelerator, resume)
    start, rank = state.step, accelerator.process_index
    batches = batches_from(start)
    accum = accelerator.gradient_accumulation_steps
    bar = _progress_bar(max_steps, start, desc, show=progress_bar and accelerator.is_main_process)
    smooth: dict[str, float] = {}
    losses, history, train_seconds, stopped_by, saved_at = [], [], 0.0, "max_steps", start
    t_start = time.perf_counter()
    for step in range(start, max_steps):
        if max_minutes and step > start and time.perf_counter() - t_start > 60 * max_minutes:
            stopped_by = "max_minutes"
            break
        t0 = time.perf_counter()
        if seed is not None:
            torch.manual_seed(hash_seed(seed, step, rank))  # this step's dropout / drop-path draws, on every device
        for _ in range(accum):
            with accelerator.accumulate(model):
                loss, out = _loss_and_out(loss_fn(model, next(batches)))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t0
        state.step = step + 1
        losses.append(float(loss.detach()))
        for name, value in {"loss": losses[-1], **out.get("log", {})}.items():
            smooth[name] = value if name not in smooth else 0.9 * smooth[name] + 0.1 * value
        bar.update(1)
        if log_every and (state.step % log_every == 0 or state.step == max_steps):
            history.append({"step": state.step, "lr": scheduler.get_last_lr()[0], **smooth})
            bar.set_postfix({k: f"{v:.4g}" for k, v in smooth.items()}, refresh=False)
            if not progress_bar:
                accelerator.print(_log_line(state.step, max_steps, history[-1]["lr"], smooth))
        if on_step is not None:
            on_step(state.step, out)
        if save_every and state.step % save_every == 0 and state.step < max_steps:
            accelerator.save_state()
            saved_at = state.step
    bar.close()
    if save_every and state.step > saved_at:
        accelerator.save_state()
    return LoopResult(
        model=model,
        optimizer=optimizer,
        step=state.step,
        start_step=start,
        stopped_by=stopped_by,
        losses=losses,
        history=history,
        train_seconds=train_seconds,
        loop_seconds=time.perf_counter() - t_start,
    )


def shuffled_loader(dataset, batch_size: int, seed: int, collate_fn) -> torch.utils.data.DataLoader:
    """A seeded, shuffled DataLoader of `dataset` that drops a short last batch unless the set is smaller than one."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(dataset) >= batch_size,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),
    )


def repeat_loader(loader, start: int = 0) -> Iterator:
    """`loader`'s batches epoch after epoch (`set_epoch` each epoch where it has one), the first `start` skipped."""
    epoch, seen = 0, 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            seen += 1
            if seen > start:
                yield batch
        epoch += 1


def compile_model(model: torch.nn.Module, train: TrainConfig) -> torch.nn.Module:
    """`model.compile()` (in place: parameter names and `save_pretrained` unchanged) when `train.compile` is set."""
    if train.compile:
        model.compile()
    return model


__all__ = [
    "LoopResult",
    "LoopState",
    "adamw",
    "build_optimizer",
    "build_scheduler",
    "checkpoint_dirs",
    "compile_model",
    "cpu_fsdp_requested",
    "gather_model",
    "has_accelerator",
    "make_accelerator",
    "parameter_groups",
    "repeat_loader",
    "resolve_resume",
    "shard_on_cpu",
    "train_loop",
]
