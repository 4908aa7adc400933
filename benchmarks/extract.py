"""Benchmark: task slices of a multi-task MoE ViT (issue 5). Prints ONE JSON line.

    python benchmarks/extract.py --model runs/mini/model      # a mini-pretrained multi-task model
    python benchmarks/extract.py                              # runs a short mini pretraining itself first
    python benchmarks/extract.py --quick                      # smoke run (numbers not meaningful)

For every task of the model it collects expert usage on calibration images (2,048 of the training split), selects
experts (default: what `moe-adapt extract` selects with no selection option, `DEFAULT_SELECTION` of
`moe_adapt.cli.extract`: Mod-Squad's 3% threshold; `--policy top_n` keeps the k experts of largest gate mass, so
every MoE layer collapses to a fused dense layer), slices the task's
sub-model and reports, all measured in this run on the same machine:

- parameters of the full model (all of it, and the part the task can reach) and of the slice;
- FLOPs per image (`moe_adapt.flops.flops_per_image`) of the full model, the slice and a transformers `ViTModel` of
  the same active shape, layer by layer (same width, depth, image and patch size; k heads of the attention
  experts' head size in mixture-of-attention layers, via `ViTConfig.head_dim`; MLP width = the active experts'
  width), and of the standard ViT of that width (hidden / heads per head everywhere: narrower attention than
  Mod-Squad's 2·d/heads experts, so fewer FLOPs than the slice);
- inference images/s of the backbones (pixels → last hidden state; heads left out so that all compare alike):
  the full model routing for the task, the slice, the same-shape `ViTModel` and the standard one; timed
  interleaved, the median of several rounds; and the rate of backbone FLOPs per second of the slice over each
  ViT's (`flop_rate_sliced_vs_vit*`: 1.0 = the slice runs its work as efficiently as transformers' ViT);
- the task metric (accuracy / COCO mAP / mean IoU on the eval split) of the full model and of the slice, and of
  the slice healed toward the parent on the calibration images (`heal_submodel`: by default the whole backbone,
  `--heal-train all`, distilled to the parent's last hidden states at lr 3e-4, 600 steps on 2,048 images; `--heal-train routers,norms,biases`
  fits only those small tensors; `--heal-steps`, 0 to skip); the healed slice has the same
  parameters, FLOPs and speed as the slice.

Allocator (`--malloc`): by default the benchmark runs under the platform's allocator as it is. `--malloc keep`
opts in to `keep_freed_memory()` (`benchmarks/measure.py`), so that glibc keeps freed buffers for the next
forward pass of every model timed. Under glibc's own dynamic thresholds the heap top is handed back to the kernel
whenever a large enough block is freed, and which model pays for it depends on its allocation pattern: measured
on the demo model's fashion slice (32 px, batch 64, 1 thread), the slice took 557-935 minor page faults per
forward pass and the same-shape ViT 20-232; with freed memory kept, almost none.

Targets: slice ≤ 50% of the full model's parameters, ≥ 99% of its metric, ≥ 0.95× the images/s of the same-shape
dense ViT (`speed_sliced_vs_vit`; `speed_sliced_vs_vit_standard` is reported beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a pretrained MoEViTForMultiTask folder; default: pretrain one first")
    p.add_argument("--pretrain-config", default="recipes/configs/mini.yaml", help="recipe of the tasks' data")
    p.add_argument("--pretrain-steps", type=int, default=150, help="steps of the short pretraining (no --model)")
    from moe_adapt.cli.extract import DEFAULT_SELECTION

    p.add_argument(
        "--policy",
        default=DEFAULT_SELECTION["policy"],
        choices=["top_n", "threshold", "coverage"],
        help="default: moe-adapt extract's (%(default)s)",
    )
    p.add_argument("--n", type=int, default=None, help="top_n: experts per layer (default: top-k)")
    p.add_argument("--threshold", type=float, default=DEFAULT_SELECTION["threshold"])
    p.add_argument("--coverage", type=float, default=0.9)
    p.add_argument("--criterion", default=None, choices=["frequency", "gate_mass", "reap"])
    p.add_argument(
        "--calibration-images", type=int, default=2048, help="training images (eval transforms) for usage and healing"
    )
    p.add_argument(
        "--heal-steps",
        type=int,
        default=600,
        help="also heal each slice toward the parent on the calibration images (heal_submodel) and report "
        "its metric; 0 skips it",
    )
    p.add_argument("--heal-batch-size", type=int, default=32)
    p.add_argument(
        "--heal-train",
        default="all",
        help="groups healing fits: 'all' (default) or comma-separated routers, norms, biases, weights",
    )
    p.add_argument(
        "--heal-lr",
        type=float,
        default=None,
        help="healing learning rate (default heal_submodel's: 3e-4 with weights, else 3e-3)",
    )
    p.add_argument("--eval-images", type=int, default=None, help="eval images per task for the metric (default all)")
    p.add_argument("--batch-size", type=int, default=64, help="batch of the throughput runs")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median)")
    p.add_argument("--iters", type=int, default=5, help="forward passes per model per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    p.add_argument(
        "--malloc",
        choices=["keep", "default"],
        default="default",
        help="keep: glibc keeps freed memory for the next forward pass (benchmarks/measure.py "
        "keep_freed_memory), for every model timed; default: glibc's own thresholds, under which "
        "some of the models page-fault their freed buffers back in on every pass (see below)",
    )
    p.add_argument("--out", default=None, help="where the pretraining and slices go (default: a temp folder)")
    p.add_argument("--quick", action="store_true", help="tiny numbers: a smoke run of the whole path")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def same_shape_vit(config, image_size: int, standard_heads: bool = False):
    """A transformers `ViTModel` with the slice's active shape, layer by layer: the same width, depth, image and
    patch size; in a mixture-of-attention layer, attention with k heads of the experts' head size (transformers'
    `ViTConfig.head_dim`; Mod-Squad's attention experts are 2·d/heads wide), elsewhere the model's dense
    attention; an MLP as wide as the active MLP experts together in an MoE MLP layer, elsewhere the dense MLP.

    `standard_heads=True` gives the plain ViT of the same width instead: `num_attention_heads` heads of
    hidden / heads everywhere (narrower than the attention experts, so fewer FLOPs than the slice)."""
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.modeling_vit import ViTAttention, ViTMLP

    def vit_config(heads=config.num_attention_heads, head_dim=None, mlp_width=config.intermediate_size):
        extra = {} if head_dim is None else {"head_dim": head_dim}
        return ViTConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            intermediate_size=mlp_width,
            image_size=image_size,
            patch_size=config.patch_size,
            num_channels=config.num_channels,
            qkv_bias=config.qkv_bias,
            layer_norm_eps=config.layer_norm_eps,
            hidden_act=config.hidden_act,
            **extra,
        )

    base = vit_config()
    vit = ViTModel(base, add_pooling_layer=False)
    moa_shape = (config.attn_top_k, config.attn_expert_head_size)
    rebuild_attention = not standard_heads and moa_shape != (
        base.num_attention_heads,
        base.hidden_size // base.num_attention_heads,
    )
    moa = vit_config(*moa_shape)
    moe_mlp = vit_config(mlp_width=config.mlp_top_k * config.mlp_expert_size)
    # rebuilt layers run the same attention kernel as the model's own (a fresh config has none set, and transformers
    # would fall back to its slower eager attention there)
    moa._attn_implementation = moe_mlp._attn_implementation = vit.config._attn_implementation
    for i, layer in enumerate(vit.layers):
        if config.attn_experts[i] and rebuild_attention:
            layer.attention = ViTAttention(moa)
        if config.mlp_experts[i] and moe_mlp.intermediate_size != base.intermediate_size:
            layer.mlp = ViTMLP(moe_mlp)
    return vit.eval()


def throughput(runners: dict, pixels, rounds: int, iters: int) -> dict[str, float]:
    """Images/s of each runner (a callable on pixels), timed in interleaved rounds; the median per runner."""
    import torch

    with torch.no_grad():
        for run in runners.values():  # warm-up
            run(pixels)
            run(pixels)
        rates = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                t0 = time.perf_counter()
                for _ in range(iters):
                    run(pixels)
                rates[name].append(iters * pixels.shape[0] / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from accelerate.utils import set_seed
    from measure import keep_freed_memory, malloc_library, malloc_setting  # benchmarks/measure.py

    if args.malloc == "keep" and keep_freed_memory() is None:
        print(
            f"warning: --malloc keep has no effect under this allocator ({malloc_library() or 'not glibc'}); "
            "measuring with it as it is",
            file=sys.stderr,
        )

    from moe_adapt.analysis import collect_expert_usage, select_experts
    from moe_adapt.analysis.selection import DEFAULT_CRITERION
    from moe_adapt.data import load_task_dataset
    from moe_adapt.flops import count_parameters, flops_per_image
    from moe_adapt.hub import load_model
    from moe_adapt.surgery import extract_submodel, heal_submodel, verify_submodel
    from moe_adapt.training import load_pretrain_config, pretrain
    from moe_adapt.training.data import load_task_data
    from moe_adapt.training.evaluation import PRIMARY_METRIC, evaluate_task

    if args.quick:
        args.pretrain_steps, args.calibration_images, args.eval_images = 3, 32, 32
        args.heal_steps = min(args.heal_steps, 3)
        args.rounds, args.iters, args.batch_size = 2, 1, 16
    from moe_adapt.cli.extract import heal_train_groups

    heal_groups = heal_train_groups(args.heal_train)
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_extract_"))
    out.mkdir(parents=True, exist_ok=True)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731 - stdout carries the JSON line only
    seconds = {}

    # 1. The multi-task model and its tasks' data -------------------------------------------------------------------
    overrides = ["train.progress_bar=false", f"train.max_steps={args.pretrain_steps}", f"output_dir={out / 'pretrain'}"]
    if args.quick:  # a small mini benchmark of its own, never the shared data/mini
        overrides += ["data.mini.small=true", f"data.mini.out={out / 'mini-small'}"]
    cfg = load_pretrain_config(args.pretrain_config, overrides)
    t0 = time.perf_counter()
    if args.model:
        model_dir = args.model
    else:
        log(f"pretraining the mini model for {args.pretrain_steps} steps ...")
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON line only
            model_dir = pretrain(cfg)["model_dir"]
    seconds["pretrain"] = time.perf_counter() - t0
    model = load_model(model_dir).eval()
    tasks = list(model.config.tasks)
    data = {t: d for t, d in load_task_data(cfg, splits=("train", "eval")).items() if t in tasks}

    results, targets = {}, {}
    for task in tasks:
        d = data[task]
        log(f"[{task}] usage, selection, slicing ...")
        t0 = time.perf_counter()
        # calibration: training images with the eval transforms (no augmentation)
        train_eval_tf = load_task_dataset(d.train.spec, split=d.train.split, transform="eval")
        order = torch.randperm(len(train_eval_tf), generator=torch.Generator().manual_seed(args.seed))
        calib = torch.utils.data.DataLoader(
            torch.utils.data.Subset(train_eval_tf, order[: args.calibration_images].tolist()),
            batch_size=64,
            collate_fn=d.collate_fn,
        )
        usage = collect_expert_usage(model, calib, task)
        selection = select_experts(
            usage, args.policy, n=args.n, threshold=args.threshold, coverage=args.coverage, criterion=args.criterion
        )
        sub = extract_submodel(model, selection, tasks=[task]).eval()
        sub.save_pretrained(out / f"slice-{task}")  # written atomically
        seconds[f"slice_{task}"] = time.perf_counter() - t0

        log(f"[{task}] metric of full model and slice ...")
        t0 = time.perf_counter()
        metric = PRIMARY_METRIC[d.task_type]
        m_full = evaluate_task(model, d, task, max_samples=args.eval_images)[metric]
        m_sub = evaluate_task(sub, d, task, max_samples=args.eval_images)[metric]
        eval_batches = [b["pixel_values"] for _, b in zip(range(2), d.eval_loader(args.eval_images))]
        report = verify_submodel(model, sub, {task: eval_batches})
        seconds[f"eval_{task}"] = time.perf_counter() - t0
        heal, m_healed = None, None
        if args.heal_steps:
            log(f"[{task}] healing the slice ({args.heal_steps} steps) ...")
            t0 = time.perf_counter()
            healed = extract_submodel(model, selection, tasks=[task]).eval()
            heal = heal_submodel(
                model,
                healed,
                calib,
                steps=args.heal_steps,
                lr=args.heal_lr,
                batch_size=args.heal_batch_size,
                seed=args.seed,
                train=heal_groups,
            )
            m_healed = evaluate_task(healed, d, task, max_samples=args.eval_images)[metric]
            seconds[f"heal_{task}"] = time.perf_counter() - t0

        log(f"[{task}] throughput ...")
        image_size = int(eval_batches[0].shape[-1])
        vit = same_shape_vit(model.config, image_size)
        vit_standard = same_shape_vit(model.config, image_size, standard_heads=True)
        pixels = torch.randn(args.batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        speed = throughput(
            {
                "full": lambda x, t=task: model.moe_vit(x, task=t),
                "sliced": lambda x, m=sub, t=task: m.moe_vit(x, task=t),
                "vit": lambda x, m=vit: m(pixel_values=x),
                "vit_standard": lambda x, m=vit_standard: m(pixel_values=x),
            },
            pixels,
            args.rounds,
            args.iters,
        )
        seconds[f"speed_{task}"] = time.perf_counter() - t0

        p_full, p_sub = count_parameters(model, task=task), count_parameters(sub)
        f_full = flops_per_image(model, task=task, image_size=image_size)
        f_sub = flops_per_image(sub, task=task, image_size=image_size)
        f_vit = flops_per_image(vit, image_size=image_size)
        f_vit_standard = flops_per_image(vit_standard, image_size=image_size)
        f_sub_backbone = f_sub["total"] - (f_sub["head"] or 0)
        n_backbone = {
            name: sum(p.numel() for p in m.parameters())
            for name, m in (
                ("full", model.moe_vit),
                ("sliced", sub.moe_vit),
                ("vit", vit),
                ("vit_standard", vit_standard),
            )
        }
        entry = {
            "task_type": d.task_type,
            "params": {
                "full": p_full["total"],
                "full_reachable_by_task": p_full["task_total"],
                "sliced": p_sub["total"],
                "ratio": p_sub["total"] / p_full["total"],
            },
            # the backbones alone (task heads cannot be sliced: a segmentation head weighs on the ratio above)
            "backbone_params": {**n_backbone, "ratio": n_backbone["sliced"] / n_backbone["full"]},
            "flops_per_image": {
                "full": f_full["total"],
                "sliced": f_sub["total"],
                "vit_backbone": f_vit["total"],
                "vit_standard_backbone": f_vit_standard["total"],
                "sliced_backbone": f_sub_backbone,
                "image_size": image_size,
            },
            "images_per_s": {k: round(v, 1) for k, v in speed.items()},
            "speed_sliced_vs_vit": speed["sliced"] / speed["vit"],
            "speed_sliced_vs_vit_standard": speed["sliced"] / speed["vit_standard"],
            # backbone FLOPs done per second, slice over ViT: how efficiently each runs its work (1.0 = alike)
            "flop_rate_sliced_vs_vit": speed["sliced"] * f_sub_backbone / (speed["vit"] * f_vit["total"]),
            "flop_rate_sliced_vs_vit_standard": speed["sliced"]
            * f_sub_backbone
            / (speed["vit_standard"] * f_vit_standard["total"]),
            "speed_sliced_vs_full": speed["sliced"] / speed["full"],
            "metric": {
                "name": metric,
                "full": m_full,
                "sliced": m_sub,
                "ratio": (m_sub / m_full) if m_full else None,
                "healed": m_healed,
                "healed_ratio": (m_healed / m_full) if m_full and m_healed is not None else None,
            },
            "heal": None
            if heal is None
            else {k: v for k, v in heal.to_dict().items() if k not in ("images", "per_task")},
            "kept_experts": {n: len(ids) for n, ids in selection.experts.items()},
            "dense_layers": sum(len(ids) == selection.top_k(n) for n, ids in selection.experts.items()),
            "tokens_routed_outside_kept": report.tasks[task]["routing_left_kept_set"]["any_layer"],
            "top1_agreement": report.tasks[task]["top1_agreement"],
        }
        results[task] = entry
        targets[task] = {
            "params_le_50pct": entry["params"]["ratio"] <= 0.5,
            "metric_ge_99pct": entry["metric"]["ratio"] is not None and entry["metric"]["ratio"] >= 0.99,
            "metric_ge_99pct_healed": entry["metric"]["healed_ratio"] is not None
            and entry["metric"]["healed_ratio"] >= 0.99,
            "speed_ge_095x_vit": entry["speed_sliced_vs_vit"] >= 0.95,
        }
        log(
            f"[{task}] params {entry['params']['ratio']:.3f}, {metric} {m_full:.4f} -> {m_sub:.4f}"
            + (f" (healed {m_healed:.4f})" if m_healed is not None else "")
            + ", "
            f"images/s full {speed['full']:.0f} sliced {speed['sliced']:.0f} vit {speed['vit']:.0f} "
            f"(standard heads {speed['vit_standard']:.0f})"
        )

    line = {
        "benchmark": "extract",
        "model": str(model_dir) if args.model else f"mini pretrained here for {args.pretrain_steps} steps",
        "policy": {
            "policy": args.policy,
            "n": args.n,
            "threshold": args.threshold,
            "coverage": args.coverage,
            "criterion": args.criterion or DEFAULT_CRITERION[args.policy],
        },
        "calibration_images": args.calibration_images,
        "heal": {
            "steps": args.heal_steps,
            "batch_size": args.heal_batch_size,
            "train": args.heal_train,
            "lr": args.heal_lr,
        },
        "device": "cpu",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "quick": args.quick,
        "malloc": malloc_setting(),
        "tasks": results,
        "targets_met": targets,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
