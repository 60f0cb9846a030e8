"""LoRA: the adapter we save loads with `peft` into transformers' model and gives our logits; merging is exact."""

from __future__ import annotations

import json

import pytest
import torch

import qwenvl
from qwenvl.model import Qwen25VL
from qwenvl.train.lora import (LoRALinear, adapters_disabled, apply_lora, load_adapter, merge_lora, save_adapter,
                               target_names)

from reference import hf_model

peft = pytest.importorskip("peft")

VS, VE, IMG = 151652, 151653, 151655


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    hf_model(qwenvl.preset("tiny")).save_pretrained(d)
    return d


def inputs():
    g = torch.Generator().manual_seed(5)
    ids = [151644, 872, 198, VS] + [IMG] * 6 + [VE, 3838, 374, 419, 30, 151645, 198, 151644, 77091, 198]
    return dict(input_ids=torch.tensor([ids]), pixel_values=torch.randn(24, 1176, generator=g),
                image_grid_thw=torch.tensor([[1, 4, 6]]))


def lora_model(base_dir, **kw):
    model = Qwen25VL.from_pretrained(base_dir, dtype=torch.float32)
    names = apply_lora(model, r=4, alpha=8, seed=0, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; make the update visible
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=g)
    return model, names


def test_targets_follow_peft_rules(base_dir):
    model = Qwen25VL.from_pretrained(base_dir, dtype=torch.float32)
    all_linear = target_names(model)
    assert "lm_head" not in all_linear and "visual.blocks.0.attn.qkv" in all_linear
    assert "visual.merger.mlp.0" in all_linear and "model.layers.1.mlp.down_proj" in all_linear
    llm = target_names(model, ["q_proj", "v_proj"], parts=["llm"])
    assert llm == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert not any(n.startswith("visual") for n in target_names(model, ["gate_proj"], parts=["llm"]))


def test_adapter_loads_in_peft_with_the_same_logits(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, names = lora_model(base_dir)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    save_adapter(model, tmp_path / "adapter", str(base_dir))
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and "model.language_model.layers.0.self_attn.q_proj" in cfg["target_modules"]

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    hf = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert sum(1 for m in hf.modules() if hasattr(m, "lora_A") and "default" in m.lora_A) == len(names)
    x = inputs()
    with torch.no_grad():
        ref = hf(**x).logits
        ours = model(**x)
        with adapters_disabled(model):
            base = model(**x)
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours - base).abs().max().item() > 1e-3  # the adapter does change the output

    # Our loader reads the same files back; merging gives the same logits with plain Linear layers.
    again = Qwen25VL.from_pretrained(base_dir, dtype=torch.float32)
    load_adapter(again, tmp_path / "adapter")
    merged = merge_lora(model)
    with torch.no_grad():
        assert (again(**x) - ours).abs().max().item() < 1e-6
        assert (merged(**x) - ours).abs().max().item() < 1e-4
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(Qwen25VL.from_pretrained(base_dir).state_dict())
