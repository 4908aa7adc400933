"""The per-task routing-concentration term of `MutualInformationLoss` (issue 28)."""

import math

import pytest
import torch

from moe_adapt import MoEViTConfig
from moe_adapt.models.moe_vit.losses import (
    MutualInformationLoss,
    mutual_information_loss,
    routing_concentration_loss,
)


def stats(probs_per_task: list[torch.Tensor]):
    """M, L and n of `routing_concentration_loss` from each task's `[tokens, E]` router probabilities."""
    m = torch.stack([p.sum(0) for p in probs_per_task])
    logs = torch.stack([p.clamp_min(1e-6).log().sum(0) for p in probs_per_task])
    n = torch.tensor([float(p.shape[0]) for p in probs_per_task])
    return m, logs, n


def test_concentration_is_zero_iff_every_token_spreads_evenly_over_the_tasks_top_k():
    on_two = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 3)
    assert routing_concentration_loss(*stats([on_two]), top_k=2).item() == pytest.approx(0.0, abs=1e-5)
    even = torch.full((3, 4), 0.25)
    assert routing_concentration_loss(*stats([even]), top_k=2).item() == pytest.approx(math.log(2), rel=1e-5)
    # the mean gate is concentrated on two experts, but half the tokens route elsewhere: far from 0
    split = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.45, 0.05, 0.5, 0.0]])
    assert routing_concentration_loss(*stats([split]), top_k=2).item() > 0.5
    # tasks weigh the same whatever their token counts; a task without tokens is left out
    m, logs, n = stats([on_two, even[:1]])
    both = routing_concentration_loss(
        torch.cat([m, torch.zeros(1, 4)]), torch.cat([logs, torch.zeros(1, 4)]), torch.cat([n, torch.zeros(1)]), top_k=2
    )
    assert both.item() == pytest.approx(math.log(2) / 2, rel=1e-4)
    assert routing_concentration_loss(*stats([even]), top_k=4).item() == 0.0  # nothing to leave out


def test_concentration_gradient_raises_every_top_k_expert_for_every_token():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.3, 0.0], [1.0, 1.0, 0.0, 0.2]], requires_grad=True)
    routing_concentration_loss(*stats([logits.softmax(-1)]), top_k=2).backward()
    # S = experts 0 and 1 (largest mean gate); descending raises, for every token, the member of S it gives less
    # (not the leader: expert 0 of the first token, above 1/k, comes down), and lowers experts 2 and 3
    weaker = logits[:, :2].argmin(1)
    assert (logits.grad[torch.arange(3), weaker] < 0).all() and (logits.grad[:, 2:] > 0).all()
    assert logits.grad[0, 0] > 0


def test_mutual_information_loss_adds_the_term_with_its_weight_and_top_k_from_the_config():
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"], routing_concentration_weight=0.3, mi_loss_weight=0.1)
    mi = MutualInformationLoss.from_config(config)
    assert mi.concentration == 0.3
    assert mi.top_k == [getattr(config, f"{kind}_top_k") for _, _, kind in config.moe_layers()]
    torch.manual_seed(0)
    probs = {t: [torch.rand(16, e).softmax(-1) for e in mi.num_experts] for t in (0, 1)}
    for t, p in probs.items():
        mi.accumulate(p, t)
    layers = [stats([probs[0][i], probs[1][i]]) for i in range(len(mi.num_experts))]
    want = sum(
        0.1 * mutual_information_loss(s[0]) + 0.3 * routing_concentration_loss(*s, top_k=k)
        for s, k in zip(layers, mi.top_k)
    )
    assert mi.compute().item() == pytest.approx(want.item(), rel=1e-5)
    off = MutualInformationLoss.from_config(MoEViTConfig.from_preset("tiny", tasks=["a", "b"], mi_loss_weight=0.1))
    for t, p in probs.items():
        off.accumulate(p, t)
    assert off.compute().item() == pytest.approx(
        sum(0.1 * mutual_information_loss(s[0]) for s in layers).item(), rel=1e-5
    )
    assert MoEViTConfig(tasks=["a"]).routing_concentration_weight == 0.0
    with pytest.raises(ValueError, match="top_k"):
        MutualInformationLoss(num_tasks=2, concentration=0.1)


def test_concentration_extra_widens_each_tasks_expert_set_up_to_the_layers_experts():
    base = MoEViTConfig.from_preset("tiny", tasks=["a", "b"], routing_concentration_weight=0.3)
    wide = MoEViTConfig.from_preset(
        "tiny", tasks=["a", "b"], routing_concentration_weight=0.3, routing_concentration_extra=1
    )
    layers = list(base.moe_layers())
    widths = [getattr(base, f"{kind}_experts")[i] for _, i, kind in layers]
    assert MutualInformationLoss.from_config(wide).top_k == [
        min(k + 1, e) for k, e in zip(MutualInformationLoss.from_config(base).top_k, widths)
    ]
    huge = MoEViTConfig.from_preset(
        "tiny", tasks=["a", "b"], routing_concentration_weight=0.3, routing_concentration_extra=99
    )
    assert MutualInformationLoss.from_config(huge).top_k == widths
    # a set of k + 1: tokens spread over those k + 1 experts pay nothing, tokens on only k of them pay
    three = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]] * 4)
    assert routing_concentration_loss(*stats([three]), top_k=3).item() == pytest.approx(0.0, abs=1e-5)
    assert routing_concentration_loss(*stats([three]), top_k=2).item() > 0.0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="routing_concentration_extra"):
            MoEViTConfig(tasks=["a"], routing_concentration_extra=bad)


def test_tasks_starting_from_uniform_routing_are_pulled_toward_different_experts():
    # zero-initialised routers: every task's tokens spread evenly; a plain top-k would give all three the same set
    uniform = [torch.full((5, 8), 1 / 8) for _ in range(3)]
    for k in (2, 4):
        logits = torch.zeros(3, 5, 8, requires_grad=True)
        probs = [logits[t].softmax(-1) for t in range(3)]
        routing_concentration_loss(*stats(probs), top_k=k).backward()
        raised = [set((logits.grad[t, 0] < 0).nonzero().flatten().tolist()) for t in range(3)]
        assert all(len(r) == k for r in raised)
        assert len(set().union(*raised)) == {2: 6, 4: 8}[k]  # k=2: three disjoint pairs; k=4: every expert
    assert routing_concentration_loss(*stats(uniform), top_k=2).item() == pytest.approx(math.log(4), rel=1e-5)
    # routing that clearly prefers other experts wins over the tie-breaker
    skewed = torch.tensor([[0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.44, 0.44]] * 4, requires_grad=True)
    routing_concentration_loss(*stats([skewed]), top_k=2).backward()
    assert (skewed.grad[:, 6:] < 0).all()
