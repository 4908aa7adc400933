"""The efficiency report of a fine-tuning run: what it trained, how big the model is, what it costs, how good it is.

```python
>>> meter = MemoryMeter()            # baseline: the process before the model exists
>>> ... build the model ...
>>> with meter.track(), Throughput() as speed:
...     for batch in loader: ...; speed.add(len(batch["labels"]))
>>> report = efficiency_report(model, task="digits", images_per_s=speed.images_per_s, memory=meter,
...                            metric_name="accuracy", metric=0.93, mode="lora")
>>> print(report.to_console()); report.save("out/report.json")
```

Peak memory is what torch or the operating system reports without help: `torch.cuda.max_memory_allocated` on
GPU (reset at the start of training, so `peak_memory_above_baseline_mb` is the run's own allocations above the
memory allocated before the model was built), and on CPU the process's peak resident set size so far
(`resource.getrusage(...).ru_maxrss`; None where the platform has no `resource` module). The CPU peak cannot be
reset: it covers the whole process, interpreter and libraries included, and `peak_memory_above_baseline_mb` is
how far the run raised it above its value before the model was built (0 when something earlier in the process
peaked higher). Finer measurements (the RSS above a baseline taken after the allocator handed its free memory
back) are the benchmarks' business: `benchmarks/measure.py` has a `MemoryMeter` subclass for them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_write_json
from .lora import count_model_parameters


def max_rss_mb() -> float | None:
    """The process's peak resident set size so far in MiB (`getrusage`), or None where there is no `resource`
    module (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux and the BSDs


class MemoryMeter:
    """Peak memory of a stretch of work: max allocated CUDA memory on a CUDA device, the process's peak RSS
    (`getrusage`) elsewhere.

    Created before the model is built, it records the baseline (allocated CUDA memory, or the peak RSS so far);
    `with meter.track():` resets the peak where the device allows it (CUDA), and `meter.peak_mb` /
    `meter.above_baseline_mb` read it after. `kind` names what was measured ("cuda_max_allocated" or "max_rss");
    `resettable` says whether the peak covers the tracked stretch only. Subclass it to measure otherwise
    (`_current_mb`, `reset_peak`, `read_peak`).
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "max_rss"
        self.resettable = self.device.type == "cuda"
        self.baseline_mb = self._current_mb()
        self.peak_mb: float | None = None

    def _current_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return max_rss_mb()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read_peak(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return max_rss_mb()

    def track(self):
        meter = self

        class _Track:
            def __enter__(self):
                meter.reset_peak()
                return meter

            def __exit__(self, *exc):
                peak = meter.read_peak()
                if peak is not None:
                    meter.peak_mb = max(meter.peak_mb or 0.0, peak)
                return False

        return _Track()

    @property
    def above_baseline_mb(self) -> float | None:
        if self.peak_mb is None or self.baseline_mb is None:
            return None
        return max(0.0, self.peak_mb - self.baseline_mb)


class Throughput:
    """Images per second of the timed region; `add(n)` after each step. The first `warmup` steps are not timed
    (allocator and kernel warm-up). Both wall-clock and process CPU time are kept: on a machine shared with other
    jobs, images per CPU-second (`images_per_cpu_s`) is the steadier number to compare runs with."""

    def __init__(self, warmup: int = 1):
        self.warmup, self.steps, self.images, self.seconds, self.cpu_seconds = warmup, 0, 0, 0.0, 0.0
        self.train_state_mb: float | None = None  # filled by the training loop (SavedTensorMeter)
        self._t = self._c = None

    def __enter__(self):
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def add(self, n: int, device: torch.device | None = None) -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        now, cpu = time.perf_counter(), time.process_time()
        self.steps += 1
        if self.steps > self.warmup:
            self.images += n
            self.seconds += now - self._t
            self.cpu_seconds += cpu - self._c
        self._t, self._c = now, cpu

    def __exit__(self, *exc):
        return False

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    @property
    def images_per_cpu_s(self) -> float | None:
        return self.images / self.cpu_seconds if self.cpu_seconds > 0 else None


class SavedTensorMeter:
    """Bytes autograd keeps for the backward pass inside the `with` block (the activations of a training step;
    the model's own parameters excluded; tensors sharing storage counted once).

    `train_state_mb(model, optimizer)` adds parameters, gradients and optimizer state: the memory a training step
    needs, measured exactly and independent of the allocator and of libraries (RSS includes both).
    """

    def __init__(self, model: nn.Module):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.sizes: dict[int, int] = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.param_ptrs:
            self.sizes[ptr] = max(self.sizes.get(ptr, 0), storage.nbytes())
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def saved_mb(self) -> float:
        return sum(self.sizes.values()) / 2**20

    def train_state_mb(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> float:
        """Saved activations + parameters + gradients + optimizer state, MiB."""
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        total += sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # gradients
        if optimizer is not None:
            for state in optimizer.state.values():
                total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim())
        return self.saved_mb + total / 2**20


@dataclasses.dataclass
class EfficiencyReport:
    """One run's numbers. `flops_per_image` is the forward pass of one image (2 × multiply-adds, from
    `moe_adapt.flops.flops_per_image`); memory in MiB."""

    name: str
    mode: str
    trainable_params: int
    total_params: int
    flops_per_image: int | None
    train_images_per_s: float | None
    train_images_per_cpu_s: float | None
    peak_memory_mb: float | None
    peak_memory_above_baseline_mb: float | None
    memory_kind: str
    train_state_mb: float | None
    metric_name: str | None
    metric: float | None
    train_steps: int | None = None
    batch_size: int | None = None
    device: str = "cpu"
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["trainable_fraction"] = round(self.trainable_fraction, 6)
        for key in (
            "train_images_per_s",
            "train_images_per_cpu_s",
            "peak_memory_mb",
            "peak_memory_above_baseline_mb",
            "train_state_mb",
            "metric",
        ):
            if out[key] is not None:
                out[key] = round(float(out[key]), 4)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    def to_console(self) -> str:
        def num(v, fmt="{:,}"):
            return "n/a" if v is None else fmt.format(v)

        mem = num(self.peak_memory_mb, "{:.1f} MiB")
        if self.peak_memory_above_baseline_mb is not None and self.memory_kind != "cuda_max_allocated":
            mem += f" ({self.peak_memory_above_baseline_mb:.1f} MiB above the process baseline)"
        kind = self.memory_kind
        rows = [
            ("run", f"{self.name} ({self.mode})"),
            ("trainable params", f"{self.trainable_params:,} ({100 * self.trainable_fraction:.2f}%)"),
            ("total params", f"{self.total_params:,}"),
            (
                "FLOPs / image",
                num(self.flops_per_image, "{:,.0f}")
                + ("" if self.flops_per_image is None else f" ({self.flops_per_image / 1e9:.4f} GFLOPs)"),
            ),
            (
                "train images/s",
                num(self.train_images_per_s, "{:.1f}")
                + " wall, "
                + num(self.train_images_per_cpu_s, "{:.1f}")
                + " per CPU-second",
            ),
            (f"peak memory ({kind})", mem),
            ("train state", num(self.train_state_mb, "{:.1f} MiB") + " (weights, grads, optimizer, activations)"),
            (self.metric_name or "metric", num(self.metric, "{:.4f}")),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(["efficiency report", *(f"  {k.ljust(width)}  {v}" for k, v in rows)])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON to `path` (through a temporary file renamed into place)."""
        return atomic_write_json(path, self.to_dict(), indent=2)


def model_flops(model: nn.Module, task: str | None = None, image_size: int | None = None) -> int | None:
    """FLOPs per image of the deployable model (`moe_adapt.flops.flops_per_image`, head included). For a
    peft-wrapped model this is the merged model's count: merging removes LoRA's extra work. None (with a
    warning) when the counter is unavailable or fails."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    try:
        from ..flops import flops_per_image

        return int(flops_per_image(base, task=task, image_size=image_size)["total"])
    except Exception as err:  # noqa: BLE001 - a report without FLOPs beats a crash after training
        warnings.warn(
            f"FLOPs per image could not be counted ({type(err).__name__}: {err}); reported as null.", stacklevel=2
        )
        return None


def efficiency_report(
    model: nn.Module,
    task: str,
    name: str,
    mode: str,
    images_per_s: float | None,
    memory: MemoryMeter | None,
    metric_name: str | None,
    metric: float | None,
    flops: int | None = None,
    train_state_mb: float | None = None,
    images_per_cpu_s: float | None = None,
    **fields,
) -> EfficiencyReport:
    """Assemble the report for `model` (plain or peft-wrapped): trainable = parameters with `requires_grad`,
    total = the deployable model's parameters (LoRA factors fold in on merge, so they are not counted twice)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return EfficiencyReport(
        name=name,
        mode=mode,
        trainable_params=trainable,
        total_params=count_model_parameters(model),
        flops_per_image=flops if flops is not None else model_flops(model, task),
        train_images_per_s=images_per_s,
        train_images_per_cpu_s=images_per_cpu_s,
        peak_memory_mb=None if memory is None else memory.peak_mb,
        peak_memory_above_baseline_mb=None if memory is None else memory.above_baseline_mb,
        memory_kind="none" if memory is None else memory.kind,
        train_state_mb=train_state_mb,
        metric_name=metric_name,
        metric=metric,
        **fields,
    )


__all__ = ["EfficiencyReport", "MemoryMeter", "SavedTensorMeter", "Throughput", "efficiency_report", "model_flops"]
