"""FP8 weights on CPU: quantisation bounds, both matmul paths against hand computations, converted
checkpoints, and the logit error of a quantised tiny model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import qwenvl
from qwenvl.errors import CheckpointError
from qwenvl.model import Qwen25VL
from qwenvl.quant import (FP8_QUANT_CONFIG, FP8Linear, compare_logits, dequantize_weight, fp8_backend, fuse_linears,
                          load_fp8, quantize_model_fp8, quantize_weight, save_fp8)
from qwenvl.quant.fp8 import checkpoint_quantization, emulate_scaled_mm, quantize_per_token

from test_parallel import text_image_batch


def weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.02
    w[0] = 0.0  # an all-zero channel
    w[1] *= 1000.0  # a large channel
    w[2, :8] = torch.tensor([1e-8, -1e-7, 3e-3, 1.0, -1.0, 0.5, 1e-5, 2e-2])  # wide range: subnormals of e4m3
    return w


def test_round_trip_within_e4m3_rounding_per_channel():
    w = weights()
    q, s = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (48, 1) and s.dtype == torch.float32
    amax = w.abs().amax(1, keepdim=True)
    assert torch.allclose(s[1:], amax[1:] / 448.0)  # the channel max maps to the largest e4m3 value
    err = (w - dequantize_weight(q, s)).abs()
    # round to nearest with 3 mantissa bits: half a unit in the last place, 2^-4 relative for normal numbers,
    # 2^-10 * scale (half the subnormal step 2^-9) below 2^-6 * scale
    bound = torch.maximum(w.abs() * 2**-4, s * 2**-10)
    assert (err <= bound * (1 + 1e-6)).all()
    assert (err <= s * 2**-3 * torch.maximum(w.abs() / s, torch.ones_like(w))).all()  # the brief's looser form
    assert (dequantize_weight(q, s)[0] == 0).all()


def test_dequant_path_equals_hand_computation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(weights())
    m = FP8Linear.from_linear(lin, backend="dequant")
    x = torch.randn(2, 5, 64)
    hand = x @ (m.weight.float() * m.weight_scale).t() + lin.bias
    # fp32 sums of 64 products in another order differ by a few ulp of the largest term, not of the result
    assert torch.allclose(m(x), hand, atol=1e-5, rtol=1e-5)


def test_dequant_path_fp32_out_keeps_the_product_unrounded():
    """out_dtype=torch.float32 (the engine's fp32 logits from an FP8 head): bf16 inputs, the product in fp32 and
    not rounded to bf16; the default output is the bf16 rounding of a bf16 matmul."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weights())
    m = FP8Linear.from_linear(lin, backend="dequant")
    x = torch.randn(3, 64).to(torch.bfloat16)
    hand = x.float() @ (m.weight.float() * m.weight_scale).t()
    got = m(x, out_dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.allclose(got, hand, atol=1e-5, rtol=1e-5)
    assert m(x).dtype == torch.bfloat16
    assert not torch.equal(got, got.to(torch.bfloat16).float())  # not a widened bf16 result


def test_scaled_mm_path_equals_per_token_emulation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weights())
    m = FP8Linear.from_linear(lin, backend="scaled_mm")
    x = torch.randn(7, 64)
    x[3] *= 100  # an outlier token keeps its own scale
    try:
        got = m(x)
    except (RuntimeError, NotImplementedError) as e:  # CPU _scaled_mm is not in every torch build
        pytest.skip(f"torch._scaled_mm unavailable on CPU: {e}")
    xq, xs = quantize_per_token(x)
    hand = (xq.float() * xs) @ (m.weight.float() * m.weight_scale).t()
    assert torch.allclose(got, hand, atol=1e-5, rtol=1e-5)
    assert torch.allclose(emulate_scaled_mm(x, m.weight, m.weight_scale), hand)
    # Each factor is within half an e4m3 step (2^-4 relative, or 2^-10 x scale below the normal range), so
    # every output is within this bound of the exact product, whatever cancellation the sum has.
    w, s = lin.weight.detach(), m.weight_scale.view(1, -1)
    bound = ((x.abs() @ w.abs().t()) * (2**-3 + 2**-8) + 2**-9 * xs * w.abs().sum(1)[None]
             + 2**-9 * x.abs().sum(1, keepdim=True) * s)
    assert ((got - x @ w.t()).abs() <= bound).all()
    assert ((got - x @ w.t()).norm() / (x @ w.t()).norm()) < 0.08


def test_cpu_backend_is_dequant():
    assert fp8_backend("cpu") == "dequant"


@pytest.mark.parametrize("kind", ["fp8", "bf16"])
def test_fuse_linears_equals_separate(kind):
    torch.manual_seed(0)
    lins = [torch.nn.Linear(64, n, bias=True) for n in (32, 16, 16)]
    mods = [FP8Linear.from_linear(l) for l in lins] if kind == "fp8" else lins
    x = torch.randn(3, 64)
    with torch.no_grad():
        separate = torch.cat([m(x) for m in mods], -1)
        fused = fuse_linears(mods, share=True)
        assert torch.allclose(fused(x), separate, atol=1e-6)
        assert torch.allclose(torch.cat([m(x) for m in mods], -1), separate, atol=1e-6)  # views still work
        assert mods[1].weight.data_ptr() == fused.weight[32:].data_ptr()


@pytest.fixture(scope="module")
def tiny():
    return Qwen25VL.random(qwenvl.preset("tiny"), torch.float32, seed=0)


@torch.no_grad()
def test_logit_error_vs_fp32_and_bf16(tiny, capsys):
    import copy

    b = text_image_batch()
    ref = tiny(**b)
    bf16 = copy.deepcopy(tiny).to(torch.bfloat16)
    bb = dict(b, pixel_values=b["pixel_values"].to(torch.bfloat16))
    q = quantize_model_fp8(copy.deepcopy(tiny))
    assert sum(isinstance(m, FP8Linear) for m in q.modules()) == 7 * 2
    assert not isinstance(q.lm_head, FP8Linear) and q.visual.blocks[0].mlp.up_proj.weight.dtype == torch.float32
    e_fp8 = compare_logits(ref, q(**b), b["attention_mask"])
    e_bf16 = compare_logits(ref, bf16(**bb), b["attention_mask"])
    e_fp8_bf16act = compare_logits(ref, quantize_model_fp8(bf16)(**bb), b["attention_mask"])
    with capsys.disabled():
        print(f"\n[fp8 quality, tiny random model] fp32-act fp8 vs fp32: {json.dumps(e_fp8)}\n"
              f"  bf16 vs fp32: {json.dumps(e_bf16)}\n  bf16-act fp8 vs fp32: {json.dumps(e_fp8_bf16act)}")
    assert e_fp8["rel_err"] < 0.06 and e_fp8["top1_agree"] >= 0.9
    assert e_fp8_bf16act["rel_err"] < 0.06
    # the engine's QWENVL_FP8_LM_HEAD: the head's per-row e4m3 rounding (<= 2^-4 relative a weight) adds its own
    # error to the decoder's, of the same order, not more
    q.lm_head = FP8Linear.from_linear(q.lm_head)
    e_head = compare_logits(ref, q(**b), b["attention_mask"])
    with capsys.disabled():
        print(f"  fp32-act fp8 with the head in fp8 too vs fp32: {json.dumps(e_head)}")
    assert e_fp8["rel_err"] < e_head["rel_err"] < 2 * e_fp8["rel_err"] + 0.02 and e_head["top1_agree"] >= 0.85


@torch.no_grad()
def test_saved_checkpoint_reloads_to_identical_logits(tiny, tmp_path):
    import copy

    q = quantize_model_fp8(copy.deepcopy(tiny))
    save_fp8(q, tmp_path, num_shards=2)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["quantization_config"] == FP8_QUANT_CONFIG
    names = {}
    for f in os.listdir(tmp_path):
        if f.endswith(".safetensors"):
            with safe_open(tmp_path / f, "pt") as sf:
                names.update({n: sf.get_slice(n).get_dtype() for n in sf.keys()})
    assert names["model.layers.0.self_attn.q_proj.weight"] == "F8_E4M3"
    assert names["model.layers.1.mlp.down_proj.weight_scale"] == "F32"
    assert names["lm_head.weight"] == names["visual.blocks.0.mlp.up_proj.weight"] == "F32"
    back = load_fp8(tmp_path, dtype=torch.float32)
    b = text_image_batch()
    assert torch.equal(back(**b), q(**b))
    assert torch.equal(back.generate(**b, max_new_tokens=5), q.generate(**b, max_new_tokens=5))


@torch.no_grad()
def test_reads_v5_layout_and_bf16_scales(tiny, tmp_path):
    """llm-compressor writes the scale in the model dtype; transformers 5 renames the decoder."""
    import copy

    from safetensors.torch import load_file, save_file

    q = quantize_model_fp8(copy.deepcopy(tiny))
    save_fp8(q, tmp_path, layout="v5")
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    assert "model.language_model.layers.0.self_attn.q_proj.weight_scale" in sd
    sd = {k: (v.to(torch.bfloat16) if k.endswith("weight_scale") else v) for k, v in sd.items()}
    save_file(sd, f, metadata={"format": "pt"})
    back = load_fp8(tmp_path, dtype=torch.float32)
    b = text_image_batch()
    assert compare_logits(q(**b), back(**b))["rel_err"] < 1e-2  # only the scales' bf16 rounding differs


def test_rejects_unsupported_quantization_configs():
    cfg = qwenvl.preset("tiny")
    assert checkpoint_quantization(cfg) is None
    cfg.extra["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(CheckpointError, match="not supported"):
        checkpoint_quantization(cfg)
    cfg.extra["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                        "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8,
                                                                            "strategy": "block"}}}}
    with pytest.raises(CheckpointError, match="per-channel"):
        checkpoint_quantization(cfg)


def test_bench_fp8_section_cpu_dry_run(tmp_path):
    """bench/bench_tp_fp8.py (a) on the tiny model: quality numbers, eager decode timing, checks pass."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_tp_fp8

    assert bench_tp_fp8.main(["--shape", "tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    r = json.load(open(tmp_path / "fp8.json"))
    assert r["complete"] and r["fp8_backend"] == "dequant" and r["fp8_decode"]["eager_ms"] > 0
    assert r["fp8_weight_bytes"] < r["bf16_weight_bytes"]
