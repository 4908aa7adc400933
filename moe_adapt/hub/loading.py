"""Load any saved moe_adapt model (backbone or task model) by the class named in its config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["check_model_location", "load_model", "weights_fingerprint"]


def _model_classes() -> dict[str, type]:
    import moe_adapt
    from moe_adapt.models import moe_vit

    found = {}
    for module in (moe_vit, moe_adapt):
        for name in dir(module):
            obj = getattr(module, name, None)
            if isinstance(obj, type) and issubclass(obj, nn.Module) and hasattr(obj, "from_pretrained"):
                found[name] = obj
    return found


def load_model(name_or_path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a saved moe_adapt model with the class in its `config.json` (`architectures[0]`), e.g.
    `MoEViTForImageClassification` or `MoEViTForMultiTask`; `MoEViTModel` when none is named. A local folder or a
    Hub id; `kwargs` go to `from_pretrained`."""
    check_model_location(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        arch = (json.loads((path / "config.json").read_text()).get("architectures") or [None])[0]
    else:
        from transformers import AutoConfig

        arch = (AutoConfig.from_pretrained(str(name_or_path)).architectures or [None])[0]
    classes = _model_classes()
    cls = classes.get(arch or "MoEViTModel")
    if cls is None:
        raise ValueError(
            f"{name_or_path}: unknown model class {arch!r} in config.json (architectures); known: {sorted(classes)}."
        )
    return cls.from_pretrained(str(name_or_path), **kwargs)


def check_model_location(name_or_path: str | os.PathLike) -> None:
    """Raise `FileNotFoundError` naming `name_or_path` unless it is a folder holding `config.json` or could be a
    Hub id (`user/model`): a local path that does not exist is reported as such, not as a malformed Hub id."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: is it a folder written by save_pretrained?")
    elif path.exists():
        raise FileNotFoundError(f"{path} is a file; give the model folder (holding config.json and model.safetensors).")
    else:
        text = os.fspath(name_or_path)
        if text.startswith(("/", ".", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text):
            raise FileNotFoundError(
                f"{text}: no such model folder (give a folder written by save_pretrained, or a Hub id)."
            )


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes, in name order): equal fingerprints mean
    bit-identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
