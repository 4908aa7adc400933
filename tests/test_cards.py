"""Model cards (metadata, tables, selection block), rebuilding a slice from a card bit for bit, and the
`moe-adapt inspect` / `moe-adapt extract` commands end to end on a tiny image folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from PIL import Image

from moe_adapt import MoEViTConfig, MoEViTForImageClassification
from moe_adapt.analysis import collect_expert_usage, select_experts
from moe_adapt.cli import main
from moe_adapt.hub import build_model_card, read_card_selection, rebuild_from_card, weights_fingerprint
from moe_adapt.surgery import extract_submodel, verify_submodel

LABELS = {"a": ["dark", "light"], "b": ["left", "right"]}


def make_model(seed=0):
    torch.manual_seed(seed)
    model = MoEViTForImageClassification(MoEViTConfig.from_preset("tiny", tasks=["a", "b"], task_labels=LABELS))
    with torch.no_grad():
        for module in model.moe_vit.moe_layers().values():
            for router in module.router.routers.values():
                router.weight.normal_(0, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def sliced():
    model = make_model()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sel = select_experts(collect_expert_usage(model, [images], task="a"), "top_n", n=3)
    sub = extract_submodel(model, sel)
    report = verify_submodel(model, sub, [(images, torch.tensor([0, 1, 0, 1]))])
    card = build_model_card(
        sub,
        sel,
        report,
        base_model="me/parent",
        command="moe-adapt extract parent ...",
        datasets={"a": "toy-a"},
        parent_fingerprint=weights_fingerprint(model),
    )
    return model, sel, sub, report, card


def test_card_metadata_and_body(sliced, tmp_path):
    _, sel, sub, report, card = sliced
    data = card.data
    assert data.base_model == "me/parent" and data.library_name == "transformers" and data.datasets == ["toy-a"]
    assert {"moe-adapt", "mixture-of-experts", "image-classification"} <= set(data.tags)
    assert data.pipeline_tag == "image-classification"
    assert 'pipeline("image-classification", model="PATH_OR_REPO")' in card.text  # the usage shown is the widget's
    result = data.eval_results[0]
    assert (result.metric_type, result.dataset_name) == ("accuracy", "toy-a")
    assert result.metric_value == pytest.approx(report.tasks["a"]["metric"]["submodel"])
    text = card.text
    for piece in (
        "## Tasks",
        "| a | classification | 2: dark, light |",
        "## Kept experts",
        "| layers.1.mlp | 2 | 3 / 8 |",
        "| parameters |",
        "FLOPs / image (a)",
        "top-1 agreement",
        "moe-adapt extract parent ...",
        "push_to_hub",
    ):
        assert piece in text, piece
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == "me/parent"
    info = read_card_selection(tmp_path / "README.md")
    assert info.selection == sel and info.tasks == ["a"] and info.submodel_fingerprint == weights_fingerprint(sub)


def test_rebuild_from_card_is_bit_identical(sliced, tmp_path):
    model, _, sub, _, card = sliced
    rebuilt = rebuild_from_card(card, model)
    a, b = sub.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sub.save_pretrained(tmp_path / "one")
    rebuilt.save_pretrained(tmp_path / "two")
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "two" / "model.safetensors"
    ).read_bytes()
    with pytest.raises(ValueError, match="weights differ from those the card was made from"):
        rebuild_from_card(card, make_model(seed=1))
    assert rebuild_from_card(card, make_model(seed=1), check=False).config.tasks == ["a"]


def test_card_without_selection_block():
    with pytest.raises(ValueError, match="no moe-adapt selection block"):
        read_card_selection(ModelCard("---\nlicense: mit\n---\n# some other model\n"))
    broken = ModelCard("# x\n<!-- moe-adapt-selection -->\n```json\n{not json\n```\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_card_selection(broken)


# ---------------------------------------------------------------------------------------------------------------
# CLI end to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Two tiny image-folder tasks (8 train / 4 test images each) and their specs.yaml."""
    root = tmp_path_factory.mktemp("tiny-data")
    rng = np.random.default_rng(0)
    blocks = []
    for task, names in LABELS.items():
        for split, count in (("train", 8), ("test", 4)):
            for c, name in enumerate(names):
                folder = root / task / split / name
                folder.mkdir(parents=True)
                for i in range(count // 2):
                    pixels = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8) + 100 * c
                    Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
        blocks.append(
            {
                "name": task,
                "task_type": "classification",
                "format": "imagefolder",
                "path": task,
                "split": "train",
                "eval_split": "test",
                "label_names": names,
                "image_size": 32,
            }
        )
    (root / "specs.yaml").write_text(yaml.safe_dump({"datasets": blocks}))
    return root


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parent") / "parent"
    make_model().save_pretrained(path)
    return path


def test_cli_inspect(tiny_data, parent_dir, tmp_path, capsys):
    out = tmp_path / "inspect"
    assert (
        main(
            [
                "inspect",
                str(parent_dir),
                "--data",
                str(tiny_data),
                "--task",
                "a",
                "--task",
                "b",
                "--out",
                str(out),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "task 'a': 8 images" in printed and "layers.3.mlp" in printed
    assert json.loads((out / "usage_b.json").read_text())["num_images"] == 8
    assert (out / "usage_heatmap.png").stat().st_size > 1000


def test_cli_extract_and_rebuild_from_card(tiny_data, parent_dir, tmp_path, capsys):
    out = tmp_path / "slice"
    args = [
        "extract",
        str(parent_dir),
        "--data",
        str(tiny_data / "specs.yaml"),
        "--task",
        "a",
        "--task",
        "b",
        "--policy",
        "coverage",
        "--coverage",
        "0.5",
        "--out",
        str(out),
        "--batch-size",
        "4",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "parameters:" in printed and "top-1 agreement" in printed
    for name in (
        "config.json",
        "model.safetensors",
        "README.md",
        "verification.json",
        "selection.json",
        "usage_a.json",
        "usage_b.json",
        "usage_heatmap.png",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "verification.json").read_text())
    assert set(report["tasks"]) == {"a", "b"} and report["tasks"]["a"]["num_images"] == 4
    card = (out / "README.md").read_text()
    assert "--policy coverage --coverage 0.5" in card
    again = tmp_path / "rebuilt"
    assert (
        main(["extract", "--from-card", str(out / "README.md"), "--model", str(parent_dir), "--out", str(again)]) == 0
    )
    assert "weights identical to the card's slice: yes" in capsys.readouterr().out
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # bad input: an existing output folder, a card without a selection block, an unknown task, no data
    assert main(args) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (
        main(
            [
                "extract",
                "--from-card",
                str(tiny_data / "specs.yaml"),
                "--model",
                str(parent_dir),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "no moe-adapt selection block" in capsys.readouterr().err
    assert (
        main(["extract", str(parent_dir), "--data", str(tiny_data), "--task", "c", "--out", str(tmp_path / "y")]) == 2
    )
    assert "Unknown task 'c'" in capsys.readouterr().err
    assert main(["inspect", str(parent_dir), "--data", str(tiny_data), "--task", "a", "--max-images", "0"]) == 2
    assert "no calibration images" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_cli_extract_with_healing_records_it_and_rebuilds_the_slice_before_healing(
    tiny_data, parent_dir, tmp_path, capsys
):
    common = ["--data", str(tiny_data), "--task", "a", "--policy", "top_n", "--batch-size", "4"]
    assert main(["extract", str(parent_dir), *common, "--out", str(tmp_path / "plain")]) == 0
    assert main(["extract", str(parent_dir), *common, "--heal-steps", "5", "--out", str(tmp_path / "healed")]) == 0
    printed = capsys.readouterr().out
    assert "healing toward the parent: 5 steps" in printed and "mean squared difference to the parent" in printed
    card = (tmp_path / "healed" / "README.md").read_text()
    info = read_card_selection(tmp_path / "healed")
    assert "## Healing" in card and "--heal-steps 5 --heal-train routers,norms,biases" in card
    assert "router rows, LayerNorms and biases" in card and info.healed["lr"] == 3e-3
    assert info.healed["steps"] == 5 and info.healed["images"] == {"a": 8}
    plain = (tmp_path / "plain" / "model.safetensors").read_bytes()
    healed = (tmp_path / "healed" / "model.safetensors").read_bytes()
    assert (healed == plain) == info.healed["restored"]  # healing changed the weights unless it was undone
    assert (
        main(
            [
                "extract",
                "--from-card",
                str(tmp_path / "healed"),
                "--model",
                str(parent_dir),
                "--out",
                str(tmp_path / "rebuilt"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "weights identical to the card's slice: yes" in out and "holds the slice before healing" in out
    assert (tmp_path / "rebuilt" / "model.safetensors").read_bytes() == plain
    assert main(["extract", str(parent_dir), *common, "--heal-steps", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--heal-steps must be 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # the whole backbone: the command and the card say so, and the default rate follows
    assert (
        main(
            [
                "extract",
                str(parent_dir),
                *common,
                "--heal-steps",
                "3",
                "--heal-train",
                "all",
                "--out",
                str(tmp_path / "all"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    card = (tmp_path / "all" / "README.md").read_text()
    info = read_card_selection(tmp_path / "all")
    assert "--heal-train all" in card and "other backbone tensors" in card
    assert info.healed["train"] == ["routers", "norms", "biases", "weights"] and info.healed["lr"] == 3e-4
    assert info.healed["batch_size"] == 32  # heal_submodel's default
    assert (
        main(
            [
                "extract",
                str(parent_dir),
                *common,
                "--heal-steps",
                "2",
                "--heal-batch-size",
                "4",
                "--out",
                str(tmp_path / "b4"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert "--heal-batch-size 4" in (tmp_path / "b4" / "README.md").read_text()
    assert read_card_selection(tmp_path / "b4").healed["batch_size"] == 4
    assert main(["extract", str(parent_dir), *common, "--heal-batch-size", "4", "--out", str(tmp_path / "bad4")]) == 2
    assert "add --heal-steps" in capsys.readouterr().err and not (tmp_path / "bad4").exists()
    assert (
        main(
            [
                "extract",
                str(parent_dir),
                *common,
                "--heal-steps",
                "3",
                "--heal-train",
                "routers,matrices",
                "--out",
                str(tmp_path / "bad2"),
            ]
        )
        == 2
    )
    assert "--heal-train 'routers,matrices'" in capsys.readouterr().err and not (tmp_path / "bad2").exists()
    assert main(["extract", str(parent_dir), *common, "--heal-train", "all", "--out", str(tmp_path / "bad3")]) == 2
    assert "add --heal-steps" in capsys.readouterr().err and not (tmp_path / "bad3").exists()
