"""benchmarks/results.py: recording a benchmark's JSON lines and regenerating docs/results.md and the README table."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("bench_results", ROOT / "benchmarks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _paths(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n\n<!-- results:start -->\nold table\n<!-- results:end -->\n\n## after\n")
    return tmp_path / "results", tmp_path / "results.md", readme


def _bench(tmp_path, line: dict, status: int = 0) -> list[str]:
    script = tmp_path / "moe_layer.py"
    script.write_text(f"import json, sys\nprint('log line')\nprint(json.dumps({line!r}))\nsys.exit({status})\n")
    return [sys.executable, str(script)]


def test_record_keeps_json_and_renders_both_documents(results, tmp_path):
    res, docs, readme = _paths(tmp_path)
    res.mkdir()
    line = {
        "device": "cpu (x86_64, 1 threads)",
        "dtype": "float32",
        "tokens": 1576,
        "best_vs_dense": 1.287,
        "vit_s_train_vs_dense": 0.751,
    }
    path = results.record(_bench(tmp_path, line), results=res, docs=docs, readme=readme)
    assert path == res / "moe_layer.jsonl"
    stored = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(stored) == 1 and stored[0]["best_vs_dense"] == 1.287 and "moe_layer.py" in stored[0]["_command"]
    text = docs.read_text()
    assert "## MoE layer and train-step speed" in text and "| 1.287 | 0.751 |" in text
    table = readme.read_text()
    assert "old table" not in table and "| MoE MLP layer / dense MLP, CPU | 1.29× |" in table
    assert table.startswith("# x\n\nintro\n") and table.endswith("<!-- results:end -->\n\n## after\n")

    # --append adds a run; the README's range spans both
    results.record(_bench(tmp_path, line | {"best_vs_dense": 1.31}), append=True, results=res, docs=docs, readme=readme)
    assert len(path.read_text().splitlines()) == 2
    assert "1.29–1.31×" in readme.read_text()


def test_failed_or_silent_benchmark_records_nothing(results, tmp_path):
    res, docs, readme = _paths(tmp_path)
    res.mkdir()
    with pytest.raises(SystemExit, match="exited with status 3; nothing recorded"):
        results.record(_bench(tmp_path, {"best_vs_dense": 1.0}, status=3), results=res, docs=docs, readme=readme)
    silent = tmp_path / "silent.py"
    silent.write_text("print('no json here')\n")
    with pytest.raises(SystemExit, match="printed no JSON line; nothing recorded"):
        results.record([sys.executable, str(silent)], results=res, docs=docs, readme=readme)
    assert list(res.iterdir()) == [] and not docs.exists() and "old table" in readme.read_text()


def test_a_broken_results_file_names_the_file_and_line(results, tmp_path):
    res, docs, readme = _paths(tmp_path)
    res.mkdir()
    (res / "export.jsonl").write_text('{"batch": 64}\n{not json\n')
    with pytest.raises(SystemExit, match=r"export.jsonl, line 2: not JSON"):
        results.render(res, docs, readme)


def test_repository_documents_are_up_to_date(results, tmp_path):
    """docs/results.md and the README table are what `render` makes of the committed JSON lines."""
    docs, readme = tmp_path / "results.md", tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    results.render(results.RESULTS, docs, readme)
    assert docs.read_text() == (ROOT / "docs" / "results.md").read_text()
    assert readme.read_text() == (ROOT / "README.md").read_text()


def test_slices_headline_shows_the_latest_run_of_the_default_policy(results):
    def run(policy, ratio):
        task = {"params": {"ratio": ratio}, "metric": {"ratio": 1.0}, "speed_sliced_vs_vit": 0.9}
        return {"policy": {"policy": policy}, "tasks": {"a": task}}

    runs = [run("threshold", 0.4), run("threshold", 0.38), run("top_n", 0.26)]
    assert results._default_policy_run(runs) is runs[1]
    assert results._slices(results._default_policy_run(runs)).startswith("policy `threshold`: 38.0% of the parameters")
    assert results._default_policy_run(runs[2:]) is runs[2]  # no default-policy run: the latest
