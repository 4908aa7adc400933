"""Expert usage statistics against hand-computed values, merging, JSON, data forms, heatmap, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from moe_adapt import MoEViTConfig, MoEViTForImageClassification, MoEViTModel
from moe_adapt.analysis import ExpertUsage, collect_expert_usage, plot_usage_heatmap

LOGITS = [3.0, 1.0, 2.0, 0.0, -1.0, 0.5, -0.5, 0.25]  # per expert; top-2 = experts 0 and 2


def fixed_routing_model(renormalize: bool = True) -> tuple[MoEViTModel, torch.Tensor]:
    """A tiny model whose every MoE layer sees the same vector c for every token, so routing is known:
    layer norms with weight 0 and bias c output c, and router rows a_e · c / |c|² give logits a."""
    torch.manual_seed(0)
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"], router_renormalize=renormalize)
    model = MoEViTModel(config).eval()
    c = torch.randn(config.hidden_size)
    with torch.no_grad():
        for layer in model.layers:
            for norm in (layer.layernorm_before, layer.layernorm_after):
                norm.weight.zero_()
                norm.bias.copy_(c)
        for module in model.moe_layers().values():
            e = module.router.num_experts
            module.router.routers["a"].weight.copy_(torch.tensor(LOGITS[:e])[:, None] * c[None, :] / c.dot(c))
    return model, c


@torch.no_grad()
def test_usage_matches_hand_computed_values():
    model, c = fixed_routing_model()
    batches = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    usage = collect_expert_usage(model, batches, task="a")
    tokens = 5 * 17  # 5 images of (32/8)² patches + CLS
    assert usage.num_tokens == tokens and usage.num_images == 5
    assert usage.layers == model.config.moe_layer_names()
    for name, module in model.moe_layers().items():
        e = module.router.num_experts
        p = torch.tensor(LOGITS[:e], dtype=torch.float64).softmax(0)
        expected_count = torch.zeros(e, dtype=torch.float64)
        expected_count[[0, 2]] = tokens
        torch.testing.assert_close(usage.token_count[name], expected_count)
        torch.testing.assert_close(usage.gate_mass[name], tokens * p, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(usage.frequency(name).sum().item(), 2.0)
        gates = {0: p[0] / (p[0] + p[2]), 2: p[2] / (p[0] + p[2])}
        ex = module.experts
        for expert, gate in gates.items():
            if name.endswith("mlp"):
                hidden = F.gelu(ex.up_proj[expert] @ c + ex.up_proj_bias[expert])
                out = ex.down_proj[expert] @ hidden + ex.down_proj_bias[expert]
            else:  # identical tokens: attention averages identical values, so the head outputs v_proj(c)
                out = ex.o_proj[expert] @ module.v_proj(c) + ex.o_proj_bias[expert]
            expected = float(gate) * float(out.norm())
            assert usage.reap(name)[expert].item() == pytest.approx(expected, rel=1e-4)
            assert usage.reap_sum[name][expert].item() == pytest.approx(tokens * expected, rel=1e-4)
        assert usage.reap(name)[[1, 3]].abs().sum() == 0


@torch.no_grad()
def test_reap_uses_the_applied_gate_when_not_renormalised():
    model, c = fixed_routing_model(renormalize=False)
    usage = collect_expert_usage(model, [torch.randn(1, 3, 32, 32)], task="a")
    module = model.moe_layers()["layers.1.mlp"]
    ex = module.experts
    p = torch.tensor(LOGITS, dtype=torch.float64).softmax(0)
    out = ex.down_proj[0] @ F.gelu(ex.up_proj[0] @ c + ex.up_proj_bias[0]) + ex.down_proj_bias[0]
    assert usage.reap("layers.1.mlp")[0].item() == pytest.approx(float(p[0]) * float(out.norm()), rel=1e-4)


def random_model(cls=MoEViTModel):
    torch.manual_seed(1)
    model = cls(MoEViTConfig.from_preset("tiny", tasks=["a", "b"], task_labels={"a": ["x", "y"], "b": ["u", "v"]}))
    with torch.no_grad():
        for module in model.moe_vit.moe_layers().values() if hasattr(model, "moe_vit") else model.moe_layers().values():
            for router in module.router.routers.values():
                router.weight.normal_(0, 1.0)
    return model.eval()


def test_merge_equals_one_pass_and_json_round_trip(tmp_path):
    model = random_model()
    x1, x2 = torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)
    whole = collect_expert_usage(model, [x1, x2], task="b")
    merged = ExpertUsage.merge(
        [collect_expert_usage(model, [x1], task="b"), collect_expert_usage(model, [x2], task="b")]
    )
    assert merged.num_tokens == whole.num_tokens and merged.num_images == 5
    for name in whole.layers:
        for attr in ("token_count", "gate_mass", "reap_sum"):
            torch.testing.assert_close(getattr(merged, attr)[name], getattr(whole, attr)[name])
        assert whole.mean_gate(name).sum().item() == pytest.approx(1.0)
    loaded = ExpertUsage.load(whole.save(tmp_path / "usage.json"))
    assert loaded.task == "b" and loaded.layers == whole.layers and loaded.top_k == whole.top_k
    for name in whole.layers:
        torch.testing.assert_close(loaded.reap_sum[name], whole.reap_sum[name])
    assert loaded.model["attn_experts"] == model.config.attn_experts
    with pytest.raises(ValueError, match="task 'a'"):
        whole + collect_expert_usage(model, [x1], task="a")


def test_all_reduce_over_a_one_process_group(tmp_path):
    import torch.distributed as dist

    model = random_model()
    usage = collect_expert_usage(model, [torch.randn(2, 3, 32, 32)], task="a")
    before = {n: usage.token_count[n].clone() for n in usage.layers}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        usage.all_reduce()
    finally:
        dist.destroy_process_group()
    assert usage.num_images == 2
    for n in usage.layers:
        torch.testing.assert_close(usage.token_count[n], before[n])


def test_data_forms_and_task_models_agree():
    model = random_model(MoEViTForImageClassification)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 0, 1])
    ref = collect_expert_usage(model, [x], task="a")
    forms = [
        [{"pixel_values": x, "labels": y}],
        [(x, y)],
        DataLoader(TensorDataset(x, y), batch_size=2),
        [img for img in x],  # single images
    ]
    for data in forms:
        usage = collect_expert_usage(model, data, task="a")
        for name in ref.layers:
            torch.testing.assert_close(usage.token_count[name], ref.token_count[name])
            # fp32 gates summed in fp64: batches of 1 and of 4 round the layers' matmuls differently
            torch.testing.assert_close(usage.gate_mass[name], ref.gate_mass[name], rtol=1e-6, atol=1e-6)
    backbone = collect_expert_usage(model.moe_vit, [x], task="a", output_norms=False)
    for name in ref.layers:
        torch.testing.assert_close(backbone.token_count[name], ref.token_count[name])
    assert all(v.sum() == 0 for v in backbone.reap_sum.values())
    assert collect_expert_usage(model, [x, x, x], task="a", max_batches=1).num_images == 4
    table = ref.table("reap")
    assert "layers.1.mlp" in table and "k=2" in table


def test_heatmap_png(tmp_path):
    model = random_model()
    x = torch.randn(2, 3, 32, 32)
    usages = {t: collect_expert_usage(model, [x], task=t) for t in ("a", "b")}
    path = plot_usage_heatmap(usages, tmp_path / "sub" / "heat.png", criterion="gate_mass")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_usage_heatmap(list(usages.values()), tmp_path / "b.png").stat().st_size > 1000


def test_bad_input_gives_clear_errors():
    model = random_model()
    with pytest.raises(ValueError, match="empty"):
        collect_expert_usage(model, [], task="a")
    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        collect_expert_usage(model, [torch.randn(1, 3, 32, 32)], task="nope")
    with pytest.raises(ValueError, match="pixel_values"):
        collect_expert_usage(model, [{"image": torch.randn(1, 3, 32, 32)}], task="a")
    usage = collect_expert_usage(model, [torch.randn(1, 3, 32, 32)], task="a")
    with pytest.raises(ValueError, match="criterion"):
        usage.scores("bogus", usage.layers[0])
    with pytest.raises(ValueError, match="not an expert-usage file"):
        ExpertUsage.from_dict({"format": "something"})


def test_offloaded_moe_layers_are_refused_where_their_tensors_are_read(tmp_path):
    """accelerate loads an offloaded module's tensors only inside that module's forward. A hook that preloads the
    whole MoE layer makes its forward exact; collecting usage reads the expert tensors after that forward, so it
    must refuse, as a forward that reads an offloaded router does."""
    from accelerate import dispatch_model

    torch.manual_seed(0)
    model = MoEViTForImageClassification(
        MoEViTConfig.from_preset("tiny", tasks=["a"], task_labels={"a": ["x", "y"]})
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x, task="a").logits
    placement = {
        "moe_vit.embeddings": "cpu",
        "moe_vit.task_embeddings": "cpu",
        "moe_vit.layers.0": "cpu",
        "moe_vit.layers.1": "disk",
        "moe_vit.layers.2": "cpu",
        "moe_vit.layers.3": "cpu",
        "moe_vit.layernorm": "cpu",
        "heads": "cpu",
    }
    preloaded = dispatch_model(
        model, placement, offload_dir=str(tmp_path / "a"), preload_module_classes=["MoEViTSparseMLP"]
    )
    assert torch.equal(preloaded(x, task="a").logits, ref)
    with pytest.raises(
        ValueError, match=r"A MoE layer's experts \(read for their output norms\) is on the meta device"
    ):
        collect_expert_usage(preloaded, [x], task="a")
