"""LoRA on the MoE ViT through peft: targets, gradients, frozen tensors, save/load, merge, bad input."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from peft.utils.other import ModulesToSaveWrapper

from moe_adapt import MoEViTConfig, MoEViTForImageClassification, lora_config
from moe_adapt.adaptation import apply_lora, count_model_parameters, load_lora, merge_lora
from moe_adapt.adaptation.lora import lora_parameter_names

IMPLS = ["segmented_mm", "eager", "batched_mm", "grouped_mm"]


def tiny_model(impl: str = "segmented_mm", dense_slice: bool = False, seed: int = 0) -> MoEViTForImageClassification:
    """A tiny classifier with non-zero routers (zero routers tie every expert); `dense_slice` keeps exactly top-k
    experts per layer, the shape of an extracted slice (run as one fused dense layer)."""
    torch.manual_seed(seed)
    kw = dict(attn_num_experts=2, mlp_num_experts=2) if dense_slice else {}
    config = MoEViTConfig.from_preset("tiny", tasks=["new"], task_labels={"new": list("abc")}, **kw)
    config._experts_implementation = impl
    model = MoEViTForImageClassification(config)
    if dense_slice:
        assert {m.router.num_experts for m in model.moe_vit.moe_layers().values()} == {2}  # k = 2 = E: dense layers
    for module in model.moe_vit.moe_layers().values():
        torch.nn.init.normal_(module.router.routers["new"].weight, std=1.0)
    return model


def pixels(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_lora_config_targets_experts_and_attention_never_routers():
    model = tiny_model()
    cfg = lora_config(model, r=2, verbose=False)
    params = sorted(cfg.target_parameters)
    assert params == sorted(
        [f"moe_vit.layers.{i}.attention.experts.{p}" for i in (0, 2) for p in ("q_proj", "o_proj")]
        + [f"moe_vit.layers.{i}.mlp.experts.{p}" for i in (1, 3) for p in ("up_proj", "down_proj")]
    )
    modules = sorted(cfg.target_modules)
    assert "moe_vit.layers.0.attention.k_proj" in modules and "moe_vit.layers.0.attention.v_proj" in modules
    assert "moe_vit.layers.1.attention.q_proj" in modules and "moe_vit.layers.1.attention.o_proj" in modules
    assert not any("router" in m for m in modules + params)
    assert not any(m.endswith(("fc1", "fc2")) for m in modules)  # dense MLPs only on request
    assert "heads.new" in cfg.modules_to_save
    assert sum("router.routers.new" in m for m in cfg.modules_to_save) == 4
    assert lora_config(model, r=2, include_dense_mlp=True, verbose=False).target_modules >= {"moe_vit.layers.0.mlp.fc1"}


def test_lora_config_attention_projections_subset():
    model = tiny_model()
    cfg = lora_config(model, r=2, verbose=False, attention_projections=["q_proj", "v_proj"])
    # MoA layers (0, 2): the attention experts' q tensor and the shared v Linear; dense attention (1, 3): q and v
    assert sorted(p for p in cfg.target_parameters if ".attention." in p) == [
        f"moe_vit.layers.{i}.attention.experts.q_proj" for i in (0, 2)
    ]
    attn_modules = sorted(m for m in cfg.target_modules if ".attention." in m)
    assert attn_modules == sorted(
        [f"moe_vit.layers.{i}.attention.v_proj" for i in (0, 2)]
        + [f"moe_vit.layers.{i}.attention.{p}" for i in (1, 3) for p in ("q_proj", "v_proj")]
    )
    with pytest.raises(ValueError, match="attention_projections"):
        lora_config(model, r=2, verbose=False, attention_projections=["query"])


def test_lora_config_mlp_experts_only_trains_them_and_leaves_attention_alone():
    """`include_attention=False` (the adaptation benchmark's `--attention-projections none`): LoRA on the fused MLP
    experts only, on a dense slice as well; a step moves those factors, and every attention tensor but the task's
    routers stays as it was."""
    for dense_slice in (False, True):
        model = tiny_model(dense_slice=dense_slice)
        cfg = lora_config(model, r=2, include_attention=False, verbose=False, init_lora_weights=False)
        assert sorted(cfg.target_parameters) == sorted(
            f"moe_vit.layers.{i}.mlp.experts.{p}" for i in (1, 3) for p in ("up_proj", "down_proj")
        )
        assert not cfg.target_modules
        peft_model = apply_lora(model, cfg, verbose=False)
        factors = {n: p for n, p in peft_model.named_parameters() if ".lora_" in n}
        assert factors and all(".mlp.experts." in n for n in factors)
        # the attention layers' own tensors (their routers are the task's and train whole, as in every LoRA mode)
        attention = {
            n: p.detach().clone()
            for n, p in peft_model.named_parameters()
            if ".attention." in n and ".router." not in n
        }
        assert any(".attention.experts." in n for n in attention) and any("k_proj" in n for n in attention)
        assert not any(p.requires_grad for n, p in peft_model.named_parameters() if n in attention)
        before = {n: p.detach().clone() for n, p in factors.items()}
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        peft_model(pixels(), labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        assert all(not torch.equal(p, before[n]) for n, p in factors.items()), "an MLP expert factor did not train"
        for n, p in peft_model.named_parameters():
            if n in attention:
                assert torch.equal(p, attention[n]), f"{n} moved"


@pytest.mark.parametrize("patch_embedding", [False, True])
def test_lora_config_prints_count_that_matches_peft(capsys, patch_embedding):
    model = tiny_model()
    cfg = lora_config(model, r=2, include_patch_embedding=patch_embedding)
    printed = capsys.readouterr().out
    peft_model = apply_lora(model, cfg)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert f"{trainable:,} trainable" in printed
    assert f"trainable params {trainable:,}" in capsys.readouterr().out
    # only LoRA factors and the modules_to_save copies train; the deployable size excludes both
    assert count_model_parameters(peft_model) == sum(p.numel() for p in tiny_model().parameters())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dense_slice", [False, True], ids=["sparse", "dense-slice"])
def test_gradients_reach_expert_lora_and_frozen_tensors_stay(impl, dense_slice):
    model = tiny_model(impl, dense_slice)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = apply_lora(model, lora_config(model, r=2, verbose=False, init_lora_weights=False), verbose=False)
    names = lora_parameter_names(peft_model)
    assert any(".mlp.experts." in n for n in names) and any(".attention.experts." in n for n in names)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(2):
        y = peft_model(pixels(seed=step), task="new").logits
        y.sum().backward()
        if step == 0:
            missing = [
                n for n, p in peft_model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
            ]
            assert not missing, f"no gradient reached {missing}"
        optimizer.step()
        optimizer.zero_grad()
    # every original tensor (now the wrapped base) is unchanged: frozen means frozen, weight decay included
    for name, p in peft_model.get_base_model().named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        key = name.replace(".base_layer", "").replace(".original_module", "")
        assert torch.equal(p, frozen_before[key]), f"{key} moved"


def test_lora_changes_the_output_of_every_expert_path():
    """Each LoRA'd expert tensor must act in the forward pass (attention experts and the dense path read the
    tensors outside the ParamWrapper's own forward)."""
    for dense_slice in (False, True):
        model = tiny_model(dense_slice=dense_slice).eval()
        x = pixels()
        ref = model(x).logits
        peft_model = apply_lora(
            model,
            lora_config(model, r=2, verbose=False, init_lora_weights=False, include_attention=True),
            verbose=False,
        )
        for wrapper in [m for m in peft_model.modules() if isinstance(m, ParamWrapper)]:
            with torch.no_grad():
                before = peft_model(x).logits
                wrapper.lora_B["default"].weight.mul_(2.0)
                after = peft_model(x).logits
                wrapper.lora_B["default"].weight.div_(2.0)
            assert not torch.allclose(before, after), f"{wrapper.parameter_name} has no effect"
        assert not torch.allclose(ref, peft_model(x).logits)


def test_get_peft_model_directly_works_with_lora_config():
    model = tiny_model().eval()
    peft_model = get_peft_model(model, lora_config(model, r=2, verbose=False, init_lora_weights=False))
    peft_model(pixels()).logits.sum().backward()


@pytest.mark.parametrize("dense_slice", [False, True], ids=["sparse", "dense-slice"])
def test_merge_equivalence_and_plain_reload(tmp_path, dense_slice):
    model = tiny_model(dense_slice=dense_slice).eval()
    peft_model = apply_lora(model, lora_config(model, r=2, verbose=False, init_lora_weights=False), verbose=False)
    with torch.no_grad():  # train the saved copies too: the merge must carry them
        for m in peft_model.modules():
            if isinstance(m, ModulesToSaveWrapper):
                for p in m.modules_to_save["default"].parameters():
                    p.add_(0.1)
    x = pixels(4)
    with torch.no_grad():
        before = peft_model(x).logits
        merged = merge_lora(peft_model)
        after = merged(x).logits
    assert type(merged) is MoEViTForImageClassification
    assert not any(isinstance(m, ParamWrapper) for m in merged.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    keys = set(merged.state_dict())
    assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k for k in keys)
    reloaded = MoEViTForImageClassification.from_pretrained(tmp_path / "merged").eval()  # strict, no peft
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, before, atol=1e-5, rtol=0)


def test_adapter_save_and_load(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "base")
    peft_model = apply_lora(model, lora_config(model, r=2, verbose=False, init_lora_weights=False), verbose=False)
    x = pixels()
    with torch.no_grad():
        expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_lora(MoEViTForImageClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert isinstance(loaded, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rank", [2, 8])
@pytest.mark.parametrize("dense_slice", [False, True], ids=["sparse", "dense-slice"])
def test_expert_lora_is_the_same_under_every_backend(dense_slice, rank):
    """peft's `ParamWrapper` applies expert LoRA inside the experts' forward, whichever backend runs it: segmented_mm
    (the default; a dense slice's fused path) and grouped_mm give the same logits and LoRA gradients. Rank 2 and 8
    give 8- and 32-byte rows to the grouped matmuls."""
    results = {}
    for impl in ("segmented_mm", "grouped_mm"):
        model = tiny_model(impl, dense_slice)
        cfg = lora_config(model, r=rank, verbose=False, init_lora_weights=False)
        peft_model = apply_lora(model, cfg, verbose=False)
        y = peft_model(pixels(3), task="new").logits
        y.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}  # LoRA, heads, routers
        results[impl] = (y.detach(), grads)
    (y_act, g_act), (y_par, g_par) = results["segmented_mm"], results["grouped_mm"]
    torch.testing.assert_close(y_act, y_par, rtol=1e-5, atol=1e-5)
    assert g_act.keys() == g_par.keys() and any(".experts." in n for n in g_act) and any("router" in n for n in g_act)
    for name in g_act:
        scale = max(1.0, g_par[name].abs().max().item())  # fp32 rounding grows with the gradient's magnitude
        torch.testing.assert_close(g_act[name], g_par[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_grouped_mm_backward_with_lora():
    model = tiny_model("grouped_mm")
    peft_model = apply_lora(model, lora_config(model, r=2, verbose=False), verbose=False)
    y = peft_model(pixels(3), task="new").logits
    y.sum().backward()  # a stride-0 gradient into grouped_mm's backward
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if ".lora_A." in n)


def test_rank_larger_than_expert_dimension_is_an_error():
    model = tiny_model()  # attention expert head size 16, MLP expert size 64, d = 32
    with pytest.raises(ValueError, match=r"r=17 .*attention\.experts\.(q_proj|o_proj).*at most 16"):
        lora_config(model, r=17, verbose=False)
    with pytest.raises(ValueError, match="r=33"):
        lora_config(model, r=33, include_attention=False, verbose=False)
    lora_config(model, r=16, verbose=False)


def test_other_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        lora_config(model, r=2, tasks=["nope"], verbose=False)
    with pytest.raises(ValueError, match="lora_dropout"):
        lora_config(model, r=2, lora_dropout=0.1, verbose=False)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        merge_lora(model)
    peft_model = apply_lora(model, r=2, verbose=False)
    with pytest.raises(ValueError, match="already carries"):
        apply_lora(peft_model, verbose=False)


def test_train_norms_trains_saves_and_merges_the_layernorms(tmp_path):
    """`train_norms=True`: every backbone LayerNorm trains (as a peft modules_to_save copy, the base one frozen), is
    saved with the adapter, reloads onto a fresh base and merges into a plain model."""
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "base")
    norms = [f"moe_vit.{n}" for n, m in model.moe_vit.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    peft_model = apply_lora(model, lora_config(model, r=2, train_norms=True, verbose=False), verbose=False)
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, ModulesToSaveWrapper)
    }
    assert set(norms) <= wrapped
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(any(n in t and "modules_to_save" in t for t in trainable) for n in norms)
    base_norm = peft_model.get_submodule(f"base_model.model.{norms[0]}.original_module").weight.detach().clone()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    x = pixels(4)
    peft_model.train()
    peft_model(x, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    opt.step()
    trained_norm = peft_model.get_submodule(f"base_model.model.{norms[0]}.modules_to_save.default").weight
    assert not torch.equal(trained_norm, base_norm)  # the copy moved
    assert torch.equal(peft_model.get_submodule(f"base_model.model.{norms[0]}.original_module").weight, base_norm)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_lora(MoEViTForImageClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(merge_lora(loaded)(x).logits, expected, atol=1e-5, rtol=0)


def test_patch_embedding_lora_trains_saves_and_merges(tmp_path):
    """`include_patch_embedding=True`: peft's conv LoRA on the patch embedding; its factors get gradients and move,
    the base convolution stays frozen, the printed count matches peft, and the adapter reloads and merges."""
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "base")
    base_conv = model.moe_vit.embeddings.projection.weight.detach().clone()
    cfg = lora_config(model, r=2, include_patch_embedding=True, verbose=False)
    assert "moe_vit.embeddings.projection" in cfg.target_modules
    assert "moe_vit.embeddings.projection" not in lora_config(model, r=2, verbose=False).target_modules
    peft_model = apply_lora(model, cfg, verbose=False)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad and "embeddings.projection" in n]
    assert names and all("lora_" in n for n in names)
    # lora_B starts at zero: one step moves it, and then the output depends on the conv's LoRA
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    x = pixels(4)
    peft_model.train()
    peft_model(x, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if n in names}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    opt.step()
    conv = peft_model.get_submodule("base_model.model.moe_vit.embeddings.projection")
    assert torch.equal(conv.base_layer.weight, base_conv)  # frozen
    assert conv.lora_B["default"].weight.abs().sum() > 0
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(x).logits
        trained_b = conv.lora_B["default"].weight.clone()
        conv.lora_B["default"].weight.zero_()  # the conv's LoRA alone switched off: the output changes
        assert not torch.allclose(peft_model(x).logits, expected)
        conv.lora_B["default"].weight.copy_(trained_b)
        torch.testing.assert_close(peft_model(x).logits, expected, atol=0, rtol=0)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_lora(MoEViTForImageClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(merge_lora(loaded)(x).logits, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="embeddings.projection"):
        lora_config(
            tiny_model(),
            r=10_000,
            include_patch_embedding=True,
            include_experts=False,
            include_attention=False,
            include_mlp=False,
            verbose=False,
        )


def test_import_moe_adapt_does_not_load_peft_until_lora_is_used():
    import subprocess
    import sys

    code = (
        "import sys, moe_adapt; assert 'peft' not in sys.modules, 'peft loaded'; "
        "from moe_adapt import lora_config, add_task, extract_submodel; assert 'peft' in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
