"""Which experts does a task use? Calibrated expert usage measured on any data.

`collect_expert_usage(model, data, task)` runs the model on `data` with `task`'s routers and records, for every
MoE layer and every expert e the task can route to:

- `token_count[e]`: tokens that chose e in their top-k (frequency = token_count / num_tokens; sums to k);
- `gate_mass[e]`: the summed router probability p_e over all tokens (mean gate = gate_mass / num_tokens; sums
  to 1);
- `reap_sum[e]`: Σ over tokens routed to e of g_e(x) · ‖f_e(x)‖₂, with g_e the gate the layer applies
  (renormalised if configured) and f_e(x) the expert's output. REAP's score (Lasby et al., 2025, "REAP: Router-
  weighted Expert Activation Pruning") is the mean over routed tokens, reap_sum / token_count.

Sums (not means) are stored, so usage from several batches, runs or processes adds up exactly
(`ExpertUsage.merge`, `ExpertUsage.all_reduce`).

```python
>>> import torch
>>> from moe_adapt import MoEViTConfig, MoEViTModel
>>> from moe_adapt.analysis import collect_expert_usage
>>> model = MoEViTModel(MoEViTConfig.from_preset("tiny", tasks=["a", "b"]))
>>> usage = collect_expert_usage(model, [torch.randn(2, 3, 32, 32)], task="a")
>>> usage.layers, usage.num_tokens
(['layers.0.attn', 'layers.1.mlp', 'layers.2.attn', 'layers.3.mlp'], 34)
>>> round(float(usage.frequency("layers.1.mlp").sum()), 6)  # = mlp_top_k
2.0
```
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_write, atomic_write_json, read_json
from ..kernels import ExpertDispatch
from ..models.moe_vit.modeling_moe_vit import find_backbone

CRITERIA = ("frequency", "gate_mass", "reap")
FORMAT_VERSION = 1

__all__ = [
    "CRITERIA",
    "ExpertUsage",
    "collect_expert_usage",
    "find_backbone",
    "iter_pixel_batches",
    "model_signature",
    "plot_usage_heatmap",
]


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by analysis and surgery
# ----------------------------------------------------------------------------------------------------------------


def model_signature(config) -> dict:
    """The shape facts a usage or selection must share with the model it is applied to."""
    return {
        "num_hidden_layers": int(config.num_hidden_layers),
        "attn_experts": [int(x) for x in config.attn_experts],
        "mlp_experts": [int(x) for x in config.mlp_experts],
        "attn_top_k": int(config.attn_top_k),
        "mlp_top_k": int(config.mlp_top_k),
    }


def iter_pixel_batches(data: Iterable) -> Iterable[torch.Tensor]:
    """Yield `pixel_values` `[batch, C, H, W]` from a DataLoader or iterable of pixel tensors, dict batches
    (`{"pixel_values": ...}`) or `(pixels, labels)` tuples. A single `[C, H, W]` image becomes a batch of one."""
    for i, batch in enumerate(data):
        if isinstance(batch, torch.Tensor):
            pixels = batch
        elif isinstance(batch, Mapping):
            if "pixel_values" not in batch:
                raise ValueError(f"calibration batch {i} is a dict without 'pixel_values' (keys: {sorted(batch)}).")
            pixels = batch["pixel_values"]
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            pixels = batch[0]
        else:
            raise ValueError(
                f"calibration batch {i} is a {type(batch).__name__}; expected a pixel tensor, a dict with "
                "'pixel_values' or a (pixels, labels) tuple."
            )
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        yield pixels


# ----------------------------------------------------------------------------------------------------------------
# The usage record
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ExpertUsage:
    """Expert usage of one task, per MoE layer (names as in `config.moe_layer_names()`).

    `token_count`, `gate_mass`, `reap_sum`: `{layer: float64 [E_t]}` sums over `num_tokens` tokens of
    `num_images` images (see the module docstring). `top_k`: `{layer: k}` used while collecting.
    `model`: `model_signature(config)` of the model measured, plus `name_or_path`.
    """

    task: str
    layers: list[str]
    top_k: dict[str, int]
    token_count: dict[str, torch.Tensor]
    gate_mass: dict[str, torch.Tensor]
    reap_sum: dict[str, torch.Tensor]
    num_tokens: int = 0
    num_images: int = 0
    model: dict = field(default_factory=dict)

    # -- derived scores ----------------------------------------------------------------------------------------
    def num_experts(self, layer: str) -> int:
        return int(self.token_count[layer].numel())

    def frequency(self, layer: str) -> torch.Tensor:
        """Share of the task's tokens that chose each expert in their top-k, `[E_t]` (sums to k)."""
        return self.token_count[layer] / max(self.num_tokens, 1)

    def mean_gate(self, layer: str) -> torch.Tensor:
        """Mean router probability of each expert over all tokens, `[E_t]` (sums to 1)."""
        return self.gate_mass[layer] / max(self.num_tokens, 1)

    def reap(self, layer: str) -> torch.Tensor:
        """REAP score, mean over routed tokens of gate × ‖expert output‖, `[E_t]` (0 for unused experts)."""
        return self.reap_sum[layer] / self.token_count[layer].clamp(min=1)

    def scores(self, criterion: str, layer: str) -> torch.Tensor:
        """`criterion` ("frequency", "gate_mass" or "reap") of every expert of `layer`, `[E_t]`."""
        if criterion == "frequency":
            return self.frequency(layer)
        if criterion == "gate_mass":
            return self.mean_gate(layer)
        if criterion == "reap":
            return self.reap(layer)
        raise ValueError(f"Unknown usage criterion {criterion!r}; choose one of {CRITERIA}.")

    def shares(self, criterion: str, layer: str) -> torch.Tensor:
        """`criterion` normalised to sum to 1 over the layer's experts, `[E_t]` (all zero if nothing was seen)."""
        s = self.scores(criterion, layer)
        total = float(s.sum())
        return s / total if total > 0 else torch.zeros_like(s)

    def table(self, criterion: str = "frequency", max_experts: int = 32) -> str:
        """A plain-text per-layer table: kept-relevant numbers at a glance (used by `moe-adapt inspect`)."""
        lines = [f"task {self.task!r}: {self.num_images} images, {self.num_tokens} tokens; {criterion} per expert"]
        width = max(len(name) for name in self.layers) if self.layers else 5
        for name in self.layers:
            s = self.scores(criterion, name).tolist()
            shown = " ".join(f"{v:5.2f}" for v in s[:max_experts]) + (" ..." if len(s) > max_experts else "")
            freq = self.frequency(name)
            used = int((freq > 0).sum())
            order = sorted(range(len(s)), key=lambda e: -s[e])[: self.top_k[name]]
            lines.append(f"{name:<{width}}  k={self.top_k[name]} used {used:>2}/{len(s):<2} top {order}  | {shown}")
        return "\n".join(lines)

    # -- merging -----------------------------------------------------------------------------------------------
    def _check_compatible(self, other: ExpertUsage) -> None:
        if other.task != self.task:
            raise ValueError(f"Cannot merge usage of task {other.task!r} into usage of task {self.task!r}.")
        if other.layers != self.layers or any(other.num_experts(n) != self.num_experts(n) for n in self.layers):
            raise ValueError("Cannot merge usages measured on different models (MoE layers or expert counts differ).")

    @classmethod
    def merge(cls, usages: Iterable[ExpertUsage]) -> ExpertUsage:
        """Sum several usages of the same task and model (batches, runs or processes) into a new one."""
        usages = list(usages)
        if not usages:
            raise ValueError("ExpertUsage.merge needs at least one usage.")
        first = usages[0]
        for u in usages[1:]:
            first._check_compatible(u)

        def add(attr):
            return {n: sum(getattr(u, attr)[n] for u in usages).clone() for n in first.layers}

        return cls(
            task=first.task,
            layers=list(first.layers),
            top_k=dict(first.top_k),
            token_count=add("token_count"),
            gate_mass=add("gate_mass"),
            reap_sum=add("reap_sum"),
            num_tokens=sum(u.num_tokens for u in usages),
            num_images=sum(u.num_images for u in usages),
            model=dict(first.model),
        )

    def __add__(self, other: ExpertUsage) -> ExpertUsage:
        return ExpertUsage.merge([self, other])

    def all_reduce(self, group=None) -> ExpertUsage:
        """Sum this usage over all processes of `torch.distributed` (in place; a no-op when not initialised).
        Every rank must call it with usage of the same task and model."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        parts = [self.token_count[n] for n in self.layers] + [self.gate_mass[n] for n in self.layers]
        parts += [self.reap_sum[n] for n in self.layers]
        flat = torch.cat(
            [p.reshape(-1) for p in parts] + [torch.tensor([self.num_tokens, self.num_images], dtype=torch.float64)]
        )
        backend_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        flat = flat.to(backend_device)
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        offset = 0
        for store in (self.token_count, self.gate_mass, self.reap_sum):
            for n in self.layers:
                size = store[n].numel()
                store[n] = flat[offset : offset + size].clone()
                offset += size
        self.num_tokens, self.num_images = int(round(float(flat[offset]))), int(round(float(flat[offset + 1])))
        return self

    # -- JSON --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "moe_adapt.expert_usage",
            "version": FORMAT_VERSION,
            "task": self.task,
            "num_tokens": self.num_tokens,
            "num_images": self.num_images,
            "model": self.model,
            "layers": {
                n: {
                    "top_k": self.top_k[n],
                    "token_count": self.token_count[n].tolist(),
                    "gate_mass": self.gate_mass[n].tolist(),
                    "reap_sum": self.reap_sum[n].tolist(),
                }
                for n in self.layers
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "usage data") -> ExpertUsage:
        if data.get("format") != "moe_adapt.expert_usage":
            raise ValueError(f"{source} is not an expert-usage file (its 'format' is {data.get('format')!r}).")
        layers = list(data["layers"])

        def tensors(key):
            return {n: torch.tensor(data["layers"][n][key], dtype=torch.float64) for n in layers}

        return cls(
            task=data["task"],
            layers=layers,
            top_k={n: int(data["layers"][n]["top_k"]) for n in layers},
            token_count=tensors("token_count"),
            gate_mass=tensors("gate_mass"),
            reap_sum=tensors("reap_sum"),
            num_tokens=int(data["num_tokens"]),
            num_images=int(data["num_images"]),
            model=dict(data.get("model", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the usage as JSON (atomically)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExpertUsage:
        return cls.from_dict(read_json(path), source=str(path))


# ----------------------------------------------------------------------------------------------------------------
# Collection
# ----------------------------------------------------------------------------------------------------------------


def _expert_tensors(module: nn.Module, names: tuple[str, ...], num: int, reference: torch.Tensor) -> list[torch.Tensor]:
    """The layer's expert tensors over all groups, concatenated along the expert axis and cut to the first `num`
    (read outside the layer's forward, so an offloaded layer is an error, as in the forward itself)."""
    groups = [module.experts, *module.extra_experts]
    if any(getattr(g, names[0]).is_meta for g in groups) and not reference.is_meta:
        raise ValueError(
            "A MoE layer's experts (read for their output norms) is on the meta device: accelerate "
            "offloaded it, and collecting usage reads expert tensors outside the experts' forward."
        )
    return [torch.cat([getattr(g, n) for g in groups], 0)[:num] for n in names]


def expert_output_norms(module: nn.Module, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """‖f_e(x)‖₂ of every (token, slot) pair: hidden `[b, n, d]` (the MoE layer's input), indices `[b·n, k]`
    → `[b·n, k]`. MLP experts: f_e(x) = W_down^e act(W_up^e x + b) + b. Attention experts (shared K, V over the
    image's tokens): f_e(x) = softmax(q_e Kᵀ/√h) V W_o^e + b_o^e with q_e = W_q^e x + b."""
    b, n, d = hidden.shape
    flat = hidden.reshape(b * n, d)
    num = int(indices.max()) + 1 if indices.numel() else 1
    plan = ExpertDispatch(indices, num)
    impl = getattr(module.config, "_experts_implementation", None) or "segmented_mm"
    if hasattr(module, "k_proj"):  # mixture of attention heads
        q_w, q_b, o_w, o_b = _expert_tensors(module, ("q_proj", "q_proj_bias", "o_proj", "o_proj_bias"), num, flat)
        k = indices.shape[-1]
        h = q_w.shape[1]
        q = plan.project(flat, q_w, q_b, impl).view(b, n, k, h).transpose(1, 2)
        key = module.k_proj(hidden).unsqueeze(1).expand(b, k, n, h)
        value = module.v_proj(hidden).unsqueeze(1).expand(b, k, n, h)
        attn = F.scaled_dot_product_attention(q, key, value).transpose(1, 2).reshape(b * n, k, h)
        out = plan.project(attn, o_w, o_b, impl, per_slot=True)
    else:
        up, up_b, down, down_b = _expert_tensors(
            module, ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias"), num, flat
        )
        act = module.experts.act_fn
        mid = act(plan.project(flat, up, up_b, impl))
        out = plan.project(mid, down, down_b, impl, per_slot=True)
    return out.float().norm(dim=-1)


def _usage_hook(name: str, stats: dict[str, dict[str, torch.Tensor]], top_k: dict[str, int], output_norms: bool):
    """A forward hook (with kwargs) for MoE layer `name` that adds each call's routing to `stats` (in float64 on
    the CPU): the tokens routed to each expert (`"count"`), the router probability mass (`"mass"`) and, with
    `output_norms`, the gate-weighted expert output norms (`"reap"`); it records the layer's top-k in `top_k`."""

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        route = output[1]
        e_t = route.probs.shape[-1]
        idx = route.indices
        top_k[name] = int(idx.shape[-1])
        stats["count"][name] += torch.bincount(idx.reshape(-1), minlength=e_t).double().cpu()
        stats["mass"][name] += route.probs.double().sum(0).cpu()
        if output_norms:
            norms = expert_output_norms(module, hidden, idx)
            weighted = (route.weights.float() * norms).double().reshape(-1)
            stats["reap"][name] += (
                torch.zeros(e_t, dtype=torch.float64, device=weighted.device)
                .index_add(0, idx.reshape(-1), weighted)
                .cpu()
            )

    return hook


def _with_progress(iterator: Iterable, data: Iterable, max_batches: int | None, task: str) -> Iterable:
    """`iterator` under a tqdm bar whose total is `len(data)` (where `data` has a length), at most `max_batches`."""
    from tqdm.auto import tqdm

    total = None
    try:
        total = len(data)
    except TypeError:
        pass
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    return tqdm(iterator, total=total, desc=f"usage {task}", unit="batch")


def collect_expert_usage(
    model: nn.Module,
    data: Iterable,
    task: str,
    *,
    max_batches: int | None = None,
    output_norms: bool = True,
    progress: bool = False,
) -> ExpertUsage:
    """Measure how `task` uses the experts of every MoE layer of `model` on `data`.

    Args:
        model: an `MoEViTModel` or any task model holding one as `.moe_vit` (only the backbone is run).
        data: a DataLoader or any iterable of pixel batches `[B, C, H, W]`, dict batches with `"pixel_values"`
            or `(pixels, labels)` tuples.
        task: the task whose routers are measured.
        max_batches: stop after this many batches.
        output_norms: also compute the REAP score (runs every routed expert once more; turn off to save time).
        progress: show a tqdm progress bar.

    Returns:
        an [`ExpertUsage`]. Runs under `torch.no_grad()` in eval mode (the model's mode is restored after).
        Routing overrides set with `model.set_routing` apply.

    Raises:
        ValueError: unknown task, or `data` gave no batch.
    """
    backbone, _ = find_backbone(model)
    config = backbone.config
    task = config.tasks[config.task_index(task)]
    layers = backbone.moe_layers()
    names = list(layers)
    sizes = {n: m.router.routers[task].out_features for n, m in layers.items()}
    stats = {key: {n: torch.zeros(sizes[n], dtype=torch.float64) for n in names} for key in ("count", "mass", "reap")}
    top_k: dict[str, int] = {}

    handles = [
        m.register_forward_hook(_usage_hook(n, stats, top_k, output_norms), with_kwargs=True) for n, m in layers.items()
    ]
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    num_tokens = num_images = batches = 0
    iterator = iter_pixel_batches(data)
    if progress:
        iterator = _with_progress(iterator, data, max_batches, task)
    try:
        with torch.no_grad():
            for pixels in iterator:
                if max_batches is not None and batches >= max_batches:
                    break
                out = backbone(pixels.to(device), task=task, return_dict=True)
                num_images += out.last_hidden_state.shape[0]
                num_tokens += out.last_hidden_state.shape[0] * out.last_hidden_state.shape[1]
                batches += 1
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    if batches == 0:
        raise ValueError(
            f"The calibration data for task {task!r} is empty: it gave no batch. Pass a non-empty DataLoader or list "
            "of pixel batches (check the dataset split and --max-images)."
        )
    signature = model_signature(config)
    signature["name_or_path"] = getattr(config, "_name_or_path", "") or ""
    return ExpertUsage(
        task=task,
        layers=names,
        top_k={n: top_k.get(n, layers[n].router.top_k) for n in names},
        token_count=stats["count"],
        gate_mass=stats["mass"],
        reap_sum=stats["reap"],
        num_tokens=num_tokens,
        num_images=num_images,
        model=signature,
    )


# ----------------------------------------------------------------------------------------------------------------
# Heatmap
# ----------------------------------------------------------------------------------------------------------------


def plot_usage_heatmap(
    usages: Mapping[str, ExpertUsage] | Iterable[ExpertUsage] | ExpertUsage,
    path: str | os.PathLike,
    criterion: str = "frequency",
    title: str | None = None,
) -> Path:
    """Draw tasks × experts heatmaps, one panel per MoE layer, and save them as an image (PNG by suffix).

    `usages`: `{task: ExpertUsage}`, a list of usages (keyed by their `task`) or a single one. All must come
    from the same model. Cells show `criterion` ("frequency", "gate_mass" or "reap"); experts a task cannot
    route to are left blank.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if isinstance(usages, ExpertUsage):
        usages = {usages.task: usages}
    elif not isinstance(usages, Mapping):
        usages = {u.task: u for u in usages}
    if not usages:
        raise ValueError("plot_usage_heatmap needs at least one ExpertUsage.")
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown usage criterion {criterion!r}; choose one of {CRITERIA}.")
    tasks = list(usages)
    layers = list(next(iter(usages.values())).layers)
    for t, u in usages.items():
        if u.layers != layers:
            raise ValueError(f"Usage of task {t!r} comes from a model with other MoE layers ({u.layers} vs {layers}).")
    ncols = min(4, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    max_e = max(u.num_experts(n) for u in usages.values() for n in layers)
    max_name = max(len(t) for t in tasks)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        squeeze=False,
        layout="constrained",
        figsize=(max(3.0, 0.4 * max_e + 0.6) * ncols + 0.08 * max_name + 1.2, (0.45 * len(tasks) + 1.5) * nrows + 0.5),
    )
    vmax = max(float(u.scores(criterion, n).max()) for u in usages.values() for n in layers) or 1.0
    image = None
    for index, (ax, name) in enumerate(zip(axes.flat, layers)):
        width = max(u.num_experts(name) for u in usages.values())
        grid = torch.full((len(tasks), width), float("nan"))
        for r, t in enumerate(tasks):
            s = usages[t].scores(criterion, name)
            grid[r, : s.numel()] = s.float()
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(width))
        ax.set_xticklabels([str(e) for e in range(width)], fontsize=7)
        ax.set_yticks(range(len(tasks)))
        ax.set_yticklabels(tasks if index % ncols == 0 else [], fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        if width <= 16 and len(tasks) <= 8:
            for r in range(len(tasks)):
                for c in range(width):
                    v = float(grid[r, c])
                    if not math.isnan(v):
                        ax.text(
                            c,
                            r,
                            f"{v:.2f}",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="white" if v < 0.6 * vmax else "black",
                        )
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, label=criterion)
    fig.suptitle(title or f"expert usage ({criterion}) per MoE layer", fontsize=10)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
