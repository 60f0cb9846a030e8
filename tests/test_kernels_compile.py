"""Every Triton kernel of the engine compiles for an H100 (sm_90) on the CPU, in the constexpr configurations the
engine launches.

Why: triton's interpreter (the CPU tests of the kernels' numbers) does not type-check the way the compiler does; a
kernel the interpreter runs can still fail to compile, and on the GPU a failed compile only shows as a probe falling
back to the slower path (the eighth session's in-kernel decode merge did so at 1-2 splits, unnoticed until W4 was
measured). triton.compile with an explicit target needs no GPU: the frontend and ptxas (shipped in triton's wheel)
run here. The device's triton (3.6 in 2026-12) may differ from the one installed here; this is the version check
the CPU can do.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)


def compile_for_h100(fn, signature: dict, constexprs: dict) -> None:
    """Compile `fn` for sm_90; constexprs left out take their defaults (as a launch does)."""
    constexprs = dict(constexprs)
    for p in fn.params:
        if p.is_constexpr and p.name not in constexprs and p.has_default:
            constexprs[p.name] = p.default
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    triton.compile(ASTSource(fn, sig, constexprs), target=H100, options={"enable_fp_fusion": True, "num_warps": 4})


def _ptx_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _ptx_available(), reason="triton without its NVIDIA backend")


@pytest.mark.parametrize("merge,max_splits,group", [(False, 1, 7), (True, 1, 7), (True, 2, 7), (True, 16, 7),
                                                     (True, 2, 2), (False, 16, 8)])
def test_paged_decode_kernel_compiles(merge, max_splits, group):
    from qwenvl.engine import attention as A

    fn = A._paged_decode_kernel
    sig = {"Q": "*bf16", "KPool": "*bf16", "VPool": "*bf16", "BlockTables": "*i32", "ContextLens": "*i32",
           "Acc": "*fp32", "M": "*fp32", "L": "*fp32", "Out": "*bf16", "Counters": "*i32"}
    sig.update({n: "i32" for n in fn.arg_names[10:23]})
    sig.update({"sm_scale": "fp32", "num_splits": "i32"})
    compile_for_h100(fn, sig, {"GROUP": group, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_N": 64,
                               "MERGE": merge, "MAX_SPLITS": max_splits, "USE_PDL": False})


@pytest.mark.parametrize("max_splits", [2, 16])
def test_merge_splits_kernel_compiles(max_splits):
    from qwenvl.engine import attention as A

    sig = {"Acc": "*fp32", "M": "*fp32", "L": "*fp32", "Out": "*bf16", "num_splits": "i32", "stride_acc_bh": "i32",
           "stride_acc_s": "i32", "stride_m_bh": "i32", "stride_o_bh": "i32"}
    compile_for_h100(A._merge_splits_kernel, sig, {"HEAD_DIM": 128, "MAX_SPLITS": max_splits})


GEMV_SIG = {"X": "*bf16", "W": "*bf16", "S": "*bf16", "Bias": "*bf16", "Y": "*bf16", "WS": "*fp32", "G": "*bf16",
            "R": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32",
            "stride_rm": "i32", "k_per_split": "i32", "eps": "fp32", "COS": "*bf16", "SIN": "*bf16", "SLOTS": "*i64",
            "QO": "*bf16", "KP": "*bf16", "VP": "*bf16", "stride_cs": "i32"}


@pytest.mark.parametrize("weight", ["*bf16", "*fp8e4nv"])
@pytest.mark.parametrize("case", ["rope", "norm", "silu_res", "split", "dot", "silu_out", "silu_out_4rows"])
def test_gemv_kernel_compiles(weight, case):
    """The decode GEMV's FMA configurations (the q/k/v GEMV with RMSNorm + the rotary/KV epilogue, gate/up with
    RMSNorm, down with silu * up + residual, a split-K one, gate/up with RMSNorm + the silu epilogue in 8- and 4-row
    tiles) and the DOT path, for bf16 and e4m3 weights."""
    from qwenvl.quant import fp8_gemv as G

    fp8 = weight != "*bf16"
    c = {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 512 if fp8 else 1024, "SPLIT": False, "EVEN_K": True,
         "HAS_BIAS": False, "USE_DOT": False, "HAS_SCALE": fp8, "PROLOGUE": 0, "HAS_RES": False, "USE_PDL": False,
         "PIPELINE": False, "VEC": 16 if fp8 else 8}
    c.update({"rope": {"PROLOGUE": 1, "HAS_BIAS": True, "ROPE": True, "RH": 28, "RKV": 4, "RD": 128, "EXACT_MUL": True},
              "norm": {"PROLOGUE": 1},
              "silu_res": {"PROLOGUE": 2, "HAS_RES": True},
              "split": {"SPLIT": True, "EVEN_K": False, "BLOCK_N": 16, "BLOCK_K": 512 // (1 if fp8 else 2),
                        "PROLOGUE": 1},
              "dot": {"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "VEC": 1},
              "silu_out": {"PROLOGUE": 1, "SILU_OUT": True, "EXACT_MUL": True},
              "silu_out_4rows": {"PROLOGUE": 1, "SILU_OUT": True, "EXACT_MUL": True, "BLOCK_N": 4}}[case])
    compile_for_h100(G._fp8_gemv_kernel, {**GEMV_SIG, "W": weight}, c)


def test_small_kernels_compile():
    """The split-K reduce, the rotary + KV write (decode and prefill forms) and silu * up."""
    from qwenvl.engine import rope_kv, silu_mul
    from qwenvl.quant import fp8_gemv as G

    compile_for_h100(G._splitk_reduce_kernel, {"WS": "*fp32", "S": "*bf16", "Bias": "*bf16", "Y": "*bf16", "R": "*bf16",
                                               "M": "i32", "N": "i32", "stride_ym": "i32", "stride_rm": "i32",
                                               "split_k": "i32"},
                     {"BLOCK": 1024, "HAS_BIAS": True, "HAS_SCALE": True, "HAS_RES": True, "USE_PDL": False})
    for rows, kv_out in ((1, False), (8, True)):
        compile_for_h100(rope_kv._rope_write_kv_kernel,
                         {"QKV": "*bf16", "COS": "*bf16", "SIN": "*bf16", "SLOTS": "*i64", "Q": "*bf16", "KP": "*bf16",
                          "VP": "*bf16", "KO": "*bf16", "VO": "*bf16", "N": "i32", "stride_qkv": "i32",
                          "stride_cs": "i32"},
                         {"H": 28, "KV": 4, "D": 128, "ROWS": rows, "KV_OUT": kv_out, "USE_PDL": False})
    compile_for_h100(silu_mul._silu_mul_kernel, {"GU": "*bf16", "Y": "*bf16", "N": "i32", "I": "i32",
                                                 "stride_gu": "i32", "stride_y": "i32"},
                     {"BLOCK": 1024, "ROWS": 4, "LIBDEVICE": True})
