"""Every Triton kernel's GPU code, compiled for the H100 (sm_90) on the CPU, without a GPU.

The CPU tests run the kernels under Triton's interpreter, which takes the other side of each device switch (no
libdevice, no programmatic dependent launch, fp32 tiles instead of tl.dot on bf16, no inline PTX multiplies). Those
CUDA-only branches are compiled here by triton's own compiler down to the cubin, with the constexprs and launch
options the wrappers pass on CUDA at the 7B shapes, so an edit that breaks them fails `make test` and not a device
call. Whether they compute the right values is the GPU tests' job (`pytest -m gpu`, through the device tool).
"""

from __future__ import annotations

import inspect
import re
import warnings

import pytest

pytest.importorskip("triton")

import triton  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - a triton without these entry points
    pytest.skip("this triton has no ASTSource / GPUTarget", allow_module_level=True)

SM90 = GPUTarget("cuda", 90, 32)
I32, BF16, FP32 = "i32", "*bf16", "*fp32"
H, KV, D = 28, 4, 128  # the 7B decoder's heads, kv heads, head dim


def compile_sm90(fn, types: dict, constexprs: dict, **options) -> dict:
    """fn's code for sm_90 with the given argument types (triton signature strings) and constexprs: its asm dict
    (ttir, ttgir, llir, ptx, cubin)."""
    # ASTSource takes no defaults: the kernel's own defaults for the constexprs not given (as a launch would)
    defaults = {k: v.default for k, v in inspect.signature(fn.fn).parameters.items()
                if v.default is not inspect.Parameter.empty and k not in types}
    constexprs = {**defaults, **constexprs}
    sig = {**types, **{k: "constexpr" for k in constexprs}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # triton 3.9's notice on the FP-fusion default
        asm = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=SM90, options=options).asm
    assert asm["cubin"] and ".target sm_90" in asm["ptx"], fn.__name__
    return asm


def strides(*names: str) -> dict:
    return {n: I32 for n in names}


def test_batch_invariant_kernels():
    """UPCAST off: tl.dot on bf16 tiles. The matmul takes the warpgroup MMA (wgmma), the 16-row attention tiles
    mma.sync; the interpreter's sum over K (_dot_by_rows) is in neither."""
    from qwenvl.engine import batch_invariant as BI

    mm = compile_sm90(BI._bi_matmul_kernel, {"X": BF16, "W": BF16, "Bias": BF16, "Y": BF16, "M": I32, "N": I32,
                                             "K": I32, **strides("stride_xm", "stride_wn", "stride_ym")},
                      {"HAS_BIAS": True, "BM": BI.BLOCK_M, "BN": BI.block_n(3584), "BK": BI.BLOCK_K, "UPCAST": False},
                      num_warps=4, num_stages=3)
    attn = compile_sm90(BI._bi_attention_kernel, {
        "Q": BF16, "KPool": BF16, "VPool": BF16, "Tables": "*i32", "TileRow0": "*i32", "TileLen": "*i32",
        "TileSeq": "*i32", "Pos": "*i32", "Out": BF16, "qk_scale": "fp32",
        **strides("stride_qn", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs",
                  "stride_vh", "stride_t", "stride_on", "stride_oh")},
        {"GROUP": H // KV, "D": D, "BS": 16, "BM": BI.ATTN_BLOCK_M, "UPCAST": False}, num_warps=4, num_stages=2)
    compile_sm90(BI._bi_rms_norm_kernel, {"H": BF16, "Delta": BF16, "Wt": BF16, "HOut": BF16, "XOut": BF16,
                                          "D": I32, "eps": "fp32", **strides("stride_h", "stride_d", "stride_ho",
                                                                              "stride_xo")},
                 {"HAS_DELTA": True, "BLOCK": 4096}, num_warps=8)
    assert "wgmma" in mm["ptx"] and "mma.sync" in attn["ptx"]
    assert "_dot_by_rows" not in mm["ttir"] + attn["ttir"] and "tt.dot" in mm["ttir"] and "tt.dot" in attn["ttir"]


def test_silu_mul_with_libdevice():
    """CUDA's expf from libdevice (the interpreter has none), for prefill and decode tiles."""
    from qwenvl.engine.silu_mul import _silu_mul_kernel

    for rows, block in ((4, 1024), (1, 256)):
        asm = compile_sm90(_silu_mul_kernel, {"GU": BF16, "Y": BF16, "N": I32, "I": I32,
                                              **strides("stride_gu", "stride_y")},
                           {"BLOCK": block, "ROWS": rows, "LIBDEVICE": True}, num_warps=4)
        assert "ex2.approx" in asm["ptx"]  # libdevice's expf, lowered


def test_rope_write_kv_with_pdl():
    """The rotary + K/V write with programmatic dependent launch (griddepcontrol), for one decode row and blocks
    of 8 rows, storing only to the pools and also returning k and v."""
    from qwenvl.engine.rope_kv import _rope_write_kv_kernel

    types = {"QKV": BF16, "COS": BF16, "SIN": BF16, "SLOTS": "*i64", "Q": BF16, "KP": BF16, "VP": BF16, "KO": BF16,
             "VO": BF16, "N": I32, **strides("stride_qkv", "stride_cs")}
    for rows, kv_out in ((1, False), (8, True)):
        asm = compile_sm90(_rope_write_kv_kernel, types, {"H": H, "KV": KV, "D": D, "ROWS": rows, "KV_OUT": kv_out,
                                                          "USE_PDL": True},
                           num_warps=4 if rows > 1 else 1, enable_fp_fusion=False)
        assert "griddepcontrol" in asm["ptx"]
        assert "fma.rn" not in asm["ptx"]  # no contraction: rounded as the eager ops round


def test_paged_decode_split_and_in_kernel_merge():
    """The split paged decode kernel (the GQA group's 7 heads padded to 16 rows of mma.sync), with its splits
    merged after it and in the kernel, with PDL."""
    from qwenvl.engine.attention import _paged_decode_kernel

    types = {"Q": BF16, "KPool": BF16, "VPool": BF16, "BlockTables": "*i32", "ContextLens": "*i32", "Acc": FP32,
             "M": FP32, "L": FP32, "Out": BF16, "Counters": "*i32",
             **strides("stride_q_b", "stride_q_h", "stride_k_blk", "stride_k_tok", "stride_k_head", "stride_bt_b",
                       "stride_acc_b", "stride_acc_h", "stride_acc_s", "stride_m_b", "stride_m_h", "stride_o_b",
                       "stride_o_h"),
             "sm_scale": "fp32", "num_splits": I32}
    for merge, max_splits in ((False, 16), (True, 2)):
        asm = compile_sm90(_paged_decode_kernel, types, {
            "GROUP": H // KV, "GROUP_PAD": 16, "HEAD_DIM": D, "BLOCK_SIZE": 16, "BLOCK_N": 64, "MERGE": merge,
            "MAX_SPLITS": max_splits, "USE_PDL": True}, num_warps=4, enable_fp_fusion=True)
        assert "mma.sync" in asm["ptx"] and "griddepcontrol" in asm["ptx"]
        assert ("atom.global" in asm["ptx"]) == merge  # the in-kernel merge counts finished splits


def _gemv_types(w: str = "*fp8e4nv") -> dict:
    return {"X": BF16, "W": w, "S": FP32, "Bias": BF16, "Y": BF16, "WS": FP32, "G": BF16, "R": BF16, "M": I32, "N": I32,
            "K": I32, **strides("stride_xm", "stride_wn", "stride_ym", "stride_rm"), "k_per_split": I32,
            "eps": "fp32", "COS": BF16, "SIN": BF16, "SLOTS": "*i64", "QO": BF16, "KP": BF16, "VP": BF16,
            "stride_cs": I32}


def test_fp8_gemv_paths():
    """The GEMV's CUDA-side variants with the configs pick_config gives at the 7B shapes: batch-1 FP8 q/k/v with the
    RMSNorm prologue, the rotary + K/V-write epilogue, exact multiplies (inline PTX), PDL and the pipelined loop;
    the 64-row FP8 gate/up on tl.dot; a narrow bf16 output (512 columns, as a tensor-parallel shard) split over K,
    with the silu * up prologue and the residual add, then its split-K reduction."""
    from qwenvl.quant import fp8_gemv as G

    cfg = G.pick_config(1, (H + 2 * KV) * D, 3584, 132, 1)
    assert not cfg.use_dot and cfg.split_k == 1
    qkv = compile_sm90(G._fp8_gemv_kernel, _gemv_types(), {
        "BLOCK_M": 1, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT": False, "EVEN_K": 3584 % cfg.block_k == 0,
        "HAS_BIAS": True, "USE_DOT": False, "HAS_SCALE": True, "PROLOGUE": 1, "HAS_RES": False, "USE_PDL": True,
        "PIPELINE": True, "VEC": cfg.vec, "ROPE": True, "RH": H, "RKV": KV, "RD": D, "EXACT_MUL": True},
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    assert "griddepcontrol" in qkv["ptx"] and re.search(r"\bmul\.rn(\.ftz)?\.f32", qkv["ptx"])  # libdevice's mul_rn

    cfg = G.pick_config(64, 37888, 3584, 132, 1)
    assert cfg.use_dot
    gate_up = compile_sm90(G._fp8_gemv_kernel, _gemv_types(), {
        "BLOCK_M": 16, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT": False, "EVEN_K": True,
        "HAS_BIAS": False, "USE_DOT": True, "HAS_SCALE": True, "PROLOGUE": 0, "HAS_RES": False, "USE_PDL": True},
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    assert "mma" in gate_up["ptx"]

    N, K = 512, 3584  # a narrow output (a tensor-parallel shard): K is split
    cfg = G.pick_config(1, N, K, 132, 2)
    assert G.normalize_split(-(-K // cfg.block_k), cfg.split_k)[0] > 1
    compile_sm90(G._fp8_gemv_kernel, _gemv_types(w=BF16), {
        "BLOCK_M": 1, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT": True, "EVEN_K": K % cfg.block_k == 0,
        "HAS_BIAS": False, "USE_DOT": False, "HAS_SCALE": False, "PROLOGUE": 2, "HAS_RES": True, "USE_PDL": True,
        "PIPELINE": True, "VEC": cfg.vec}, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    reduce = compile_sm90(G._splitk_reduce_kernel, {"WS": FP32, "S": FP32, "Bias": BF16, "Y": BF16, "R": BF16,
                                                    "M": I32, "N": I32, **strides("stride_ym", "stride_rm"),
                                                    "split_k": I32},
                          {"BLOCK": 1024, "HAS_BIAS": False, "HAS_SCALE": False, "HAS_RES": True, "USE_PDL": True},
                          num_warps=4, enable_fp_fusion=True)
    assert "griddepcontrol" in reduce["ptx"]
