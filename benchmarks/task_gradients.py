"""Benchmark: how much of the shared backbone's gradient each task contributes. Prints ONE JSON line.

    python benchmarks/task_gradients.py --model runs/mini/model      # a pretrained MoEViTForMultiTask
    python benchmarks/task_gradients.py --model init                  # the recipe's model at initialisation

For every task of the recipe (`--config`, default `recipes/configs/mini.yaml`), the gradient of its loss (mean over
`--batches` training batches, the recipe's batch size and augmentation) on each parameter group:

- `shared`: what every task trains (patch embedding, position embedding, norms, the dense attention and MLP
  sub-layers, the shared key/value projections of the attention experts);
- `experts`, `routers`, `task_embedding`, `head`.

Reported: each task's gradient norm per group, the cosine between tasks' shared gradients, the number of shared
tensors on which each task has the largest gradient, and `loss_weights_equal_norm`: the fixed loss weights
(the task of smallest shared gradient = 1) that would give every task the same shared-gradient norm. One AdamW over the summed loss
normalises each shared coordinate by the root of its summed squared gradient, so a task whose shared gradient is
10x smaller moves the shared parameters about 10x less than it would alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a pretrained MoEViTForMultiTask folder, or 'init'")
    p.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "mini.yaml"))
    p.add_argument("--batches", type=int, default=8, help="training batches per task (default 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    return p.parse_args(argv)


def parameter_group(name: str) -> str:
    if name.startswith("heads."):
        return "head"
    if ".router." in name:
        return "routers"
    if ".experts." in name:
        return "experts"
    if "task_embeddings" in name:
        return "task_embedding"
    return "shared"


def task_gradients(model, data: dict, batches: int, seed: int) -> dict:
    """`{task: {parameter name: gradient}}`: each task's mean loss gradient over `batches` training batches, on
    every parameter some task's loss reached (zero where this task's did not)."""
    import torch

    from moe_adapt.training.data import TaskBatchStream

    grads = {}
    model.train()
    for index, (task, d) in enumerate(data.items()):
        stream = TaskBatchStream(d.train, d.batch_size, d.collate_fn, seed=seed, task_index=index)
        model.zero_grad(set_to_none=True)
        for _, batch in zip(range(batches), stream.batches()):
            out = model(batch["pixel_values"], task=task, labels=batch["labels"], return_dict=True)
            (out.task_loss / batches).backward()
        grads[task] = {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
        }
    # a parameter some task reached and another did not: a zero gradient for the other
    reached = {n: g for task_grads in grads.values() for n, g in task_grads.items()}
    return {t: {n: g.get(n, torch.zeros_like(reached[n])) for n in reached} for t, g in grads.items()}


def summarise(grads: dict) -> dict:
    import torch

    tasks = list(grads)
    norms = {}
    for task, g in grads.items():
        squares: dict[str, float] = {}
        for name, value in g.items():
            group = parameter_group(name)
            squares[group] = squares.get(group, 0.0) + float(value.pow(2).sum())
        norms[task] = {group: round(s**0.5, 4) for group, s in sorted(squares.items())}
    shared = sorted({n for g in grads.values() for n in g if parameter_group(n) == "shared"})

    vectors = {t: torch.cat([grads[t][n].flatten() for n in shared]) for t in tasks}
    cosine = {
        f"{a}|{b}": round(float(torch.nn.functional.cosine_similarity(vectors[a], vectors[b], dim=0)), 3)
        for i, a in enumerate(tasks)
        for b in tasks[i + 1 :]
    }
    largest = dict.fromkeys(tasks, 0)
    for name in shared:
        sizes = {t: float(grads[t][name].norm()) for t in tasks}
        largest[max(sizes, key=sizes.get)] += 1
    shared_norm = {t: norms[t].get("shared", 0.0) for t in tasks}
    smallest = min(shared_norm.values())
    return {
        "norms": norms,
        "shared_cosine": cosine,
        "largest_on_shared_tensors": largest,
        "shared_tensors": len(shared),
        "loss_weights_equal_norm": {t: round(smallest / v, 3) if v else None for t, v in shared_norm.items()},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from moe_adapt.training import load_pretrain_config
    from moe_adapt.training.data import load_task_data
    from moe_adapt.training.model import build_model

    torch.set_num_threads(args.threads)
    config = load_pretrain_config(args.config, args.overrides)
    data = load_task_data(config, main_process=True)
    torch.manual_seed(config.seed)
    if args.model == "init":
        model = build_model(config, label_names={t: d.label_names for t, d in data.items()})
    else:
        from moe_adapt import load_model

        model = load_model(args.model)
    grads = task_gradients(model, data, args.batches, seed=config.seed + 1)
    print(json.dumps({"benchmark": "task_gradients", "model": args.model, "batches": args.batches, **summarise(grads)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
