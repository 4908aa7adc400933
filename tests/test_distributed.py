"""The one training loop scales out through existing engines: 2 CPU processes (gloo) under DDP (torchrun) and under
FSDP (`accelerate launch --use_fsdp`; on CPU, where accelerate runs DDP only, torch's `fully_shard`). Each run
trains a tiny MoE ViT 4 steps with a checkpoint at step 2, then a freshly initialised model resumes from that
checkpoint: every rank ends with the same weights, and the resumed run with the weights and losses of the first."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import run_two_processes

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

WORKER = """
# Train 4 steps (checkpoint at 2), then resume a fresh model from the step-2 checkpoint and train to 4; write each
# rank's weight digests and losses.
import hashlib
import json
import sys

import torch
import torch.distributed as dist

from moe_adapt import MoEViTConfig, MoEViTForImageClassification
from moe_adapt.training import OptimizerConfig, TrainConfig, build_optimizer, build_scheduler, make_accelerator, train_loop

out = sys.argv[1]
train = TrainConfig(max_steps=4, save_every=2, num_threads=1, progress_bar=False)
opt_cfg = OptimizerConfig(lr=1e-2, warmup_steps=1, max_grad_norm=1.0)


def batches_from(start, rank):
    '''Each rank's batch of step s: a function of (s, rank) alone, as pretraining's streams are.'''
    step = start
    while True:
        g = torch.Generator().manual_seed(1000 * step + rank)
        yield torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)
        step += 1


def run(seed, project_dir, resume=None):
    accelerator = make_accelerator(train, project_dir)
    torch.manual_seed(seed)
    model = MoEViTForImageClassification(MoEViTConfig.from_preset("tiny", tasks=["a"], task_labels={"a": ["x", "y", "z"]}))
    model.train()
    optimizer = build_optimizer(model, opt_cfg, accelerator.device)
    result = train_loop(
        model, optimizer, build_scheduler(optimizer, opt_cfg, train.max_steps),
        lambda start: batches_from(start, accelerator.process_index),
        lambda m, b: m(pixel_values=b[0], labels=b[1], task="a", return_dict=True).loss, accelerator,
        max_steps=train.max_steps, seed=0, max_grad_norm=opt_cfg.max_grad_norm, resume=resume,
        save_every=train.save_every if project_dir else 0, progress_bar=False,
    )
    local = hashlib.sha256(b"".join(p.detach().float().contiguous().numpy().tobytes()
                                    for p in _full_parameters(result.model))).hexdigest()
    sharded = any(hasattr(p, "full_tensor") for p in result.model.parameters())
    return local, result, accelerator.distributed_type.value, sharded


def _full_parameters(model):
    '''Every parameter, whole, on this rank (FSDP's sharded DTensors gathered).'''
    return [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]


first, result_a, kind, sharded = run(0, out)
resumed, result_b, _, _ = run(1, None, resume=f"{out}/checkpoints/checkpoint_0")
rank = dist.get_rank()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"kind": kind, "fsdp": sharded, "world": dist.get_world_size(), "digest": first, "resumed_digest": resumed,
               "start": result_b.start_step, "steps": result_b.step, "losses": result_a.losses[2:],
               "resumed_losses": result_b.losses}, f)
dist.barrier()
dist.destroy_process_group()  # a live gloo group at interpreter exit can abort the process
"""


def launch(cmd: list[str], out: Path) -> list[dict]:
    """Run the worker under `cmd` (a 2-process launcher) and return each rank's report."""
    script = out / "worker.py"
    script.write_text(WORKER)
    run_two_processes([*cmd, script, out])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def check_same_weights_and_exact_resume(ranks: list[dict]) -> None:
    r0, r1 = ranks
    assert r0["world"] == r1["world"] == 2
    assert r0["digest"] == r1["digest"]  # every rank holds the same weights
    assert r0["losses"] != r1["losses"]  # while their data differed
    for r in ranks:  # the resumed run started at step 2 and continued bit for bit
        assert (r["start"], r["steps"]) == (2, 4)
        assert r["resumed_digest"] == r["digest"] and r["resumed_losses"] == r["losses"]


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    ranks = launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"], tmp_path)
    assert ranks[0]["kind"] == "MULTI_CPU" and not ranks[0]["fsdp"]
    check_same_weights_and_exact_resume(ranks)


@pytest.mark.slow
def test_fsdp_two_processes(tmp_path):
    ranks = launch(
        [
            str(BIN / "accelerate"),
            "launch",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--use_fsdp",
            "--fsdp_version",
            "2",
        ],
        tmp_path,
    )
    assert ranks[0]["fsdp"]  # the model's parameters were sharded (DTensors), each rank holding its part
    check_same_weights_and_exact_resume(ranks)
    shards = sorted(p.name for p in (tmp_path / "checkpoints" / "checkpoint_0" / "fsdp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards  # one shard file per rank
