"""File handling around the MoE ViT's `save_pretrained` / `from_pretrained`: readable weights files, tensors
realigned after a memory-mapped load, and the files a save keeps."""

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
