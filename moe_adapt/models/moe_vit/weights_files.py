"""File handling around the MoE ViT's `save_pretrained` / `from_pretrained`: readable weights files, tensors
realigned after a memory-mapped load, the files a save keeps, and what a load report may not list."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from torch import nn


def _check_weights_readable(folder: str) -> None:
    """Open every safetensors file of `folder` (headers only); raise naming a file that cannot be read."""
    import json

    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"] if os.path.exists(os.path.join(folder, "model.safetensors")) else []
    for name in files:
        file = os.path.join(folder, name)
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as err:  # noqa: BLE001 - any parse failure means a damaged file
            raise OSError(f"Could not read weights file {file} (truncated or not safetensors?): {err}") from err


#: byte alignment of torch's own CPU allocations (c10's `gAlignment`)
CPU_ALIGNMENT = 64


def realign_cpu_tensors(model: nn.Module) -> int:
    """Copy every CPU parameter and buffer whose data does not start on a 64-byte boundary into a fresh torch
    allocation (which does); return how many were copied.

    safetensors stores tensors back to back (8-byte aligned), and a memory-mapped load hands out tensors at those
    offsets. BLAS libraries pick their kernels by operand alignment on some CPUs (seen on AMD EPYC), so the same
    weights at another address can round differently. After this, a loaded model computes bit for bit what the
    saved one did, on any x86 CPU."""
    copied = 0
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or tensor.device.type != "cpu" or tensor.is_meta or not tensor.numel():
                    continue
                if tensor.data_ptr() % CPU_ALIGNMENT:
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = tensor.data.clone()  # same Parameter object: ties and optimisers keep it
                    else:
                        store[name] = tensor.clone()
                    copied += 1
    return copied


#: files that a save writes anew (weights, shards and their index, configs); anything else in the folder is kept
_SAVED_FILES = re.compile(
    r"(model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?"
    r"|config\.json|preprocessor_config\.json|generation_config\.json)$"
)


def _keep_other_files(old: Path, new: Path) -> None:
    """Link (or copy) into `new` every entry of `old` that a save does not write itself, so that saving over a
    folder keeps its other files, as transformers' own `save_pretrained` does."""
    for entry in old.iterdir():
        if _SAVED_FILES.match(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _check_load_report(model, path, info: dict, strict: bool, fresh_ok: bool) -> None:
    """Raise naming what transformers' load report lists that this model may not lack: any backbone tensor missing,
    unexpected or mis-shaped; with `strict`, any tensor; a mis-shaped or missing head unless `fresh_ok`."""
    names = {
        key: sorted(str(x[0] if isinstance(x, tuple) else x) for x in info.get(key, []))
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    shapes = {str(x[0]): (x[1], x[2]) for x in info.get("mismatched_keys", []) if isinstance(x, tuple)}
    mis = [n for n in names["mismatched_keys"] if strict or not fresh_ok or _is_backbone_key(model, n)]
    if mis:
        backbone = any(_is_backbone_key(model, n) for n in mis)
        fix = (
            "Fix config.json (e.g. the per-layer expert counts): backbone tensors are never re-initialised."
            if backbone
            else "For a new label set, pass ignore_mismatched_sizes=True to get fresh heads."
        )
        listed = "; ".join(f"{n}: checkpoint {list(shapes[n][0])} vs config {list(shapes[n][1])}" for n in mis[:20])
        raise ValueError(f"Checkpoint {path} disagrees with the config on tensor shapes ({listed}). {fix}")
    problems = []
    for key in ("missing_keys", "unexpected_keys"):
        items = [n for n in names[key] if strict or _is_backbone_key(model, n)]
        if items:
            problems.append(f"{key.replace('_', ' ')}: {', '.join(items[:20])}")
    if problems:
        what = "" if strict else " on the MoE ViT backbone"
        raise ValueError(
            f"Checkpoint {path} does not match the model's config{what} ({'; '.join(problems)}). A missing or "
            "mis-shaped tensor is never re-initialised silently: load a checkpoint that holds it, or fix its "
            "config.json (e.g. the per-layer expert counts)."
        )
    legacy = sorted({n.split(".")[1] for n in names["unexpected_keys"] if n.startswith("classifiers.")})
    if legacy and hasattr(model, "_init_missing_heads"):
        raise ValueError(
            f"Checkpoint {path} holds classification heads in the layout of moe_adapt before 0.2 "
            f"(classifiers.{legacy[0]}.*: a Linear on the pooled output), for task(s) {legacy}; this version's "
            "heads are heads.T.* (LayerNorm, then Linear) and cannot reuse them. Fine-tune a new head on this "
            "backbone (ignore_mismatched_sizes=True starts one), or load it with the moe_adapt version that saved it."
        )
    if hasattr(model, "_init_missing_heads"):  # heads that initialise themselves, skipped by transformers' init
        model._init_missing_heads({*names["missing_keys"], *names["mismatched_keys"]}, fresh_ok=fresh_ok)


def _is_backbone_key(model: nn.Module, key: str) -> bool:
    """Whether state-dict `key` of `model` (a moe_vit model class) names a tensor of the MoE ViT backbone
    (`MoEViTModel`), as opposed to a task head or a backbone adapter such as `MoEViTBackbone`'s pyramid."""
    base = getattr(model, "moe_vit", model)  # a task model's backbone, or the MoEViTModel itself
    if not hasattr(base, "moe_layers"):
        return False
    prefix = model.base_model_prefix + "."
    top = key.removeprefix(prefix).split(".", 1)[0]
    if base is not model and not key.startswith(prefix) and (top in model._modules or top in model._parameters):
        return False  # a task model's own tensor (a head, a pyramid)
    # a task model loading a base checkpoint reports the base's extra tensors without the prefix
    return top in base._modules or top in base._parameters
