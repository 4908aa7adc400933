"""The README's model snippets run as written (issue 2: "the README shows a runnable snippet of the model API")."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_VIT = "google/vit-base-patch16-224-in21k"


def model_snippets() -> list[str]:
    """The python blocks of the README's model section ("The model in five lines" up to the workflow)."""
    text = README.read_text()
    section = text[text.index("## The model in five lines") : text.index("## The workflow")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_model_snippets_run_as_written(tmp_path, monkeypatch):
    from transformers import ViTConfig, ViTModel

    blocks = model_snippets()
    assert len(blocks) == 4, "the model section's python blocks changed: update this test"
    # the one thing that cannot run offline is the Hub download: a small local ViT stands in for it
    vit_dir = tmp_path / "vit"
    ViTModel(
        ViTConfig(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=12,
            intermediate_size=96,
            image_size=32,
            patch_size=8,
        ),
        add_pooling_layer=False,
    ).save_pretrained(vit_dir)
    assert sum(HUB_VIT in b for b in blocks) == 1
    blocks = [b.replace(HUB_VIT, str(vit_dir)) for b in blocks]
    monkeypatch.chdir(tmp_path)  # the snippets save "my-moe" into the working directory
    torch.manual_seed(0)
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, str(README), "exec"), ns)  # noqa: S102 - our own README
        if i == 0:  # what the comments in the first snippet promise
            assert tuple(ns["out"].logits.shape) == (2, 1000) and len(ns["out"].router_probs) == 12
    assert (tmp_path / "my-moe" / "model.safetensors").exists()
    assert (tmp_path / "my-moe" / "preprocessor_config.json").exists()
    assert ns["classify"].model.config.model_type == "moe_vit"
    assert ns["moe"].config.mlp_experts == [0, 8] and ns["moa"].config.attn_experts == [12, 0]
    assert ns["mi"].joint is None  # reset after the step
    grads = [p.grad for p in ns["model"].parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
