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
        vit = ViTModel.from_pretrained(path, add_pooling_layer=False, use_safetensors=True)
    if isinstance(vit, ViTForImageClassification):
        vit = vit.vit
    if not isinstance(vit, ViTModel):
        raise ValueError(f"from_dense expects a transformers ViTModel or ViTForImageClassification; got {type(vit).__name__}.")
    return vit


def upcycle_dense_vit(model_cls, vit, tasks, num_experts: int = 8, top_k: int = 2, moe_layers: str = "odd", **config_kwargs):
    """See `MoEViTModel.from_dense`."""
    from .configuration_moe_vit import MoEViTConfig

    vit = _load_vit(vit)
    vc = vit.config
    depth = vc.num_hidden_layers
    chosen = {"odd": lambda i: i % 2 == 1, "even": lambda i: i % 2 == 0, "all": lambda i: True}
    if moe_layers not in chosen:
        raise ValueError(f"moe_layers={moe_layers!r}: expected 'odd', 'even' or 'all'.")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is larger than num_experts={num_experts}.")
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
        attn_experts=[0] * depth,
        mlp_experts=[num_experts if chosen[moe_layers](i) else 0 for i in range(depth)],
        mlp_top_k=top_k,
        attn_top_k=1,
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
