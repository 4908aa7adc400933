"""The per-task routing-concentration term of `MutualInformationLoss` (issue 28)."""

import math

import pytest
import torch

from moe_adapt import MoEViTConfig
from moe_adapt.models.moe_vit.losses import MutualInformationLoss, mutual_information_loss, routing_concentration_loss


def test_concentration_is_each_tasks_normalised_entropy_averaged_over_tasks():
    one_expert = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    even = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert routing_concentration_loss(one_expert).item() == pytest.approx(0.0, abs=1e-7)
    assert routing_concentration_loss(even).item() == pytest.approx(1.0, rel=1e-6)
    # two experts of four, evenly: log 2 / log 4 = 0.5; tasks weigh the same whatever their token counts
    half = torch.tensor([[100.0, 100.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    assert routing_concentration_loss(half).item() == pytest.approx(0.25, rel=1e-6)
    # a task without tokens is left out
    assert routing_concentration_loss(torch.cat([half, torch.zeros(1, 4)])).item() == pytest.approx(0.25, rel=1e-6)


def test_concentration_gradient_moves_mass_toward_the_tasks_favourite_expert():
    logits = torch.tensor([[0.5, 0.0, 0.0, 0.0]] * 8, requires_grad=True)
    routing_concentration_loss(logits.softmax(-1).sum(0, keepdim=True)).backward()
    grad = logits.grad[0]
    assert grad[0] < 0 and (grad[1:] > 0).all()  # descending raises the favourite's logit, lowers the others'


def test_mutual_information_loss_adds_the_term_with_its_weight_from_the_config():
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"], routing_concentration_weight=0.3, mi_loss_weight=0.1)
    mi = MutualInformationLoss.from_config(config)
    assert mi.concentration == 0.3
    widths = mi.num_experts
    torch.manual_seed(0)
    probs = {t: [torch.rand(16, e).softmax(-1) for e in widths] for t in (0, 1)}
    for t, p in probs.items():
        mi.accumulate(p, t)
    joint = [torch.stack([probs[0][i].sum(0), probs[1][i].sum(0)]) for i in range(len(widths))]
    want = sum(0.1 * mutual_information_loss(m) + 0.3 * routing_concentration_loss(m) for m in joint)
    assert mi.compute().item() == pytest.approx(want.item(), rel=1e-5)
    off = MutualInformationLoss.from_config(MoEViTConfig.from_preset("tiny", tasks=["a", "b"], mi_loss_weight=0.1))
    for t, p in probs.items():
        off.accumulate(p, t)
    assert off.compute().item() == pytest.approx(sum(0.1 * mutual_information_loss(m) for m in joint).item(), rel=1e-5)
    assert math.isclose(MoEViTConfig(tasks=["a"]).routing_concentration_weight, 0.0)
