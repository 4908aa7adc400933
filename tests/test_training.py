"""Training building blocks: task samplers, loss weighting, the learning-rate schedule, deterministic batch streams,
parameter groups and the normalised task–expert MI."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from moe_adapt.training import (
    LossWeighting,
    TaskBatchStream,
    TaskSampler,
    normalized_task_expert_mi,
    parameter_groups,
    task_probabilities,
)

TASKS = ["a", "b", "c"]
SIZES = {"a": 6000, "b": 3000, "c": 1000}


# -- sampling ----------------------------------------------------------------------------------------------------
def test_all_tasks_puts_every_task_in_every_step():
    s = TaskSampler(TASKS, "all_tasks", rounds=2)
    assert s.tasks_for_step(0) == s.tasks_for_step(7) == TASKS * 2
    assert s.micro_batches_in_step() == 6


def test_round_robin_cycles_across_steps():
    s = TaskSampler(TASKS, "round_robin", micro_batches_per_step=2)
    assert [s.tasks_for_step(i) for i in range(3)] == [["a", "b"], ["c", "a"], ["b", "c"]]


@pytest.mark.parametrize("strategy,temperature", [("proportional", 1.0), ("temperature", 2.0), ("temperature", 1e6)])
def test_drawn_tasks_follow_their_probabilities(strategy, temperature):
    probs = task_probabilities(SIZES, strategy, temperature)
    weights = {t: n ** (1.0 if strategy == "proportional" else 1 / temperature) for t, n in SIZES.items()}
    for t in TASKS:
        assert probs[t] == pytest.approx(weights[t] / sum(weights.values()))
    s = TaskSampler(TASKS, strategy, sizes=SIZES, temperature=temperature, micro_batches_per_step=3, seed=1)
    counts = Counter(t for step in range(2000) for t in s.tasks_for_step(step))
    for t in TASKS:
        assert counts[t] / 6000 == pytest.approx(probs[t], abs=0.02)
    # A pure function of (seed, step): resuming draws what the uninterrupted run drew.
    again = TaskSampler(TASKS, strategy, sizes=SIZES, temperature=temperature, micro_batches_per_step=3, seed=1)
    assert [again.tasks_for_step(i) for i in (5, 900)] == [s.tasks_for_step(i) for i in (5, 900)]


def test_sampler_errors():
    with pytest.raises(ValueError, match="Unknown sampling strategy"):
        TaskSampler(TASKS, "random")
    with pytest.raises(ValueError, match="needs the dataset size"):
        TaskSampler(TASKS, "proportional")


# -- loss weighting ---------------------------------------------------------------------------------------------------
def test_fixed_weights():
    w = LossWeighting(TASKS, "fixed", {"b": 2.0})
    total = w([("a", torch.tensor(1.0)), ("b", torch.tensor(3.0)), ("a", torch.tensor(0.5))])
    assert float(total) == pytest.approx(1.0 + 6.0 + 0.5)
    assert list(w.parameters()) == []
    with pytest.raises(ValueError, match="unknown tasks"):
        LossWeighting(TASKS, "fixed", {"z": 1.0})


def test_uncertainty_weighting_formula_and_gradient():
    w = LossWeighting(TASKS, "uncertainty")
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
    total = w(list(losses.items()))
    # σ = 1 at the start: 0.5 / 1 · L + log(1 + 1) per task.
    assert float(total.detach()) == pytest.approx(0.5 * 2.5 + 2 * math.log(2.0))
    total.backward()
    # d/ds [0.5 e^{-s} L + log(1 + e^s)] at s = 0 = -0.5 L + 0.5: a large loss raises σ (lowers its weight).
    assert float(w.log_variance["a"].grad) == pytest.approx(-0.5 * 2.0 + 0.5)
    assert float(w.log_variance["b"].grad) == pytest.approx(-0.5 * 0.5 + 0.5)
    assert w.log_variance["c"].grad is None
    with torch.no_grad():
        w.log_variance["a"].fill_(math.log(4.0))
    assert w.weights()["a"] == pytest.approx(0.5 / 4.0) and w.sigmas()["a"] == pytest.approx(2.0)


# -- schedule, parameter groups ------------------------------------------------------------------------------------------
def test_schedule_warms_up_then_decays_to_min_lr():
    """transformers' `cosine_with_min_lr` through `build_scheduler`: linear warm-up, cosine to `min_lr`, every
    group at its own rate."""
    from moe_adapt.training import OptimizerConfig, build_scheduler

    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 1e-2}], lr=1e-3)
    sched = build_scheduler(opt, OptimizerConfig(lr=1e-3, warmup_steps=10, min_lr=1e-5), max_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(sched.get_last_lr())
        opt.step()
        sched.step()
    assert lrs[0][0] == 0 and lrs[5][0] == pytest.approx(5e-4) and lrs[10][0] == pytest.approx(1e-3)
    assert lrs[60][0] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2) and lrs[109][0] == pytest.approx(1e-5, abs=1e-6)
    assert lrs[60][1] == pytest.approx(10 * lrs[60][0])  # the second group keeps its 10x rate
    assert (
        OptimizerConfig(warmup_ratio=0.1).warmup(50) == 5
        and OptimizerConfig(warmup_steps=3, warmup_ratio=0.1).warmup(50) == 3
    )
    with pytest.raises(ValueError, match="optimizer.scheduler='cosin'.*cosine_with_min_lr"):
        OptimizerConfig(scheduler="cosin")


def test_parameter_groups_leave_routers_norms_and_biases_undecayed():
    from moe_adapt import MoEViTConfig, MoEViTForMultiTask

    model = MoEViTForMultiTask(
        MoEViTConfig.from_preset("tiny", tasks=["a", "b"], task_labels={"a": ["x", "y"], "b": ["x", "y"]})
    )
    decay, rest = parameter_groups(model, 0.05)
    model.requires_grad_(False)
    assert parameter_groups(model, 0.05) == []  # frozen tensors are left out (and empty groups with them)
    model.requires_grad_(True)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert any(n.endswith("experts.up_proj") for n in decayed) and any("classifier.weight" in n for n in decayed)
    assert not any(".router." in n or "layernorm" in n or n.endswith("bias") or "task_embeddings" in n for n in decayed)
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


# -- batch streams ---------------------------------------------------------------------------------------------------
class Items(torch.utils.data.Dataset):
    """Item i = (i, a random number drawn from torch's global RNG, as augmentations do)."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i), float(torch.rand(()))])


def test_batch_stream_is_deterministic_epoch_based_and_rank_disjoint():
    stack = torch.stack
    s0 = TaskBatchStream(Items(), 2, stack, seed=3, rank=0, world_size=2)
    s1 = TaskBatchStream(Items(), 2, stack, seed=3, rank=1, world_size=2)
    assert s0.batches_per_epoch == 2  # 10 items, global batch 4: the last 2 are dropped each epoch
    seen = [int(i) for d in range(2) for s in (s0, s1) for i in s.indices(d)]
    assert len(set(seen)) == 8
    assert s0.indices(2) != s0.indices(0)  # a new permutation each epoch
    # Same items and augmentation whether read in order, from the middle, or in a worker process.
    in_order = [b for _, b in zip(range(4), s0.batches(0))]
    assert torch.equal(next(s0.batches(3)), in_order[3]) and torch.equal(s0.batch(2), in_order[2])
    workers = TaskBatchStream(Items(), 2, stack, seed=3, rank=0, world_size=2, num_workers=1)
    assert torch.equal(next(workers.batches(1)), in_order[1])


# -- routing specialisation ------------------------------------------------------------------------------------------------
def test_normalized_mi_is_zero_for_shared_and_one_for_disjoint_experts():
    from moe_adapt.analysis import ExpertUsage

    def usage(task, mass):
        mass = torch.tensor(mass, dtype=torch.float64)
        return ExpertUsage(
            task=task,
            layers=["layers.1.mlp"],
            top_k={"layers.1.mlp": 1},
            token_count={"layers.1.mlp": mass},
            gate_mass={"layers.1.mlp": mass},
            reap_sum={"layers.1.mlp": mass},
            num_tokens=10,
        )

    shared = {"a": usage("a", [5.0, 5.0]), "b": usage("b", [2.0, 2.0])}
    disjoint = {"a": usage("a", [5.0, 0.0]), "b": usage("b", [0.0, 3.0])}
    assert normalized_task_expert_mi(shared)["mean"] == pytest.approx(0.0, abs=1e-9)
    assert normalized_task_expert_mi(disjoint)["mean"] == pytest.approx(1.0)


def _adamw_steps(param, opt, n):
    for _ in range(n):
        opt.zero_grad()
        (param.sin() * (1 + torch.arange(float(param.numel()))).view_as(param)).sum().backward()
        opt.step()


def test_adamw_is_fused_on_cpu_and_steps_like_the_plain_one():
    from moe_adapt.training.loop import adamw

    torch.manual_seed(0)
    start = torch.randn(5, 3)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    fused, plain = adamw([a], "cpu", lr=0.1, weight_decay=0.05), torch.optim.AdamW([b], lr=0.1, weight_decay=0.05)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    _adamw_steps(a, fused, 3)
    _adamw_steps(b, plain, 3)
    assert (a - start).abs().min() > 0.05 and torch.allclose(a, b, atol=1e-6)  # every entry moved, as plain's did


# -- train.compile ---------------------------------------------------------------------------------------------------
@pytest.mark.slow  # one torch.compile of the tiny model: about a minute and a half on a CPU
def test_a_compiled_train_step_equals_the_eager_one():
    """`train.compile` (`compile_model`: `model.compile()`, parameter names unchanged) through the loop: one step of
    the tiny model gives the eager loss and weights within fp32 tolerance."""
    from moe_adapt import MoEViTConfig, MoEViTForImageClassification
    from moe_adapt.training import OptimizerConfig, TrainConfig, build_scheduler, make_accelerator, train_loop
    from moe_adapt.training.loop import compile_model

    assert TrainConfig().compile is False  # off unless asked for
    config = MoEViTConfig.from_preset("tiny", tasks=["a"], task_labels={"a": ["x", "y", "z"]})
    torch.manual_seed(0)
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = compile_model(MoEViTForImageClassification(config), TrainConfig(compile=compiled)).train()
        opt_cfg = OptimizerConfig(lr=1e-2, scheduler="constant")
        accelerator = make_accelerator(TrainConfig(max_steps=1))
        # SGD: the update is the gradient times lr, so the weights compare the gradients (Adam's first step,
        # lr x sign(g), would turn rounding noise in a near-zero gradient into a full step)
        optimizer = torch.optim.SGD(model.parameters(), lr=opt_cfg.lr)
        result = train_loop(
            model,
            optimizer,
            build_scheduler(optimizer, opt_cfg, 1),
            lambda start: iter([batch]),
            lambda m, b: m(pixel_values=b[0], labels=b[1], task="a", return_dict=True).loss,
            accelerator,
            max_steps=1,
            seed=0,
            progress_bar=False,
        )
        runs[compiled] = (result.losses[0], dict(accelerator.unwrap_model(result.model).named_parameters()))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    eager, compiled = runs[False][1], runs[True][1]
    assert eager.keys() == compiled.keys()  # model.compile() keeps the parameter names (save_pretrained unchanged)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-7, msg=name)


# -- the loop's checkpoints -------------------------------------------------------------------------------------------
def test_resume_latest_continues_from_the_newest_checkpoint_and_accelerate_keeps_the_newest_few(tmp_path):
    from moe_adapt.training import (
        OptimizerConfig,
        TrainConfig,
        build_optimizer,
        build_scheduler,
        make_accelerator,
        train_loop,
    )
    from moe_adapt.training.loop import checkpoint_dirs

    def run(max_steps, resume=None):
        train = TrainConfig(max_steps=max_steps, save_every=1, keep_checkpoints=2)
        accelerator = make_accelerator(train, tmp_path)
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = build_optimizer(model, OptimizerConfig(lr=0.1), accelerator.device)

        def batches_from(start):  # batch s is a function of s
            for s in range(start, max_steps):
                yield torch.full((2, 3), float(s))

        return train_loop(
            model,
            optimizer,
            build_scheduler(optimizer, OptimizerConfig(lr=0.1), 5),
            batches_from,
            lambda m, x: m(x).square().mean(),
            accelerator,
            max_steps=max_steps,
            resume=resume,
            save_every=1,
            progress_bar=False,
        )

    first = run(3)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint_1", "checkpoint_2"]  # total_limit 2
    resumed = run(5, resume="latest")
    assert (resumed.start_step, resumed.step, len(resumed.losses)) == (3, 5, 2) and first.step == 3
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint_3", "checkpoint_4"]  # numbering continued
    fresh = run(5, resume=None)  # resume=None: a fresh start, whatever the folder holds
    assert fresh.start_step == 0


# -- recipe settings the loop would ignore ---------------------------------------------------------------------------
def test_finetune_and_continual_refuse_pretraining_only_train_settings():
    from moe_adapt.adaptation.finetune import FinetuneConfig
    from moe_adapt.training import ContinualConfig, TrainConfig

    with pytest.raises(ValueError, match=r"train.save_every=5: the finetune recipe does not use it"):
        FinetuneConfig(model="m", dataset="builtin:digits", train=TrainConfig(save_every=5))
    with pytest.raises(ValueError, match=r"train.max_minutes=3.0: the continual recipe does not use it"):
        ContinualConfig(model="m", train=TrainConfig(max_minutes=3))
    assert ContinualConfig(model="m", train=TrainConfig(max_steps=10, num_threads=1)).train.max_steps == 10
