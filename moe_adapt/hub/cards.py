"""Model cards for sliced models, built with huggingface_hub's `ModelCard` / `ModelCardData`.

A card says what the slice is (base model = the parent, tasks, datasets, eval results in the Hub's metadata),
which experts it kept, how much smaller and cheaper it is, how closely it matches the parent, and the exact command
that made it. It also carries a machine-readable selection block: `moe-adapt extract --from-card CARD --model
PARENT` (or `rebuild_from_card(card, parent)`) rebuilds the same sub-model bit for bit, and refuses a parent whose
weights differ from the one the card was made from.

Sharing: the folder written by `moe-adapt extract` holds `config.json`, `model.safetensors` and this card as
`README.md`, so the usual hub methods apply:

```python
sub.push_to_hub("me/vit-mini-fashion-slice")          # weights + config (transformers' PushToHubMixin)
ModelCard.load("out/README.md").push_to_hub("me/vit-mini-fashion-slice")   # the card
# or the whole folder at once:
huggingface_hub.upload_folder(repo_id="me/vit-mini-fashion-slice", folder_path="out")
```
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from ..analysis.selection import ExpertSelection
from ..models.moe_vit.configuration_moe_vit import parse_moe_layer_name
from ..surgery.extract import extract_submodel
from .loading import weights_fingerprint

__all__ = ["CardSelection", "build_model_card", "read_card_selection", "rebuild_from_card"]

SELECTION_MARKER = "moe-adapt-selection"
_BLOCK = re.compile(r"<!--\s*" + SELECTION_MARKER + r".*?-->\s*```json\s*\n(.*?)\n```", re.DOTALL)
PIPELINE_TAGS = {
    "classification": "image-classification",
    "detection": "object-detection",
    "semantic_segmentation": "image-segmentation",
}


@dataclass
class CardSelection:
    """What a card's selection block holds: the selection, the kept tasks, the parent it was sliced from and
    fingerprints (sha256 of the weights, `weights_fingerprint`) of parent and slice."""

    selection: ExpertSelection
    tasks: list[str]
    base_model: str | None
    parent_fingerprint: str | None
    submodel_fingerprint: str | None
    healed: dict | None = None  # the `HealReport` of a slice healed after slicing (its weights are then not rebuilt)


_HEAL_GROUP_TEXT = {
    "routers": "router rows",
    "norms": "LayerNorms",
    "biases": "biases",
    "weights": "other backbone tensors: matrices, expert tensors, embeddings",
}


def _heal_groups_text(groups) -> str:
    """`["routers", "norms"]` → "router rows and LayerNorms" (the card's words for `HealReport.train`)."""
    words = [_HEAL_GROUP_TEXT.get(g, g) for g in dict.fromkeys(groups)]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _compact_json(data) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(data, indent=1)
    return re.sub(
        r"\[\s*([-\d.e,\s]*?)\s*\]", lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text
    )


def _task_table(config) -> list[str]:
    rows = ["| task | type | labels |", "|---|---|---|"]
    for t in config.tasks:
        labels = (config.task_labels or {}).get(t) or []
        shown = ", ".join(labels[:10]) + (" …" if len(labels) > 10 else "")
        rows.append(
            f"| {t} | {config.task_types.get(t, 'classification')} | {len(labels) or '–'}{': ' + shown if shown else ''} |"
        )
    return rows


def _experts_table(selection: ExpertSelection, config) -> list[str]:
    rows = ["| MoE layer | top-k | kept / parent experts | parent expert ids | runs as |", "|---|---:|---:|---|---|"]
    root = config.parent_expert_ids or {}
    for name, ids in selection.experts.items():
        i, kind = parse_moe_layer_name(name)
        original = (root.get(kind) or [None] * config.num_hidden_layers)[i] or ids
        k = selection.top_k(name)
        mode = "fused dense (k kept)" if len(ids) == k else f"top-{k} of {len(ids)}"
        rows.append(f"| {name} | {k} | {len(ids)} / {selection.layer_size(name)} | {list(original)} | {mode} |")
    return rows


def _usage_lines(config) -> list[str]:
    """How to run the slice: a transformers pipeline for a one-task slice, the multi-task Auto class otherwise."""
    tasks = list(config.tasks)
    head = ["import moe_adapt  # registers the model classes with transformers' Auto classes"]
    if len(tasks) == 1:
        tag = PIPELINE_TAGS[config.task_types.get(tasks[0], "classification")]
        return [
            *head,
            "from transformers import pipeline",
            f'predict = pipeline("{tag}", model="PATH_OR_REPO")',
            'predict("image.png")',
        ]
    return [
        *head,
        "from moe_adapt import AutoModelForMultiTask",
        'model = AutoModelForMultiTask.from_pretrained("PATH_OR_REPO")',
        f"outputs = model(pixel_values, task={tasks[0]!r})",
    ]


def build_model_card(
    submodel: nn.Module,
    selection: ExpertSelection,
    report=None,
    *,
    base_model: str | None = None,
    command: str | None = None,
    datasets: Mapping[str, str] | list[str] | None = None,
    parent_fingerprint: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    heal: Mapping | None = None,
    slice_fingerprint: str | None = None,
) -> ModelCard:
    """The model card of `submodel`, sliced with `selection`.

    Args:
        submodel: the slice (its config names the tasks and the kept experts).
        selection: the `ExpertSelection` it was sliced with (goes into the machine-readable block).
        report: the `VerificationReport` (parameters, FLOPs, agreement, metrics); optional.
        base_model: the parent's Hub id or path (card metadata `base_model`).
        command: the exact command line that made the slice.
        datasets: `{task: dataset id or name}` (or a list) the usage was measured and verified on.
        parent_fingerprint: `weights_fingerprint(parent)`, so a rebuild can check it has the same parent.
        model_name, license: card metadata.
        heal: `HealReport.to_dict()` when the slice was healed (`heal_submodel`) after slicing; then
            `slice_fingerprint` is the fingerprint of the slice before healing, which is what `--from-card` rebuilds.
    """
    config = submodel.config
    tasks = list(config.tasks)
    model_name = model_name or f"{Path(str(base_model or 'moe-vit')).name}-slice-{'-'.join(tasks)}"
    data = _card_data(config, report, base_model, datasets, model_name, license)
    block = {
        "format": "moe_adapt.card_selection",
        "version": 1,
        "tasks": tasks,
        "base_model": str(base_model) if base_model else None,
        "parent_fingerprint": parent_fingerprint,
        "submodel_fingerprint": slice_fingerprint if heal else weights_fingerprint(submodel),
        "selection": selection.to_dict(),
    }
    if heal:
        block["healed"] = dict(heal)
        block["healed_fingerprint"] = weights_fingerprint(submodel)
    body = _card_body(config, selection, report, heal, command, block, model_name, base_model)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _card_data(config, report, base_model, datasets, model_name: str, license) -> ModelCardData:
    """The card's metadata: tags, pipeline tag, datasets and one `EvalResult` per verified task metric."""
    tasks = list(config.tasks)
    ds_map = dict(datasets) if isinstance(datasets, Mapping) else {}
    ds_list = list(dict.fromkeys(ds_map.values() if ds_map else (datasets or [])))
    eval_results = []
    for task, t in report.tasks.items() if report is not None else ():
        m = t.get("metric")
        if m:
            eval_results.append(
                EvalResult(
                    task_type=PIPELINE_TAGS.get(config.task_types.get(task), "image-classification"),
                    dataset_type=ds_map.get(task, task),
                    dataset_name=ds_map.get(task, task),
                    metric_type=m["name"],
                    metric_value=round(m["submodel"], 6),
                    task_name=task,
                    metric_name=f"{m['name']} (parent {m['parent']:.4f})",
                )
            )
    types = {config.task_types.get(t, "classification") for t in tasks}
    return ModelCardData(
        library_name="transformers",  # the Hub shows transformers' widget and snippet for the pipeline tag
        tags=[
            "moe-adapt",
            "moe_vit",
            "mixture-of-experts",
            "vision-transformer",
            "sliced-model",
            *sorted(PIPELINE_TAGS[t] for t in types),
        ],
        base_model=str(base_model) if base_model else None,
        datasets=ds_list or None,
        eval_results=eval_results or None,
        model_name=model_name,
        pipeline_tag=PIPELINE_TAGS[types.pop()] if len(types) == 1 else None,
        license=license,
    )


def _card_body(config, selection, report, heal, command, block: dict, model_name: str, base_model) -> list[str]:
    """The card's markdown lines: usage, tasks, kept experts, verification, healing, command, selection block."""
    tasks = list(config.tasks)
    parent_txt = f"`{base_model}`" if base_model else "a multi-task MoE ViT"
    body = [
        f"# {model_name}",
        "",
        f"A task-specific slice of {parent_txt}, made with moe_adapt "
        f"(`moe_adapt.surgery.extract_submodel`): it keeps only the experts that the task(s) {', '.join(f'`{t}`' for t in tasks)} "
        "route to, their routers, heads and task embeddings, and loads without the parent.",
        "",
        "```python",
        *_usage_lines(config),
        "```",
        "",
        "## Tasks",
        "",
        *_task_table(config),
        "",
        "## Kept experts",
        "",
        f"Selection policy: `{json.dumps(selection.policy, sort_keys=True)}`.",
        "",
        *_experts_table(selection, config),
        "",
    ]
    if report is not None:
        body += ["## Size, cost and agreement with the parent", "", report.to_markdown(), ""]
        if not report.renormalized:
            body += [
                "The parent does not renormalise its top-k gates, so each MoE layer of the slice scales its output "
                "by 1 / (parent router mass on the kept experts); see `max_gate_scale` in verification.json.",
                "",
            ]
    if heal:
        body += [
            "## Healing",
            "",
            f"After slicing, the slice's {_heal_groups_text(heal['train'])} ({heal['trained_params']:,} parameters; groups "
            f"{', '.join(heal['train'])}) were fitted for {heal['steps']} steps (lr {heal['lr']}) so that the slice's last "
            "hidden states match the parent's on the calibration images (`moe_adapt.surgery.heal_submodel`): mean "
            f"squared difference {heal['loss_before']:.4g} → {heal['loss_after']:.4g}"
            + (" (no improvement: the slice was kept as sliced)" if heal.get("restored") else "")
            + ". "
            "`--from-card` rebuilds the slice before healing; the command below heals it again.",
            "",
        ]
    if command:
        body += ["## How it was made", "", "```bash", command, "```", ""]
    body += [
        "## Selection (machine-readable)",
        "",
        f"<!-- {SELECTION_MARKER}: `moe-adapt extract --from-card README.md --model PARENT --out DIR` rebuilds this "
        "model bit for bit from the block below. Do not edit. -->",
        "```json",
        _compact_json(block),
        "```",
        "",
        "## Sharing",
        "",
        "`model.push_to_hub(repo_id)` uploads weights and config, `ModelCard.load('README.md').push_to_hub(repo_id)` "
        "this card; `huggingface_hub.upload_folder(repo_id=..., folder_path=DIR)` uploads the whole folder.",
        "",
    ]
    return body


def _card_text(card: ModelCard | str | os.PathLike) -> tuple[str, str]:
    if isinstance(card, ModelCard):
        return str(card), "the model card"
    path = Path(card)
    if path.is_dir():
        path = path / "README.md"
    if not path.is_file():
        raise FileNotFoundError(f"No model card at {path}.")
    return path.read_text(), str(path)


def read_card_selection(card: ModelCard | str | os.PathLike) -> CardSelection:
    """Parse the machine-readable selection block of a card (a `ModelCard`, a README.md path or its folder)."""
    text, where = _card_text(card)
    match = _BLOCK.search(text)
    if not match:
        raise ValueError(
            f"{where} has no moe-adapt selection block (a ```json block after '<!-- {SELECTION_MARKER} -->'): it was not "
            "written by `moe-adapt extract`, or the block was removed. Re-run the extraction to get a card with one."
        )
    try:
        block = json.loads(match.group(1))
    except json.JSONDecodeError as err:
        raise ValueError(f"The selection block of {where} is not valid JSON ({err}); was it edited by hand?") from err
    if block.get("format") != "moe_adapt.card_selection":
        raise ValueError(f"The selection block of {where} has an unknown format {block.get('format')!r}.")
    selection = ExpertSelection.from_dict(block["selection"], source=f"the selection block of {where}")
    return CardSelection(
        selection=selection,
        tasks=list(block["tasks"]),
        base_model=block.get("base_model"),
        parent_fingerprint=block.get("parent_fingerprint"),
        submodel_fingerprint=block.get("submodel_fingerprint"),
        healed=block.get("healed"),
    )


def rebuild_from_card(card: ModelCard | str | os.PathLike, parent: nn.Module, check: bool = True) -> nn.Module:
    """Rebuild the slice a card describes from its parent. With `check`, the parent's weights must match the
    card's parent fingerprint and the result's weights the card's slice fingerprint (else `ValueError`)."""
    info = read_card_selection(card)
    if check and info.parent_fingerprint:
        got = weights_fingerprint(parent)
        if got != info.parent_fingerprint:
            raise ValueError(
                "This parent's weights differ from those the card was made from (weights fingerprint "
                f"{got[:12]}… vs {info.parent_fingerprint[:12]}…); use the card's base model "
                f"{info.base_model!r}, or pass check=False (--no-check) to slice this parent anyway."
            )
    sub = extract_submodel(parent, info.selection, tasks=info.tasks)
    if check and info.submodel_fingerprint:
        got = weights_fingerprint(sub)
        if got != info.submodel_fingerprint:
            raise ValueError(
                f"The rebuilt slice's weights differ from the card's (fingerprint {got[:12]}… vs "
                f"{info.submodel_fingerprint[:12]}…)."
            )
    return sub
