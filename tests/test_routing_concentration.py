"""The per-task routing-concentration term of `MutualInformationLoss` (issue 28)."""

import pytest
import torch

from moe_adapt import MoEViTConfig
from moe_adapt.models.moe_vit.losses import MutualInformationLoss, mutual_information_loss, routing_concentration_loss


def test_concentration_is_the_mass_outside_each_tasks_top_k_averaged_over_tasks():
    on_two = torch.tensor([[5.0, 5.0, 0.0, 0.0]])
    even = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert routing_concentration_loss(on_two, top_k=2).item() == pytest.approx(0.0, abs=1e-7)
    assert routing_concentration_loss(even, top_k=2).item() == pytest.approx(0.5, rel=1e-6)
    assert routing_concentration_loss(even, top_k=1).item() == pytest.approx(0.75, rel=1e-6)
    # tasks weigh the same whatever their token counts; a task without tokens is left out
    two_tasks = torch.tensor([[100.0, 60.0, 40.0, 0.0], [0.0, 0.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    assert routing_concentration_loss(two_tasks, top_k=2).item() == pytest.approx((0.2 + 0.0) / 2, rel=1e-6)
    # a layer with no more experts than k has nothing outside
    assert routing_concentration_loss(even, top_k=4).item() == 0.0


def test_concentration_gradient_moves_every_token_toward_the_tasks_top_k():
    logits = torch.tensor([[0.5, 0.4, 0.0, 0.0], [0.0, 0.0, 0.3, 0.0], [0.2, 0.3, 0.0, 0.1]], requires_grad=True)
    routing_concentration_loss(logits.softmax(-1).sum(0, keepdim=True), top_k=2).backward()
    # descending raises experts 0 and 1 (the task's top-2 by mean gate) for every token, lowers 2 and 3
    assert (logits.grad[:, :2] < 0).all() and (logits.grad[:, 2:] > 0).all()


def test_mutual_information_loss_adds_the_term_with_its_weight_and_top_k_from_the_config():
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"], routing_concentration_weight=0.3, mi_loss_weight=0.1)
    mi = MutualInformationLoss.from_config(config)
    assert mi.concentration == 0.3
    assert mi.top_k == [getattr(config, f"{kind}_top_k") for _, _, kind in config.moe_layers()]
    torch.manual_seed(0)
    probs = {t: [torch.rand(16, e).softmax(-1) for e in mi.num_experts] for t in (0, 1)}
    for t, p in probs.items():
        mi.accumulate(p, t)
    joint = [torch.stack([probs[0][i].sum(0), probs[1][i].sum(0)]) for i in range(len(mi.num_experts))]
    want = sum(0.1 * mutual_information_loss(m) + 0.3 * routing_concentration_loss(m, k) for m, k in zip(joint, mi.top_k))
    assert mi.compute().item() == pytest.approx(want.item(), rel=1e-5)
    off = MutualInformationLoss.from_config(MoEViTConfig.from_preset("tiny", tasks=["a", "b"], mi_loss_weight=0.1))
    for t, p in probs.items():
        off.accumulate(p, t)
    assert off.compute().item() == pytest.approx(sum(0.1 * mutual_information_loss(m) for m in joint).item(), rel=1e-5)
    assert MoEViTConfig(tasks=["a"]).routing_concentration_weight == 0.0
    with pytest.raises(ValueError, match="top_k"):
        MutualInformationLoss(num_tasks=2, concentration=0.1)
