"""The recipes and the CLI answer a user's mistake with one `error:` line naming what was wrong, exit code 2 and
no traceback; `--debug` (or MOE_ADAPT_DEBUG=1) shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
MOE_ADAPT = str(Path(sys.executable).with_name("moe-adapt"))

CASES = {
    "pretrain unknown key": ([sys.executable, "recipes/pretrain.py", "--config", f"{CONFIGS}/mini.yaml", "train.stpes=3"],
                             "pretrain.py: error: .*train: unknown key.*'stpes'.*max_steps"),
    "pretrain missing config": ([sys.executable, "recipes/pretrain.py", "--config", "no/such.yaml"],
                                "pretrain.py: error: .*no/such.yaml"),
    "finetune missing model": ([sys.executable, "recipes/finetune.py", "--config", f"{CONFIGS}/finetune_digits.yaml",
                                "--model", "/no/such/model"], "finetune.py: error: /no/such/model: no such model folder"),
    "finetune missing dataset": ([sys.executable, "recipes/finetune.py", "--config", f"{CONFIGS}/finetune_digits.yaml",
                                  "--model", "MODEL", "--dataset", "/no/such/spec.json"], "finetune.py: error: .*/no/such/spec.json"),
    "continual unknown key": ([sys.executable, "recipes/continual.py", "--config", f"{CONFIGS}/continual.yaml",
                               "--model", "MODEL", "stpes=3"], "continual.py: error: .*unknown key.*'stpes'.*steps"),
    "extract missing model": ([MOE_ADAPT, "extract", "/no/such/model", "--task", "a", "--out", "OUT"],
                              "moe-adapt extract: error: /no/such/model: no such model folder"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import trained_like

    from moe_adapt import MoEViTConfig, MoEViTForImageClassification

    path = tmp_path_factory.mktemp("recipes") / "model"
    config = MoEViTConfig.from_preset("tiny", tasks=["a"], task_labels={"a": ["x", "y"]})
    trained_like(MoEViTForImageClassification(config)).save_pretrained(path)
    return path


def _run(cmd, tmp_path, model_dir, env=None):
    cmd = [str(model_dir) if c == "MODEL" else str(tmp_path / "out") if c == "OUT" else c for c in cmd]
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", **(env or {}))
    env.pop("MOE_ADAPT_DEBUG", None) if "MOE_ADAPT_DEBUG" not in (env or {}) else None
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line_naming_it(case, tmp_path, model_dir):
    import re

    cmd, pattern = CASES[case]
    cmd = [str(ROOT / c) if c.startswith("recipes/") else c for c in cmd]
    proc = _run(cmd, tmp_path, model_dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path, model_dir):
    cmd = [sys.executable, str(ROOT / "recipes/pretrain.py"), "--config", str(CONFIGS / "mini.yaml"), "train.stpes=3"]
    proc = _run(cmd + ["--debug"], tmp_path, model_dir)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "stpes" in proc.stderr
    proc = _run(cmd, tmp_path, model_dir, env={"MOE_ADAPT_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
