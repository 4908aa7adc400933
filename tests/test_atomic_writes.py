"""Writers of user outputs are atomic: a process killed in the middle of writing a model folder or a checkpoint
leaves the previous complete output (or none), never a half-written folder that loads; and `atomic_dir` itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from moe_adapt import MoEViTConfig, MoEViTForMultiTask
from moe_adapt.io import atomic_dir
from moe_adapt.training.loop import checkpoint_dirs, resolve_resume

ROOT = Path(__file__).resolve().parents[1]

# Writes a tiny model (seed `seed`) with one of the package's writers. With `stall`, every safetensors file is
# written, cut to half its size (what a kill in the middle of writing it leaves on disk), and the process then waits
# for its SIGKILL, having created the `stalled` marker file.
WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import torch
    from moe_adapt import MoEViTConfig, MoEViTForMultiTask

    writer, dest, seed, marker = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(seed)
    model = MoEViTForMultiTask(MoEViTConfig.from_preset("tiny", tasks=["cls"], task_labels={"cls": ["a", "b"]}))
    if writer == "checkpoint":
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
        from moe_adapt.training.loop import LoopState, checkpoint_dirs

        project = ProjectConfiguration(project_dir=str(dest), automatic_checkpoint_naming=True, total_limit=2)
        accelerator = Accelerator(cpu=True, project_config=project)
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
        accelerator.register_for_checkpointing(LoopState(2))
        project.iteration = len(checkpoint_dirs(dest))
    if marker != "-":
        import safetensors.torch

        original = safetensors.torch.save_file

        def stalled(tensors, filename, *args, _save=original, **kwargs):
            _save(tensors, filename, *args, **kwargs)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            Path(marker).write_text(str(filename))
            time.sleep(300)

        for module in [m for m in sys.modules.values() if m is not sys.modules[__name__]]:  # and every alias
            for name, value in list(getattr(module, "__dict__", {}).items()):
                if value is original:
                    setattr(module, name, stalled)
    if writer == "atomic_dir":
        from moe_adapt.io import atomic_dir

        with atomic_dir(dest) as stage:
            model.save_pretrained(stage)
    elif writer == "finetune":  # fine-tuning's model / base / adapter / merged folders
        from moe_adapt.adaptation.finetune import _save_dir

        _save_dir(model, dest)
    elif writer == "checkpoint":
        accelerator.save_state()  # what the training loop calls
    print("DONE", flush=True)
    """
)


def _run_writer(writer: str, dest: Path, seed: int, marker: Path | None, log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, writer, str(dest), str(seed), str(marker or "-")],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if marker is None:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            return
        deadline = time.monotonic() + 300
        while not marker.exists():  # the writer is in the middle of writing its weights
            assert proc.poll() is None, f"the writer ended before stalling:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the writer never stalled"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "writer, previous", [("atomic_dir", False), ("atomic_dir", True), ("finetune", True), ("checkpoint", True)]
)
def test_a_writer_killed_mid_write_leaves_the_previous_output_or_none(writer, previous, tmp_path):
    parent = tmp_path / "out"
    dest = parent / "model"
    if previous:  # a complete output from an earlier run (seed 0) that the killed run (seed 1) was replacing
        _run_writer(writer, dest, 0, None, tmp_path / "first.log")
        before = _files(dest / "checkpoints" / "checkpoint_0" if writer == "checkpoint" else dest)
        assert before
    marker = tmp_path / "stalled"
    _run_writer(writer, dest, 1, marker, tmp_path / "killed.log")
    assert Path(marker.read_text()).is_relative_to(parent)  # killed while writing a file of this output

    visible = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    hidden = [p for p in parent.iterdir() if p.name.startswith(".")]
    if not previous:
        assert visible == [] and not dest.exists()
    elif writer == "checkpoint":
        # accelerate writes in place: the half-written checkpoint_1 is there, but it lacks the loop state (written
        # last), so resuming ("latest") takes the previous complete one
        assert visible == ["model"] and (dest / "checkpoints" / "checkpoint_1").is_dir()
        assert checkpoint_dirs(dest) == [dest / "checkpoints" / "checkpoint_0"] == [resolve_resume(dest, "latest")]
        assert _files(dest / "checkpoints" / "checkpoint_0") == before  # the previous one, unchanged
    else:
        assert visible == ["model"] and _files(dest) == before
        torch.manual_seed(0)
        expected = MoEViTForMultiTask(MoEViTConfig.from_preset("tiny", tasks=["cls"], task_labels={"cls": ["a", "b"]}))
        loaded = MoEViTForMultiTask.from_pretrained(dest).state_dict()
        assert all(torch.equal(v, loaded[k]) for k, v in expected.state_dict().items())
    for folder in hidden:  # what the kill left behind is a hidden temporary folder that does not load
        assert ".tmp-" in folder.name
        with pytest.raises(Exception):  # noqa: B017 (whatever the loader raises on a half-written file)
            MoEViTForMultiTask.from_pretrained(folder)


def test_atomic_dir_replaces_on_success_and_keeps_the_old_folder_on_failure(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".out.tmp-")
        (stage / "a.txt").write_text("first")
    assert _files(dest) == {"a.txt": b"first"}

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(dest) as stage:
            (stage / "a.txt").write_text("second, half")
            raise RuntimeError("boom")
    assert _files(dest) == {"a.txt": b"first"} and [p.name for p in tmp_path.iterdir()] == ["out"]

    with atomic_dir(dest) as stage:
        (stage / "b.txt").write_text("second")
    assert _files(dest) == {"b.txt": b"second"} and [p.name for p in tmp_path.iterdir()] == ["out"]
    assert oct(dest.stat().st_mode & 0o777) == oct(0o755)

    with pytest.raises(FileExistsError, match="pass --overwrite"):
        with atomic_dir(dest, overwrite=False, hint="pass --overwrite"):
            pass
    assert _files(dest) == {"b.txt": b"second"}


def test_save_pretrained_on_a_non_main_process_writes_nothing_and_keeps_other_files(tmp_path, monkeypatch):
    """accelerate's pattern calls save_pretrained on every rank with is_main_process=False on all but one: those
    calls leave the folder as it is. A save over a folder keeps its other files (a card, notes), by exact name."""
    import os

    from moe_adapt import MoEViTConfig, MoEViTForImageClassification

    model = MoEViTForImageClassification(MoEViTConfig.from_preset("tiny", tasks=["a"], task_labels={"a": ["x", "y"]}))
    out = tmp_path / "model"
    model.save_pretrained(out)
    (out / "README.md").write_text("card")
    (out / "model_notes.md").write_text("notes")
    before = sorted(os.listdir(out))
    model.save_pretrained(out, is_main_process=False)
    assert sorted(os.listdir(out)) == before
    model.save_pretrained(out)
    assert sorted(os.listdir(out)) == before and (out / "model_notes.md").read_text() == "notes"
    monkeypatch.chdir(out)  # a folder holding the working directory is written in place, not swapped away
    model.save_pretrained(".")
    assert os.getcwd() == str(out.resolve()) and sorted(os.listdir(out)) == before
