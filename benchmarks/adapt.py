"""Adaptation benchmark: one downstream set, the same step budget, four ways to adapt a pretrained MoE ViT.

    python benchmarks/adapt.py                                   # runs/mini_full/model (`make mini-full`) if it
                                                                 # exists, else a mini model pretrained briefly
    python benchmarks/adapt.py --model runs/mini/model --dataset textures --steps 300

Arms (each in a fresh process, so that peak memory is the arm's own):

- `full_ft`: full fine-tuning of the whole (unsliced) MoE model;
- `sliced_lora`: the sub-network the source task uses on the new images (top-k experts per layer) + LoRA;
- `sliced_router`: the same sub-network, router and head only;
- `lora_unsliced`: LoRA on the whole model.

`--untrained-preset vit-s --image-size 224 --steps 6 --batch-size 8` measures speed and memory at ViT-S size on a
randomly initialised model (no ViT-S can be pretrained here); its accuracies are meaningless.

`--validation 0.2` scores every arm on a fixed 20% of the training images instead of the test split, for choosing
LoRA settings (`--r`, `--attention-projections`, `--lora-lr`, `--lora-weight-decay`, `--augment`, ...) without
looking at the test images.

Each arm reports trainable / total parameters, FLOPs per image, train images/s, peak memory (RSS above the
process baseline on CPU: weights, gradients, optimizer state, activations; measured by `measure.RssMeter`, which
`finetune` takes in place of the library's getrusage peak) and accuracy. Every arm runs `--seeds`
times (3; seeds outermost, so machine drift hits all arms alike): accuracy is the mean over seeds, speed and memory
the median, `per_seed` lists each run. The last line printed is
ONE JSON object with every arm's report, the ratios of sliced + LoRA to full fine-tuning measured in this run, and
whether each target of issue 6 is met (<= 5% trainable, <= 50% params, >= 1.5x images/s, <= 0.6x memory,
accuracy within 1 point).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from measure import MALLOC_LIBRARIES, RssMeter, malloc_library, preload_env  # noqa: E402  (benchmarks/measure.py)

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "full_ft": {"mode": "full", "slice": False},
    "sliced_lora": {"mode": "lora", "slice": True},
    "sliced_router": {"mode": "router", "slice": True},
    "lora_unsliced": {"mode": "lora", "slice": False},
}
BRIEF_STEPS, BRIEF_DIR = 200, ROOT / "runs" / "bench_adapt" / "pretrain"
FULL_MODEL = ROOT / "runs" / "mini_full" / "model"  # `make mini-full`: the model of the README's numbers
KEEP = (
    "trainable_params",
    "total_params",
    "trainable_fraction",
    "flops_per_image",
    "train_images_per_s",
    "train_images_per_cpu_s",
    "peak_memory_mb",
    "peak_memory_above_baseline_mb",
    "train_state_mb",
    "metric",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        help="pretrained multi-task model folder (default: runs/mini_full/model if present and no "
        "--pretrain-* flag is given, else a mini model pretrained briefly here)",
    )
    p.add_argument(
        "--untrained-preset",
        choices=["vit-s", "vit-b"],
        help="speed and memory at a real size instead: a randomly initialised model of this preset (routers "
        "random, so routing spreads); accuracies are then meaningless. Use with --image-size 224.",
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help=f"steps of a brief mini pretraining (default {BRIEF_STEPS}); given, or with --pretrain-dir, "
        "it is used even when runs/mini_full/model exists",
    )
    p.add_argument("--pretrain-dir", default=None, help=f"where that pretraining goes (default {BRIEF_DIR})")
    p.add_argument("--dataset", default="digits", choices=["digits", "textures"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--r", type=int, default=4, help="LoRA rank (FinetuneConfig's default)")
    p.add_argument(
        "--dense-mlp",
        dest="dense_mlp",
        action="store_true",
        help="also LoRA the dense MLPs' fc1/fc2 (default: the fused experts and the attention projections)",
    )
    p.add_argument(
        "--attention-projections",
        default="q_proj,v_proj",
        help="comma-separated attention projections LoRA adapts (q_proj,k_proj,v_proj,o_proj), or none: no "
        "attention LoRA at all (neither Linears nor the MoA experts' q/o; include_attention=False)",
    )
    p.add_argument("--train-norms", action="store_true", help="LoRA arms also train the backbone's LayerNorms")
    p.add_argument(
        "--lora-experts",
        default="all",
        choices=["all", "attention", "none"],
        help="which fused expert tensors LoRA adapts: all (MLP and attention experts), attention (the MoA "
        "experts' q/o only), none (Linear layers only)",
    )
    p.add_argument(
        "--patch-embedding", action="store_true", help="LoRA arms also adapt the patch embedding (conv LoRA)"
    )
    p.add_argument(
        "--lora-lr",
        type=float,
        default=None,
        help="learning rate of the LoRA arms (default: the recipe's, FinetuneConfig's per-mode default)",
    )
    p.add_argument(
        "--head-lr",
        type=float,
        default=None,
        help="learning rate of what the LoRA arms train whole (head, routers; FinetuneConfig.head_lr, "
        "default: 3 x the LoRA rate; full fine-tuning keeps its own, 20 x its rate)",
    )
    p.add_argument(
        "--lora-weight-decay",
        type=float,
        default=None,
        help="AdamW weight decay of the LoRA arms (default: the recipe's, 0)",
    )
    p.add_argument(
        "--augment",
        default=None,
        metavar="SPEC",
        help="every arm trains with augmentation: 'default' (random resized crops of 25-100%% and flips) "
        'or a JSON mapping of scale / ratio / hflip_p, e.g. \'{"scale": [0.8, 1.0], "hflip_p": 0}\'',
    )
    p.add_argument(
        "--validation",
        type=float,
        default=None,
        metavar="FRACTION",
        help="evaluate on this fraction of the training images (held out, the same for every arm and "
        "seed) instead of the eval (test) split: for choosing settings without scoring the test images",
    )
    p.add_argument("--policy", default="top_n", help="expert selection policy of the sliced arms")
    p.add_argument(
        "--criterion",
        default="frequency",
        choices=["frequency", "gate_mass", "reap"],
        help="what the policy ranks experts by (default frequency: the criterion this benchmark's "
        "results were measured with; select_experts' top_n default is gate_mass)",
    )
    p.add_argument(
        "--source-task",
        default="auto",
        help="pretraining task whose routers route the new task's images (default auto: lowest routing "
        "entropy, FinetuneConfig's default)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    p.add_argument(
        "--malloc",
        default="glibc",
        choices=["glibc", *MALLOC_LIBRARIES],
        help="allocator of every arm's process: the platform's (glibc's malloc; the default), or opt in "
        "to jemalloc / tcmalloc preloaded "
        "(LD_PRELOAD), as PyTorch's CPU launcher torch.backends.xeon.run_cpu does; peak RSS depends "
        "on it",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="runs per arm with seeds seed, seed+1, ...: accuracy is their mean, speed and memory their "
        "median (one run's accuracy on the ~450 eval images moves by about a point with the seed)",
    )
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    p.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm and print its report
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


#: options only the parent process reads (the child gets the model folder, its arm and its seed explicitly)
PARENT_ONLY = {"help", "model", "untrained_preset", "pretrain_steps", "pretrain_dir", "seeds", "arms", "arm", "seed"}


def child_argv(args) -> list[str]:
    """Every other option of this run as command-line flags for an arm's child process, read from the parser, so
    that a new option reaches the arms without forwarding code of its own."""
    argv = []
    for action in build_parser()._actions:
        if not action.option_strings or action.dest in PARENT_ONLY:
            continue
        value, flag = getattr(args, action.dest), action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif type(action) is not argparse._StoreAction or action.nargs is not None:
            raise TypeError(f"child_argv cannot forward {flag} ({type(action).__name__}); extend it for that action.")
        elif value is not None:
            argv.append(f"{flag}={value}")  # one token: a value starting with '-' stays a value
    return argv


def parse_augment(value: str | None):
    """`--augment`: None (off), 'default' (True) or a JSON mapping."""
    if value is None:
        return False
    if value == "default":
        return True
    try:
        spec = json.loads(value)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--augment {value!r}: expected 'default' or a JSON mapping ({e}).") from None
    if not isinstance(spec, dict):
        raise SystemExit(f"--augment {value!r}: expected 'default' or a JSON mapping, got {type(spec).__name__}.")
    return spec


def warm_up_libraries() -> None:
    """Two training steps of a throwaway tiny model, so that one-time allocations of the libraries (kernels,
    thread pools, lazily imported modules) happen before the memory baseline and are not charged to the arm."""
    import torch

    from moe_adapt import MoEViTConfig, MoEViTForImageClassification
    from moe_adapt.adaptation.finetune import InMemoryDataset, train

    config = MoEViTConfig.from_preset("tiny", tasks=["warm"], task_labels={"warm": ["a", "b"]})
    data = InMemoryDataset(torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.long))
    train(MoEViTForImageClassification(config), data, "warm", steps=2, batch_size=8, lr=1e-3, log_every=0)


def run_one_arm(args) -> None:
    """Child process: run one arm and print its report as JSON on the last line."""
    import torch

    from moe_adapt.adaptation.finetune import FinetuneConfig, finetune
    from moe_adapt.training import OptimizerConfig, TrainConfig

    torch.set_num_threads(args.threads)
    running = malloc_library()
    if running != args.malloc and (args.malloc != "glibc" or running in MALLOC_LIBRARIES):
        raise SystemExit(
            f"--malloc {args.malloc}: this process runs {running}'s malloc (LD_PRELOAD="
            f"{os.environ.get('LD_PRELOAD', '')!r})."
        )
    warm_up_libraries()

    arm = ARMS[args.arm]
    cfg = FinetuneConfig(
        model=args.model,
        dataset={"builtin": args.dataset, "image_size": args.image_size},
        output_dir=None,
        mode=arm["mode"],
        slice=arm["slice"],
        selection={"policy": args.policy, "criterion": args.criterion},
        source_task=args.source_task,
        lora={
            "r": args.r,
            "include_dense_mlp": args.dense_mlp,
            **(
                {"include_attention": False}
                if args.attention_projections == "none"
                else {"attention_projections": args.attention_projections.split(",")}
            ),
            "train_norms": args.train_norms,
            "include_patch_embedding": args.patch_embedding,
            "include_experts": args.lora_experts != "none",
            "include_mlp": args.lora_experts == "all",
        },
        head_lr=args.head_lr if arm["mode"] == "lora" else None,
        augment=parse_augment(args.augment),
        optimizer=OptimizerConfig(
            lr=args.lora_lr if arm["mode"] == "lora" else None,
            warmup_ratio=0.05,
            weight_decay=args.lora_weight_decay
            if arm["mode"] == "lora" and args.lora_weight_decay is not None
            else 0.0,
        ),
        train=TrainConfig(max_steps=args.steps, num_threads=args.threads, log_every=0),
        batch_size=args.batch_size,
        seed=args.seed,
        validation_fraction=args.validation,
    )
    result = finetune(cfg, verbose=False, memory=RssMeter)  # RSS above a baseline of live data (measure.py)
    report = result.report.to_dict()
    print(
        json.dumps(
            {k: report[k] for k in KEEP}
            | {
                "accuracy": report["metric"],
                "source_task": result.source_task,
                "malloc": running,
                "lr": report["extra"]["lr"],
                "head_lr": report["extra"]["head_lr"],
                "experts_kept": report["extra"]["experts_kept"],
                "final_loss": report["extra"]["final_loss"],
            }
        )
    )


def untrained_model(preset: str, out_dir: Path) -> str:
    """A randomly initialised classification model of `preset` (one source task, random routers), saved once."""
    if (out_dir / "config.json").is_file():
        return str(out_dir)
    import torch

    from moe_adapt import MoEViTConfig, MoEViTForImageClassification

    torch.manual_seed(0)
    config = MoEViTConfig.from_preset(preset, tasks=["source"], task_labels={"source": [str(i) for i in range(10)]})
    model = MoEViTForImageClassification(config)
    with torch.no_grad():
        for layer in model.moe_vit.moe_layers().values():
            torch.nn.init.normal_(layer.router.routers["source"].weight, std=0.5)
    model.save_pretrained(out_dir)  # atomic: reused when config.json is there, so never a half-written folder
    return str(out_dir)


def pretrained_model(args) -> str:
    if args.model:
        return args.model
    if args.untrained_preset:
        return untrained_model(
            args.untrained_preset, ROOT / "runs" / "bench_adapt" / f"untrained-{args.untrained_preset}"
        )
    brief = args.pretrain_steps is not None or args.pretrain_dir is not None
    if not brief and (FULL_MODEL / "config.json").is_file():
        print(f"using {os.path.relpath(FULL_MODEL)} (make mini-full: the mini recipe at 2000 steps)", file=sys.stderr)
        return os.path.relpath(FULL_MODEL)
    steps = BRIEF_STEPS if args.pretrain_steps is None else args.pretrain_steps
    pretrain_dir = Path(args.pretrain_dir or BRIEF_DIR)
    print(
        f"a mini model pretrained for {steps} steps: features that weak favour full fine-tuning (LoRA trailed it "
        "by ~5 points on the demo's 349-step model and was within 1 on `make mini-full`'s 2000-step one), so "
        "compare accuracies on the latter.",
        file=sys.stderr,
    )
    model_dir = pretrain_dir / "model"
    if (model_dir / "config.json").is_file():
        return str(model_dir)
    from moe_adapt.training import load_pretrain_config, pretrain

    config = load_pretrain_config(
        str(ROOT / "recipes" / "configs" / "mini.yaml"),
        [
            f"output_dir={pretrain_dir}",
            f"train.max_steps={steps}",
            "train.log_every=50",
            f"data.mini.out={ROOT / 'data' / 'mini'}",
        ],
    )
    results = pretrain(config)
    print(f"pretrained {results['model_dir']} in {results['loop_seconds']:.0f} s", file=sys.stderr)
    return results["model_dir"]


MEDIAN_KEYS = (
    "train_images_per_s",
    "train_images_per_cpu_s",
    "peak_memory_mb",
    "peak_memory_above_baseline_mb",
    "train_state_mb",
)


def aggregate(reports: list[dict]) -> dict:
    """One arm over several seeds: accuracy (= metric) is the mean, speed and memory the median, the rest is the
    first run's (parameters and FLOPs do not depend on the seed); `per_seed` keeps every run's numbers."""
    out = dict(reports[0])
    accuracy = statistics.mean(r["accuracy"] for r in reports)
    out["accuracy"] = out["metric"] = round(accuracy, 4)
    for key in MEDIAN_KEYS:  # None where a run measured nothing (e.g. --steps 1: the first step is warm-up)
        values = [r[key] for r in reports if r.get(key) is not None]
        out[key] = round(statistics.median(values), 4) if values else None
    out["per_seed"] = {
        key: [r[key] for r in reports]
        for key in ("accuracy", "train_images_per_cpu_s", "peak_memory_above_baseline_mb", "final_loss")
    }
    return out


def ratios(arms: dict) -> tuple[dict, dict]:
    full, lora = arms.get("full_ft"), arms.get("sliced_lora")
    if not full or not lora:
        return {}, {}
    r = {
        "trainable_fraction": lora["trainable_fraction"],
        "trainable_vs_full_model": round(lora["trainable_params"] / full["total_params"], 4),
        "params": round(lora["total_params"] / full["total_params"], 4),
        "flops": round(lora["flops_per_image"] / full["flops_per_image"], 4) if full["flops_per_image"] else None,
        "images_per_s": round(lora["train_images_per_s"] / full["train_images_per_s"], 3),
        "images_per_cpu_s": round(lora["train_images_per_cpu_s"] / full["train_images_per_cpu_s"], 3),
        "peak_memory": round(lora["peak_memory_above_baseline_mb"] / full["peak_memory_above_baseline_mb"], 3),
        "train_state_memory": round(lora["train_state_mb"] / full["train_state_mb"], 3),
        "accuracy_points": round(100 * (lora["accuracy"] - full["accuracy"]), 2),
    }
    targets = {
        "trainable<=5%": r["trainable_fraction"] <= 0.05,
        "params<=50%": r["params"] <= 0.5,
        "images_per_cpu_s>=1.5x": r["images_per_cpu_s"] >= 1.5,
        "peak_memory<=0.6x": r["peak_memory"] <= 0.6,
        "train_state_memory<=0.6x": r["train_state_memory"] <= 0.6,
        "accuracy_within_1pt": r["accuracy_points"] >= -1.0,
    }
    return r, targets


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.arm:
        run_one_arm(args)
        return
    start = time.time()
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {args.seeds}")
    names = [a for a in args.arms.split(",") if a]
    for name in names:
        if name not in ARMS:
            raise SystemExit(f"unknown arm {name!r}; choose from {list(ARMS)}")
    if args.attention_projections == "none" and args.lora_experts != "all" and not args.dense_mlp:
        raise SystemExit(
            f"--attention-projections none with --lora-experts {args.lora_experts} leaves LoRA no target: "
            "keep --lora-experts all (the MLP experts) or add --dense-mlp."
        )
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.malloc != "glibc":
        try:
            env = preload_env(args.malloc, env)
        except FileNotFoundError as e:
            raise SystemExit(f"--malloc {args.malloc}: {e}") from None
    model = pretrained_model(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = {name: [] for name in names}
    for seed in seeds:  # seeds outermost: machine drift hits every arm alike
        for name in names:
            cmd = [sys.executable, __file__, "--arm", name, "--model", model, "--seed", str(seed), *child_argv(args)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"arm {name} (seed {seed}) failed (exit code {proc.returncode})")
            runs[name].append(json.loads(lines[-1]))
            print(f"{name} (seed {seed}): {runs[name][-1]}", file=sys.stderr)
    arms = {name: aggregate(reports) for name, reports in runs.items()}
    r, targets = ratios(arms)
    from moe_adapt.adaptation.finetune import evaluated_on

    print(
        json.dumps(
            {
                "benchmark": "adapt",
                "dataset": args.dataset,
                "image_size": args.image_size,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "seeds": seeds,
                "evaluated_on": evaluated_on(args.validation),
                "lora_r": args.r,
                "lora_dense_mlp": args.dense_mlp,
                "lora_attention_projections": []
                if args.attention_projections == "none"
                else args.attention_projections.split(","),
                "lora_lr": args.lora_lr,
                "head_lr": args.head_lr,
                "lora_weight_decay": args.lora_weight_decay,
                "augment": args.augment,
                "lora_train_norms": args.train_norms,
                "lora_patch_embedding": args.patch_embedding,
                "lora_experts": args.lora_experts,
                "selection": args.policy,
                "criterion": args.criterion,
                "threads": args.threads,
                "malloc": args.malloc,
                "throughput": "images per CPU-second of the training loop (machine shared; wall "
                "clock too, as train_images_per_s)",
                "model": model,
                "untrained_preset": args.untrained_preset,
                "source_task": next(iter(arms.values()))["source_task"] if arms else None,
                "memory": "peak_memory_above_baseline_mb: peak RSS above the process (libraries warmed, data loaded) before "
                "the model; train_state_mb: weights + grads + optimizer state + saved activations of one step",
                "arms": arms,
                "sliced_lora_vs_full_ft": r,
                "targets_met": targets,
                "wall_s": round(time.time() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
