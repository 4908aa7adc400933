"""The embedded mini benchmark: determinism, disjoint splits, layout, atomic output, CLI."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
from PIL import Image

from moe_adapt.data import load_specs, load_task_dataset
from moe_adapt.data.mini import SIZES, build_mini_benchmark, load_fashion_mnist


def _file_hashes(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cli(argv):
    from moe_adapt.cli import main

    return main(argv)


def test_same_seed_same_bytes_other_seed_other_bytes(mini_data_dir, tmp_path):
    assert _cli(["data", "mini", "--out", str(tmp_path / "again"), "--small", "--seed", "0"]) == 0
    assert _cli(["data", "mini", "--out", str(tmp_path / "seed1"), "--small", "--seed", "1"]) == 0
    reference = _file_hashes(mini_data_dir)
    assert _file_hashes(tmp_path / "again") == reference
    other = _file_hashes(tmp_path / "seed1")  # fashion/ file names carry the source ids, so they differ too
    changed = [k for k in reference if other.get(k) != reference[k]]
    assert len(changed) > 0.9 * len(reference)
    manifest = json.loads((mini_data_dir / "manifest.json").read_text())
    assert manifest["sha256"] == {k: v for k, v in reference.items() if k != "manifest.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "seed1"]  # no temp folders left


def test_splits_share_no_source_image(mini_data_dir):
    fashion = mini_data_dir / "fashion"
    pixels = {
        split: {np.asarray(Image.open(p)).tobytes() for p in (fashion / split).rglob("*.png")}
        for split in ("train", "test")
    }
    assert len(pixels["train"]) == SIZES[True]["fashion"][0] and len(pixels["test"]) == SIZES[True]["fashion"][1]
    assert not pixels["train"] & pixels["test"]

    sources = json.loads((mini_data_dir / "manifest.json").read_text())["sources"]
    for task, (train_dir, eval_dir) in {
        "digits-det": ("train/", "test/"),
        "fashion-seg": ("images/training/", "images/validation/"),
    }.items():
        train = {s for f, ids in sources[task].items() if f.startswith(train_dir) for s in ids}
        test = {s for f, ids in sources[task].items() if f.startswith(eval_dir) for s in ids}
        assert train and test and not train & test, task
    # all eval images of every task come from Fashion-MNIST's t10k or the held-out digits, never the train pool
    fashion_train = {
        s
        for task in ("fashion", "fashion-seg")
        for f, ids in sources[task].items()
        if f.startswith(("train/", "images/training/"))
        for s in ids
    }
    fashion_eval = {
        s
        for task in ("fashion", "fashion-seg")
        for f, ids in sources[task].items()
        if f.startswith(("test/", "images/validation/"))
        for s in ids
    }
    assert all(s.startswith("fashion-mnist/train/") for s in fashion_train)
    assert all(s.startswith("fashion-mnist/test/") for s in fashion_eval)


def test_layout_sizes_and_specs(mini_data_dir, mini_specs):
    assert list(mini_specs) == ["fashion", "digits-det", "fashion-seg"]
    assert [s.task_type for s in mini_specs.values()] == ["classification", "detection", "semantic_segmentation"]
    text = (mini_data_dir / "specs.yaml").read_text()
    assert "path: fashion\n" in text and str(mini_data_dir) not in text  # relative: the folder can move
    coco = json.loads((mini_data_dir / "digits-det" / "annotations" / "instances_test.json").read_text())
    assert [c["name"] for c in coco["categories"]] == [str(d) for d in range(10)]
    for name, spec in mini_specs.items():
        n_train, n_eval = SIZES[True][name]
        assert len(load_task_dataset(spec)) == n_train and len(load_task_dataset(spec, spec.eval_split)) == n_eval
    counts = np.bincount([r.label for r in load_task_dataset(mini_specs["fashion"]).records], minlength=10)
    assert counts.tolist() == [20] * 10  # class-balanced


def test_existing_output_is_kept_unless_forced(tmp_path):
    out = tmp_path / "mini"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        build_mini_benchmark(out, small=True)
    assert _cli(["data", "mini", "--out", str(out), "--small"]) == 1
    assert (out / "keep.txt").read_text() == "mine"
    specs = build_mini_benchmark(out, small=True, force=True)
    assert not (out / "keep.txt").exists() and (out / "specs.yaml").is_file()
    assert specs["fashion"].path == str(out / "fashion")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini"]


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_mini_benchmark(tmp_path / "out", small=True, fashion_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_cli_show_draws_a_grid(mini_data_dir, tmp_path, capsys):
    for task in ("fashion", "digits-det", "fashion-seg"):
        out = tmp_path / f"{task}.png"
        assert (
            _cli(["data", "show", str(mini_data_dir), "--task", task, "--out", str(out), "--n", "4", "--augment"]) == 0
        )
        with Image.open(out) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 200
    assert _cli(["data", "show", str(mini_data_dir), "--task", "nope", "--out", str(tmp_path / "x.png")]) == 1
    assert "tasks: ['fashion', 'digits-det', 'fashion-seg']" in capsys.readouterr().err


@pytest.mark.slow
def test_full_build_is_fast_enough(tmp_path):
    start = time.perf_counter()
    specs = build_mini_benchmark(tmp_path / "full", seed=0)
    elapsed = time.perf_counter() - start
    print(f"full mini benchmark build: {elapsed:.1f} s")
    assert elapsed < 120
    assert len(load_task_dataset(specs["fashion"])) == 6000
    assert len(load_task_dataset(load_specs(tmp_path / "full")["fashion-seg"], "validation")) == 500
