"""The analytical FLOP and parameter counters against hand-written formulas."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTModel

from moe_adapt import MoEViTConfig, MoEViTForImageClassification, MoEViTModel
from moe_adapt.analysis import ExpertSelection
from moe_adapt.analysis.usage import model_signature
from moe_adapt.flops import count_parameters, flops_per_image
from moe_adapt.surgery import extract_submodel

# tiny preset: d 32, 4 blocks, 4 heads, MLP 64, 32x32 images, patch 8; even blocks 6 attention experts (head 16),
# odd blocks 8 MLP experts (width 64); top-2 everywhere
D, N, P, H, IE, I_DENSE = 32, 17, 16, 16, 64, 64


def moe_attention(k):  # shared K and V, k query + output projections, k heads of QK^T and AV
    return 2 * 2 * N * D * H + 2 * 2 * N * k * D * H + 2 * 2 * N * N * k * H


def dense_attention():
    return 4 * 2 * N * D * D + 2 * 2 * N * N * D


def test_moe_vit_flops_match_the_formula():
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"])
    f = flops_per_image(config, task="a")
    assert f["tokens"] == N and f["image_size"] == [32, 32]
    assert f["patch_embed"] == 2 * P * 3 * 8 * 8 * D
    assert f["attention"] == 2 * (moe_attention(2) + dense_attention())
    assert f["mlp"] == 2 * (2 * 2 * N * D * I_DENSE + 2 * 2 * N * 2 * D * IE)
    assert f["router"] == 2 * (2 * N * D * 6 + 2 * N * D * 8)
    assert f["head"] == 0
    assert f["total"] == f["patch_embed"] + f["attention"] + f["mlp"] + f["router"]
    assert f["layers"][1]["mlp_experts_active"] == 2 and f["layers"][0]["attn_experts_active"] == 2
    one = flops_per_image(config, task="a", top_k={"mlp": 1})
    assert f["mlp"] - one["mlp"] == 2 * (2 * 2 * N * 1 * D * IE) and one["attention"] == f["attention"]
    bigger = flops_per_image(config, image_size=64)
    assert bigger["tokens"] == 65 and bigger["task"] == "a"


def test_router_sizes_heads_and_slices():
    config = MoEViTConfig.from_preset(
        "tiny", tasks=["a", "b"], task_labels={"a": list("xyz"), "b": list("uv")},
        task_router_sizes={"b": {"attn": [4, 0, 4, 0], "mlp": [0, 8, 0, 8]}},
    )
    assert flops_per_image(config, "a")["router"] - flops_per_image(config, "b")["router"] == 2 * (2 * N * D * 2)
    model = MoEViTForImageClassification(config).eval()
    assert flops_per_image(model, "a")["head"] == 2 * D * 3
    assert flops_per_image(model, "b")["head"] == 2 * D * 2
    assert flops_per_image(model.moe_vit, "a")["head"] == 0
    keep_k = {n: [0, 1] for n in config.moe_layer_names()}
    sub = extract_submodel(model, ExpertSelection(experts=keep_k, tasks=["a"], model=model_signature(config)))
    full, sliced = flops_per_image(model, "a"), flops_per_image(sub, "a")
    assert full["total"] - sliced["total"] == full["router"] - sliced["router"] == 2 * (2 * N * D * (6 - 2 + 8 - 2))
    assert sliced["attention"] == full["attention"] and sliced["mlp"] == full["mlp"]


def test_dense_vit_and_all_dense_moe_config_agree():
    vit_config = ViTConfig(hidden_size=D, num_hidden_layers=4, num_attention_heads=4, intermediate_size=I_DENSE,
                           image_size=32, patch_size=8)
    dense = MoEViTConfig.from_preset("tiny", tasks=["a"], attn_experts=0, mlp_experts=0)
    f_vit = flops_per_image(ViTModel(vit_config, add_pooling_layer=False))
    assert f_vit["total"] == flops_per_image(dense)["total"] == flops_per_image(vit_config)["total"]
    assert f_vit["attention"] == 4 * dense_attention() and f_vit["router"] == 0 and f_vit["task"] is None


def test_vit_with_wider_heads_is_counted_per_layer():
    """A ViTModel with `head_dim` (heads wider than hidden / heads), one of whose layers is rebuilt with the default
    head size, is counted layer by layer from its modules, not from the config alone."""
    from transformers.models.vit.modeling_vit import ViTAttention

    vit_config = ViTConfig(hidden_size=D, num_hidden_layers=4, num_attention_heads=4, intermediate_size=I_DENSE,
                           image_size=32, patch_size=8, head_dim=2 * D // 4)
    vit = ViTModel(vit_config, add_pooling_layer=False)
    wide = 4 * 2 * N * D * (2 * D) + 2 * 2 * N * N * (2 * D)
    assert flops_per_image(vit_config)["attention"] == flops_per_image(vit)["attention"] == 4 * wide
    vit.layers[1].attention = ViTAttention(ViTConfig(hidden_size=D, num_attention_heads=4))
    f = flops_per_image(vit)
    assert f["layers"][1]["attention"] == dense_attention() and f["layers"][0]["attention"] == wide
    assert f["attention"] == 3 * wide + dense_attention()
    assert vit(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state.shape == (1, N, D)
    # a MoE ViT's dense attention is hidden / heads wide whatever a stray `head_dim` says
    moe = MoEViTConfig.from_preset("tiny", tasks=["a"], attn_experts=0, mlp_experts=0)
    moe.head_dim = 16
    assert flops_per_image(moe)["attention"] == 4 * dense_attention()


def test_parameter_counts():
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"], task_labels={"a": list("xyz"), "b": list("uv")})
    model = MoEViTForImageClassification(config)
    counts = count_parameters(model, task="a")
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["experts"] == 2 * (6 * (2 * H * D + H + D)) + 2 * (8 * (2 * IE * D + IE + D))
    assert counts["routers"] == 2 * 2 * (6 * D + 8 * D)
    assert counts["task_specific"] == (D * 3 + 3) + (D * 2 + 2) + 2 * D
    assert counts["task_total"] == counts["total"] - counts["routers"] // 2 - (D * 2 + 2) - D
    assert count_parameters(MoEViTModel(config))["task_specific"] == 2 * D


def test_bad_arguments():
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"])
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        flops_per_image(config, image_size=30)
    with pytest.raises(ValueError, match="top_k=7"):
        flops_per_image(config, top_k=7)
    with pytest.raises(ValueError, match="unknown MoE layers"):
        flops_per_image(config, expert_mask={"layers.1.attn": torch.ones(6, dtype=torch.bool)})
    with pytest.raises(ValueError, match="Unknown task"):
        flops_per_image(config, task="c")
    with pytest.raises(ValueError, match="no experts"):
        flops_per_image(ViTConfig(), top_k=2)
    masked = flops_per_image(config, expert_mask={"layers.1.mlp": torch.tensor([1, 1, 1, 0, 0, 0, 0, 0]).bool()})
    assert masked["total"] == flops_per_image(config)["total"]
    with pytest.raises(ValueError, match="removes every expert"):
        flops_per_image(config, expert_mask={"layers.1.mlp": torch.zeros(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="must be bool"):
        flops_per_image(config, expert_mask={"layers.1.mlp": torch.ones(8)})
    with pytest.raises(ValueError, match="top_k=2 .* 1 experts"):
        flops_per_image(config, expert_mask={"layers.1.mlp": torch.tensor([1, 0, 0, 0, 0, 0, 0, 0]).bool()})
