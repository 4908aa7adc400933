"""The recipes and the CLI answer a user's mistake with one `error:` line naming what was wrong, exit code 2 and
no traceback; `--debug` (or MOE_ADAPT_DEBUG=1) shows the traceback."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"

CASES = {
    "pretrain unknown key": (
        "pretrain",
        ["--config", f"{CONFIGS}/mini.yaml", "train.stpes=3"],
        "pretrain.py: error: .*train: unknown key.*'stpes'.*max_steps",
    ),
    "pretrain missing config": ("pretrain", ["--config", "no/such.yaml"], "pretrain.py: error: .*no/such.yaml"),
    "finetune missing model": (
        "finetune",
        ["--config", f"{CONFIGS}/finetune_digits.yaml", "--model", "/no/such/model"],
        "finetune.py: error: /no/such/model: no such model folder",
    ),
    "finetune missing dataset": (
        "finetune",
        ["--config", f"{CONFIGS}/finetune_digits.yaml", "--model", "MODEL", "--dataset", "/no/such/spec.json"],
        "finetune.py: error: .*/no/such/spec.json",
    ),
    "continual unknown key": (
        "continual",
        ["--config", f"{CONFIGS}/continual.yaml", "--model", "MODEL", "train.stpes=3"],
        "continual.py: error: .*train: unknown key.*'stpes'.*'max_steps'",
    ),
    "finetune unknown key": (
        "finetune",
        ["--config", f"{CONFIGS}/finetune_digits.yaml", "--model", "MODEL", "optimizer.rl=1"],
        "finetune.py: error: .*optimizer: unknown key.*'rl'.*'lr'",
    ),
    "extract missing model": (
        "moe-adapt",
        ["extract", "/no/such/model", "--task", "a", "--out", "OUT"],
        "moe-adapt extract: error: /no/such/model: no such model folder",
    ),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import trained_like

    from moe_adapt import MoEViTConfig, MoEViTForImageClassification

    path = tmp_path_factory.mktemp("recipes") / "model"
    config = MoEViTConfig.from_preset("tiny", tasks=["a"], task_labels={"a": ["x", "y"]})
    trained_like(MoEViTForImageClassification(config)).save_pretrained(path)
    return path


def entry_point(name: str):
    """The `main(argv)` a user's command runs: a recipe script (loaded from its file) or the `moe-adapt` CLI."""
    if name == "moe-adapt":
        from moe_adapt.cli import main

        return main
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line_naming_it(case, tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MOE_ADAPT_DEBUG", raising=False)
    name, argv, pattern = CASES[case]
    argv = [str(model_dir) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert entry_point(name)(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and re.search(pattern, errors[0]), err[-3000:]
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--config", str(CONFIGS / "mini.yaml"), "train.stpes=3"]
    with pytest.raises(ValueError, match="stpes"):
        entry_point("pretrain")(argv + ["--debug"])
    monkeypatch.setenv("MOE_ADAPT_DEBUG", "1")
    with pytest.raises(ValueError, match="stpes"):
        entry_point("pretrain")(argv)


def test_a_recipe_process_exits_2_with_one_line(tmp_path):
    """The same through a real process, as a user's shell sees it."""
    cmd = [sys.executable, str(ROOT / "recipes/pretrain.py"), "--config", str(CONFIGS / "mini.yaml"), "train.stpes=3"]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()][-1].startswith("pretrain.py: error: ")


def test_the_cli_lists_every_step_of_the_workflow(capsys):
    from moe_adapt.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("data", "pretrain", "inspect", "extract", "finetune", "continual"):
        assert command in out, command
    assert entry_point("moe-adapt")(["pretrain", "--config", str(CONFIGS / "mini.yaml"), "train.stpes=3"]) == 2
    assert "moe-adapt pretrain: error: " in capsys.readouterr().err
