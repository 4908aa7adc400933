"""Helpers shared by the test files (import as `from helpers import ...`; pytest puts tests/ on sys.path)."""

import torch


def trained_like(model, seed=0):
    """Random routers and task embeddings, so routing is far from uniform (as after training); returns the model
    in eval mode. Zero-initialised routers tie every expert and make routing arbitrary."""
    g = torch.Generator().manual_seed(seed)
    backbone = getattr(model, "moe_vit", model)
    with torch.no_grad():
        for module in backbone.moe_layers().values():
            for r in module.router.routers.values():
                r.weight.copy_(torch.randn(r.weight.shape, generator=g))
        for emb in backbone.task_embeddings.values():
            emb.copy_(0.1 * torch.randn(emb.shape, generator=g))
    return model.eval()
