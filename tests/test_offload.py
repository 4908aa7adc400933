"""accelerate's offloading works as for any transformers model: every MoE submodule (routers, experts, attention
experts, task embeddings) computes in its own forward, where accelerate's hooks load its tensors."""

import pytest
import torch
from helpers import trained_like

from moe_adapt import MoEViTConfig, MoEViTForImageClassification, MoEViTModel


@pytest.mark.parametrize("cls", [MoEViTForImageClassification, MoEViTModel])
def test_model_with_part_of_its_backbone_offloaded_to_disk_gives_the_in_memory_outputs(tmp_path, cls):
    torch.manual_seed(0)
    config = MoEViTConfig.from_preset("tiny", tasks=["a", "b"], task_labels={"a": ["x", "y"], "b": ["p", "q", "r"]})
    model = trained_like(cls(config)).eval()
    model.save_pretrained(tmp_path / "model")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    offloaded = cls.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": size // 2}, offload_folder=str(tmp_path / "off")
    ).eval()
    placement = offloaded.hf_device_map
    assert "disk" in placement.values() and "cpu" in placement.values(), placement
    on_disk = [n for n, p in offloaded.named_parameters() if p.is_meta]
    assert any(".experts." in n for n in on_disk) and any(".router." in n for n in on_disk), on_disk
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for task in ("a", "b"):
            want, got = model(x, task=task), offloaded(x, task=task, output_router_probs=True)
            if cls is MoEViTModel:
                torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)
            else:
                torch.testing.assert_close(got.logits, want.logits)
    assert all(p.is_meta for n, p in offloaded.named_parameters() if n in on_disk)  # loaded per forward, not kept
