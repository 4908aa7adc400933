"""Atomic file and folder writes, and JSON reading, shared by the whole package: a process killed at any moment
leaves the previous complete output or none, never a half-written one (write to a temporary file or folder beside
the target, then rename it into place).

- `atomic_write(path, write)` / `atomic_write_text` / `atomic_write_json`: one file.
- `atomic_dir(path)`: a whole folder (a run's output, a model folder with a card beside it): `with
  atomic_dir(out) as tmp: ...`. moe_adapt models' own `save_pretrained` already writes through it.
- `replace_dir(src, dst)`: the rename step of `atomic_dir`, for a folder staged elsewhere (checkpoints, which every
  process writes into).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it into place (readable 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, data, indent: int = 1) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Move the complete folder `src` to `dst` (same file system), replacing what is there: the old `dst` is first
    renamed aside to a hidden `.NAME.old-*` sibling, then `src` renamed to `dst`, then the old one deleted. At no
    moment does `dst` hold a mix of both; a kill between the two renames leaves no `dst` (and the old folder
    aside)."""
    src, dst = Path(src), Path(dst)
    if not (dst.exists() or dst.is_symlink()):
        os.replace(src, dst)
        return dst
    trash = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
    os.replace(dst, trash / "old")
    os.replace(src, dst)
    shutil.rmtree(trash, ignore_errors=True)
    return dst


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True, hint: str = "allow overwriting it") -> Iterator[Path]:
    """Write the folder `path` in one step: yields an empty temporary sibling folder `.NAME.tmp-*` to write into;
    when the block ends without an exception it replaces `path` (`replace_dir`), else it is deleted and `path` is
    left as it was. A process killed inside the block leaves only the hidden temporary folder, which nothing loads.

    `overwrite=False`: a `FileExistsError` (before anything is written) when `path` exists and is not an empty
    folder (its message ends "choose another folder or `hint`").
    """
    path = Path(path)
    if not overwrite and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty; choose another folder or {hint}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates it owner-only
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike):
    """Parse a JSON file; a clear `ValueError` naming the file when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
