"""A MoE ViT train step captured as one CUDA graph, against the same step run eagerly and the dense ViT. Prints one JSON
line. Needs a CUDA GPU.

    python benchmarks/cuda_graph_step.py                  # bf16 ViT-S, batch 8 and 64

On an accelerator every MoE layer dispatches without waiting for the device (block offsets, gathers and grouped
matmuls stay on the GPU; bf16 takes CUDA's fused grouped kernel), and every tensor's shape is fixed by the batch
(tokens × top-k rows, whatever the routing), so forward, backward and a capturable fused AdamW step can be recorded
once with `torch.cuda.graph` and replayed: the routing still changes with the weights, since the replay reads the
offsets from device memory. This is PyTorch's whole-network capture recipe (warm-up on a side stream,
`zero_grad(set_to_none=True)` before capture, static inputs, an optimizer with `capturable=True`); a training loop
copies each batch into the captured input tensors before `replay()`. Per model and batch: the eager step (plain
fused AdamW) and the replayed graph (median ms), whether a replay moved the parameters, and the captured loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from moe_layer import build_model  # benchmarks/ is on sys.path when this script runs


def timeit(fn, n: int) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 2)


def measure(name: str, a, batch: int, dtype: torch.dtype) -> dict:
    model, kw = build_model(name, a.preset, a.image_size)
    model = model.cuda().to(dtype)
    x = torch.randn(batch, 3, a.image_size, a.image_size, device="cuda", dtype=dtype)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the eager baseline: plain fused AdamW

    def step():
        opt.zero_grad(set_to_none=True)
        model(pixel_values=x, labels=y, **kw).loss.backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    eager = timeit(step, a.steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)  # its state stays on the GPU
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as the recipe asks
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = model(pixel_values=x, labels=y, **kw).loss
        loss.backward()
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    graph.replay()
    torch.cuda.synchronize()
    moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    return {
        "eager_ms": eager,
        "graph_ms": timeit(graph.replay, a.steps),
        "params_move": moved,
        "loss": float(loss.detach()),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="bfloat16: CUDA's fused grouped kernel; other dtypes take a per-expert fallback that reads "
        "the offsets back to the host, which capture rejects",
    )
    p.add_argument("--preset", default="vit-s")
    p.add_argument("--batches", default="8,64", help="comma-separated batch sizes")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20, help="timed steps and replays (median)")
    p.add_argument("--warmup", type=int, default=10, help="eager steps before timing")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_graph_step.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    dtype = getattr(torch, a.dtype)
    result = {"device": torch.cuda.get_device_name(), "dtype": a.dtype, "preset": a.preset, "image_size": a.image_size}
    for batch in (int(b) for b in a.batches.split(",")):
        for name in ("moe", "dense"):
            try:
                result[f"{name}_b{batch}"] = measure(name, a, batch, dtype)
            except RuntimeError as e:  # e.g. a host sync during capture: say which, and go on
                cause = e.__context__ or e  # a failed capture re-raises on exit; the first error is the one to show
                result[f"{name}_b{batch}"] = {"error": str(cause).splitlines()[0][:300]}
            print(f"{name} batch {batch}: {result[f'{name}_b{batch}']}", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
        moe, dense = result[f"moe_b{batch}"], result[f"dense_b{batch}"]
        if "graph_ms" in moe and "graph_ms" in dense:
            result[f"b{batch}_graph_vs_dense_graph"] = round(dense["graph_ms"] / moe["graph_ms"], 3)
            result[f"b{batch}_graph_vs_dense_eager"] = round(dense["eager_ms"] / moe["graph_ms"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
