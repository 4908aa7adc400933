"""Shared test set-up: offline Hugging Face libraries, and the `--small` mini benchmark built once.

Environment (set before any test module imports transformers / datasets / evaluate):
`HF_HUB_OFFLINE=1`, `HF_DATASETS_OFFLINE=1`, `TOKENIZERS_PARALLELISM=false`, `MPLBACKEND=Agg`; torch uses
one thread.

Fixtures for everybody's tests:

- `mini_data_dir` (session): a `pathlib.Path` to the mini benchmark built with
  `build_mini_benchmark(dir, seed=0, small=True)` once per test session (about 3 s): `fashion` (classification,
  200 train / 100 test), `digits-det` (detection, 200 / 100), `fashion-seg` (segmentation, 200 training /
  100 validation), plus `specs.yaml` and `manifest.json`. Treat it as read-only: other tests share it.
- `mini_specs` (session): `load_specs(mini_data_dir)`, the three `DatasetSpec`s by name (absolute paths).

```python
def test_something(mini_specs):
    ds = load_task_dataset(mini_specs["digits-det"], transform="train")
```
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: one thread is faster than two fighting over a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mini_data_dir(tmp_path_factory):
    """The `--small` mini benchmark (seed 0), built once per session; read-only."""
    from moe_adapt.data.mini import build_mini_benchmark

    out = tmp_path_factory.mktemp("mini-benchmark") / "mini"
    build_mini_benchmark(out, seed=0, small=True)
    return out


@pytest.fixture(scope="session")
def mini_specs(mini_data_dir):
    """The mini benchmark's `DatasetSpec`s by name: `fashion`, `digits-det`, `fashion-seg`."""
    from moe_adapt.data.specs import load_specs

    return load_specs(mini_data_dir / "specs.yaml")
