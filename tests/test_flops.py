"""The analytical FLOP and parameter counters against hand-written formulas."""

from __future__ import annotations

import pytest
import torch
from helpers import trained_like
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import ViTConfig, ViTModel

from moe_adapt import MoEViTConfig, MoEViTForImageClassification, MoEViTModel
from moe_adapt.analysis import ExpertSelection
from moe_adapt.analysis.usage import model_signature
from moe_adapt.flops import count_parameters, flops_per_image
from moe_adapt.surgery import add_task, extract_submodel

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
        "tiny",
        tasks=["a", "b"],
        task_labels={"a": list("xyz"), "b": list("uv")},
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
    vit_config = ViTConfig(
        hidden_size=D,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=I_DENSE,
        image_size=32,
        patch_size=8,
    )
    dense = MoEViTConfig.from_preset("tiny", tasks=["a"], attn_experts=0, mlp_experts=0)
    f_vit = flops_per_image(ViTModel(vit_config, add_pooling_layer=False))
    assert f_vit["total"] == flops_per_image(dense)["total"] == flops_per_image(vit_config)["total"]
    assert f_vit["attention"] == 4 * dense_attention() and f_vit["router"] == 0 and f_vit["task"] is None


def test_vit_with_wider_heads_is_counted_per_layer():
    """A ViTModel with `head_dim` (heads wider than hidden / heads), one of whose layers is rebuilt with the default
    head size, is counted layer by layer from its modules, not from the config alone."""
    from transformers.models.vit.modeling_vit import ViTAttention

    vit_config = ViTConfig(
        hidden_size=D,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=I_DENSE,
        image_size=32,
        patch_size=8,
        head_dim=2 * D // 4,
    )
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
    norm = 2 * D  # each classification head: LayerNorm, then Linear
    assert counts["task_specific"] == (norm + D * 3 + 3) + (norm + D * 2 + 2) + 2 * D
    assert counts["task_total"] == counts["total"] - counts["routers"] // 2 - (norm + D * 2 + 2) - D
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


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def torch_flops(model, task, top_k=None) -> int:
    """torch's own count of one 32x32 image's forward (`FlopCounterMode`, given the formula of its other attention
    kernels for the CPU one, which it does not count)."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(pixel_values=pixels, task=task, top_k=top_k)
    return counter.get_total_flops()


def assert_counts_agree(model, task, top_k=None):
    counted, measured = flops_per_image(model, task, top_k=top_k)["total"], torch_flops(model, task, top_k)
    assert abs(counted / measured - 1) < 0.02, (task, top_k, counted, measured)
    return counted, measured


@pytest.fixture(scope="module")
def grown_eager():
    """A tiny eager-backend model grown by task c (2 attention and 3 MLP experts per layer), then grown again by task
    d (1 attention expert per attention layer), with random routers: c and d route over two and three expert groups."""
    torch.manual_seed(0)
    config = MoEViTConfig.from_preset(
        "tiny", tasks=["a", "b"], task_labels={"a": list("xyz"), "b": list("uv")}, experts_implementation="eager"
    )
    model = trained_like(MoEViTForImageClassification(config))
    grown = add_task(model, "c", labels=4, new_attn_experts=2, new_mlp_experts=3, init="random")
    twice = add_task(grown, "d", labels=5, new_attn_experts=1, new_mlp_experts=0, init="random")
    return trained_like(twice, seed=3)


def test_flop_count_agrees_with_torch_for_every_task_of_a_grown_model(grown_eager):
    """flops_per_image agrees with torch's FlopCounterMode (eager experts backend) for the old tasks and for the tasks
    that route over several expert groups, whose every slot runs in the one group that holds its expert: a new task
    costs what its larger routers and head add, not a second pass of its experts per group."""
    assert grown_eager.config._experts_implementation == "eager"
    assert grown_eager.config.attn_expert_groups[0] == [6, 2, 1] and grown_eager.config.mlp_expert_groups[1] == [8, 3]
    counts = {task: assert_counts_agree(grown_eager, task) for task in ("a", "b", "c", "d")}
    (old_counted, old_measured), (new_counted, new_measured) = counts["a"], counts["c"]
    assert new_counted / old_counted < 1.01
    assert abs(new_measured / old_measured - new_counted / old_counted) < 0.01  # 1.42 when every group ran all k slots


@pytest.mark.parametrize("top_k", [1, 3, {"mlp": 3}, {"attn": 1, "mlp": 4}])
def test_flop_count_agrees_with_torch_under_top_k_overrides(grown_eager, top_k):
    for task in ("a", "c", "d"):
        assert_counts_agree(grown_eager, task, top_k)


@pytest.mark.parametrize("keep", [[0, 1], [0, 6, 7], [0, 1, 2, 6, 7]])
def test_flop_count_agrees_with_torch_for_slices_of_a_grown_model(grown_eager, keep):
    """Slices of the grown model (their expert groups fused into one) for the new tasks, kept exactly k experts (run as
    one dense layer) or more, at their own and at an overridden top-k."""
    names = grown_eager.config.moe_layer_names()
    selection = ExpertSelection(
        experts=dict.fromkeys(names, keep), tasks=["c", "d"], model=model_signature(grown_eager.config)
    )
    sub = extract_submodel(grown_eager, selection)
    assert sub.config._experts_implementation == "eager"
    for task in ("c", "d"):
        assert_counts_agree(sub, task)
        if len(keep) > 2:
            assert_counts_agree(sub, task, top_k=1)
