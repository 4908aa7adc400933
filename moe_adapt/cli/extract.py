"""`moe-adapt extract`: slice a standalone sub-model for one or more tasks.

    moe-adapt extract MODEL --data SPEC --task NAME [--task NAME2 ...] --out DIR
                      [--policy threshold|top_n|coverage] [--n N] [--threshold PCT] [--coverage FRAC]
                      [--criterion frequency|gate_mass|reap] [--split train] [--verify-split eval]
                      [--max-images 256] [--verify-images 256] [--batch-size 32] [--overwrite]
    moe-adapt extract --from-card CARD --model PARENT --out DIR [--no-check] [--overwrite]

The first form collects each task's expert usage on calibration data (`--split`), selects experts per task with
the policy, takes the union over tasks, slices the sub-model, verifies it against the parent on `--verify-split`
and writes to DIR: the sub-model (`config.json`, `model.safetensors`), `README.md` (the model card),
`verification.json`, `selection.json`, `usage_<task>.json` and `usage_heatmap.png`.

`--heal-steps N` fits the slice's router rows, LayerNorms and biases (`--heal-train all`: its whole backbone) to the
parent's outputs on the calibration images after slicing (`moe_adapt.surgery.heal_submodel`); the card records it.

The second form rebuilds the sub-model a card describes from its parent, bit for bit (checked against the card's
weight fingerprints unless `--no-check`); of a healed slice it rebuilds the slice before healing.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from pathlib import Path

from moe_adapt.analysis.selection import POLICIES
from moe_adapt.analysis.usage import CRITERIA
from moe_adapt.io import atomic_dir
from moe_adapt.surgery.heal import DEFAULT_HEAL_GROUPS, HEAL_GROUPS

from .inspect import add_calibration_arguments, collect_usages, dataset_names

#: what `moe-adapt extract` selects with no selection option (benchmarks/decomposition.py measures the same):
#: Mod-Squad's rule, experts chosen by more than 3% of the task's tokens. On a model pretrained with
#: `routing_concentration_weight` it keeps each task's top-k + `routing_concentration_extra` experts per layer: each
#: mini task within half the parent's parameters and its metric within 1%, without healing (docs/results.md); the
#: k-expert `top_n` slice is smaller and runs dense, but needs healing when that extra is above 0.
DEFAULT_SELECTION = {"policy": "threshold", "criterion": None, "threshold": 3.0}

#: `--heal-train`'s default: `heal_submodel`'s own (the small tensors)
HEAL_TRAIN_DEFAULT = ",".join(DEFAULT_HEAL_GROUPS)


def heal_train_groups(spec: str) -> tuple[str, ...]:
    """`--heal-train`: "all" or comma-separated groups of `HEAL_GROUPS` → the groups (a clear error otherwise)."""
    groups = (
        HEAL_GROUPS if spec.strip() == "all" else tuple(dict.fromkeys(g.strip() for g in spec.split(",") if g.strip()))
    )
    unknown = [g for g in groups if g not in HEAL_GROUPS]
    if unknown or not groups:
        raise ValueError(f"--heal-train {spec!r}: choose 'all' or comma-separated groups of {list(HEAL_GROUPS)}.")
    return groups


def kept_line(report) -> str:
    """One line: the slice's share of the parent's parameters and, per task, of its metric."""
    parts = [f"slice: {100 * report.params['ratio']:.1f}% of the parameters"]
    for task, t in report.tasks.items():
        m = t.get("metric")
        if m and m["parent"]:
            parts.append(f"{task} keeps {100 * m['submodel'] / m['parent']:.1f}% of its {m['name']}")
    return "; ".join(parts)


def command_line(args: argparse.Namespace) -> str:
    """The command, with every option that shaped the result spelled out."""
    if args.from_card:
        parts = ["moe-adapt", "extract", "--from-card", args.from_card, "--model", args.model, "--out", args.out]
        return shlex.join(parts + (["--no-check"] if args.no_check else []))
    parts = ["moe-adapt", "extract", args.model, "--data", args.data]
    for t in args.task:
        parts += ["--task", t]
    for d in args.dataset or []:
        parts += ["--dataset", d]
    parts += ["--policy", args.policy]
    if args.policy == "top_n" and args.n is not None:
        parts += ["--n", str(args.n)]
    if args.policy == "threshold":
        parts += ["--threshold", str(args.threshold)]
    if args.policy == "coverage":
        parts += ["--coverage", str(args.coverage)]
    if args.criterion:
        parts += ["--criterion", args.criterion]
    if args.heal_steps:
        parts += ["--heal-steps", str(args.heal_steps), "--heal-train", args.heal_train]
        if args.heal_lr is not None:
            parts += ["--heal-lr", str(args.heal_lr)]
        if args.heal_batch_size is not None:
            parts += ["--heal-batch-size", str(args.heal_batch_size)]
    parts += [
        "--split",
        args.split,
        "--max-images",
        str(args.max_images),
        "--verify-split",
        args.verify_split,
        "--verify-images",
        str(args.verify_images),
        "--batch-size",
        str(args.batch_size),
        "--out",
        args.out,
    ]
    if args.no_norms:
        parts.append("--no-norms")
    return shlex.join(parts)


def _from_card(args: argparse.Namespace) -> int:
    from moe_adapt.hub import load_model, read_card_selection, rebuild_from_card, weights_fingerprint

    if not args.model:
        raise ValueError("--from-card needs the parent model: --model PARENT.")
    if not args.out:
        raise ValueError("--out DIR is required: the folder to write the rebuilt sub-model to.")
    info = read_card_selection(args.from_card)
    parent = load_model(args.model)
    print(f"rebuilding the slice of tasks {info.tasks} from {args.model} ...")
    sub = rebuild_from_card(args.from_card, parent, check=not args.no_check)
    with atomic_dir(args.out, overwrite=args.overwrite, hint="pass --overwrite") as stage:
        sub.save_pretrained(stage)
        card = Path(args.from_card)
        shutil.copyfile(card / "README.md" if card.is_dir() else card, stage / "README.md")
    same = info.submodel_fingerprint == weights_fingerprint(sub)
    print(
        f"wrote {args.out}: {sum(p.numel() for p in sub.parameters()):,} parameters; "
        f"weights identical to the card's slice: {'yes' if same else 'not checked' if args.no_check else 'NO'}"
    )
    if info.healed:
        print(
            f"note: the card's model was healed after slicing ({info.healed['steps']} steps on calibration images); "
            f"{args.out} holds the slice before healing. Re-run the card's command (with --data) to heal it again."
        )
    return 0


def _checked_heal_groups(args: argparse.Namespace) -> tuple[str, ...]:
    """Check the arguments of a slicing run (one clear error naming the option) and return the `--heal-train`
    groups."""
    if not args.model:
        raise ValueError("MODEL is required: the parent model folder (save_pretrained) or Hub id.")
    if not args.out:
        raise ValueError("--out DIR is required: the folder to write the sub-model to.")
    if args.criterion == "reap" and args.no_norms:
        raise ValueError("--criterion reap needs the expert output norms; drop --no-norms.")
    if args.heal_steps < 0:
        raise ValueError(f"--heal-steps must be 0 (no healing) or more, got {args.heal_steps}.")
    heal_groups = heal_train_groups(args.heal_train)
    if not args.heal_steps and (
        args.heal_train != HEAL_TRAIN_DEFAULT or args.heal_lr is not None or args.heal_batch_size is not None
    ):
        raise ValueError(
            "--heal-train, --heal-lr and --heal-batch-size set how a slice is healed; add --heal-steps N "
            "(N > 0) to heal it."
        )
    if args.heal_batch_size is not None and args.heal_batch_size < 1:
        raise ValueError(f"--heal-batch-size must be at least 1, got {args.heal_batch_size}.")
    return heal_groups


def _heal_if_asked(args: argparse.Namespace, parent, sub, calib, heal_groups: tuple[str, ...]):
    """With `--heal-steps N`, heal `sub` toward `parent` on the calibration batches `calib` (in place) and print
    the loss before and after. Returns `(HealReport or None, the slice's weights fingerprint before healing or
    None)`."""
    from moe_adapt.hub import weights_fingerprint
    from moe_adapt.surgery import heal_submodel

    heal, slice_fingerprint = None, None
    if args.heal_steps:
        slice_fingerprint = weights_fingerprint(sub)  # what --from-card rebuilds: the slice before healing
        print(f"    healing toward the parent: {args.heal_steps} steps on the calibration images")
        heal_kw = {} if args.heal_batch_size is None else {"batch_size": args.heal_batch_size}
        heal = heal_submodel(parent, sub, calib, steps=args.heal_steps, lr=args.heal_lr, train=heal_groups, **heal_kw)
        print(
            f"    mean squared difference to the parent {heal.loss_before:.4g} -> {heal.loss_after:.4g}"
            + (" (no improvement: kept as sliced)" if heal.restored else "")
        )
    return heal, slice_fingerprint


def _verify_data(args: argparse.Namespace, names: dict[str, str]) -> dict:
    """`{task: loader}` of the `--verify-split` images the slice is verified on (up to `--verify-images` each)."""
    from moe_adapt.analysis.calibration import calibration_loader

    return {
        t: calibration_loader(
            args.data,
            t,
            split=args.verify_split,
            dataset=names.get(t),
            batch_size=args.batch_size,
            max_images=args.verify_images,
            seed=1,
        )
        for t in args.task
    }


def run(args: argparse.Namespace) -> int:
    if args.from_card:
        return _from_card(args)
    from moe_adapt.analysis import ExpertSelection, plot_usage_heatmap, select_experts
    from moe_adapt.hub import build_model_card, load_model, weights_fingerprint
    from moe_adapt.surgery import extract_submodel, verify_submodel

    heal_groups = _checked_heal_groups(args)
    with atomic_dir(args.out, overwrite=args.overwrite, hint="pass --overwrite") as stage:
        parent = load_model(args.model)
        print(
            f"1/4 collecting expert usage of {args.task} on {args.data} ({args.split}, up to {args.max_images} images)"
        )
        calib = {} if args.heal_steps else None  # healing reuses the calibration batches the usage was measured on
        usages = collect_usages(parent, args, keep=calib)
        print(f"2/4 selecting experts: policy {args.policy}")
        kwargs = {"n": args.n, "threshold": args.threshold, "coverage": args.coverage, "criterion": args.criterion}
        selections = [select_experts(u, policy=args.policy, **kwargs) for u in usages.values()]
        selection = ExpertSelection.union(*selections) if len(selections) > 1 else selections[0]
        for name, ids in selection.experts.items():
            print(f"    {name:<16} keep {len(ids):>2}/{selection.layer_size(name):<2} {ids}")
        print("3/4 slicing")
        sub = extract_submodel(parent, selection, tasks=args.task)
        names = dataset_names(args)
        heal, slice_fingerprint = _heal_if_asked(args, parent, sub, calib, heal_groups)
        sub.save_pretrained(stage)
        print(f"4/4 verifying on {args.verify_split} (up to {args.verify_images} images per task)")
        report = verify_submodel(parent, sub, _verify_data(args, names), progress=True)
        report.save(stage / "verification.json")
        selection.save(stage / "selection.json")
        for task, usage in usages.items():
            usage.save(stage / f"usage_{task}.json")
        plot_usage_heatmap(
            usages,
            stage / "usage_heatmap.png",
            criterion=selection.policy.get("criterion") or (args.criterion or "frequency"),
        )
        datasets = {t: names.get(t, t) for t in args.task}
        card = build_model_card(
            sub,
            selection,
            report,
            base_model=args.model,
            command=command_line(args),
            datasets=datasets,
            parent_fingerprint=weights_fingerprint(parent),
            heal=heal.to_dict() if heal else None,
            slice_fingerprint=slice_fingerprint,
        )
        card.save(stage / "README.md")
    print()
    print(report.summary())
    print(kept_line(report))
    print(f"wrote the sub-model, README.md (model card), verification.json, selection.json to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `extract` to the CLI; returns its parser so that other options can be added."""
    parser = subparsers.add_parser(
        "extract",
        help="slice a standalone sub-model for some tasks (usage → selection → slice → verify → card)",
        description="Slice a standalone sub-model that keeps only the experts, routers and heads of some tasks.",
    )
    parser.add_argument("model", nargs="?", metavar="MODEL", help="parent model folder (save_pretrained) or Hub id")
    parser.add_argument("--model", dest="model_opt", metavar="PARENT", help="the parent model (same as MODEL)")
    add_calibration_arguments(parser)
    group = parser.add_argument_group("selection")
    group.add_argument(
        "--policy",
        choices=POLICIES,
        default=DEFAULT_SELECTION["policy"],
        help="default: threshold (Mod-Squad's rule); top_n keeps the k experts of largest gate mass per "
        "layer (a dense slice)",
    )
    group.add_argument("--n", type=int, help="top_n: experts kept per layer (default: the layer's top-k)")
    group.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_SELECTION["threshold"],
        help="threshold: keep experts above this percentage of the criterion (default 3)",
    )
    group.add_argument("--coverage", type=float, default=0.9, help="coverage: fraction of the criterion to cover")
    group.add_argument(
        "--criterion",
        choices=CRITERIA,
        help="frequency (default for threshold), gate_mass (default for top_n and coverage), reap",
    )
    group = parser.add_argument_group("healing")
    group.add_argument(
        "--heal-steps",
        type=int,
        default=0,
        help="fit the slice (the groups of --heal-train) to the parent's outputs on the calibration "
        "images for this many steps (default 0: no healing)",
    )
    group.add_argument(
        "--heal-train",
        default=HEAL_TRAIN_DEFAULT,
        help="comma-separated groups healing fits: routers, norms, biases, weights (every other backbone "
        f"tensor), or 'all' (default {HEAL_TRAIN_DEFAULT})",
    )
    group.add_argument(
        "--heal-lr",
        type=float,
        default=None,
        help="learning rate of the healing (default 3e-3, or 3e-4 when weights are fitted)",
    )
    group.add_argument(
        "--heal-batch-size",
        type=int,
        default=None,
        help="calibration images per healing step (default heal_submodel's: 32)",
    )
    group = parser.add_argument_group("verification")
    group.add_argument("--verify-split", default="eval", help="'eval' (default), 'train' or a split name")
    group.add_argument("--verify-images", type=int, default=256, help="verification images per task")
    parser.add_argument("--from-card", metavar="CARD", help="rebuild the slice a model card (README.md) describes")
    parser.add_argument("--no-check", action="store_true", help="with --from-card: skip the weight fingerprint checks")
    parser.add_argument("--out", metavar="DIR", help="folder to write the sub-model to")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(func=_main)
    return parser


def _main(args: argparse.Namespace) -> int:
    if args.model and args.model_opt and args.model != args.model_opt:
        raise ValueError(f"MODEL {args.model!r} and --model {args.model_opt!r} differ; give one.")
    args.model = args.model or args.model_opt
    return run(args)
