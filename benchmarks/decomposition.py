"""Benchmark: how well a multi-task model decomposes into task slices, per selection policy (issue 28).
Prints ONE JSON line per model and appends it to `--jsonl` when given.

    python benchmarks/decomposition.py --model runs/x/model --variant baseline --jsonl benchmarks/results/decomposition.jsonl
    python benchmarks/decomposition.py --model runs/x/model --heal-steps 100    # also heal the default slice

For every task of the model, on the recipe's data (`--config`, default `recipes/configs/mini.yaml`):

- `entropy`: the normalised routing entropy (mean over MoE layers of H(mean gate) / log E, the quantity
  `moe_adapt.adaptation.finetune.usage_entropy` measures: 1 = spread evenly over every expert, 0 = one expert) on
  `--calibration-images` training images (eval transforms);
- `parent`: the parent's metric on the eval split (accuracy / COCO mAP / mean IoU);
- `curve`: for each selection policy of `--policies` (`policy:criterion:value`, value = n, percent or fraction), the
  slice's parameters over the parent's and its metric over the parent's, before healing. Mod-Squad's 3% frequency
  threshold is the baseline; `default` is what `moe-adapt extract --task T` picks with no selection option;
- `default`: that default slice again, and with `--heal-steps N` its metric after `heal_submodel` (groups
  `--heal-train`) on the calibration images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
POLICIES = (
    "threshold:frequency:3,threshold:frequency:10,threshold:frequency:25,top_n:gate_mass:k,top_n:gate_mass:k+1,"
    "coverage:gate_mass:0.8,coverage:gate_mass:0.9,coverage:gate_mass:0.95,coverage:gate_mass:0.99,default"
)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a pretrained MoEViTForMultiTask folder")
    p.add_argument("--variant", default="", help="a name for this model in the JSON line")
    p.add_argument(
        "--config", default=str(ROOT / "recipes" / "configs" / "mini.yaml"), help="recipe of the tasks' data"
    )
    p.add_argument("--policies", default=POLICIES, help="comma-separated policy:criterion:value, or 'default'")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--eval-images", type=int, default=None, help="eval images per task (default all)")
    p.add_argument("--heal-steps", type=int, default=0, help="heal the default slice this many steps (0: no)")
    p.add_argument("--heal-train", default="routers,norms,biases")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jsonl", default=None, help="append the JSON line to this file too")
    p.add_argument("extra", nargs="*", help="key=value pairs recorded in the JSON line (e.g. steps=286 seed=1)")
    return p.parse_args(argv)


def selection_kwargs(spec: str, usage) -> tuple[str, dict]:
    """`policy:criterion:value` → (policy, select_experts keywords); `default` → the extract CLI's defaults."""
    if spec == "default":
        from moe_adapt.cli.extract import DEFAULT_SELECTION

        return DEFAULT_SELECTION["policy"], {k: v for k, v in DEFAULT_SELECTION.items() if k != "policy"}
    policy, criterion, value = spec.split(":")
    if policy == "top_n":  # "k" or "k+1": the layer's top-k (plus some) per kind
        extra = int(value.split("+")[1]) if "+" in value else 0
        n = (
            {kind: usage_top_k(usage, kind) + extra for kind in ("attn", "mlp")}
            if value.startswith("k")
            else int(value)
        )
        return policy, {"criterion": criterion, "n": n}
    return policy, {"criterion": criterion, policy: float(value)}


def usage_top_k(usage, kind: str) -> int:
    return next((k for name, k in usage.top_k.items() if name.endswith(kind)), 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from moe_adapt.adaptation.finetune import usage_entropy
    from moe_adapt.analysis import collect_expert_usage, select_experts
    from moe_adapt.data import load_task_dataset
    from moe_adapt.flops import count_parameters
    from moe_adapt.hub import load_model
    from moe_adapt.surgery import extract_submodel, heal_submodel
    from moe_adapt.training import load_pretrain_config
    from moe_adapt.training.data import load_task_data
    from moe_adapt.training.evaluation import PRIMARY_METRIC, evaluate_task

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_model(args.model).eval()
    tasks = list(model.config.tasks)
    cfg = load_pretrain_config(args.config, ["train.progress_bar=false"])
    data = {t: d for t, d in load_task_data(cfg, splits=("train", "eval")).items() if t in tasks}
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731 - stdout carries the JSON line only
    out = {}
    for task in tasks:
        d = data[task]
        ds = load_task_dataset(d.train.spec, split=d.train.split, transform="eval")
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: args.calibration_images].tolist()
        calib = list(
            torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order), batch_size=64, collate_fn=d.collate_fn)
        )
        usage = collect_expert_usage(model, calib, task, output_norms=False)
        metric = PRIMARY_METRIC[d.task_type]
        parent = evaluate_task(model, d, task, max_samples=args.eval_images)[metric]
        p_full = count_parameters(model, task=task)["total"]
        entry = {"metric": metric, "entropy": round(usage_entropy(usage), 4), "parent": round(parent, 4), "curve": []}
        seen = {}
        for spec in args.policies.split(","):
            policy, kw = selection_kwargs(spec, usage)
            sel = select_experts(usage, policy, **kw)
            key = json.dumps(sel.experts, sort_keys=True)
            if key not in seen:
                sub = extract_submodel(model, sel, tasks=[task]).eval()
                m = evaluate_task(sub, d, task, max_samples=args.eval_images)[metric]
                seen[key] = {
                    "params": round(count_parameters(sub)["total"] / p_full, 4),
                    "metric": round(m, 4),
                    "kept": round(m / parent, 4) if parent else None,
                    "experts": sum(len(v) for v in sel.experts.values()),
                }
            point = {"policy": spec, **seen[key]}
            entry["curve"].append(point)
            log(
                f"[{task}] {spec:<28} params {point['params']:.3f} {metric} {parent:.4f} -> {point['metric']:.4f}"
                f" ({point['kept']:.4f})"
            )
            if spec == "default":
                entry["default"] = dict(point)
                if args.heal_steps:
                    sub = extract_submodel(model, sel, tasks=[task]).eval()
                    rep = heal_submodel(model, sub, calib, steps=args.heal_steps, train=args.heal_train.split(","))
                    m = evaluate_task(sub, d, task, max_samples=args.eval_images)[metric]
                    entry["default"].update(
                        healed=round(m, 4),
                        healed_kept=round(m / parent, 4) if parent else None,
                        heal_steps=args.heal_steps,
                        heal_train=args.heal_train,
                        heal_loss=[round(rep.loss_before, 5), round(rep.loss_after, 5)],
                    )
                    log(f"[{task}] default healed {args.heal_steps} steps: {m:.4f}")
        out[task] = entry
    from moe_adapt.cli.extract import DEFAULT_SELECTION

    line = {
        "benchmark": "decomposition",
        "variant": args.variant,
        "model": args.model,
        "default_selection": DEFAULT_SELECTION,
        **dict(kv.split("=", 1) for kv in args.extra),
        "tasks": out,
        "targets_met": {
            t: e.get("default", {}).get("params", 1) <= 0.5
            and max(e.get("default", {}).get("kept") or 0, e.get("default", {}).get("healed_kept") or 0) >= 0.99
            for t, e in out.items()
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(line)
    print(text)
    if args.jsonl:
        Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
        with open(args.jsonl, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
