"""The pretraining recipe end to end on tiny runs: config files parse and build their models, the run writes its
artefacts, an interrupted and resumed run ends with the same weights, and a real 2-process (gloo) run keeps the
ranks in lockstep with the MI statistics all-reduced."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_two_processes

from moe_adapt.training import PretrainConfig, build_model, build_model_config, load_pretrain_config, pretrain

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"


def tiny_recipe(specs_dir: Path, out: Path, **train) -> dict:
    """A recipe small enough for a test: tiny model, a few images per task, 32 px everywhere."""
    return {
        "seed": 0,
        "output_dir": str(out),
        "data": {"specs": str(specs_dir / "specs.yaml")},
        "model": {"preset": "tiny", "overrides": {"mi_loss_weight": 0.01}},
        "tasks": {
            "fashion": {"batch_size": 4, "eval_max_samples": 8},
            "digits-det": {
                "batch_size": 2,
                "image_size": 32,
                "eval_max_samples": 4,
                "head": {"channels": 8, "num_convs": 1, "scales": [1]},
            },
            "fashion-seg": {
                "batch_size": 2,
                "image_size": 32,
                "eval_max_samples": 4,
                "head": {"channels": 8, "scales": [2, 1], "pool_scales": [1]},
            },
        },
        "sampling": {"strategy": "all_tasks"},
        "loss_weighting": "uncertainty",
        "optimizer": {"lr": 1e-3, "warmup_steps": 1},
        "train": {
            "max_steps": 4,
            "log_every": 1,
            "progress_bar": False,
            "usage_max_batches": 1,
            "num_threads": 1,
            **train,
        },
    }


# -- config files ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mini", "mini_full", "vit-s", "vit-b"])
def test_config_files_parse_and_build_their_model(name):
    config = load_pretrain_config(CONFIGS / f"{name}.yaml")
    model_config = build_model_config(config)
    assert model_config.tasks == list(config.tasks)
    assert set(model_config.task_types.values()) == {"classification", "detection", "semantic_segmentation"}
    with torch.device("meta"):  # paper-scale models: shapes only, nothing allocated
        model = build_model(config)
    assert set(model.heads) == set(config.tasks)
    n = sum(p.numel() for p in model.parameters())
    if name == "vit-s":
        assert (
            model_config.hidden_size == 384 and model_config.attn_experts[0] == 15 and model_config.mlp_experts[1] == 16
        )
        assert [len(model_config.task_labels[t]) for t in config.tasks] == [1000, 80, 150]
    if name == "vit-b":
        assert model_config.hidden_size == 768 and model_config.attn_experts[0] == 24 and n > 100e6


def test_mini_full_differs_from_mini_only_in_length_threads_and_output():
    """The adaptation benchmark's model (mini_full.yaml) differs from the demo's recipe only in how long it trains
    (steps), on how many threads, and where it writes; neither stops at a wall-clock cap before its schedule ends."""
    mini, full = (load_pretrain_config(CONFIGS / f"{n}.yaml").to_dict() for n in ("mini", "mini_full"))
    assert full["train"]["max_steps"] > mini["train"]["max_steps"]
    assert full["train"]["max_minutes"] is None and mini["train"]["max_minutes"] is None
    for cfg in (mini, full):
        for key in ("max_steps", "max_minutes", "num_threads"):
            cfg["train"].pop(key)
        cfg.pop("output_dir")
    assert full == mini


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="tasks.fashion: unknown key.*'batchsize'"):
        PretrainConfig.from_dict({"data": {"mini": {"out": "x"}}, "tasks": {"fashion": {"batchsize": 2}}})
    with pytest.raises(ValueError, match="sampling.strategy='random'"):
        PretrainConfig.from_dict(
            {"data": {"mini": {"out": "x"}}, "tasks": {"f": {}}, "sampling": {"strategy": "random"}}
        )
    misspelt = load_pretrain_config(CONFIGS / "mini.yaml", ["model.overrides={mi_loss_wieght: 0.05}"])
    with pytest.raises(
        ValueError,
        match=r"model.overrides of the recipe \(preset 'mini'.*'mi_loss_wieght' \(did you mean 'mi_loss_weight'",
    ):
        build_model_config(misspelt)
    overridden = load_pretrain_config(CONFIGS / "mini.yaml", ["train.max_steps=7", "sampling.strategy=temperature"])
    assert overridden.train.max_steps == 7 and overridden.sampling.strategy == "temperature"


# -- a tiny run, its artefacts, and exact resume -----------------------------------------------------------------------------
@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_weights(mini_data_dir, tmp_path):
    full = pretrain(PretrainConfig.from_dict(tiny_recipe(mini_data_dir, tmp_path / "full", save_every=2)))
    out = tmp_path / "full"
    for artefact in (
        "model/config.json",
        "model/model.safetensors",
        "model/preprocessor_config.json",
        "metrics.json",
        "expert_usage.png",
        "usage/fashion.json",
        "usage/digits-det.json",
        "checkpoints/checkpoint_0/custom_checkpoint_0.pkl",
    ):
        assert (out / artefact).is_file(), artefact
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["primary"]) == {"fashion", "digits-det", "fashion-seg"} and metrics["steps"] == 4

    # "Interrupted" after step 2: a second run in another folder resumes from the step-2 checkpoint.
    resumed = pretrain(
        PretrainConfig.from_dict(tiny_recipe(mini_data_dir, tmp_path / "resumed")),
        resume=str(out / "checkpoints" / "checkpoint_0"),
    )
    assert resumed["steps_this_run"] == 2
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert full["loss_weights"] == resumed["loss_weights"]  # the uncertainty weights came back too


@pytest.mark.slow
def test_a_last_eval_batch_of_one_image_is_evaluated(mini_data_dir, tmp_path):
    """3 segmentation eval images in batches of 2: the final evaluation's last batch holds one image."""
    recipe = tiny_recipe(mini_data_dir, tmp_path / "run", max_steps=1)
    recipe["tasks"]["fashion-seg"].update(eval_max_samples=3, eval_batch_size=2)
    result = pretrain(PretrainConfig.from_dict(recipe))
    assert 0 <= result["primary"]["fashion-seg"] <= 1
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_failing_final_evaluation_leaves_the_trained_model_saved(mini_data_dir, tmp_path, monkeypatch):
    """The model is saved before the final evaluation: an evaluation that raises cannot lose the training."""
    from moe_adapt import MoEViTForMultiTask
    from moe_adapt.training import pretraining

    trained = {}

    def failing_evaluation(model, *args, **kwargs):  # only the evaluator fails; training and saving are real
        trained.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        raise RuntimeError("the evaluation failed")

    monkeypatch.setattr(pretraining, "evaluate", failing_evaluation)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        pretrain(PretrainConfig.from_dict(tiny_recipe(mini_data_dir, out, max_steps=2)))
    state = MoEViTForMultiTask.from_pretrained(out / "model").state_dict()
    assert trained and state.keys() == trained.keys()
    assert all(torch.equal(state[k], trained[k]) for k in state), [
        k for k in state if not torch.equal(state[k], trained[k])
    ][:5]
    assert not (out / "metrics.json").exists()


# -- 2 processes ------------------------------------------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import hashlib, json, sys
    import torch
    import torch.distributed as dist
    from moe_adapt import MutualInformationLoss
    from moe_adapt.training import PretrainConfig, pretrain

    recipe, out = json.loads(sys.argv[1]), sys.argv[2]
    result = pretrain(PretrainConfig.from_dict(recipe))
    rank = dist.get_rank()
    model = result["model"]
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()

    # MI statistics of different data on each rank: the synced counts must be the sum over ranks.
    torch.manual_seed(100 + rank)
    with torch.no_grad():
        probs = model(torch.randn(2, 3, 32, 32), task="fashion", output_router_probs=True).router_probs
    synced, local = MutualInformationLoss(3), MutualInformationLoss(3, sync=False)
    for mi in (synced, local):
        mi.accumulate(probs, rank)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [m.tolist() for m in local.joint_counts()])
    summed = [torch.tensor(g) for g in gathered[0]]
    for g in gathered[1:]:
        summed = [a + torch.tensor(b) for a, b in zip(summed, g)]
    mi_ok = all(torch.allclose(s, m) for s, m in zip(summed, synced.joint_counts()))
    history = result["history"]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"digest": digest, "mi_ok": mi_ok, "world": dist.get_world_size(),
                   "mi_loss": [h["mi_loss"] for h in history],
                   "fashion_loss": [h["loss/fashion"] for h in history]}, f)
    dist.destroy_process_group()  # a live gloo group at interpreter exit can abort the process (SIGABRT)
    """
)


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_identical_and_all_reduces_mi(mini_data_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    recipe = tiny_recipe(mini_data_dir, tmp_path / "run", max_steps=3)
    recipe["sampling"] = {"strategy": "proportional", "micro_batches_per_step": 2}  # steps that leave a task out
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        json.dumps(recipe),
        str(tmp_path),
    ]
    run_two_processes(cmd)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["digest"] == r1["digest"]  # DDP kept the replicas identical
    assert r0["mi_ok"] and r1["mi_ok"]
    # Every step's MI loss came from the all-reduced statistics: identical on both ranks, while their data differ.
    assert r0["mi_loss"] == r1["mi_loss"] and len(r0["mi_loss"]) == 3
    assert r0["fashion_loss"] != r1["fashion_loss"]
    assert yaml.safe_load((tmp_path / "run" / "metrics.json").read_text())["processes"] == 2


def readme_command(prefix: str) -> list[str]:
    """The README's command line that starts with `prefix`, split into words (its trailing comment dropped)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(prefix):
            return line.split("#", 1)[0].split()
    raise AssertionError(f"README.md shows no command starting with {prefix!r}")


@pytest.mark.slow
def test_readme_torchrun_command_exits_zero_on_every_rank(mini_data_dir, tmp_path):
    """The README's two-process command exactly as written, plus dotted overrides that make it a few steps long
    on the small mini benchmark. torchrun exits 0 only when every rank did."""
    cmd = readme_command("torchrun --nproc_per_node 2 recipes/pretrain.py")
    assert cmd[:2] == ["torchrun", "--nproc_per_node"]
    cmd[0] = str(Path(sys.executable).with_name("torchrun"))
    cmd += [
        f"output_dir={tmp_path / 'run'}",
        f"data.mini.out={mini_data_dir}",
        "data.mini.small=true",
        "train.max_steps=2",
        "train.max_minutes=null",
        "train.progress_bar=false",
        "train.num_threads=1",
    ]
    cmd += [f"tasks.{t}.eval_max_samples=8" for t in ("fashion", "digits-det", "fashion-seg")]
    output = run_two_processes(cmd)
    assert "Traceback" not in output, output[-4000:]
    assert output.count("fashion: accuracy = ") == 1  # the main process reports, once
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["processes"] == 2
