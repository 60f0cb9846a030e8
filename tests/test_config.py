"""Config: both config.json layouts, transformers' handling of missing/unknown keys, presets' sizes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import qwenvl
from qwenvl.config import ModelConfig
from qwenvl.errors import ConfigError
from qwenvl.model import Qwen25VL

HUB_7B = {  # the shape of the Hub config.json of Qwen2.5-VL-7B-Instruct (flat text fields)
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 128000, "max_window_layers": 28, "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


def test_hub_layout_equals_preset():
    cfg = ModelConfig.from_hf_dict(HUB_7B)
    ref = qwenvl.preset("7b")
    assert cfg.text == ref.text and cfg.vision == ref.vision


def test_v5_nested_layout():
    d = {k: v for k, v in HUB_7B.items() if k not in ("hidden_size", "num_hidden_layers", "vocab_size",
                                                       "intermediate_size", "rope_scaling", "tie_word_embeddings")}
    d["text_config"] = {"model_type": "qwen2_5_vl_text", "hidden_size": 3584, "num_hidden_layers": 28,
                        "vocab_size": 152064, "intermediate_size": 18944, "num_attention_heads": 28,
                        "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 128000,
                        "sliding_window": 32768, "max_window_layers": 28,
                        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24],
                                            "rope_theta": 1000000.0}}
    d["tie_word_embeddings"] = False
    d["vision_config"] = dict(d["vision_config"], model_type="qwen2_5_vl_vision")
    assert ModelConfig.from_hf_dict(d).text == qwenvl.preset("7b").text


def test_missing_keys_take_transformers_defaults_and_unknown_are_kept():
    from transformers import Qwen2_5_VLConfig

    cfg = ModelConfig.from_hf_dict({"model_type": "qwen2_5_vl", "my_custom_flag": 3})
    hf = Qwen2_5_VLConfig()
    assert cfg.text.hidden_size == hf.text_config.hidden_size
    assert cfg.text.rms_norm_eps == hf.text_config.rms_norm_eps
    assert cfg.vision.tokens_per_second == hf.vision_config.tokens_per_second
    assert cfg.vision.hidden_size == hf.vision_config.hidden_size
    assert cfg.extra == {"my_custom_flag": 3}
    assert cfg.to_hf_dict()["my_custom_flag"] == 3


def test_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match="model_type 'qwen2_vl'"):
        ModelConfig.from_hf_dict(dict(HUB_7B, model_type="qwen2_vl"))
    with pytest.raises(ConfigError, match="hidden_size.*expected int"):
        ModelConfig.from_hf_dict(dict(HUB_7B, hidden_size="big"))
    with pytest.raises(ConfigError, match="depth"):
        ModelConfig.from_hf_dict(dict(HUB_7B, vision_config=dict(HUB_7B["vision_config"], depth=2.5)))
    with pytest.raises(ConfigError, match="mrope_section"):
        ModelConfig.from_hf_dict(dict(HUB_7B, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 23]})).validate()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown preset"):
        qwenvl.preset("13b")


def test_roundtrip_through_transformers(tmp_path):
    from transformers import Qwen2_5_VLConfig

    cfg = qwenvl.preset("3b")
    cfg.save(tmp_path)
    hf = Qwen2_5_VLConfig.from_pretrained(tmp_path)
    assert hf.text_config.hidden_size == 2048 and hf.text_config.tie_word_embeddings is True
    assert hf.vision_config.out_hidden_size == 2048 and hf.vision_config.tokens_per_second == 2
    # transformers drops sliding_window (None) when use_sliding_window is off; everything else survives
    back = ModelConfig.from_hf_dict(json.loads(hf.to_json_string())).text
    assert back == dataclasses.replace(cfg.text, sliding_window=None)


@pytest.mark.parametrize("name,total,vit", [("3b", 3.755e9, 0.669e9), ("7b", 8.292e9, 0.677e9),
                                            ("72b", 73.41e9, 0.705e9)])
def test_preset_parameter_counts(name, total, vit):
    # REFERENCE.md 1.1: totals computed from the released shapes (tied head counted once)
    with torch.device("meta"):
        m = Qwen25VL(qwenvl.preset(name))
    n = sum(p.numel() for p in m.parameters())
    n_vit = sum(p.numel() for p in m.visual.parameters())
    assert abs(n - total) / total < 2e-3 and abs(n_vit - vit) / vit < 2e-3


def test_nano_preset():
    # docs/NANO.md §1: 11.29 M parameters (ViT 2.89 M + merger 0.79 M + LLM and tied embedding), remapped ids
    cfg = qwenvl.preset("nano").validate()
    with torch.device("meta"):
        m = Qwen25VL(cfg)
    n = sum(p.numel() for p in m.parameters())
    n_vit = sum(p.numel() for k, p in m.visual.named_parameters() if not k.startswith("merger."))
    assert n == 11_292_480 and n_vit == 2_894_208
    assert sum(p.numel() for p in m.visual.merger.parameters()) == 787_648
    assert cfg.text.tie_word_embeddings and cfg.text.vocab_size == 8192 and cfg.text.head_dim == 64
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
            cfg.vision_token_id, cfg.bos_token_id, cfg.eos_token_id) == (8182, 8183, 8179, 8180, 8181, 8170, 8172)
    assert "nano" in qwenvl.config.PRESETS
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_env_flag_switches(monkeypatch):
    from qwenvl.config import env_flag

    monkeypatch.delenv("QWENVL_TEST_FLAG", raising=False)
    assert env_flag("QWENVL_TEST_FLAG", True) is True and env_flag("QWENVL_TEST_FLAG", False) is False
    for word, on in [("1", True), ("On", True), (" yes ", True), ("TRUE", True), ("0", False), ("off", False),
                     ("No", False), ("false", False), ("", True)]:
        monkeypatch.setenv("QWENVL_TEST_FLAG", word)
        assert env_flag("QWENVL_TEST_FLAG", True) is on, word
    monkeypatch.setenv("QWENVL_TEST_FLAG", "maybe")
    with pytest.raises(ConfigError, match="QWENVL_TEST_FLAG='maybe'"):
        env_flag("QWENVL_TEST_FLAG", True)
