"""Sparse upcycling of a dense transformers ViT into a multi-task MoE ViT."""

from __future__ import annotations

import os

import torch


def _load_vit(vit):
    from transformers import ViTForImageClassification, ViTModel

    if isinstance(vit, (str, os.PathLike)):
        path = os.fspath(vit)
        if not os.path.isdir(path):
            raise ValueError(f"from_dense: {path!r} is not a local directory holding a saved ViT (no downloads here).")
        vit, info = ViTModel.from_pretrained(
            path, add_pooling_layer=False, use_safetensors=True, output_loading_info=True
        )
        # a dense tensor missing from the checkpoint would be initialised at random and copied into every expert
        missing = sorted(info.get("missing_keys", [])) + sorted(str(k[0]) for k in info.get("mismatched_keys", []))
        if missing:
            raise ValueError(
                f"from_dense: the ViT checkpoint at {path} lacks {', '.join(missing[:10])}"
                f"{' ...' if len(missing) > 10 else ''}; refusing to upcycle randomly initialised weights."
            )
    if isinstance(vit, ViTForImageClassification):
        vit = vit.vit
    if not isinstance(vit, ViTModel):
        raise ValueError(
            f"from_dense expects a transformers ViTModel or ViTForImageClassification; got {type(vit).__name__}."
        )
    return vit


def upcycle_dense_vit(
    model_cls,
    vit,
    tasks,
    num_experts: int = 8,
    top_k: int = 2,
    moe_layers: str = "odd",
    attn_experts: int = 0,
    attn_top_k: int | None = None,
    attn_layers: str = "even",
    **config_kwargs,
):
    """See `MoEViTModel.from_dense`."""
    from .configuration_moe_vit import MoEViTConfig

    vit = _load_vit(vit)
    vc = vit.config
    depth = vc.num_hidden_layers
    heads = vc.num_attention_heads
    chosen = {"odd": lambda i: i % 2 == 1, "even": lambda i: i % 2 == 0, "all": lambda i: True}
    for field, value in (("moe_layers", moe_layers), ("attn_layers", attn_layers)):
        if value not in chosen:
            raise ValueError(f"{field}={value!r}: expected 'odd', 'even' or 'all'.")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is larger than num_experts={num_experts}.")
    if attn_experts < 0:
        raise ValueError(f"attn_experts={attn_experts}: expected 0 (attention stays dense) or a number of experts.")
    if attn_experts % heads:
        raise ValueError(
            f"attn_experts={attn_experts} must be a multiple of the dense model's {heads} attention heads: each head "
            "seeds the same number of experts (0 keeps attention dense)."
        )
    attn_top_k = min(heads, attn_experts) if attn_top_k is None else attn_top_k
    if attn_experts and not 1 <= attn_top_k <= attn_experts:
        raise ValueError(f"attn_top_k={attn_top_k} must lie between 1 and attn_experts={attn_experts}.")
    image_size = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
    patch_size = vc.patch_size if isinstance(vc.patch_size, int) else vc.patch_size[0]
    config = MoEViTConfig(
        tasks=list(tasks),
        image_size=image_size,
        patch_size=patch_size,
        num_channels=vc.num_channels,
        hidden_size=vc.hidden_size,
        num_hidden_layers=depth,
        num_attention_heads=vc.num_attention_heads,
        intermediate_size=vc.intermediate_size,
        hidden_act=vc.hidden_act,
        layer_norm_eps=vc.layer_norm_eps,
        qkv_bias=vc.qkv_bias,
        attn_experts=[attn_experts if chosen[attn_layers](i) else 0 for i in range(depth)],
        mlp_experts=[num_experts if chosen[moe_layers](i) else 0 for i in range(depth)],
        mlp_top_k=top_k,
        attn_top_k=max(attn_top_k, 1),
        attn_expert_head_size=vc.hidden_size // heads,
        mlp_expert_size=vc.intermediate_size,
        router_renormalize=True,
        **config_kwargs,
    )
    model = model_cls(config)
    with torch.no_grad():
        src, dst = vit.embeddings, model.embeddings
        dst.projection.load_state_dict(src.patch_embeddings.projection.state_dict())
        dst.cls_token.copy_(src.cls_token)
        dst.position_embeddings.copy_(src.position_embeddings)
        for a, b in zip(vit.layers, model.layers):
            b.layernorm_before.load_state_dict(a.layernorm_before.state_dict())
            b.layernorm_after.load_state_dict(a.layernorm_after.state_dict())
            if b.attn_is_moe:
                _upcycle_attention(a.attention, b.attention, heads, attn_top_k)
            else:
                b.attention.load_state_dict(a.attention.state_dict())
            if b.mlp_is_moe:
                ex = b.mlp.experts
                ex.up_proj.copy_(a.mlp.fc1.weight.unsqueeze(0).expand_as(ex.up_proj))
                ex.up_proj_bias.copy_(a.mlp.fc1.bias.unsqueeze(0).expand_as(ex.up_proj_bias))
                ex.down_proj.copy_(a.mlp.fc2.weight.unsqueeze(0).expand_as(ex.down_proj))
                ex.down_proj_bias.copy_(a.mlp.fc2.bias.unsqueeze(0).expand_as(ex.down_proj_bias))
            else:
                b.mlp.load_state_dict(a.mlp.state_dict())
        model.layernorm.load_state_dict(vit.layernorm.state_dict())
    return model


def _upcycle_attention(dense, moa, heads: int, top_k: int) -> None:
    """Dense multi-head attention → mixture of attention heads. Expert e is head `e mod heads`: its query rows and
    its output columns, the latter scaled by `top_k` because each of a token's k heads enters with gate 1/k (zero
    routers, renormalised gates). The experts share one key and one value projection: the mean of the heads'
    (as when uptraining multi-head into multi-query attention, Ainslie et al. 2023, GQA). With as many experts as
    heads and top-k = heads the result is the dense attention with every head's keys and values replaced by that
    mean; heads whose keys and values agree are reproduced exactly. With more experts than heads (copies of each
    head) the zero-initialised routers tie, and which copies a token's top-k takes is left to `topk`'s
    tie-breaking, so that start is only near this one."""
    d = dense.q_proj.weight.shape[1]
    h = d // heads

    def per_head(w):  # [d_out = heads·h, ...] → [heads, h, ...]
        return w.reshape(heads, h, *w.shape[1:])

    ex = moa.experts
    source = torch.arange(ex.num_experts) % heads
    ex.q_proj.copy_(per_head(dense.q_proj.weight)[source])
    if dense.q_proj.bias is not None:
        ex.q_proj_bias.copy_(per_head(dense.q_proj.bias)[source])
    else:
        ex.q_proj_bias.zero_()
    ex.o_proj.copy_(dense.o_proj.weight.reshape(d, heads, h).permute(1, 0, 2)[source] * top_k)
    ex.o_proj_bias.copy_(dense.o_proj.bias.expand_as(ex.o_proj_bias))
    for shared, full in ((moa.k_proj, dense.k_proj), (moa.v_proj, dense.v_proj)):
        shared.weight.copy_(per_head(full.weight).mean(0))
        if full.bias is not None:
            shared.bias.copy_(per_head(full.bias).mean(0))
