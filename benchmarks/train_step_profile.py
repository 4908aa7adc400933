"""Where a MoE ViT train step's time goes, against the dense ViT of the same width and depth. Prints one JSON line.

    python benchmarks/train_step_profile.py --device cuda --dtype bfloat16     # the GPU question
    python benchmarks/train_step_profile.py --preset tiny --image-size 32      # a quick look on CPU

Per model and per train step (forward, backward, fused AdamW step, as `moe_layer.py`'s model benchmark): the wall
time with the profiler off (median over `--steps`), the number of ATen operator calls (nested ones included), and
on CUDA the number of device operations (kernels, memsets and copies), the time the GPU was busy, and how many
times the host waited for the device (`torch.cuda`'s sync debug mode). A step far slower than its GPU-busy time
is launch-bound: fewer, larger kernels help, not faster ones (or CUDA graphs: `cuda_graph_step.py`). The `top`
lists give the operators with the most device time (CUDA) or host time (CPU), in ms per step. The MoE model
is `MoEViTForImageClassification` from a preset (ViT-S by default), the dense one transformers'
`ViTForImageClassification`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from moe_layer import build_model  # benchmarks/ is on sys.path when this script runs
from torch.profiler import ProfilerActivity, profile

from moe_adapt.training.loop import adamw


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def host_waits(step, device: torch.device) -> int | None:
    """How many times one step makes the host wait for the device (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sync(device)
    return sum("called a synchronizing" in str(c.message) for c in caught)  # not the mode's own prototype notice


def measure(step, device: torch.device, steps: int, warmup: int, top: int) -> dict:
    for _ in range(warmup):
        step()
    walls = []  # timed before the profiler runs: its teardown slows the steps right after it
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        walls.append((time.perf_counter() - t) * 1000)
    waits = host_waits(step, device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()
    on_device = [  # device work, without user annotations (the optimizer's `Optimizer.step#...` span repeats its kernels)
        e
        for e in events
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    host_ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::")]
    out = {"wall_ms": round(statistics.median(walls), 3), "aten_calls": sum(e.count for e in host_ops) // steps}
    if cuda:
        out |= {
            "kernels": sum(e.count for e in on_device) // steps,
            "gpu_busy_ms": round(sum(e.self_device_time_total for e in on_device) / steps / 1000, 3),
            "host_waits": waits,
        }
        ranked = sorted(on_device, key=lambda e: e.self_device_time_total, reverse=True)[:top]
        out["top"] = {e.key[:80]: round(e.self_device_time_total / steps / 1000, 3) for e in ranked}
    else:
        ranked = sorted(host_ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        out["top"] = {e.key: round(e.self_cpu_time_total / steps / 1000, 3) for e in ranked}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--preset", default="vit-s", help="MoEViTConfig preset of the MoE model (vit-s, vit-b, mini, tiny)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed steps, then as many profiled ones")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=5, help="operators listed per model")
    a = p.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    moe = build_model("moe", a.preset, a.image_size)[0].to(device=device, dtype=dtype)
    vit = build_model("dense", a.preset, a.image_size)[0].to(device=device, dtype=dtype)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device, dtype=dtype)
    y = torch.randint(0, 1000, (a.batch,), device=device)

    def train_step(model, **kw):
        opt = adamw(model.parameters(), lr=1e-4)

        def step():
            model(pixel_values=x, labels=y, **kw).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    result = {"device": a.device, "dtype": a.dtype, "preset": a.preset, "batch": a.batch, "image_size": a.image_size}
    result["moe"] = measure(train_step(moe, task="cls"), device, a.steps, a.warmup, a.top)
    result["dense"] = measure(train_step(vit), device, a.steps, a.warmup, a.top)
    result["moe_vs_dense_wall"] = round(result["moe"]["wall_ms"] / result["dense"]["wall_ms"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
