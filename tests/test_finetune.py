"""The fine-tuning path on real tiny models: source task choice, slicing, the new task, each mode, the recipe,
the built-in downstream sets and the bad inputs."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

from moe_adapt import MoEViTConfig, MoEViTForImageClassification
from moe_adapt.adaptation import load_lora
from moe_adapt.adaptation.downstream import builtin_downstream_spec, resolve_dataset_spec
from moe_adapt.adaptation.finetune import (
    FinetuneConfig,
    attach_task,
    choose_source_task,
    finetune,
    load_finetuned,
)
from moe_adapt.analysis import collect_expert_usage, select_experts
from moe_adapt.surgery import extract_submodel
from moe_adapt.training import OptimizerConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def parent_model(seed: int = 0) -> MoEViTForImageClassification:
    """A tiny two-task 'pretrained' model: task b's routers are sharper than a's (lower routing entropy)."""
    torch.manual_seed(seed)
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"], task_labels={"a": list("xyz"), "b": list("pq")})
    model = MoEViTForImageClassification(config)
    for module in model.moe_vit.moe_layers().values():
        torch.nn.init.normal_(module.router.routers["a"].weight, std=0.01)
        torch.nn.init.normal_(module.router.routers["b"].weight, std=2.0)
    return model


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parent")
    parent_model().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    builtin_downstream_spec("digits", root=root)
    return root


def run_config(parent_dir, digits_root, out, **kw) -> FinetuneConfig:
    base = dict(
        model=str(parent_dir),
        dataset={"builtin": "digits", "root": str(digits_root)},
        output_dir=str(out),
        batch_size=16,
        calibration_images=32,
        max_train_images=64,
        max_eval_images=32,
        selection={"policy": "top_n"},
        lora={"r": 2},
        train=TrainConfig(max_steps=4, log_every=0),
    )
    if "lr" in kw:
        base["optimizer"] = OptimizerConfig(lr=kw.pop("lr"), warmup_ratio=0.05)
    base.update(kw)
    return FinetuneConfig(**base)


def test_choose_source_task_by_lowest_entropy():
    model = parent_model()
    data = [torch.randn(4, 3, 32, 32)]
    task, usages, entropies = choose_source_task(model, data)
    assert task == "b" and entropies["b"] < entropies["a"] and set(usages) == {"a", "b"}
    assert choose_source_task(model, data, source_task="a")[0] == "a"
    with pytest.raises(ValueError, match="no task 'zebra'.*'a', 'b'"):
        choose_source_task(model, data, source_task="zebra")


def test_attach_task_starts_from_source_router_rows():
    model = parent_model().eval()
    usage = collect_expert_usage(model, [torch.randn(4, 3, 32, 32)], "b", output_norms=False)
    selection = select_experts(usage, policy="top_n", n=3)
    sub = extract_submodel(model, selection, tasks=["b"])
    new = attach_task(sub, "b", "digits", [str(d) for d in range(10)])
    assert new.config.tasks == ["digits"] and new.heads["digits"].classifier.out_features == 10
    for name, module in model.moe_vit.moe_layers().items():
        kept = selection.experts[name]
        routers = new.moe_vit.moe_layers()[name].router.routers
        assert torch.equal(routers["digits"].weight, module.router.routers["b"].weight[kept])
    assert torch.equal(new.moe_vit.task_embeddings["digits"], model.moe_vit.task_embeddings["b"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # same backbone computation as the slice under the source task
        torch.testing.assert_close(new.moe_vit(x, task="digits").pooler_output, sub.moe_vit(x, task="b").pooler_output)
    # the seed decides the new head's initialisation, and only the head's
    labels = [str(d) for d in range(10)]
    again, other = attach_task(sub, "b", "digits", labels, seed=0), attach_task(sub, "b", "digits", labels, seed=1)
    assert torch.equal(again.heads["digits"].classifier.weight, new.heads["digits"].classifier.weight)
    assert not torch.equal(other.heads["digits"].classifier.weight, new.heads["digits"].classifier.weight)
    assert torch.equal(other.moe_vit.layers[0].layernorm_before.weight, new.moe_vit.layers[0].layernorm_before.weight)


def test_lora_mode_end_to_end_saves_adapter_and_merged(parent_dir, digits_root, tmp_path):
    result = finetune(run_config(parent_dir, digits_root, tmp_path / "run", mode="lora", merge=True), verbose=False)
    report = result.report
    assert result.source_task == "b" and result.task == "digits"
    assert 0 < report.trainable_params < report.total_params
    assert report.flops_per_image > 0 and report.train_images_per_s > 0 and report.peak_memory_mb > 0
    assert 0.0 <= report.metric <= 1.0 and report.metric_name == "accuracy"
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["trainable_params"] == report.trainable_params and saved["mode"] == "lora"
    for folder in ("base", "adapter", "merged"):
        assert (tmp_path / "run" / folder).is_dir()
    merged = load_finetuned(tmp_path / "run")
    assert type(merged) is MoEViTForImageClassification and merged.config.tasks == ["digits"]
    assert merged.config.attn_experts == [2, 0, 2, 0] and merged.config.mlp_experts == [0, 2, 0, 2]  # sliced
    # the adapter reloads onto base/ and matches the merged model
    peft_model = load_lora(
        MoEViTForImageClassification.from_pretrained(tmp_path / "run" / "base"), tmp_path / "run" / "adapter"
    )
    assert isinstance(peft_model, PeftModel)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(x).logits, merged.eval()(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["router", "full"])
def test_router_and_full_modes(parent_dir, digits_root, tmp_path, mode):
    from moe_adapt.adaptation.report import MemoryMeter

    class FivePastBaseline(MemoryMeter):  # a caller's own meter (as the adapt benchmark's RssMeter), by class
        def read_peak(self):
            return self.baseline_mb + 5.0

    parent = MoEViTForImageClassification.from_pretrained(parent_dir)
    result = finetune(
        run_config(parent_dir, digits_root, tmp_path / mode, mode=mode, slice=False),
        verbose=False,
        memory=FivePastBaseline if mode == "full" else None,
    )
    model = result.model
    if mode == "full":
        assert result.report.peak_memory_above_baseline_mb == pytest.approx(5.0)
    if mode == "router":
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("router.routers.digits" in n or n.startswith("heads.digits") for n in trainable)
        # the frozen backbone did not move
        torch.testing.assert_close(
            model.moe_vit.layers[1].mlp.experts.up_proj, parent.moe_vit.layers[1].mlp.experts.up_proj, atol=0, rtol=0
        )
    else:
        assert result.report.trainable_params == result.report.total_params
    assert model.config.mlp_experts == parent.config.mlp_experts  # slice: false keeps every expert
    reloaded = load_finetuned(tmp_path / mode)
    assert type(reloaded) is MoEViTForImageClassification


def test_recipe_runs_from_yaml(parent_dir, digits_root, tmp_path):
    config = {
        "model": str(parent_dir),
        "dataset": {"builtin": "digits", "root": str(digits_root)},
        "output_dir": str(tmp_path / "recipe"),
        "batch_size": 8,
        "calibration_images": 16,
        "max_train_images": 32,
        "max_eval_images": 16,
        "lora": {"r": 2},
        "selection": {"policy": "top_n"},
        "train": {"max_steps": 3, "log_every": 1},
    }
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(config))
    spec = importlib.util.spec_from_file_location("finetune_recipe", ROOT / "recipes" / "finetune.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    recipe.main(
        [
            "--config",
            str(path),
            "--merge",
            "--source-task",
            "a",
            "--validation-fraction",
            "0.25",
            "--lr",
            "0.02",
            "--head-lr",
            "0.05",
            "train.max_steps=2",
        ]
    )
    saved = json.loads((tmp_path / "recipe" / "report.json").read_text())
    assert saved["extra"]["source_task"] == "a" and (tmp_path / "recipe" / "merged" / "config.json").is_file()
    assert (saved["extra"]["lr"], saved["extra"]["head_lr"]) == (0.02, 0.05)
    assert "malloc" not in saved["extra"] and saved["memory_kind"] == "max_rss"  # no allocator plumbing (issue 27)
    # 8 of the 32 (capped) training images held out and evaluated on, instead of the eval split's 16
    extra = saved["extra"]
    assert (extra["train_images"], extra["eval_images"]) == (24, 8) and extra["evaluated_on"].startswith("validation")
    assert saved["train_steps"] == 2  # the dotted override won over the file's 3
    with pytest.raises(ValueError, match=r"train: unknown key\(s\) \['stepz'\]; valid keys: .*'max_steps'"):
        FinetuneConfig.from_yaml(path, ["train.stepz=3"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['steps'\]; valid keys: .*'train'"):
        FinetuneConfig.from_yaml(path, ["steps=3"])  # the flat keys of before are gone


def test_builtin_sets_are_specs(digits_root, tmp_path):
    spec = resolve_dataset_spec({"builtin": "digits", "root": str(digits_root)}, image_size=32)
    assert spec.format == "imagefolder" and spec.num_labels == 10 and spec.image_size == 32
    assert sum(1 for _ in Path(spec.path, "train").rglob("*.png")) == 1347
    textures = builtin_downstream_spec("textures", root=tmp_path)
    assert textures.label_names[:3] == ["brick", "grass", "gravel"]
    assert sum(1 for _ in Path(textures.path, "test").rglob("*.png")) == 360
    with pytest.raises(ValueError, match="Unknown built-in downstream set 'cifar'"):
        builtin_downstream_spec("cifar", root=tmp_path)
    with pytest.raises(ValueError, match="builtin:<name>"):
        resolve_dataset_spec("digits")


def test_bad_inputs(parent_dir, digits_root, tmp_path):
    with pytest.raises(ValueError, match="no task 'zebra'"):
        finetune(run_config(parent_dir, digits_root, tmp_path / "x", source_task="zebra"), verbose=False)
    with pytest.raises(ValueError, match="10 classes .* num_labels=7"):
        finetune(run_config(parent_dir, digits_root, tmp_path / "x", num_labels=7), verbose=False)
    with pytest.raises(ValueError, match="needs a LoRA adapter"):
        run_config(parent_dir, digits_root, tmp_path / "x", mode="full", merge=True)
    with pytest.raises(ValueError, match="rank r=40"):
        finetune(run_config(parent_dir, digits_root, tmp_path / "x", lora={"r": 40}), verbose=False)
    # a model that already has a head for the task, of another size
    model = parent_model()
    with pytest.raises(ValueError, match="dataset has 10 classes but the model's head for task 'a' has 3"):
        attach_task(model, "b", "a", [str(d) for d in range(10)])


def test_attach_task_to_a_multitask_model_with_head_options():
    """The new single-task model drops the source tasks' head options (regression: the demo's LoRA step)."""
    from moe_adapt import MoEViTForMultiTask
    from moe_adapt.adaptation.finetune import attach_task

    config = MoEViTConfig.from_preset(
        "tiny",
        tasks=["cls", "det"],
        task_types={"det": "detection"},
        task_labels={"cls": ["a", "b"], "det": ["x"]},
        head_configs={"det": {"channels": 16, "scales": [1]}},
    )
    model = MoEViTForMultiTask(config).eval()
    new = attach_task(model, "det", "digits", [str(i) for i in range(10)])
    assert new.config.tasks == ["digits"] and new.config.head_configs == {}
    assert new(torch.randn(1, 3, 32, 32), task="digits").logits.shape == (1, 10)


def test_head_lr_is_the_rate_of_the_new_tasks_tensors():
    """In lora mode the LoRA factors train at `lr` and heads/routers at `head_lr`; in full mode the new task's head,
    routers and task embedding train at `head_lr` and the backbone at `lr`. A head_lr of 0 leaves exactly those
    tensors as they were while the rest moves, whatever the task is called. Default: `lr` x 3 (lora), x 20 (full),
    x 1 (router)."""
    from moe_adapt.adaptation import apply_lora, lora_config
    from moe_adapt.adaptation.finetune import HEAD_LR_SCALE, InMemoryDataset, train

    def rate(**kw):
        lr = {"optimizer": OptimizerConfig(lr=kw.pop("lr"))} if "lr" in kw else {}
        return FinetuneConfig(model="m", dataset="d", **lr, **kw).whole_module_learning_rate

    assert HEAD_LR_SCALE == {"lora": 3.0, "full": 20.0, "router": 1.0}
    assert rate(mode="lora") == pytest.approx(3e-2) and rate(mode="lora", lr=2e-3) == pytest.approx(6e-3)
    assert rate(mode="lora", lr=1e-2, head_lr=5e-3) == 5e-3
    assert rate(mode="full") == pytest.approx(1e-2) and rate(mode="full", lr=1e-3) == pytest.approx(2e-2)
    assert rate(mode="full", lr=1e-3, head_lr=1e-3) == 1e-3
    assert rate(mode="router", lr=2e-3) == 2e-3 and rate(mode="router") == 1e-2
    data = InMemoryDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,)))

    def moved_after_training(model, task):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trained, _, _ = train(model, data, task, steps=3, batch_size=8, lr=1e-2, log_every=0, head_lr=0.0)
        after = dict(trained.named_parameters())
        return set(before), {n for n in before if not torch.equal(after[n], before[n])}

    def tiny(task):
        torch.manual_seed(0)
        return MoEViTForImageClassification(
            MoEViTConfig.from_preset("tiny", tasks=[task], task_labels={task: list("abc")})
        )

    lora = apply_lora(tiny("new"), lora_config(tiny("new"), r=2, verbose=False), verbose=False)
    trainable, moved = moved_after_training(lora, "new")
    assert moved and all(".lora_A." in n or ".lora_B." in n for n in moved)
    assert any("heads.new." in n for n in trainable)  # the head was trainable, at rate 0

    # task names that are also words of backbone tensor names ("layers.0.", ".attention.", "lora_")
    for task in ("new", "0", "attention", "lora_A"):
        trainable, moved = moved_after_training(tiny(task), task)
        own = {n for n in trainable if re.search(rf"(heads|routers|task_embeddings)\.{re.escape(task)}(\.|$)", n)}
        assert {f"heads.{task}.classifier.weight", f"moe_vit.task_embeddings.{task}"} <= own, (task, own)
        assert any(".routers." in n for n in own), task
        assert moved == trainable - own, task  # the backbone moved, the new task's own tensors stayed
    with pytest.raises(ValueError, match="no trainable tensor of task 'other'"):
        train(tiny("new"), data, "other", steps=1, batch_size=8, lr=1e-2, log_every=0, head_lr=0.0)


def _rows(pixels: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in pixels.flatten(1)}


def _pairs(ds) -> set[tuple[bytes, int]]:
    return {(ds.pixel_values[i].numpy().tobytes(), int(ds.labels[i])) for i in range(len(ds))}


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("eval_split", [True, False])
def test_validation_fraction_holds_out_training_images(digits_root, augment, eval_split):
    """`validation_fraction` evaluates on held-out training images (never the eval split), disjoint from what is
    trained on, with their own labels, the same draw for every seed, within `max_train_images` / `max_eval_images`;
    with augmentation the held-out images are read unaugmented and training still augments. A dataset without an
    eval split gives its whole training split to the two (no extra 10% set aside)."""
    import dataclasses

    from moe_adapt.adaptation.finetune import load_downstream_data
    from moe_adapt.data import load_task_dataset

    spec = builtin_downstream_spec("digits", root=digits_root)
    spec = spec if eval_split else dataclasses.replace(spec, eval_split=None)

    def load(**kw):
        cfg = FinetuneConfig(model="unused", dataset=spec, max_train_images=200, augment=augment, **kw)
        return load_downstream_data(cfg, 32)

    _, fit, val, _ = load(validation_fraction=0.25)
    _, _, val_seed, _ = load(validation_fraction=0.25, seed=7)
    assert (len(fit), len(val)) == (150, 50)
    assert torch.equal(val.pixel_values, val_seed.pixel_values) and torch.equal(val.labels, val_seed.labels)
    plain = load_task_dataset(spec, split="train", transform="eval")  # every training image, unaugmented
    truth = {(plain[i]["pixel_values"].numpy().tobytes(), int(plain[i]["labels"])) for i in range(len(plain))}
    assert _pairs(val) <= truth  # training images, each with its own label
    if eval_split:
        test = load_task_dataset(spec, split="test", transform="eval")
        assert not _rows(val.pixel_values) & _rows(torch.stack([test[i]["pixel_values"] for i in range(len(test))]))
    if augment:  # a Subset of the augmented split: no held-out index is trained on, and training still augments
        assert isinstance(fit, torch.utils.data.Subset) and len(set(fit.indices)) == len(fit)
        assert not _rows(val.pixel_values) & _rows(torch.stack([plain[i]["pixel_values"] for i in fit.indices]))
        torch.manual_seed(0)
        first = fit[0]["pixel_values"]
        assert not torch.equal(first, fit[0]["pixel_values"])  # random crops and flips on every read
    else:
        assert not _rows(val.pixel_values) & _rows(fit.pixel_values) and _pairs(fit) <= truth
    _, fit_capped, val_capped, _ = load(validation_fraction=0.25, max_eval_images=20)
    assert (len(fit_capped), len(val_capped)) == (150, 20)
    assert torch.equal(val_capped.pixel_values, val.pixel_values[:20])
    for bad in (0, 1, 1.5, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match=f"validation_fraction={bad!r} must be a number strictly between"):
            FinetuneConfig(model="m", dataset="builtin:digits", validation_fraction=bad)
    with pytest.raises(ValueError, match="leaves 0 for validation and 200 for training"):
        load(validation_fraction=0.001)
    with pytest.raises(ValueError, match="leaves 200 for validation and 0 for training"):
        load(validation_fraction=0.999)


def test_augment_mapping_sets_the_training_transform(digits_root):
    """`augment` as a mapping sets the crop scale and flip probability (no flips for digits); True is the defaults;
    unknown keys and other values are errors naming the field."""
    from moe_adapt.adaptation.finetune import load_downstream_data

    spec = builtin_downstream_spec("digits", root=digits_root, image_size=32)

    def train_set(augment):
        cfg = FinetuneConfig(model="unused", dataset=spec, max_train_images=50, augment=augment)
        return load_downstream_data(cfg, 32)[1]

    plain = load_task_dataset_eval(spec)
    mirrored = 0
    torch.manual_seed(0)
    for augment in ({"scale": [1.0, 1.0], "hflip_p": 0.0}, {"scale": [1.0, 1.0], "hflip_p": 1.0}):
        fit = train_set(augment)
        i = fit.indices[0]
        x, ref = fit[0]["pixel_values"], plain[i]["pixel_values"]
        if augment["hflip_p"] == 0.0:
            assert torch.allclose(x, ref, atol=1e-5)  # a full-image crop and no flip: the image itself
        else:
            assert torch.allclose(x, ref.flip(-1), atol=1e-5) and not torch.allclose(x, ref, atol=1e-3)
            mirrored += 1
    assert mirrored == 1
    assert FinetuneConfig(model="m", dataset="builtin:digits", augment={}).augment is True
    with pytest.raises(ValueError, match=r"augment: unknown key\(s\) \['flip'\]"):
        FinetuneConfig(model="m", dataset="builtin:digits", augment={"flip": 0})
    with pytest.raises(ValueError, match="augment='yes' must be true, false or a mapping"):
        FinetuneConfig(model="m", dataset="builtin:digits", augment="yes")


def load_task_dataset_eval(spec):
    from moe_adapt.data import load_task_dataset

    return load_task_dataset(spec, split="train", transform="eval")


def test_memory_meter_reports_the_peak_torch_or_the_os_gives():
    """On CPU the library's meter reads the process's peak RSS from getrusage (no allocator calls, no /proc), never
    below its baseline, and the report says what it measured."""
    import resource

    from moe_adapt.adaptation.report import MemoryMeter, efficiency_report

    model = MoEViTForImageClassification(MoEViTConfig.from_preset("tiny", tasks=["t"], task_labels={"t": list("ab")}))
    meter = MemoryMeter("cpu")
    assert meter.kind == "max_rss" and not meter.resettable
    assert meter.baseline_mb == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, abs=64)
    with meter.track():
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert meter.peak_mb >= meter.baseline_mb and meter.above_baseline_mb >= 0
    common = dict(
        model=model, task="t", name="t", mode="full", images_per_s=1.0, memory=meter, metric_name="accuracy", metric=0.5
    )
    report = efficiency_report(**common)
    assert report.memory_kind == "max_rss" and report.peak_memory_mb == meter.peak_mb
    assert "peak memory (max_rss)" in report.to_console()
    assert efficiency_report(**{**common, "memory": None}).peak_memory_mb is None
