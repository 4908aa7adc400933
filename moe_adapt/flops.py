"""Analytical FLOPs and parameter counts: the one counter every part of moe_adapt uses.

FLOPs are 2 × multiply-adds of the matrix products (patch embedding, attention projections and attention
matmuls, MLPs / experts at the active top-k, routers, task heads). Element-wise work (layer norms, GELU, softmax,
bias adds, gate scaling, residuals) is left out: it is a few percent of a ViT and the same for the models we
compare. With the `eager` experts backend the total agrees with what torch's `FlopCounterMode` counts for the
model's forward pass once FlopCounterMode is given a formula for the CPU attention kernel, which it does not count
(tests/test_flops.py checks every task of a grown model, slices and top-k overrides to within 2%).

```python
>>> from moe_adapt import MoEViTConfig
>>> from moe_adapt.flops import flops_per_image
>>> config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"])
>>> f = flops_per_image(config, task="a")
>>> sorted(f)[:4], f["tokens"]
(['attention', 'gflops', 'head', 'image_size'], 17)
```
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["count_parameters", "flops_per_image"]


def _config_of(model_or_config):
    if isinstance(model_or_config, nn.Module):
        return model_or_config.config, model_or_config
    return model_or_config, None


def _image_hw(config, image_size) -> tuple[int, int]:
    size = config.image_size if image_size is None else image_size
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (height, width); got {image_size!r}.")
    return size


def _task_modules(model: nn.Module, task: str) -> list[nn.Module]:
    """The task's own modules of a task model: entries `task` of the ModuleDicts that are direct children of the
    model (`heads`), the backbone excluded."""
    found = []
    for name, child in model.named_children():
        if name == "moe_vit":
            continue
        if isinstance(child, nn.ModuleDict) and task in child:
            found.append(child[task])
    return found


def _head_flops(model: nn.Module, task: str, hw: tuple[int, int]) -> tuple[int | None, str | None]:
    """Count the task head by running the model once on a blank image with hooks on the head's Linear and
    convolution layers (heads differ per task type, so they are measured rather than modelled)."""
    heads = _task_modules(model, task)
    if not heads:
        return 0, None
    total = [0]

    def linear_hook(module, args, out):
        total[0] += 2 * out[0].numel() * module.in_features

    def conv_hook(module, args, out):
        window = 1
        for s in module.kernel_size:
            window *= s
        if isinstance(module, nn.ConvTranspose2d):  # every input pixel is spread over a kernel window
            total[0] += 2 * args[0][0].numel() * module.out_channels // module.groups * window
        else:
            total[0] += 2 * out[0].numel() * module.in_channels // module.groups * window

    handles = []
    for head in heads:
        for m in head.modules():
            if isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                handles.append(m.register_forward_hook(conv_hook))
    param = next(model.parameters())
    # two images (heads with batch-statistics norms need more than one value per channel); hooks count image 0
    pixels = torch.zeros(2, model.config.num_channels, *hw, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(pixel_values=pixels, task=task)
    except Exception as err:  # noqa: BLE001 - the head is optional in the count; say why it is missing
        return None, f"head not counted: the model's forward on a blank {hw[0]}x{hw[1]} image failed ({err})"
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total[0], None


def _dense_layer_widths(config, vit: nn.Module | None, depth: int, is_moe: bool) -> list[tuple[int, int]]:
    """(heads × head size, MLP width) of each dense layer. A transformers `ViTConfig` may set `head_dim` (heads
    wider or narrower than hidden / heads); a `ViTModel` (`vit`) is read layer by layer from its `q_proj` and `fc1`,
    so a model whose layers differ in shape is counted as it is built. A MoE ViT's dense attention always uses
    hidden / heads, whatever a stray `head_dim` says."""
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = (None if is_moe else getattr(config, "head_dim", None)) or d // heads
    widths = [(heads * head_dim, config.intermediate_size)] * depth
    layers = None if is_moe or vit is None else getattr(vit, "layers", None)
    if layers is not None and len(layers) == depth:
        for i, layer in enumerate(layers):
            q_proj = getattr(getattr(layer, "attention", None), "q_proj", None)
            fc1 = getattr(getattr(layer, "mlp", None), "fc1", None)
            widths[i] = (
                widths[i][0] if q_proj is None else q_proj.out_features,
                widths[i][1] if fc1 is None else fc1.out_features,
            )
    return widths


def flops_per_image(
    model_or_config,
    task: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    top_k: int | Mapping[str, int] | None = None,
    expert_mask: Mapping[str, object] | None = None,
) -> dict:
    """FLOPs (2 × multiply-adds) of one image's forward pass.

    Args:
        model_or_config: a `MoEViTConfig`, an `MoEViTModel` or any task model holding `.moe_vit` (its heads are
            then counted too, by a hooked forward pass on a blank image), or a transformers `ViTConfig` /
            `ViTModel` (all layers dense, each counted with its own head width and MLP width; used to compare with
            a same-shape dense ViT).
        task: whose routers to count (a task may route over fewer experts, `config.task_router_sizes`); default
            `config.default_task` or the first task.
        image_size: an int or (height, width); default `config.image_size`.
        top_k: an int or `{"attn": k, "mlp": k}` overriding the configured top-k (as in `forward(top_k=...)`).
        expert_mask: `{layer_name: bool [E_t]}` as in `forward(expert_mask=...)`; checked, and a layer's top-k is
            capped at the experts it leaves (the router still scores all E_t experts).

    Returns:
        `{"total", "patch_embed", "attention", "mlp", "router", "head"}` in FLOPs (ints; "head" is None when it could
        not be measured, with the reason in "notes"), "gflops" (total / 1e9), "layers" (one dict per block:
        attention, mlp, router, attn_experts_active, mlp_experts_active), "tokens", "image_size", "task", "notes".
    """
    config, model = _config_of(model_or_config)
    h_img, w_img = _image_hw(config, image_size)
    p = config.patch_size
    if h_img % p or w_img % p:
        raise ValueError(f"image_size {h_img}x{w_img} is not a multiple of patch_size={p}.")
    d = config.hidden_size
    patches = (h_img // p) * (w_img // p)
    n = patches + 1
    depth = config.num_hidden_layers
    is_moe = getattr(config, "model_type", None) == "moe_vit"
    notes: list[str] = []

    if is_moe:
        tasks = list(config.tasks)
        if task is None:
            task = config.default_task or tasks[0]
        task = tasks[config.task_index(task)]
        backbone = (
            None if model is None else (model if hasattr(model, "moe_layers") else getattr(model, "moe_vit", None))
        )
        # what the model would run: the same checks and messages as forward, and set_routing's overrides
        plan = (backbone or config).routing_plan(task, top_k, expert_mask)
        attn_counts, mlp_counts = list(config.attn_experts), list(config.mlp_experts)
    else:
        task, plan = None, {}
        attn_counts = mlp_counts = [0] * depth
        if top_k is not None or expert_mask:
            raise ValueError("top_k / expert_mask only apply to MoE ViT models; this config has no experts.")

    dense_widths = _dense_layer_widths(config, model, depth, is_moe)
    result = {"patch_embed": 2 * patches * config.num_channels * p * p * d, "attention": 0, "mlp": 0, "router": 0}
    layers = []
    for i in range(depth):
        row = {"layer": i, "attention": 0, "mlp": 0, "router": 0, "attn_experts_active": 0, "mlp_experts_active": 0}
        for kind, counts in (("attn", attn_counts), ("mlp", mlp_counts)):
            if counts[i] == 0:
                attn_width, mlp_width = dense_widths[i]
                if kind == "attn":  # standard multi-head attention: q, k, v, o projections + QK^T and AV
                    row["attention"] = 4 * 2 * n * d * attn_width + 2 * 2 * n * n * attn_width
                else:
                    row["mlp"] = 2 * 2 * n * d * mlp_width
                continue
            e_t = config.router_size(task, kind, i)
            k, _ = plan.get(f"layers.{i}.{kind}", (None, None))
            k = getattr(config, f"{kind}_top_k") if k is None else k
            row["router"] += 2 * n * d * e_t
            if kind == "attn":
                hd = config.attn_expert_head_size
                # shared K and V (d → h), per selected head a query and an output projection, k heads of QK^T and AV
                row["attention"] = 2 * 2 * n * d * hd + 2 * 2 * n * k * d * hd + 2 * 2 * n * n * k * hd
                row["attn_experts_active"] = k
            else:
                row["mlp"] = 2 * 2 * n * k * d * config.mlp_expert_size
                row["mlp_experts_active"] = k
        for key in ("attention", "mlp", "router"):
            result[key] += row[key]
        layers.append(row)

    head = 0
    if model is not None and is_moe and not hasattr(model, "moe_layers"):  # a task model, not the bare backbone
        head, note = _head_flops(model, task, (h_img, w_img))
        if note:
            notes.append(note)
    result["head"] = head
    result["total"] = sum(result[k] for k in ("patch_embed", "attention", "mlp", "router")) + (head or 0)
    result["gflops"] = result["total"] / 1e9
    result.update(layers=layers, tokens=n, image_size=[h_img, w_img], task=task, notes=notes)
    return result


def _expert_param_info(name: str) -> bool:
    return ".experts." in name or ".extra_experts." in name


def count_parameters(model: nn.Module, task: str | None = None) -> dict:
    """Parameter counts of a MoE ViT (bare or task model).

    Returns `{"total", "experts", "routers", "task_specific" (heads and task embeddings), "shared"}`;
    with `task`, also `"task_total"`: the parameters that task's forward pass can reach (shared weights, the
    experts its routers may choose, its own routers, head and embedding) — the fair "before" size when comparing
    with a slice of that task.
    """
    config = model.config
    total = experts = routers = task_specific = 0
    task_total = 0
    if task is not None:
        task = config.tasks[config.task_index(task)]
    moe = model if hasattr(model, "moe_layers") else model.moe_vit
    # reachable experts per (layer, group): experts [offset, offset + size) of a layer, task reaches the first E_t
    reach: dict[int, float] = {}
    if task is not None:
        for module in moe.moe_layers().values():
            i, kind = module.router.layer_idx, module.router.kind
            e_t = config.router_size(task, kind, i)
            offset = 0
            for group in [module.experts, *module.extra_experts]:
                size = group.num_experts
                share = max(0, min(e_t - offset, size)) / size
                for prm in group.parameters():
                    reach[id(prm)] = share
                offset += size
    task_ids = set()
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleDict) and name != "moe_vit":
            for key, sub in child.items():
                for prm in sub.parameters():
                    task_ids.add((id(prm), key))
    for key, prm in moe.task_embeddings.items():
        task_ids.add((id(prm), key))
    owner = {pid: key for pid, key in task_ids}
    for name, prm in model.named_parameters():
        numel = prm.numel()
        total += numel
        if _expert_param_info(name):
            experts += numel
            task_total += round(numel * reach.get(id(prm), 0.0))
        elif ".router.routers." in name:
            routers += numel
            if task is not None and f".routers.{task}." in name:
                task_total += numel
        elif id(prm) in owner:
            task_specific += numel
            if owner[id(prm)] == task:
                task_total += numel
        else:
            task_total += numel
    out = {
        "total": total,
        "experts": experts,
        "routers": routers,
        "task_specific": task_specific,
        "shared": total - experts - routers - task_specific,
    }
    if task is not None:
        out["task_total"] = task_total
    return out
