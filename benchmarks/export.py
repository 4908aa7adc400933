"""Benchmark: a routed slice in eager mode against the same slice exported with `torch.export`. Prints ONE JSON line.

    python benchmarks/export.py                 # mini preset, a classification slice that keeps 6 of 8 experts
    python benchmarks/export.py --quick         # smoke run (numbers not meaningful)

Eager mode dispatches each token to its k chosen experts (data-dependent block sizes). `torch.export` needs static
shapes, so under export a slice's MoE layers run every kept expert densely and weight them by the gates (zero for
the unchosen ones): the same outputs, E_t/k times the expert FLOPs. Both are timed interleaved in this run, on the
same inputs, median of several rounds; `max_abs_diff` is the largest difference of their logits.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def build_slice(keep: int, seed: int = 0):
    """A mini-preset classification model with random routers, sliced to the `keep` most used experts per layer."""
    from moe_adapt import MoEViTConfig, MoEViTForImageClassification
    from moe_adapt.analysis import collect_expert_usage, select_experts
    from moe_adapt.surgery import extract_submodel

    torch.manual_seed(seed)
    config = MoEViTConfig.from_preset("mini", tasks=["cls"], task_labels={"cls": [str(i) for i in range(10)]})
    model = MoEViTForImageClassification(config).eval()
    with torch.no_grad():
        for layer in model.moe_vit.moe_layers().values():
            for router in layer.router.routers.values():
                router.weight.normal_(0, 1.0)
    calib = torch.randn(32, 3, config.image_size, config.image_size)
    usage = collect_expert_usage(model, calib, "cls")
    return extract_submodel(model, select_experts(usage, "top_n", n=keep), tasks=["cls"]).eval()


def timed(fn, x, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--keep", type=int, default=6, help="experts kept per MoE layer (the mini preset has 8)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.rounds = 4, 2
    torch.set_num_threads(args.threads)
    sub = build_slice(args.keep)
    size = sub.config.image_size
    x = torch.randn(args.batch, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(sub, (x,), dynamic_shapes=({0: batch},)).module()
    with torch.inference_mode():
        eager_logits, export_logits = sub(x).logits, exported(x).logits
        odd = torch.randn(3, 3, size, size)  # another batch size through the same exported program
        odd_diff = (sub(odd).logits - exported(odd).logits).abs().max().item()
        eager_t, export_t = [], []
        for _ in range(args.rounds):  # interleaved
            eager_t += timed(lambda v: sub(v), x, 1)
            export_t += timed(exported, x, 1)
    eager_ms, export_ms = 1e3 * statistics.median(eager_t), 1e3 * statistics.median(export_t)
    print(
        json.dumps(
            {
                "benchmark": "export",
                "device": f"cpu ({platform.machine()}, {args.threads} threads)",
                "batch": args.batch,
                "experts_kept": args.keep,
                "top_k": sub.config.mlp_top_k,
                "eager_ms": round(eager_ms, 2),
                "exported_ms": round(export_ms, 2),
                "exported_vs_eager": round(export_ms / eager_ms, 3),
                "max_abs_diff": (eager_logits - export_logits).abs().max().item(),
                "max_abs_diff_batch3": odd_diff,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
