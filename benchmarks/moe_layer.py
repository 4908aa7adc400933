"""MoE MLP layer and MoE ViT train-step speed against dense equivalents. Prints one JSON line.

    python benchmarks/moe_layer.py                      # CPU, fp32, ViT-S shape, batch 8
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16
    python benchmarks/moe_layer.py --preset vit-b --batch 128 --device cuda --dtype bfloat16   # ViT-B, 25,216 tokens
    python benchmarks/moe_layer.py --malloc keep        # glibc keeps freed memory (see below)
    python benchmarks/moe_layer.py --malloc tcmalloc    # tcmalloc preloaded (or jemalloc)

Layer: forward + backward of one MoE MLP layer at the preset's width (`--preset vit-s`: d=384, `vit-b`: d=768;
16 experts, top-4, expert width d; batch × 197 tokens unless `--tokens`), routing included, for each experts backend; a dense MLP of equal active width (d → 4d → d); and a
plain per-expert Python loop. `matmul_floor_vs_dense`: the expert matmuls alone (16 blocks of 394 rows) against
the dense MLP's matmuls, the floor under any backend's `best_vs_dense` on this machine. Model: one AdamW train step (fused, as transformers' Trainer's default) of the MoE preset against transformers'
`ViTForImageClassification` of the same width and depth, `--batch` images at 224 px; the JSON states both models'
forward FLOPs per image (`moe_adapt.flops.flops_per_image`: the MoE model's active FLOPs). Timings are medians over rounds that
interleave the candidates (in an order that rotates every round), so machine noise hits all of them alike; the ratios are what to compare.

By default the benchmark runs under the platform's allocator as it is (`--malloc default`). `--malloc keep` opts
in to `keep_freed_memory()` (`benchmarks/measure.py`): glibc then keeps freed buffers for the next step instead of
returning them to the kernel and page-faulting them back in, a cost that falls on every candidate but most on the
MoE layer's larger temporaries (the CPU numbers in docs/performance.md were measured so); `--malloc jemalloc` / `--malloc tcmalloc`
restart the benchmark with that allocator preloaded (`LD_PRELOAD`), as PyTorch's CPU launcher
`python -m torch.backends.xeon.run_cpu` does by default. The JSON's `malloc` says which ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from measure import (  # benchmarks/
    MALLOC_LIBRARIES,
    keep_freed_memory,
    malloc_library,
    malloc_setting,
    preload_env,
)

from moe_adapt import MoEViTConfig, MoEViTForImageClassification
from moe_adapt.models.moe_vit.modeling_moe_vit import MoEViTSparseMLP
from moe_adapt.training.loop import adamw


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t) * 1000


def interleaved(cands: dict, rounds: int, device, warmup: int = 2, once=()) -> dict[str, float]:
    """Median time per candidate over `rounds` interleaved rounds; candidates in `once` (too slow to repeat)
    run a single timed call."""
    for k, fn in cands.items():
        for _ in range(0 if k in once else warmup):
            fn()
    times = {k: [] for k in cands}
    names = list(cands)
    for r in range(rounds):
        # each round starts one candidate later: what runs right after another (a cache or allocator state left
        # behind) is not always the same pair, so no candidate carries a fixed position's cost or benefit
        for k in names[r % len(names) :] + names[: r % len(names)]:
            if k not in once or r == 0:
                times[k].append(timed(cands[k], device))
    return {k: statistics.median(v) for k, v in times.items()}


BACKENDS = ("eager", "batched_mm", "grouped_mm", "segmented_mm")


def layer_benchmark(device, dtype, rounds, tokens, backends=BACKENDS, d=384):
    experts, k = 16, 4
    torch.manual_seed(0)
    cands = {}
    x = torch.randn(tokens // 197, 197, d, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    base = None
    for impl in backends:
        cfg = MoEViTConfig(
            tasks=["t"],
            hidden_size=d,
            num_hidden_layers=1,
            num_attention_heads=6,
            mlp_experts=[experts],
            mlp_top_k=k,
            mlp_expert_size=4 * d // k,
            experts_implementation=impl,
        )
        layer = MoEViTSparseMLP(cfg, 0).to(device=device, dtype=dtype)
        if base is None:
            with torch.no_grad():
                for p in layer.parameters():
                    p.normal_(0, 0.02)
            base = layer.state_dict()
        layer.load_state_dict(base)
        layer.config._experts_implementation = impl

        def run(layer=layer):
            layer.zero_grad(set_to_none=True)  # as in a train step: no gradient accumulation
            y, _ = layer(x, "t")
            y.backward(grad)

        cands[impl] = run

    ex = layer.experts

    def loop():  # a plain per-expert Python loop over the same fused weights, routing included
        layer.zero_grad(set_to_none=True)
        flat = x.reshape(-1, d)
        route = layer.router(flat, "t")
        out = torch.zeros_like(flat)
        for e in range(experts):
            token, slot = torch.where(route.indices == e)
            h = F.gelu(flat[token] @ ex.up_proj[e].T + ex.up_proj_bias[e])
            h = (h @ ex.down_proj[e].T + ex.down_proj_bias[e]) * route.weights[token, slot, None]
            out = out.index_add(0, token, h)
        out.backward(grad.reshape(-1, d))

    cands["loop"] = loop
    fc1 = torch.nn.Linear(d, 4 * d, device=device, dtype=dtype)
    fc2 = torch.nn.Linear(4 * d, d, device=device, dtype=dtype)

    def dense():
        fc1.zero_grad(set_to_none=True)
        fc2.zero_grad(set_to_none=True)
        fc2(F.gelu(fc1(x))).backward(grad)

    cands["dense"] = dense
    # batched_mm gathers one weight matrix per (token, expert) pair: gigabytes at this shape, so it runs once.
    return interleaved(cands, rounds, device, once=("batched_mm",) if device.type == "cpu" else ())


def matmul_floor(device, dtype, rounds, tokens, d=384):
    """The matmuls alone, no routing, no gathers: the six per-expert matmuls of forward + backward (up, down, and
    their input and weight gradients) over 16 equal contiguous blocks of tokens·4 rows, against the six matmuls of
    the dense MLP. Whatever an experts backend does, its matmuls cost at least this ratio."""
    experts, k = 16, 4
    width = 4 * d // k
    rows = tokens * k // experts
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    xs, dh, dy = rand(experts, rows, d), rand(experts, rows, width), rand(experts, rows, d)
    up, down = rand(experts, width, d), rand(experts, d, width)
    x, dh_dense, dy_dense = rand(tokens, d), rand(tokens, 4 * d), rand(tokens, d)
    w1, w2 = rand(4 * d, d), rand(d, 4 * d)

    def expert_mms():
        for e in range(experts):
            h = xs[e] @ up[e].T
            _ = h @ down[e].T
            _ = dy[e] @ down[e]
            _ = dy[e].T @ h
            _ = dh[e] @ up[e]
            _ = dh[e].T @ xs[e]

    def dense_mms():
        h = x @ w1.T
        _ = h @ w2.T
        _ = dy_dense @ w2
        _ = dy_dense.T @ h
        _ = dh_dense @ w1
        _ = dh_dense.T @ x

    ms = interleaved({"experts": expert_mms, "dense": dense_mms}, rounds, device)
    return ms["experts"] / ms["dense"]


def build_model(name: str, preset: str, image_size: int):
    """The model a train step times, and its forward's extra arguments: "moe", the MoE ViT preset with one task
    (`cls`, 1000 labels); "dense", transformers' `ViTForImageClassification` of the same width, depth, heads and
    patch size with a 4× MLP. Seeded, so each is the same on every call (also used by `train_step_profile.py` and
    `cuda_graph_step.py`)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = MoEViTConfig.from_preset(preset, tasks=["cls"], image_size=image_size, num_labels=1000)
    if name == "moe":
        return MoEViTForImageClassification(cfg), {"task": "cls"}
    vit = ViTForImageClassification(
        ViTConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=4 * cfg.hidden_size,
            image_size=image_size,
            patch_size=cfg.patch_size,
            num_labels=1000,
        )
    )
    return vit, {}


def model_benchmark(device, dtype, rounds, batch, image_size, preset="vit-s"):
    moe = build_model("moe", preset, image_size)[0].to(device=device, dtype=dtype)
    vit = build_model("dense", preset, image_size)[0].to(device=device, dtype=dtype)
    x = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
    y = torch.randint(0, 1000, (batch,), device=device)
    # fused where torch has the kernel, as transformers' Trainer uses by default
    opts = {id(m): adamw(m.parameters(), lr=1e-4) for m in (moe, vit)}

    def step(model, **kw):
        def run():
            out = model(pixel_values=x, labels=y, **kw)
            out.loss.backward()
            opts[id(model)].step()
            opts[id(model)].zero_grad(set_to_none=True)

        return run

    ms = interleaved({"moe": step(moe, task="cls"), "dense": step(vit)}, rounds, device, warmup=1)
    return {k: batch / (v / 1000) for k, v in ms.items()}, (moe.config, vit.config)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--model-rounds", type=int, default=4)
    p.add_argument("--preset", default="vit-s", choices=["vit-s", "vit-b"], help="layer width and model")
    p.add_argument("--tokens", type=int, default=None, help="tokens of the layer benchmark (default: batch x 197)")
    p.add_argument("--batch", type=int, default=8, help="images per train step (and the layer's tokens / 197)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated experts backends to time")
    p.add_argument(
        "--malloc",
        choices=["keep", "default", *MALLOC_LIBRARIES],
        default="default",
        help="keep: glibc keeps freed memory for the next step (benchmarks/measure.py keep_freed_memory); "
        "default: the platform's allocator as it is (under glibc its own thresholds, which page-fault "
        "freed buffers back in every step); jemalloc / tcmalloc: the benchmark restarts itself with "
        "that allocator preloaded (LD_PRELOAD), as PyTorch's CPU launcher does",
    )
    a = p.parse_args()
    preloaded = os.environ.pop("MOE_ADAPT_PRELOADED", None)  # set by the restart below, for this process only
    if a.malloc in MALLOC_LIBRARIES and malloc_library() != a.malloc:
        if preloaded == a.malloc:
            raise SystemExit(
                f"--malloc {a.malloc}: preloading (LD_PRELOAD={os.environ.get('LD_PRELOAD')!r}) did not "
                f"replace malloc ({malloc_library()})"
            )
        try:
            env = preload_env(a.malloc) | {"MOE_ADAPT_PRELOADED": a.malloc}
        except FileNotFoundError as e:
            raise SystemExit(f"--malloc {a.malloc}: {e}") from None
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # interpreter flags kept
    if a.malloc == "keep":
        keep_freed_memory()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    names = a.backends.split(",")
    width = MoEViTConfig.from_preset(a.preset, tasks=["cls"]).hidden_size
    tokens = a.tokens or a.batch * 197
    layer = layer_benchmark(device, dtype, a.rounds, tokens, names, d=width)
    backends = {k: round(layer[k], 3) for k in names}
    best = min(backends, key=backends.get)
    result = {
        "device": a.device
        if a.device != "cpu"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": a.dtype,
        "malloc": malloc_setting(),
        "preset": a.preset,
        "hidden_size": width,
        "tokens": tokens,
        "dense_ms": round(layer["dense"], 3),
        "backends_ms": backends,
        "loop_ms": round(layer["loop"], 3),
        "best_backend": best,
        "best_vs_dense": round(backends[best] / layer["dense"], 3),
        "loop_vs_dense": round(layer["loop"] / layer["dense"], 3),
        "matmul_floor_vs_dense": round(matmul_floor(device, dtype, a.rounds, tokens, d=width), 3),
    }
    if not a.skip_model:
        from moe_adapt.flops import flops_per_image

        img_s, (moe_config, vit_config) = model_benchmark(
            device, dtype, a.model_rounds, a.batch, a.image_size, a.preset
        )
        name = a.preset.replace("-", "_")  # vit_s / vit_b
        result.update(
            {
                "batch": a.batch,
                f"moe_{name}_train_img_s": round(img_s["moe"], 2),
                f"dense_{name}_train_img_s": round(img_s["dense"], 2),
                f"{name}_train_vs_dense": round(img_s["moe"] / img_s["dense"], 3),
                "moe_gflops_per_image": round(flops_per_image(moe_config)["gflops"], 3),  # active FLOPs, forward
                "dense_gflops_per_image": round(flops_per_image(vit_config)["gflops"], 3),
            }
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
