"""Record benchmark JSON lines and regenerate `docs/results.md` (and the README's results table) from them.

Every benchmark prints one JSON line per run. `record` runs one benchmark, keeps the JSON lines it printed in
`benchmarks/results/<name>.jsonl` (stamped with the command, the git revision and the date), and renders the
documents again; `render` only renders. Nothing else writes the results: edit a benchmark, re-run it through
`record`, commit the `.jsonl` and the regenerated documents together.

    python benchmarks/results.py record -- python benchmarks/moe_layer.py --preset vit-s
    python benchmarks/results.py record --append -- python benchmarks/moe_layer.py   # add a run, keep the others
    python benchmarks/results.py render

A benchmark's section shows one table row per recorded run (or per task, where the benchmark reports tasks), the
columns named in `SECTIONS`, and a link to its JSON lines. The README's headline table sits between the
`<!-- results:start -->` and `<!-- results:end -->` markers and is rebuilt from `HEADLINES`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# name -> title, guide, what the benchmark measures, `rows` (a dotted path to a dict whose keys become the table's
# rows; otherwise one row per run) and `columns` (header -> dotted path inside a row).
SECTIONS: dict[str, dict] = {
    "pretrain_mini": {
        "title": "Multi-task pretraining on the mini benchmark",
        "guide": "pretraining.md",
        "about": "One MoE ViT trained on all three tasks at once, against the same without the MI loss and against "
        "a dense ViT per task with the MoE's active compute, same steps.",
        "rows": "tasks",
        "columns": {
            "metric": "metric",
            "multi-task MoE": "multitask_moe",
            "no MI loss": "multitask_moe_no_mi",
            "single-task dense": "single_task_dense",
            "steps": "/steps",
        },
    },
    "decomposition": {
        "title": "Decomposition out of the box",
        "guide": "decomposition.md",
        "about": "Pretraining variants of the demo recipe at 286 steps (the earlier recipe) and 500 steps on 1 thread, "
        "seeds 0 to 3, then 600 steps on 2 threads on seeds 0 to 5: each task held to its k experts per layer, and "
        "the recipe now (each task on k + 1 experts per layer) in the last rows: per task, "
        "the routing entropy (mean over MoE layers of H(mean gate) / log E), the parent's metric beside the "
        "single-task dense baseline of the same seed, the default `moe-adapt extract` slice (Mod-Squad's 3% "
        "threshold) and the k-expert slice (`--policy top_n`) as parameters kept / metric kept, and the "
        "default slice healed for 100 steps. ✓: at most 50% of the parameters and at least 99% of the metric.",
        "render": lambda runs, all_runs: _decomposition(runs, all_runs),
    },
    "pretrain_mini_dense": {
        "title": "Single-task dense baselines at the decomposition runs' length",
        "guide": "pretraining.md",
        "about": "The dense ViT per task with the MoE's active compute, per seed, number of steps and recipe "
        "overrides (the fashion-seg head's width changes its baseline; the MoE layout does not change a dense model).",
        "rows": "tasks",
        "columns": {"seed": "/seed", "metric": "metric", "single-task dense": "single_task_dense", "steps": "/steps"},
    },
    "bf16_autocast": {
        "title": "bf16 autocast on this CPU",
        "guide": "pretraining.md",
        "about": "One multi-task train step of the mini recipe in fp32 against `torch.autocast('cpu', torch.bfloat16)`, "
        "interleaved in one process.",
        "columns": {
            "fp32 s/step": "fp32_s_per_step",
            "bf16 s/step": "bf16_s_per_step",
            "bf16 speed-up": "speedup_bf16",
            "torch": "torch",
        },
    },
    "extract": {
        "title": "Task slices",
        "guide": "decomposition.md",
        "about": "The slice `moe-adapt extract` gives per task: parameters against the parent, metric kept before and "
        "after healing, and backbone speed against transformers' `ViTModel` of the slice's active shape.",
        "rows": "tasks",
        "columns": {
            "policy": "/policy.policy",
            "params slice/full": "params.ratio",
            "metric kept": "metric.ratio",
            "kept healed": "metric.healed_ratio",
            "speed vs same-shape ViT": "speed_sliced_vs_vit",
        },
    },
    "adapt": {
        "title": "LoRA on a slice",
        "guide": "adaptation.md",
        "about": "LoRA-fine-tuning a slice on scikit-learn digits against full fine-tuning of the whole model "
        "(ratios sliced LoRA / full).",
        "columns": {
            "trainable vs full model": "sliced_lora_vs_full_ft.trainable_vs_full_model",
            "params": "sliced_lora_vs_full_ft.params",
            "images/s": "sliced_lora_vs_full_ft.images_per_s",
            "peak memory": "sliced_lora_vs_full_ft.peak_memory",
            "accuracy points": "sliced_lora_vs_full_ft.accuracy_points",
        },
    },
    "continual": {
        "title": "Continual learning",
        "guide": "continual.md",
        "about": "Adding scikit-learn digits as a new task: old tasks must not move, the new task is compared with "
        "fine-tuning a copy of the whole model.",
        "columns": {
            "old tasks unchanged": "targets.old_tasks_unchanged",
            "new-task accuracy": "new_task_accuracy.ours",
            "full fine-tune": "new_task_accuracy.full_finetune_baseline",
            "params added": "params.added_ratio",
        },
    },
    "moe_layer": {
        "title": "MoE layer and train-step speed",
        "guide": "performance.md",
        "about": "One MoE MLP layer, forward + backward, against a dense MLP of equal active width; then a ViT train "
        "step against transformers' ViT of the same width and depth.",
        "columns": {
            "device": "device",
            "dtype": "dtype",
            "tokens": "tokens",
            "layer vs dense": "best_vs_dense",
            "train step vs dense ViT": "vit_s_train_vs_dense",
        },
    },
    "export": {
        "title": "Exported slices",
        "guide": "decomposition.md",
        "about": "A routed slice through `torch.export` against eager mode.",
        "columns": {
            "batch": "batch",
            "eager ms": "eager_ms",
            "exported ms": "exported_ms",
            "exported / eager": "exported_vs_eager",
            "max |diff|": "max_abs_diff",
        },
    },
}


def _span(values, f=lambda v: f"{v:.2f}") -> str:
    values = sorted(v for v in values if v is not None)
    if not values:
        return "—"
    return f(values[0]) if f(values[0]) == f(values[-1]) else f"{f(values[0])}–{f(values[-1])}"


def _pretraining(run):
    tasks = run["tasks"].values()
    above = sum(t["multitask_moe"] >= t["single_task_dense"] for t in tasks)
    mi = run.get("normalized_mi", {})
    return (
        f"seed {run.get('seed')}, {run.get('steps')} steps: at or above {above} of {len(run['tasks'])} single-task dense "
        "baselines (other seeds: [results](docs/results.md#decomposition-out-of-the-box)); normalised I(T;E) "
        f"{mi.get('with_mi_loss', float('nan')):.2f} vs {mi.get('without_mi_loss', float('nan')):.2f} without the MI loss"
    )


def _default_policy_run(runs: list[dict]) -> dict:
    """The latest extract run of `moe-adapt extract`'s default policy (Mod-Squad's threshold), else the latest."""
    return next((r for r in reversed(runs) if r.get("policy", {}).get("policy") == "threshold"), runs[-1])


def _slices(run):
    tasks = run["tasks"].values()
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    healed = [t["metric"].get("healed_ratio") for t in tasks]
    kept = _span([t["metric"]["ratio"] for t in tasks], pct)
    return (
        f"policy `{run['policy']['policy']}`: {_span([t['params']['ratio'] for t in tasks], pct)} of the parameters, {kept} of the metric"
        + (f" ({_span(healed, pct)} healed)" if any(v is not None for v in healed) else "")
        + f", {_span([t['speed_sliced_vs_vit'] for t in tasks])}× a same-shape ViT's speed"
    )


def _lora(run):
    r = run["sliced_lora_vs_full_ft"]
    return (
        f"{100 * r['trainable_vs_full_model']:.1f}% of the parameters trained, {r['accuracy_points']:+.2f} points, "
        f"{r['images_per_s']:.2f}× images/s, {r['peak_memory']:.2f}× peak memory"
    )


def _continual(run):
    acc = run["new_task_accuracy"]
    return (
        ("old tasks bit-identical" if run["targets"]["old_tasks_unchanged"] else "OLD TASKS CHANGED")
        + f", new task {acc['ours']:.3f} vs {acc['full_finetune_baseline']:.3f} for full fine-tuning, "
        f"+{100 * run['params']['added_ratio']:.1f}% parameters"
    )


# README headline rows: (what, benchmark, summary of its runs). Rows whose benchmark has no recorded run are left out.
HEADLINES = [
    ("multi-task MoE vs single-task dense (mini benchmark)", "pretrain_mini", lambda runs: _pretraining(runs[-1])),
    ("task slices (`moe-adapt extract`)", "extract", lambda runs: _slices(_default_policy_run(runs))),
    ("LoRA on a slice vs full fine-tuning (digits)", "adapt", lambda runs: _lora(runs[-1])),
    ("adding a task", "continual", lambda runs: _continual(runs[-1])),
    (
        "MoE MLP layer / dense MLP, CPU",
        "moe_layer",
        lambda runs: _span([r["best_vs_dense"] for r in runs if str(r.get("device", "")).startswith("cpu")]) + "×",
    ),
]


def lookup(data, path: str):
    """`a.b.c` inside nested dicts; None where a key is missing."""
    for key in path.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value).replace("|", "\\|")


def load_runs(results: Path = RESULTS) -> dict[str, list[dict]]:
    runs = {}
    for path in sorted(results.glob("*.jsonl")):
        runs[path.stem] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                runs[path.stem].append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}, line {number}: not JSON ({e.msg})") from None
    return runs


def _pair(point) -> str:
    if not point:
        return "—"
    ok = point["params"] <= 0.5 and point["kept"] >= 0.99
    return f"{point['params']:.3f} / {100 * point['kept']:.1f}%" + (" ✓" if ok else "")


def _recipe_overrides(overrides) -> str:
    """A dense baseline's recipe overrides other than the seed, as one string ("" for the recipe itself)."""
    return " ".join(o for o in overrides or [] if not o.startswith("seed="))


def _dense_key(run: dict, overrides: str) -> tuple[str, str, str]:
    """Which dense baseline a decomposition run compares with: same seed, steps and recipe overrides (a
    decomposition line's `dense_overrides`, one string or one per task; "" by default)."""
    return str(run.get("seed")), str(run.get("steps")), overrides


def _decomposition(runs: list[dict], all_runs: dict[str, list[dict]]) -> list[str]:
    """The variants table, then per task the parameters-kept / metric-kept curve of every selection policy for the
    baseline and the last (chosen) variant."""
    dense = {
        _dense_key(r, _recipe_overrides(r.get("overrides"))): r["tasks"]
        for r in all_runs.get("pretrain_mini_dense", [])
    }
    out = [
        "| variant | seed | steps | task | routing entropy | parent (dense) | default slice | k-expert slice | healed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for task, t in run["tasks"].items():
            curve = {p["policy"]: p for p in t.get("curve", [])}
            overrides = run.get("dense_overrides", "")
            if isinstance(overrides, dict):  # per task: a head's width changes only its own task's baseline
                overrides = overrides.get(task, "")
            base = dense.get(_dense_key(run, overrides), {}).get(task, {}).get("single_task_dense")
            healed = t.get("default", {}).get("healed_kept")
            out.append(
                f"| {run['variant']} | {run.get('seed')} | {run.get('steps')} | {task} | {t['entropy']:.2f} | {t['parent']:.4f} "
                f"({fmt(base)}) | {_pair(t.get('default') or curve.get('default'))} | "
                f"{_pair(curve.get('top_n:gate_mass:k'))} | {f'{100 * healed:.1f}%' if healed else '—'} |"
            )
    shown = [r for r in runs if r["variant"] == "baseline"][:1] + [
        r for r in runs if r["variant"] == runs[-1]["variant"]
    ]
    for task in runs[-1]["tasks"]:
        policies = list(dict.fromkeys(p["policy"] for r in shown for p in r["tasks"].get(task, {}).get("curve", [])))
        out += [
            "",
            f"**{task}**: parameters kept / metric kept per selection policy, before healing",
            "",
            "| policy | "
            + " | ".join(f"{r['variant']}, seed {r.get('seed')}, {r.get('steps')} steps" for r in shown)
            + " |",
            "|---|" + "---|" * len(shown),
        ]
        for policy in policies:
            cells = [
                _pair(next((p for p in r["tasks"].get(task, {}).get("curve", []) if p["policy"] == policy), None))
                for r in shown
            ]
            out.append(f"| {policy} | " + " | ".join(cells) + " |")
    return out


def table(name: str, runs: list[dict]) -> list[str]:
    spec = SECTIONS.get(name, {})
    columns = spec.get("columns") or {
        k: k for k, v in runs[-1].items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))
    }
    rows_at = spec.get("rows")
    head = ["run"] + (["task"] if rows_at else []) + list(columns)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, run in enumerate(runs, 1):
        rows = (lookup(run, rows_at) or {}).items() if rows_at else [(None, run)]
        for key, row in rows:
            cells = [str(i)] + ([key] if rows_at else [])
            for path in columns.values():
                cells.append(fmt(lookup(run, path[1:]) if path.startswith("/") else lookup(row, path)))
            out.append("| " + " | ".join(cells) + " |")
    return out


def render_results(runs: dict[str, list[dict]]) -> str:
    out = [
        "# Results",
        "",
        "Generated by `python benchmarks/results.py render` from `benchmarks/results/*.jsonl`; do not edit by hand. "
        "Each section names the command that produced it, the revision and the date; ratios are measured "
        "within one run, absolute times move with the machine's load.",
        "",
    ]
    order = [n for n in SECTIONS if n in runs] + sorted(n for n in runs if n not in SECTIONS)
    for name in order:
        spec, lines = SECTIONS.get(name, {}), runs[name]
        out.append(f"## {spec.get('title', name)}")
        out.append("")
        if spec.get("about"):
            guide = f" Guide: [{spec['guide']}]({spec['guide']})." if spec.get("guide") else ""
            out += [spec["about"] + guide, ""]
        stamps = list(
            dict.fromkeys((r["_command"], r.get("_revision"), r.get("_date")) for r in lines if r.get("_command"))
        )  # in recorded order
        for command, revision, date in stamps:
            out.append(f"- `{command}`" + (f" at {revision}" if revision else "") + (f" on {date}" if date else ""))
        if stamps:
            out.append("")
        out += spec["render"](lines, runs) if "render" in spec else table(name, lines)
        out += ["", f"JSON lines: [benchmarks/results/{name}.jsonl](../benchmarks/results/{name}.jsonl)", ""]
    return "\n".join(out)


def render_headlines(runs: dict[str, list[dict]]) -> str:
    rows = ["| what | result | guide |", "|---|---|---|"]
    for what, name, summary in HEADLINES:
        if runs.get(name):
            guide = SECTIONS[name]["guide"]
            rows.append(f"| {what} | {summary(runs[name])} | [{guide[:-3]}](docs/{guide}) |")
    return "\n".join(rows)


def render(results: Path = RESULTS, docs: Path = ROOT / "docs" / "results.md", readme: Path = ROOT / "README.md"):
    """Write `docs` and the README's marked table from the recorded runs in `results`."""
    sys.path.insert(0, str(ROOT))
    from moe_adapt.io import atomic_write_text

    runs = load_runs(results)
    atomic_write_text(docs, render_results(runs))
    if readme.exists():
        text = readme.read_text()
        if START in text and END in text:
            before, rest = text.split(START, 1)
            after = rest.split(END, 1)[1]
            atomic_write_text(readme, f"{before}{START}\n{render_headlines(runs)}\n{END}{after}")


def revision() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def record(
    command: list[str],
    name: str | None = None,
    append: bool = False,
    results: Path = RESULTS,
    docs: Path = ROOT / "docs" / "results.md",
    readme: Path = ROOT / "README.md",
) -> Path:
    """Run `command`, keep the JSON lines it prints on stdout in `results/<name>.jsonl`, render the documents."""
    sys.path.insert(0, str(ROOT))
    from moe_adapt.io import atomic_write_text

    if not command:
        raise SystemExit("error: nothing to run: give the benchmark's command after `--`")
    script = next((Path(a).stem for a in command if a.endswith(".py")), None)
    name = name or script
    if not name:
        raise SystemExit("error: cannot tell the benchmark's name from the command: pass --name")
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        raise SystemExit(f"error: {shlex.join(command)} exited with status {proc.returncode}; nothing recorded")
    if not lines:
        raise SystemExit(f"error: {shlex.join(command)} printed no JSON line; nothing recorded")
    stamp = {"_command": shlex.join(command), "_revision": revision(), "_date": datetime.date.today().isoformat()}
    new = [json.dumps(json.loads(line) | stamp) for line in lines]
    path = results / f"{name}.jsonl"
    old = path.read_text().splitlines() if append and path.exists() else []
    atomic_write_text(path, "\n".join(old + new) + "\n")
    render(results, docs, readme)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    rec = sub.add_parser("record", help="run a benchmark and keep its JSON lines, then render")
    rec.add_argument("--name", help="results file name (default: the script's name)")
    rec.add_argument("--append", action="store_true", help="add these runs to the recorded ones")
    rec.add_argument("command", nargs=argparse.REMAINDER, help="-- the benchmark's command line")
    sub.add_parser("render", help="regenerate docs/results.md and the README table")
    args = parser.parse_args(argv)
    if args.verb == "record":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        print(record(command, args.name, args.append))
    else:
        render()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
