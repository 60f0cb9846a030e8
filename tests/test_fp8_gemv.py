"""The weight-only FP8 GEMV kernel (qwenvl/quant/fp8_gemv.py).

CPU (make test): the config heuristic on the real shapes, the dispatch rules, and the kernel itself run by
Triton's interpreter in a subprocess (TRITON_INTERPRET=1 must be set before triton is imported) against the
fp32 reference: FMA and tl.dot paths, split-K, bias, ragged K and N, fp16, strided rows. Skipped when triton
is not installed (it is in the test extras).
GPU (`pytest -m gpu tests/test_fp8_gemv.py` through the device tool): the compiled kernel on the 3B/7B/72B
(and tensor-parallel) decoder shapes at M = 1..16, inside a CUDA graph, FP8Linear's dispatch, and the engine's
greedy FP8 decode with the kernel equal to the weight-only path without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qwenvl.quant import FP8Linear
from qwenvl.quant import fp8_gemv as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (N, K) of the decoder linears as the engine runs them: fused qkv, o, fused gate/up, down
SHAPES = {
    "3b": [(2048 + 2 * 256, 2048), (2048, 2048), (2 * 11008, 2048), (2048, 11008)],
    "7b": [(3584 + 2 * 512, 3584), (3584, 3584), (2 * 18944, 3584), (3584, 18944)],
    "72b": [(8192 + 2 * 1024, 8192), (8192, 8192), (2 * 29568, 8192), (8192, 29568)],
    "72b_tp2": [(5120, 8192), (8192, 4096), (29568, 8192), (8192, 14784)],
    "72b_tp4": [(2560, 8192), (8192, 2048), (14784, 8192), (8192, 7392)],
    "7b_unfused": [(512, 3584)],  # k/v alone (the model's own forward, bench_tp_fp8's Decoder)
}


def quantized(N, K, g, device="cpu", std=0.02):
    w = torch.randn(N, K, generator=g, device=device) * std
    scale = (w.abs().amax(1, keepdim=True) / 448.0).clamp(min=1e-12)
    return (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def check(y, x, q, scale, bias) -> dict:
    ref = G.reference(x, q, scale, bias)
    bound = G.error_bound(x, q, scale, bias, ref, y.dtype)
    err = (y.reshape(ref.shape).double() - ref).abs()
    return {"within_bound": bool((err <= bound).all()), "worst_err_over_bound": (err / bound).max().item(),
            "exact_frac": (y.reshape(ref.shape) == ref.to(y.dtype)).float().mean().item()}


# ---------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("M", [1, 2, 4, 8, 16])
def test_pick_config_on_real_shapes(M):
    for name, shapes in SHAPES.items():
        for N, K in shapes:
            c = G.pick_config(M, N, K, num_sms=132)
            assert c.use_dot == (M > 1) and c.block_k & (c.block_k - 1) == 0 and c.block_n >= (16 if c.use_dot else 1)
            k_blocks = -(-K // c.block_k)
            split, per = G.normalize_split(k_blocks, c.split_k)
            assert split == c.split_k and (split - 1) * per < k_blocks <= split * per, (name, N, K, c)  # no empty split
            programs = -(-N // c.block_n) * split * (-(-M // 16) if c.use_dot else M)
            cap, _ = G.normalize_split(k_blocks, G.max_split(M, K))
            assert split <= 16 and 8 * split * M * N <= max(N * K / 10, 8 * M * N), (name, N, K, c)
            if M == 1 and -(-N // 8) >= 2 * 132:  # enough rows: 8-row tiles, unsplit
                assert c.block_n == 8 and split == 1 and c.vec == 16, (name, N, K, c)
            elif M == 1:  # split until a program reads ~64 KiB of weights, not more
                per_program = c.block_n * per * c.block_k
                assert per_program <= G.WEIGHT_BYTES_PER_PROGRAM or split == cap, (name, N, K, c)
                assert split == 1 or c.block_n * (per + 1) * c.block_k > G.WEIGHT_BYTES_PER_PROGRAM // 2
            else:
                assert programs >= 8 * 132 or split == cap, (name, N, K, c, programs)


def test_tuned_table_overrides_heuristic():
    cfg = G.GemvConfig(block_n=8, block_k=512, split_k=3, num_warps=8)
    G.set_tuned({(1, 3584, 18944): cfg.as_dict()})
    try:
        assert G.pick_config(1, 3584, 18944) == cfg and G.pick_config(2, 3584, 18944) != cfg
    finally:
        G.set_tuned(None)
    assert G.pick_config(1, 3584, 18944) != cfg


def test_pick_config_for_2_byte_weights():
    """M == 1 where N gives >= 2 programs of 8 rows per SM: the sweep's [8, 1024] tile (FP8 [8, 512] where N gives
    >= 16 per SM), 4 warps, per-thread sums of one 16-byte load (vec 8 bf16 / 16 e4m3), unsplit; below that the
    tile reads the same bytes per load for both weight sizes ([16, 256] vs [16, 512]) and K is split by bytes (the
    same ~64 KiB of weights per program); tuned FP8 entries do not leak into them."""
    assert G.pick_config(1, 37888, 3584, 132, weight_bytes=2) == G.GemvConfig(8, 1024, 1, 4, 1, False, 8)
    assert G.pick_config(1, 152064, 3584, 132, weight_bytes=2) == G.GemvConfig(8, 1024, 1, 4, 1, False, 8)
    assert G.pick_config(1, 37888, 3584, 132) == G.GemvConfig(8, 512, 1, 4, 1, False, 16)  # 7B gate/up, FP8
    assert G.pick_config(1, 3584, 18944, 132) == G.GemvConfig(8, 1024, 1, 4, 1, False, 16)  # 7B down, FP8
    for name, shapes in SHAPES.items():
        for N, K in shapes + [(1024, 8192), (512, 29568)]:
            c8, c16 = G.pick_config(1, N, K, 132), G.pick_config(1, N, K, 132, weight_bytes=2)
            if -(-N // 8) >= 2 * 132:
                assert c16 == G.GemvConfig(8, min(1024, G.triton_next_pow2(K)), 1, 4, 1, False, 8), (name, N, K)
                assert c8.block_n == 8 and c8.split_k == 1 and c8.vec == 16 and c8.num_warps == 4, (name, N, K)
                continue
            assert not c16.use_dot and c16.block_n * c16.block_k * 2 == c8.block_n * c8.block_k, (name, N, K)
            assert c16.vec == 8 and c8.vec == 16 and c8.block_k % c8.vec == 0, (name, N, K)
            split, per = G.normalize_split(-(-K // c16.block_k), c16.split_k)
            cap = G.normalize_split(-(-K // c16.block_k), G.max_split(1, K))[0]
            assert c16.block_n * per * c16.block_k * 2 <= G.WEIGHT_BYTES_PER_PROGRAM or split == cap, (name, N, K)
            assert G.pick_config(4, N, K, 132, weight_bytes=2).use_dot
    cfg = G.GemvConfig(block_n=8, block_k=512, split_k=3, num_warps=8)
    G.set_tuned({(1, 3584, 18944): cfg.as_dict()})
    try:
        assert G.pick_config(1, 3584, 18944, weight_bytes=2) != cfg
        G.set_tuned({(1, 3584, 18944, 2): cfg.as_dict()})
        assert G.pick_config(1, 3584, 18944, weight_bytes=2) == cfg and G.pick_config(1, 3584, 18944) != cfg
    finally:
        G.set_tuned(None)


def test_gemv_linear_dispatch_on_cpu(monkeypatch):
    """GemvLinear: CPU calls (and every call while the bf16 path is off) are the wrapped nn.Linear itself;
    wrap_linear leaves CPU modules, FP8Linear and subclasses of nn.Linear (tensor-parallel ones) alone; the
    switch comes from QWENVL_BF16_GEMV (on by default) and QWENVL_BF16_GEMV_MAX_M."""
    monkeypatch.delenv("QWENVL_BF16_GEMV", raising=False)
    monkeypatch.delenv("QWENVL_BF16_GEMV_MAX_M", raising=False)
    assert G._env_bf16() == (True, 1)
    monkeypatch.setenv("QWENVL_BF16_GEMV", "0")
    assert G._env_bf16() == (False, 1)
    monkeypatch.setenv("QWENVL_BF16_GEMV", "1")
    monkeypatch.setenv("QWENVL_BF16_GEMV_MAX_M", "4")
    assert G._env_bf16() == (True, 4)
    lin = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    old = G.set_enabled(bf16_enabled=True)
    try:
        assert G.wrap_linear(lin) is lin  # CPU weights
        assert G.wrap_linear(FP8Linear.from_linear(lin)).__class__ is FP8Linear

        class Sub(torch.nn.Linear):
            pass

        with pytest.raises(TypeError, match="plain nn.Linear"):
            G.GemvLinear(Sub(4, 4))
        m = G.GemvLinear(lin)
        x = torch.randn(1, 64, dtype=torch.bfloat16)
        assert not G.use_bf16_gemv(x, lin.weight) and torch.equal(m(x), lin(x))
        assert m.weight is lin.weight and m.bias is lin.bias and (m.in_features, m.out_features) == (64, 32)
        # the rule itself, with the device checks stubbed: rows, dtype and the switch decide
        calls = []
        monkeypatch.setattr(G, "gemv_ok", lambda *a: True)
        monkeypatch.setattr(G, "gemv", lambda *a, **k: calls.append(a[0].shape) or lin(a[0]))
        cuda_like = type("T", (), {"is_cuda": True, "dtype": torch.bfloat16, "device": "cuda",
                                   "numel": lambda self: self.n})
        for rows, dtype, on, want in ((1, torch.bfloat16, True, True), (2, torch.bfloat16, True, False),
                                      (1, torch.float32, True, False), (1, torch.bfloat16, False, False)):
            G.set_enabled(bf16_enabled=on, bf16_max_m=1)
            t = cuda_like()
            t.n, t.dtype = rows * 64, dtype
            assert G.use_bf16_gemv(t, lin.weight) == want, (rows, dtype, on)
    finally:
        G.set_enabled(**old)


def test_dispatch_rules_on_cpu(monkeypatch):
    lin = torch.nn.Linear(64, 32)
    m = FP8Linear.from_linear(lin)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert not m.use_gemv(x)  # CPU tensors never take the kernel outside the interpreter
    monkeypatch.setenv("QWENVL_FP8_GEMV", "0")
    assert not G._env_enabled()
    monkeypatch.setenv("QWENVL_FP8_GEMV", "1")
    assert G._env_enabled()
    old = G.set_enabled(False, max_m=4)
    try:
        assert G.settings() == {"enabled": False, "max_m": 4, "bf16_enabled": old["bf16_enabled"],
                                "bf16_max_m": old["bf16_max_m"], "pdl": old["pdl"]}
    finally:
        G.set_enabled(**old)
    for backend, allowed in (("auto", True), ("gemv", True), ("scaled_mm", False), ("dequant", False)):
        m.backend = backend
        monkeypatch.setattr(G, "use_gemv", lambda *a, **k: True)
        assert m.use_gemv(x) == allowed


def test_kernel_failure_falls_back_to_the_matmul_path(monkeypatch):
    """A kernel that fails at a shape the self-test did not probe: the layer answers through the matmul path (the
    same values as with the kernel off), and the kernel is switched off for every layer; a forced backend raises."""
    m = FP8Linear.from_linear(torch.nn.Linear(64, 32))
    x = torch.randn(1, 64).to(torch.bfloat16)
    expected = m(x)  # CPU: the kernel is never chosen
    monkeypatch.setattr(G, "use_gemv", lambda *a, **k: G.settings()["enabled"])
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(G, "fp8_gemv", broken)
    old = G.set_enabled(True)
    try:
        assert torch.equal(m(x), expected) and calls == [1] and not G.settings()["enabled"]
        assert torch.equal(m(x), expected) and calls == [1]  # off from now on: no second try
        G.set_enabled(True)
        m.backend = "gemv"
        with pytest.raises(RuntimeError, match="PassManager"):
            m(x)
    finally:
        G.set_enabled(**old)


def interpreter_cases() -> list[dict]:
    """Run in a TRITON_INTERPRET=1 process: every code path of the kernel against the fp32 reference."""
    assert G.interpreting(), "TRITON_INTERPRET=1 must be set before triton is imported"
    g = torch.Generator().manual_seed(0)
    C = G.GemvConfig
    cases = [  # M, N, K, bias, x dtype, config (None: the heuristic with 4 "SMs")
        (1, 48, 512, True, torch.bfloat16, None),  # FMA, split-K by the heuristic
        (1, 50, 300, False, torch.bfloat16, None),  # ragged N and K (masked K tail, clamped rows)
        (1, 40, 3584, True, torch.bfloat16, C(16, 256, 1)),  # 7B K, no split, bias fused
        (1, 24, 18944, False, torch.bfloat16, C(8, 512, 5, num_warps=8)),  # down_proj K, last split shorter
        (1, 16, 7392, True, torch.bfloat16, C(16, 256, 4)),  # 72B TP=4 down_proj K: not a multiple of 256
        (2, 40, 272, False, torch.bfloat16, C(16, 64, 1)),  # M > 1 on the FMA path (one program per row)
        (3, 40, 272, True, torch.bfloat16, C(16, 64, 3, use_dot=True)),  # DOT path, split-K, ragged K
        (5, 64, 640, True, torch.bfloat16, C(32, 128, 2, use_dot=True)),
        (16, 72, 3584, True, torch.bfloat16, C(64, 128, 1, use_dot=True)),  # full 16-row tile, bias
        (17, 33, 96, True, torch.bfloat16, None),  # two row blocks, K < BLOCK_K
        (4, 40, 512, True, torch.float16, None),  # fp16 activations (DOT)
        (1, 40, 512, True, torch.float16, C(16, 128, 2)),  # fp16 activations (FMA, split)
        # per-thread partial sums (vec): even K, split, ragged K
        (1, 40, 3584, True, torch.bfloat16, C(16, 512, 1, vec=16)),
        (1, 24, 18944, False, torch.bfloat16, C(16, 512, 5, num_warps=8, vec=16)),
        (1, 50, 300, True, torch.bfloat16, C(16, 128, 1, vec=16)),
        (1, 40, 512, False, torch.float16, C(8, 256, 2, vec=8)),
    ]
    out = []
    for M, N, K, bias, dtype, cfg in cases:
        q, scale = quantized(N, K, g)
        x = (torch.randn(M, K, generator=g) * 3).to(dtype)
        b = torch.randn(N, generator=g).to(dtype) if bias else None
        y = G.fp8_gemv(x, q, scale, b, config=cfg)
        out.append(dict(case=[M, N, K, bias, str(dtype)], config=(cfg or G.pick_config(M, N, K, 4)).as_dict(),
                        dtype_ok=y.dtype == dtype and y.shape == (M, N), **check(y, x, q, scale, b)))
    # a row-offset view of a fused weight (FP8Linear after fuse_linears(share=True)), bf16 scales,
    # a non-contiguous x and a 3-D input
    q, scale = quantized(96, 256, g)
    x = torch.randn(2, 3, 512, generator=g).to(torch.bfloat16)[..., ::2]
    qv, sv = q[32:80], scale[32:80].to(torch.bfloat16)
    y = G.fp8_gemv(x, qv, sv)
    x2 = x.reshape(-1, 256)
    out.append(dict(case="view+bf16 scale+strided x", dtype_ok=y.shape == (2, 3, 48),
                    **check(y.reshape(-1, 48), x2, qv, sv.float(), None)))
    # 2-byte weights (GemvLinear's path): no scale, every code path
    for M, N, K, bias, dtype, cfg in ((1, 48, 512, True, torch.bfloat16, None), (1, 50, 300, False, torch.bfloat16, None),
                                      (1, 24, 2048, False, torch.bfloat16, C(8, 256, 3)),
                                      (5, 64, 640, True, torch.bfloat16, C(32, 128, 2, use_dot=True)),
                                      (1, 40, 512, True, torch.float16, None), (3, 40, 272, False, torch.float16, None),
                                      (1, 48, 2048, True, torch.bfloat16, C(8, 512, 1, vec=8)),
                                      (1, 50, 300, False, torch.bfloat16, C(8, 256, 2, vec=8))):
        w = (torch.randn(N, K, generator=g) * 0.02).to(dtype)
        x = (torch.randn(M, K, generator=g) * 3).to(dtype)
        b = torch.randn(N, generator=g).to(dtype) if bias else None
        y = G.gemv(x, w, None, b, config=cfg)
        out.append(dict(case=["2-byte", M, N, K, bias, str(dtype)],
                        config=(cfg or G.pick_config(M, N, K, 4, 2)).as_dict(),
                        dtype_ok=y.dtype == dtype and y.shape == (M, N), **check(y, x, w, None, b)))
    # FP8Linear end to end (the dispatch, forced: CPU tensors never take it otherwise)
    lin = torch.nn.Linear(256, 48, bias=True)
    m = FP8Linear.from_linear(lin)
    xb = torch.randn(1, 256, generator=g).to(torch.bfloat16)
    y = G.fp8_gemv(xb, m.weight, m.weight_scale, m.bias.to(torch.bfloat16))
    out.append(dict(case="FP8Linear weights", dtype_ok=True,
                    **check(y, xb, m.weight, m.weight_scale, m.bias.to(torch.bfloat16))))
    return out


def check_fused(y, x, q, scale, bias, norm_weight, eps, silu_mul, residual) -> dict:
    """check() for gemv's prologue/epilogue: the float64 result of the same maths (prologue_reference), bounded by
    check's bound on that input, plus the rounding before the residual add, plus 16 u on sum |x||w| for the fp32
    norm product and rsqrt."""
    xe = G.prologue_reference(x, norm_weight, eps, silu_mul)
    ref_y = G.reference(xe, q, scale, bias)
    ref = ref_y + (residual.reshape(ref_y.shape).double() if residual is not None else 0)
    absdot = xe.abs() @ q.double().abs().t() * (scale.reshape(1, -1).double().abs() if scale is not None else 1)
    half_ulp = torch.finfo(y.dtype).eps / 2
    bound = G.error_bound(xe, q, scale, bias, ref_y, y.dtype) + half_ulp * ref.abs() * 1.01 + 16 * 2.0 ** -24 * absdot
    err = (y.reshape(ref.shape).double() - ref).abs()
    return {"within_bound": bool((err <= bound).all()), "worst_err_over_bound": (err / bound).max().item(),
            "exact_frac": (y.reshape(ref.shape) == ref.to(y.dtype)).float().mean().item()}


def fused_case(M, N, K, kind, res, fp8, g, device="cpu", bf16_std=0.05):
    """(weight, scale, x, norm weight, residual) of a gemv prologue/epilogue case: bf16 (normal, bf16_std) or FP8
    weights [N, K], x [M, 2K] for silu * up else [M, K], the norm weight for 'norm', the residual [M, N] if res."""
    if fp8:
        q, scale = quantized(N, K, g, device=device)
    else:
        q, scale = (torch.randn(N, K, generator=g, device=device) * bf16_std).to(torch.bfloat16), None
    x = (torch.randn(M, 2 * K if kind == "silu" else K, generator=g, device=device) * 2).to(torch.bfloat16)
    nw = (torch.rand(K, generator=g, device=device) + 0.5).to(torch.bfloat16) if kind == "norm" else None
    r = torch.randn(M, N, generator=g, device=device).to(torch.bfloat16) if res else None
    return q, scale, x, nw, r


def interpreter_fused_cases() -> list[dict]:
    """gemv's fused RMSNorm / silu*up prologues and residual epilogue (TRITON_INTERPRET=1 process): within
    check_fused's bound, silu * up bit-equal to the eager ops followed by the plain kernel (same roundings), the
    DOT path's torch prologue too, and decode's rotary + KV write kernel bit-equal to the eager ops."""
    from qwenvl.engine.rope_kv import rope_write_kv_ok
    from qwenvl.layers import rms_norm

    g = torch.Generator().manual_seed(5)
    C = G.GemvConfig
    out = []
    for M, N, K, kind, res, fp8, cfg in (
            (1, 40, 512, "norm", True, False, C(8, 128, 1)),  # bf16 weights, rstd from the main loop
            (1, 40, 300, "norm", False, False, C(8, 128, 2)),  # split-K: the row's sum of squares first, ragged K
            (1, 24, 512, "silu", True, False, C(8, 128, 3)),  # silu * up, split-K, the residual in the reduce
            (2, 24, 256, "silu", True, False, C(8, 64, 1)),  # two rows on the FMA path
            (3, 40, 256, "norm", True, False, C(16, 64, 1, use_dot=True)),  # DOT: prologue as torch ops
            (1, 40, 512, "norm", True, True, C(16, 128, 1)),  # FP8 weights, per-channel scale
            (1, 40, 640, "silu", True, True, None),  # FP8, the heuristic (split-K)
            (1, 40, 512, "none", True, True, C(16, 128, 2))):  # the residual alone, split
        q, scale, x, nw, r = fused_case(M, N, K, kind, res, fp8, g)
        y = G.gemv(x, q, scale, None, cfg, norm_weight=nw, eps=1e-6, silu_mul=kind == "silu", residual=r)
        if kind == "norm" and cfg and cfg.use_dot:  # the torch prologue rounds RMSNorm(x) * w as eager does
            bounded = check_fused(y, rms_norm(x, nw, 1e-6), q, scale, None, None, 1e-6, False, r)
        else:
            bounded = check_fused(y, x, q, scale, None, nw, 1e-6, kind == "silu", r)
        row = dict(case=[M, N, K, kind, res, fp8], dtype_ok=y.dtype == x.dtype and y.shape == (M, N), **bounded)
        if kind != "norm" or (cfg and cfg.use_dot):  # the eager ops, then the plain kernel: the same roundings
            xe = rms_norm(x, nw, 1e-6) if kind == "norm" else F.silu(x[:, :K]) * x[:, K:] if kind == "silu" else x
            eager = G.gemv(xe, q, scale, None, cfg)
            row["equal_to_eager"] = bool(torch.equal(y, eager + r if r is not None else eager))
        out.append(row)
    # the pipelined FMA loop (each weight tile loaded one iteration ahead; programmatic dependent launch's path)
    # gives the plain loop's bits: even and ragged K, split-K, FP8, the prologues and the residual
    for M, N, K, kind, fp8, cfg in ((1, 40, 512, "none", False, C(8, 128, 1)), (1, 40, 300, "norm", False, C(8, 128, 2)),
                                    (1, 24, 640, "silu", True, C(16, 128, 3)), (2, 24, 200, "none", True, None)):
        q, scale, x, nw, r = fused_case(M, N, K, kind, True, fp8, g)
        ys = [G.gemv(x, q, scale, None, cfg, norm_weight=nw, silu_mul=kind == "silu", residual=r, _pipeline=p)
              for p in (True, False)]
        out.append(dict(case=["pipelined", M, N, K, kind, fp8], dtype_ok=True, within_bound=True, exact_frac=1.0,
                        equal_to_eager=bool(torch.equal(*ys))))
    # out_dtype float32 (the engine's fp32 logits): the accumulator unrounded, whose bf16 rounding is the default
    # output's bits; close to the float64 product (FMA path, split-K, FP8 weights, the norm prologue)
    for M, N, K, kind, fp8, cfg in ((1, 40, 512, "norm", False, C(8, 128, 1)), (1, 40, 300, "norm", False, C(8, 128, 2)),
                                    (1, 40, 512, "none", True, C(16, 128, 1)), (2, 24, 256, "none", False, None),
                                    (1, 40, 512, "norm", True, C(8, 128, 1))):  # last: an FP8 lm_head with the norm
        q, scale, x, nw, _ = fused_case(M, N, K, kind, False, fp8, g)
        y32 = G.gemv(x, q, scale, None, cfg, norm_weight=nw, eps=1e-6, out_dtype=torch.float32)
        y16 = G.gemv(x, q, scale, None, cfg, norm_weight=nw, eps=1e-6)
        xr = rms_norm(x.double(), nw.double(), 1e-6) if nw is not None else x.double()
        w64 = q.double() * (scale.double().reshape(-1, 1) if scale is not None else 1)
        ref, mag = xr @ w64.T, xr.abs() @ w64.abs().T
        out.append(dict(case=["out_dtype float32", M, N, K, kind, fp8], dtype_ok=y32.dtype == torch.float32,
                        within_bound=bool(((y32.double() - ref).abs() <= 1e-2 * mag + 1e-6).all()),
                        exact_frac=1.0, equal_to_eager=bool(torch.equal(y32.to(x.dtype), y16)  # and not
                                                            and not torch.equal(y32, y16.float()))))  # rounded
    for heads, kv_heads, head_dim in ((4, 2, 16), (28, 4, 128)):  # the tiny model, the 7B shape
        out.append(dict(case=["rope_write_kv", heads, kv_heads, head_dim], dtype_ok=True, within_bound=True,
                        exact_frac=1.0, equal_to_eager=rope_write_kv_ok("cpu", torch.bfloat16, heads, kv_heads,
                                                                        head_dim)))
    from qwenvl.engine.rope_kv import gemv_rope_ok
    for heads, kv_heads, head_dim in ((4, 2, 16), (28, 4, 128)):  # the epilogue: bit-equal to GEMV + rope_write_kv
        for wd in (torch.bfloat16, G.FP8):
            out.append(dict(case=["gemv rope epilogue", heads, kv_heads, head_dim, str(wd)], dtype_ok=True,
                            within_bound=True, exact_frac=1.0,
                            equal_to_eager=gemv_rope_ok("cpu", torch.bfloat16, heads, kv_heads, head_dim, wd)))
    from qwenvl.engine.rope_kv import rope_write_kv
    M, H, KV, D, K = 3, 4, 2, 16, 64  # several rows on the FMA path: each its own cos/sin row and slot
    w = (torch.randn((H + 2 * KV) * D, K, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(w.shape[0], generator=g).to(torch.bfloat16)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    nw = (torch.rand(K, generator=g) + 0.5).to(torch.bfloat16)
    ang = torch.randn(M, D, generator=g) * 3
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    slots = torch.tensor([5, 17, 2])
    pools = [torch.zeros(2, 16, KV, D, dtype=torch.bfloat16) for _ in range(4)]
    cfg = C(8, 32, 1, 4, 1, False, 8)
    q = G.gemv(x, w, None, b, cfg, norm_weight=nw, rope=(cos, sin, slots, pools[0], pools[1], H, KV, D))
    want = rope_write_kv(G.gemv(x, w, None, b, cfg, norm_weight=nw), cos, sin, slots, pools[2], pools[3], H, KV, D)
    out.append(dict(case=["gemv rope epilogue, 3 rows"], dtype_ok=q.shape == (M, H, D), within_bound=True,
                    exact_frac=1.0, equal_to_eager=bool(torch.equal(q, want) and torch.equal(pools[0], pools[2])
                                                        and torch.equal(pools[1], pools[3]))))
    from qwenvl.engine import attention as A
    for heads, kv_heads, head_dim, bs in ((4, 2, 16, 4), (14, 2, 32, 8)):  # GQA groups of 2 and 7 (7B's)
        kp, vp = (torch.randn(41, bs, kv_heads, head_dim, generator=g).to(torch.bfloat16) for _ in range(2))
        q = torch.randn(3, heads, head_dim, generator=g).to(torch.bfloat16)
        bt = torch.randperm(40, generator=g)[:30].view(3, 10).int()
        ctx = torch.tensor([1, bs + 1, 10 * bs], dtype=torch.int32)
        ref = A.decode_attention_gather(q.float(), kp.float(), vp.float(), bt.long(), ctx)
        for splits in (1, 3, 16):  # 16: splits with no tile of their own
            apart = A.decode_attention_triton(q, kp, vp, bt, ctx, num_splits=splits, block_n=16)
            fused = A.decode_attention_triton(q, kp, vp, bt, ctx, num_splits=splits, block_n=16, fused_merge=True)
            err = (fused.float() - ref).abs().max().item()
            out.append(dict(case=["paged decode, in-kernel merge", heads, kv_heads, head_dim, splits],
                            dtype_ok=fused.dtype == q.dtype and fused.shape == q.shape, within_bound=err < 2e-2,
                            exact_frac=1.0, equal_to_eager=bool((fused.float() - apart.float()).abs().max() <= 1e-2
                                                                and A._COUNTERS[torch.device("cpu")].eq(0).all())))
    for S in (2, 3, 16):  # merge_splits_triton against merge_splits, the last split empty
        acc = torch.randn(2, 5, S, 32, generator=g)
        m, lse = torch.randn(2, 5, S, generator=g) * 4, torch.rand(2, 5, S, generator=g) + 0.5
        m[:, :, -1], lse[:, :, -1] = float("-inf"), 0.0
        want, got = A.merge_splits(acc, m, lse, torch.bfloat16), A.merge_splits_triton(acc, m, lse, torch.bfloat16)
        out.append(dict(case=["triton split merge", S], dtype_ok=got.dtype == torch.bfloat16 and got.shape == want.shape,
                        within_bound=bool(((got.float() - want.float()).abs()
                                           <= 2 ** -8 * want.float().abs() + 1e-6).all()),
                        exact_frac=1.0, equal_to_eager=True))
    from qwenvl.engine.fused import silu_mul_eager
    from qwenvl.engine.silu_mul import silu_mul, silu_mul_ok
    for dtype in (torch.bfloat16, torch.float16):  # the probe: one row and a ragged block, within one rounding
        out.append(dict(case=["silu_mul probe", str(dtype)], dtype_ok=True, within_bound=True, exact_frac=1.0,
                        equal_to_eager=silu_mul_ok("cpu", dtype)))
    gu = (torch.randn(9, 2 * 1500, generator=g) * 3).to(torch.bfloat16)  # 3 row blocks, 2 column blocks
    y, want = silu_mul(gu), silu_mul_eager(gu)
    out.append(dict(case=["silu_mul", 9, 3000], dtype_ok=y.dtype == want.dtype and y.shape == want.shape,
                    within_bound=bool(((y.float() - want.float()).abs()
                                       <= torch.finfo(torch.bfloat16).eps * want.float().abs() + 1e-30).all()),
                    exact_frac=(y == want).float().mean().item()))
    # gate/up's silu epilogue: bit-equal to the plain GEMV then the silu_mul kernel (the same roundings, the same
    # exp under the interpreter), within one rounding of F.silu(g) * u; ragged last tile, FP8, 16-row tiles, and the
    # split-K config, where the eager ops run after the kernel
    for M, I, K, fp8, cfg in ((1, 22, 512, False, C(8, 128, 1, 4, 1, False, 8)), (1, 22, 512, True, C(8, 128, 1)),
                              (1, 40, 256, False, C(16, 64, 1)), (1, 22, 640, True, C(8, 128, 3)),
                              (2, 22, 256, False, C(8, 64, 1))):
        q, scale, x, nw, _ = fused_case(M, 2 * I, K, "norm", False, fp8, g)
        got = G.gemv(x, q, scale, None, cfg, norm_weight=nw, eps=1e-6, silu_out=True)
        y = G.gemv(x, q, scale, None, cfg, norm_weight=nw, eps=1e-6)
        want = silu_mul_eager(y)
        out.append(dict(case=["gemv silu epilogue", M, I, K, fp8, cfg.split_k], dtype_ok=got.shape == (M, I)
                        and got.dtype == x.dtype, within_bound=bool(((got.float() - want.float()).abs() <= torch.finfo(
                            x.dtype).eps * want.float().abs() + 1e-30).all()), exact_frac=1.0,
                        equal_to_eager=bool(torch.equal(got, silu_mul(y) if cfg.split_k == 1 else want))))
    out.append(dict(case=["gemv silu epilogue probe"], dtype_ok=True, within_bound=True, exact_frac=1.0,
                    equal_to_eager=G.silu_out_ok("cpu", torch.bfloat16) and G.silu_out_ok("cpu", G.FP8)))
    return out


def interpreter_fused_engine() -> dict:
    """The engine on the tiny model in bf16 (TRITON_INTERPRET=1 process, the CPU standing in for CUDA): greedy
    outputs with batch-1 decode through the fused GEMV layers and the rotary + KV write kernel, and without."""
    from qwenvl import preset
    from qwenvl.engine import LLM, SamplingParams
    from qwenvl.engine.rope_kv import rope_write_kv_ok
    from qwenvl.engine.silu_mul import silu_mul, silu_mul_ok
    from qwenvl.model import Qwen25VL

    G.bf16_route = lambda rows, dtype, device, weight: rows <= 1 and weight.dtype == dtype  # CPU as if CUDA
    calls = {"prologue": 0}
    real = G.gemv

    def spy(*a, **k):
        calls["prologue"] += k.get("norm_weight") is not None or bool(k.get("silu_mul"))
        calls["rope"] = calls.get("rope", 0) + (k.get("rope") is not None)
        calls["silu_out"] = calls.get("silu_out", 0) + bool(k.get("silu_out"))
        return real(*a, **k)

    G.gemv = spy
    model = Qwen25VL.random(preset("tiny"), dtype=torch.bfloat16, device="cpu", seed=0)
    prompts = random_token_prompts(3, seed=2)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    outs, used = {}, {}
    for fused in ("silu_out", True, False):
        llm = LLM(model, num_blocks=256, block_size=16, max_num_seqs=4)
        r = llm.runner
        r.gemv_silu_out = fused == "silu_out"  # silu * up in gate/up's epilogue (else in down's prologue)
        if fused:  # what the runner does on CUDA (wrap_linear, the probes) done by hand; lm_head left to torch
            for L in r.layers:
                L.qkv, L.o, L.gu, L.down = (G.GemvLinear(m) for m in (L.qkv, L.o, L.gu, L.down))
            r.fused_gemv = True
            G.fused_gemv_ok = lambda device, weight_dtype=torch.bfloat16: True  # its probe needs CUDA
            r.fused_rope_kv = rope_write_kv_ok("cpu", torch.bfloat16, r.heads, r.kv_heads, r.head_dim, 16)
            r.gemv_rope = r.fused_rope_kv  # the rotary + KV write in the q/k/v GEMV's epilogue (its own probe)
            if silu_mul_ok("cpu", torch.bfloat16):  # the prefill steps' silu * up (the GEMV layers fuse decode's)
                r.ops.silu_mul = silu_mul
        outs[fused] = [llm.generate([p], params)[0].outputs[0] for p in prompts]
        llm.shutdown()
        if fused:
            used[str(fused)] = {"prologue_calls": calls["prologue"], "rope_kv": r.fused_rope_kv,
                                "gemv_rope_calls": calls.get("rope", 0), "silu_out_calls": calls.get("silu_out", 0),
                                "gemv_rope_plan": all(o[4] for o in r._gemv_plan(1)),
                                "silu_out_plan": all(o[5] for o in r._gemv_plan(1)), "triton_silu": r.triton_silu,
                                "plan_m1": r._gemv_plan(1) is not None, "plan_m2": r._gemv_plan(2) is not None}
            calls.clear()
            calls["prologue"] = 0
    return {"used": used, "outs": {str(k): [[o.token_ids, [{str(t): lp for t, lp in d.items()} for d in o.logprobs]]
                                            for o in v] for k, v in outs.items()}}


def run_interpreter(mode: str, script: str = __file__, timeout: int = 600, env: dict | None = None):
    """`python script mode` in a TRITON_INTERPRET=1 process (env: more variables); its last stdout line as JSON."""
    env = dict(os.environ, **(env or {}), TRITON_INTERPRET="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, os.path.abspath(script), mode], env=env, capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_fused_gemv_and_rope_kv_under_triton_interpreter():
    pytest.importorskip("triton")
    results = run_interpreter("--interpret-fused")
    bad = [r for r in results if not (r["within_bound"] and r["dtype_ok"] and r.get("equal_to_eager", True))]
    assert not bad, bad
    assert sum("equal_to_eager" in r for r in results) >= 16
    assert sum(str(r["case"][0]).startswith("gemv rope epilogue") for r in results) == 5
    assert sum(r["case"][0] == "paged decode, in-kernel merge" for r in results) == 6
    assert sum(r["case"][0] == "out_dtype float32" for r in results) == 5
    assert sum(r["case"][0] == "triton split merge" for r in results) == 3
    assert sum(str(r["case"][0]).startswith("gemv silu epilogue") for r in results) == 6
    # silu * up over several blocks: within one rounding everywhere, nearly all bit-equal (numpy's exp here)
    assert [r["exact_frac"] >= 0.99 for r in results if r["case"][0] == "silu_mul"] == [True], results


def test_engine_fused_decode_layers_under_triton_interpreter():
    """Same greedy tokens (logprobs within 0.1) with the fused decode layers as without, up to a near-tie parting;
    the fused path ran (prologue calls at batch 1 only, the rotary + KV write kernel on)."""
    pytest.importorskip("triton")
    import types

    res = run_interpreter("--interpret-engine")
    for arm, silu_out in (("True", False), ("silu_out", True)):
        u = res["used"][arm]
        assert u["prologue_calls"] > 0 and u["rope_kv"] and u["triton_silu"] and u["plan_m1"] and not u["plan_m2"], u
        assert u["gemv_rope_plan"] and u["gemv_rope_calls"] > 0, u
        assert u["silu_out_plan"] == silu_out and (u["silu_out_calls"] > 0) == silu_out, u

    def outs(key):
        return [types.SimpleNamespace(token_ids=t, logprobs=[{int(k): v for k, v in d.items()} for d in lps])
                for t, lps in res["outs"][key]]

    assert_equal_up_to_near_ties(outs("True"), outs("False"), 6)
    assert_equal_up_to_near_ties(outs("silu_out"), outs("False"), 6)


def test_kernel_under_triton_interpreter():
    pytest.importorskip("triton")
    results = run_interpreter("--interpret")
    bad = [r for r in results if not (r["within_bound"] and r["dtype_ok"])]
    assert not bad, bad
    # one rounding of the fp32 result: nearly every output is the correctly rounded reference (the rest are
    # within the fp32 summation-order difference of a rounding boundary)
    assert all(r["exact_frac"] >= 0.97 for r in results), results


def test_bench_fp8_gemv_cpu_smoke(tmp_path):
    """bench/bench_fp8_gemv.py end to end on the tiny model (the GPU command's code paths: microbench with a
    config sweep, graph-free CPU timing, engine W1 for every variant); the kernel under the interpreter when
    triton is installed."""
    try:
        import triton  # noqa: F401
        interp = {"TRITON_INTERPRET": "1"}
    except ImportError:
        interp = {}
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **interp)
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_fp8_gemv.py"), "--shape", "tiny", "--device", "cpu",
           "--out", str(tmp_path), "--ms", "1,4", "--sweep-ms", "1", "--w1-tokens", "4", "--eq-tokens", "4",
           "--image", "112x112"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    r = json.load(open(tmp_path / "fp8_gemv.json"))
    assert r["complete"] and all(r["checks"].values()) and "micro_error" not in r and "engine_error" not in r
    rows = {(x["linear"], x["M"]): x for x in r["micro"]}
    assert set(rows) == {(n, m) for n in ("qkv", "o_proj", "gate_up", "down_proj", "lm_head") for m in (1, 4)}
    assert set(r["engine"]) >= {"bf16", "fp8_scaled_mm", "fp8_gemv"} and r["issue7_target"]["target"] == 1.7
    if interp:
        assert r["gemv_available"] and all(rows[(n, 1)]["sweep_all_correct"] for n in ("qkv", "down_proj"))
        assert len(rows[("gate_up", 1)]["sweep"]) > 5 and "best_config" in rows[("gate_up", 1)]


# ---------------------------------------------------------------------------------------------- GPU
def _needs_fp8_gpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the kernel needs compute capability >= 8.9 (e4m3 conversions)")
    assert G.gemv_ok("cuda"), "the kernel's self-test failed on this GPU"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", list(SHAPES))
def test_gpu_kernel_matches_reference_on_real_shapes(model):
    _needs_fp8_gpu()
    g = torch.Generator(device="cuda").manual_seed(0)
    for N, K in SHAPES[model]:
        q, scale = quantized(N, K, g, "cuda")
        bias = torch.randn(N, generator=g, device="cuda").to(torch.bfloat16)
        for M in (1, 2, 3, 8, 16):
            x = (torch.randn(M, K, generator=g, device="cuda") * 2).to(torch.bfloat16)
            for b in (None, bias) if M in (1, 8) else (None,):
                r = check(G.fp8_gemv(x, q, scale, b), x, q, scale, b)
                assert r["within_bound"] and r["exact_frac"] > 0.9, (model, N, K, M, r)
        if N * K <= 64 * 2**20:  # splits other than the heuristic's give the same result (up to fp32 order)
            x = torch.randn(1, K, generator=g, device="cuda").to(torch.bfloat16)
            base = G.pick_config(1, N, K, G.num_sms("cuda"))
            for split in (1, 3):
                r = check(G.fp8_gemv(x, q, scale, None, config=dataclasses.replace(base, split_k=split)), x, q,
                          scale, None)
                assert r["within_bound"], (model, N, K, split, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp16_and_views():
    _needs_fp8_gpu()
    g = torch.Generator(device="cuda").manual_seed(1)
    q, scale = quantized(2 * 18944, 3584, g, "cuda")
    qv, sv = q[18944:], scale[18944:]  # up_proj as a view of the fused gate/up weight
    for M in (1, 4):
        x = torch.randn(M, 3584, generator=g, device="cuda").to(torch.float16)
        r = check(G.fp8_gemv(x, qv, sv), x, qv, sv, None)
        assert r["within_bound"], r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_capture():
    _needs_fp8_gpu()
    g = torch.Generator(device="cuda").manual_seed(2)
    q, scale = quantized(3584, 18944, g, "cuda")  # down_proj: split-K (workspace + reduce kernel)
    bias = torch.randn(3584, generator=g, device="cuda").to(torch.bfloat16)
    for M in (1, 4):
        x = torch.randn(M, 18944, generator=g, device="cuda").to(torch.bfloat16)
        G.fp8_gemv(x, q, scale, bias)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = G.fp8_gemv(x, q, scale, bias)
        for _ in range(3):
            x.copy_(torch.randn(M, 18944, generator=g, device="cuda").to(torch.bfloat16))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, G.fp8_gemv(x, q, scale, bias))  # deterministic: fixed split order


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp8linear_dispatch(monkeypatch):
    _needs_fp8_gpu()
    lin = torch.nn.Linear(3584, 4608, bias=True, device="cuda", dtype=torch.bfloat16)
    m = FP8Linear.from_linear(lin)
    calls = []
    real = G.fp8_gemv
    monkeypatch.setattr(G, "fp8_gemv", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    with torch.no_grad():
        for M in (1, 16, 17, 300):
            x = torch.randn(M, 3584, device="cuda", dtype=torch.bfloat16)
            y = m(x)
            ref = G.reference(x, m.weight, m.weight_scale, m.bias)
            assert (y.double() - ref).norm() / ref.norm() < 0.08  # (> 16 rows: the activation-quantised path)
        assert [s[0] for s in calls] == [1, 16]
        old = G.set_enabled(False)
        try:
            m(torch.randn(1, 3584, device="cuda", dtype=torch.bfloat16))
            assert len(calls) == 2
            m.backend = "gemv"  # forced
            m(torch.randn(1, 3584, device="cuda", dtype=torch.bfloat16))
            assert len(calls) == 3
        finally:
            G.set_enabled(**old)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_engine_fp8_greedy_with_kernel_equals_without_up_to_near_ties(monkeypatch):
    """Same FP8 weights, same weight-only maths (bf16 activations, fp8 weights): the kernel (one rounding of
    an fp32 result) vs the dequant path (bf16 matmul, then the scale). Large-M steps use dequant in both.
    The two round differently (an ulp of bf16 per linear), so at random weights greedy tokens may part where the
    top two logits nearly tie (H100 2026-12-05: one request of 8 at its 7th token). Checked: every token before a
    parting has the same logprob within 0.1 on both paths, and at a parting the kernel's token is the dequant
    path's runner-up within 0.1 of its top choice."""
    _needs_fp8_gpu()
    import qwenvl
    from qwenvl.engine import LLM, SamplingParams
    from qwenvl.model import Qwen25VL
    from qwenvl.quant import fp8, quantize_model_fp8

    model = quantize_model_fp8(Qwen25VL.random(qwenvl.preset("tiny"), dtype=torch.bfloat16, device="cuda", seed=0))
    monkeypatch.setitem(fp8._BACKENDS, str(torch.device("cuda", torch.cuda.current_device())), "dequant")
    prompts = random_token_prompts(8, seed=0)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    calls = []
    real = G.gemv  # fp8_gemv's, and the fused decode layers' direct calls; FP8 weights only (the bf16 lm_head
    # runs the same kernel through GemvLinear either way)
    monkeypatch.setattr(G, "gemv", lambda x, w, *a, **k: (w.dtype == G.FP8 and calls.append(1)) or real(x, w, *a, **k))
    outs = {}
    for on in (True, False):
        old = G.set_enabled(on)
        try:
            n0 = len(calls)  # counted while the engine warms up and captures its decode graphs, and eagerly
            llm = LLM(model, num_blocks=1024, block_size=16, max_num_seqs=16)
            assert llm.stats()["cuda_graph_batch_sizes"]
            outs[on] = [o.outputs[0] for o in llm.generate(prompts, params)]
            assert (len(calls) > n0) == on
            llm.shutdown()
        finally:
            G.set_enabled(**old)
    assert_equal_up_to_near_ties(outs[True], outs[False], 8)


def random_token_prompts(n: int, seed: int) -> list[dict]:
    """n prompts of 4-39 random token ids, the same for a seed (the engine tests' requests)."""
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(100, 150000) for _ in range(rng.randrange(4, 40))]}
            for _ in range(n)]


def assert_equal_up_to_near_ties(kernel_outs, other_outs, n_tokens: int | None, tol: float = 0.1) -> None:
    """Greedy outputs of the kernel path vs another path of the same weights: equal tokens with logprobs within
    tol up to a parting, and at a parting the kernel's token is the other path's runner-up within tol of its top
    choice (a near-tie that two roundings may break differently)."""
    for kernel, other in zip(kernel_outs, other_outs):
        assert len(kernel.token_ids) == len(other.token_ids) == (n_tokens or len(other.token_ids))
        for i, (a, b) in enumerate(zip(kernel.token_ids, other.token_ids)):
            lp_k, lp_o = kernel.logprobs[i], other.logprobs[i]
            if a == b:
                assert abs(lp_k[a] - lp_o[b]) < tol, (i, lp_k, lp_o)
                continue
            assert a in lp_o and lp_o[b] - lp_o[a] < tol, f"token {i}: kernel chose {a}, the other path {lp_o}"
            break


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_gemv_matches_reference_on_real_shapes():
    """The 2-byte path (GemvLinear) on the 7B decoder linears and lm_head: within the bound of one rounding of
    the float64 result, M = 1 and 2, with and without bias, and under a CUDA graph."""
    assert G.gemv_ok("cuda", torch.bfloat16), "the bf16 GEMV self-test failed on this GPU"
    g = torch.Generator(device="cuda").manual_seed(3)
    for N, K in SHAPES["7b"] + [(152064, 3584)]:
        w = (torch.randn(N, K, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
        bias = torch.randn(N, generator=g, device="cuda").to(torch.bfloat16)
        for M in (1, 2):
            x = (torch.randn(M, K, generator=g, device="cuda") * 2).to(torch.bfloat16)
            for b in (None, bias):
                r = check(G.gemv(x, w, None, b), x, w, None, b)
                assert r["within_bound"] and r["exact_frac"] > 0.9, (N, K, M, r)
    x = torch.randn(1, K, generator=g, device="cuda").to(torch.bfloat16)
    G.gemv(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = G.gemv(x, w)
    x.copy_(torch.randn(1, K, generator=g, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, G.gemv(x, w))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_prefill_kernels_equal_the_eager_ops_on_real_shapes():
    """The prefill kernels at W2's shape (1,281 rows, 7B): silu * up and the rotary + KV write with the chunk's k
    and v returned, bit-equal to the eager ops (their probes pass on this GPU too)."""
    from qwenvl.engine.rope_kv import rope_write_kv, rope_write_kv_eager
    from qwenvl.engine.fused import silu_mul_eager
    from qwenvl.engine.silu_mul import silu_mul, silu_mul_ok

    assert silu_mul_ok("cuda", torch.bfloat16) and silu_mul_ok("cuda", torch.float16)
    g = torch.Generator(device="cuda").manual_seed(6)
    gu = (torch.randn(1281, 2 * 18944, generator=g, device="cuda") * 3).to(torch.bfloat16)
    assert torch.equal(silu_mul(gu), silu_mul_eager(gu))
    n, H, KV, D = 1281, 28, 4, 128
    qkv = torch.randn(n, (H + 2 * KV) * D, generator=g, device="cuda").to(torch.bfloat16)
    ang = torch.randn(n, D, generator=g, device="cuda") * 50
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    slots = torch.randperm(128 * 16, generator=g, device="cuda")[:n]
    pools = [torch.zeros(128, 16, KV, D, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    got = rope_write_kv(qkv, cos, sin, slots, pools[0], pools[1], H, KV, D, kv_out=True)
    want = rope_write_kv_eager(qkv, cos, sin, slots, pools[2], pools[3], H, KV, D, kv_out=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_gemv_and_rope_kv_on_real_shapes():
    """The engine's fused decode layer pieces on the 7B shapes (bf16 and FP8 weights): RMSNorm prologue on q/k/v
    and gate/up, silu * up prologue + residual on down, residual on o, within check_fused's bound; their probes
    pass; the rotary + KV write kernel equals the eager ops bit for bit."""
    from qwenvl.engine.rope_kv import rope_write_kv_ok

    assert G.fused_gemv_ok("cuda", torch.bfloat16) and rope_write_kv_ok("cuda", torch.bfloat16, 28, 4, 128)
    g = torch.Generator(device="cuda").manual_seed(4)
    (qkv, _), (o, _), (gu, _), (down, K_down) = SHAPES["7b"]
    cases = [(qkv, 3584, "norm", False), (o, 3584, "none", True), (gu, 3584, "norm", False), (down, K_down, "silu", True)]
    for fp8 in (False, True):
        if fp8 and not G.fused_gemv_ok("cuda", G.FP8):
            pytest.fail("the FP8 fused GEMV probe failed on this GPU")
        for N, K, kind, res in cases:
            q, scale, x, nw, r = fused_case(1, N, K, kind, res, fp8, g, device="cuda", bf16_std=0.02)
            y = G.gemv(x, q, scale, None, norm_weight=nw, eps=1e-6, silu_mul=kind == "silu", residual=r)
            c = check_fused(y, x, q, scale, None, nw, 1e-6, kind == "silu", r)
            # a residual adds a second rounding (y rounded, then y + r, as eager): not the one rounding of the exact
            # sum that exact_frac counts, so there the bits must equal the kernel without it, then the eager add
            assert c["within_bound"] and (res or c["exact_frac"] > 0.9), (fp8, N, K, kind, c)
            if res:
                plain = G.gemv(x, q, scale, None, norm_weight=nw, eps=1e-6, silu_mul=kind == "silu")
                assert torch.equal(y, plain + r), (fp8, N, K, kind)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads,kv_heads,hidden", [(16, 2, 2048), (28, 4, 3584), (64, 8, 8192)])
def test_gpu_gemv_rope_epilogue_equals_gemv_then_rope_kv(heads, kv_heads, hidden):
    """The q/k/v GEMV with the rotary + KV-write epilogue, at the 3B/7B/72B shapes with the config the engine
    picks (bf16 and FP8 weights, RMSNorm prologue, bias): q and the pools bit-equal to the GEMV followed by
    rope_write_kv; its probe passes."""
    from qwenvl.engine.rope_kv import gemv_rope_ok, rope_write_kv

    D = 128
    N = (heads + 2 * kv_heads) * D
    g = torch.Generator(device="cuda").manual_seed(7)
    for fp8 in (False, True):
        assert gemv_rope_ok("cuda", torch.bfloat16, heads, kv_heads, D, G.FP8 if fp8 else torch.bfloat16)
        w, scale, x, nw, _ = fused_case(1, N, hidden, "norm", False, fp8, g, device="cuda", bf16_std=0.02)
        assert G.rope_route(1, N, hidden, heads, kv_heads, D, "cuda", w.element_size())
        bias = torch.randn(N, generator=g, device="cuda").to(torch.bfloat16)
        ang = torch.randn(1, D, generator=g, device="cuda") * 50
        cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
        slots = torch.tensor([37], device="cuda")
        pools = [torch.zeros(4, 16, kv_heads, D, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
        q = G.gemv(x, w, scale, bias, norm_weight=nw, rope=(cos, sin, slots, pools[0], pools[1], heads, kv_heads, D))
        y = G.gemv(x, w, scale, bias, norm_weight=nw)
        want = rope_write_kv(y, cos, sin, slots, pools[2], pools[3], heads, kv_heads, D)
        assert torch.equal(q, want) and torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3]), fp8
        assert pools[0].abs().sum() > 0 and pools[1].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("inter,hidden", [(11008, 2048), (18944, 3584), (29568, 8192)])
def test_gpu_gemv_silu_epilogue_equals_gemv_then_silu_mul(inter, hidden):
    """gate/up's GEMV with the silu epilogue at the 3B/7B/72B shapes (bf16 and FP8 weights, RMSNorm prologue), with
    the config the engine picks and with 4- and 16-row tiles: bit-equal to the plain GEMV then silu_mul (and so to
    F.silu(g) * u); its probe passes."""
    from qwenvl.engine.fused import silu_mul_eager
    from qwenvl.engine.silu_mul import silu_mul

    g = torch.Generator(device="cuda").manual_seed(8)
    for fp8 in (False, True):
        assert G.silu_out_ok("cuda", G.FP8 if fp8 else torch.bfloat16)
        w, scale, x, nw, _ = fused_case(1, 2 * inter, hidden, "norm", False, fp8, g, device="cuda", bf16_std=0.02)
        vec = 16 if fp8 else 8
        for cfg in (None, G.GemvConfig(4, 1024, 1, 4, 1, False, vec), G.GemvConfig(16, 512, 1, 8, 1, False, vec)):
            got = G.gemv(x, w, scale, None, cfg, norm_weight=nw, silu_out=True)
            y = G.gemv(x, w, scale, None, cfg, norm_weight=nw)
            assert torch.equal(got, silu_mul(y)) and torch.equal(got, silu_mul_eager(y)), (fp8, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_engine_gemv_silu_out_equals_silu_apart(monkeypatch):
    """The engine with silu * up in gate/up's epilogue (QWENVL_GEMV_SILU_OUT=1): the same tokens and logprobs, bit
    for bit, as with silu_mul between the GEMVs (QWENVL_FUSED_GEMV_SILU=0; the same roundings)."""
    monkeypatch.setenv("QWENVL_FUSED_GEMV", "1")
    outs = {}
    for on in (True, False):
        monkeypatch.setenv("QWENVL_GEMV_SILU_OUT", "1" if on else "0")
        monkeypatch.setenv("QWENVL_FUSED_GEMV_SILU", "0")

        def check(llm, on=on):
            assert llm.stats()["gemv_silu_out"] == on and llm.stats()["fused_gemv_layers"], llm.stats()

        outs[on] = tiny_engine_outputs(5, {}, check)
    assert outs[True] == outs[False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pdl_chain_equals_plain_launches():
    """Programmatic dependent launch (set_enabled(pdl=True)): a chain of GEMVs, each reading the one before
    (a residual, a split-K reduce, the fused prologues), eagerly and replayed from a CUDA graph, bit-equal to plain
    launches: every kernel waits for the previous one's writes before touching memory."""
    if not G.pdl_ok("cuda"):
        pytest.skip("needs compute capability 9.0+ and triton's griddepcontrol")
    g = torch.Generator(device="cuda").manual_seed(6)
    D, I = 3584, 18944
    w_qkv = (torch.randn(4608, D, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    w_gu = (torch.randn(2 * I, D, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    w_down = (torch.randn(D, I, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    q8, s8 = quantized(D, I, g, device="cuda")
    nw = (torch.rand(D, generator=g, device="cuda") + 0.5).to(torch.bfloat16)
    x = torch.randn(1, D, generator=g, device="cuda").to(torch.bfloat16)

    def chain(h):
        for _ in range(3):
            a = G.gemv(h, w_qkv, norm_weight=nw)[:, :D]  # o-sized slice of q/k/v, as a stand-in
            h = G.gemv(G.gemv(h, w_gu, norm_weight=nw), w_down, silu_mul=True, residual=h + a)
            h = G.fp8_gemv(G.gemv(h, w_gu)[:, :I], q8, s8) + h  # FP8 split-K
        return h

    outs = {}
    for pdl in (False, True):
        old = G.set_enabled(pdl=pdl)
        try:
            eager = chain(x)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain(x)
            graph.replay()
            torch.cuda.synchronize()
            outs[pdl] = (eager, out.clone())
        finally:
            G.set_enabled(**old)
    assert torch.equal(outs[True][0], outs[False][0]) and torch.equal(outs[True][1], outs[False][1])
    assert torch.equal(outs[False][0], outs[False][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_engine_with_pdl_equals_without(monkeypatch):
    """The engine with programmatic dependent launch of its Triton kernels (GEMVs with the fused prologues, the
    rotary + KV write, the paged decode attention) inside its decode CUDA graphs: the same tokens and logprobs as
    without, bit for bit (the launches change, not the arithmetic), batch 1 and batched."""
    if not G.pdl_ok("cuda"):
        pytest.skip("needs compute capability 9.0+ and triton's griddepcontrol")
    monkeypatch.setenv("QWENVL_FUSED_GEMV", "1")
    outs = {pdl: tiny_engine_outputs(4, {"pdl": pdl}) for pdl in (True, False)}
    assert outs[True] == outs[False]


def tiny_engine_outputs(seed: int, gemv_settings: dict, check=None) -> list:
    """(token ids, logprobs) of 6 random-token prompts, each alone then all batched, greedy, on the tiny bf16 model
    in an engine with the bf16 GEMV at batch 1 and fp8_gemv.set_enabled(**gemv_settings); check(llm) runs first."""
    import qwenvl
    from qwenvl.engine import LLM, SamplingParams
    from qwenvl.model import Qwen25VL

    model = Qwen25VL.random(qwenvl.preset("tiny"), dtype=torch.bfloat16, device="cuda", seed=0)
    prompts = random_token_prompts(6, seed=seed)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    old = G.set_enabled(bf16_enabled=True, bf16_max_m=1, **gemv_settings)
    try:
        llm = LLM(model, num_blocks=1024, block_size=16, max_num_seqs=16)
        assert llm.stats()["fused_gemv_layers"] and llm.stats()["cuda_graph_batch_sizes"], llm.stats()
        if check is not None:
            check(llm)
        alone = [llm.generate([p], params)[0].outputs[0] for p in prompts]
        batched = [o.outputs[0] for o in llm.generate(prompts, params)]
        llm.shutdown()
    finally:
        G.set_enabled(**old)
    return [(o.token_ids, o.logprobs) for o in alone + batched]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_engine_gemv_rope_equals_without(monkeypatch):
    """The engine with the rotary + KV write in the q/k/v GEMV's epilogue: the same tokens and logprobs, bit for bit,
    as with it after the GEMV (the arithmetic does not change), batch 1 and batched."""
    monkeypatch.setenv("QWENVL_FUSED_GEMV", "1")
    outs = {}
    for on in (True, False):
        monkeypatch.setenv("QWENVL_GEMV_ROPE", "1" if on else "0")

        def check(llm, on=on):
            assert llm.stats()["gemv_rope"] == on, llm.stats()

        outs[on] = tiny_engine_outputs(5, {}, check)
    assert outs[True] == outs[False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_engine_bf16_gemv_greedy_equals_cublas_up_to_near_ties(monkeypatch):
    """The engine with the bf16 GEMV on (the default; decode linears and lm_head through the kernel at batch 1) against
    cuBLAS: same tokens and logprobs (within 0.1) up to a near-tie parting, as for FP8 above."""
    import qwenvl
    from qwenvl.engine import LLM, SamplingParams
    from qwenvl.model import Qwen25VL

    model = Qwen25VL.random(qwenvl.preset("tiny"), dtype=torch.bfloat16, device="cuda", seed=0)
    prompts = random_token_prompts(4, seed=1)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    calls = []
    real = G.gemv
    monkeypatch.setattr(G, "gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = {}
    for on in (True, False):
        old = G.set_enabled(bf16_enabled=on, bf16_max_m=1)
        try:
            n0 = len(calls)  # counted while the engine captures its decode graphs (replays make no calls)
            llm = LLM(model, num_blocks=1024, block_size=16, max_num_seqs=16)
            assert llm.stats()["bf16_gemv"] == on
            outs[on] = [llm.generate([p], params)[0].outputs[0] for p in prompts]  # alone: batch-1 decode
            assert (len(calls) > n0) == on
            llm.shutdown()
        finally:
            G.set_enabled(**old)
    assert_equal_up_to_near_ties(outs[True], outs[False], 8)


if __name__ == "__main__" and "--interpret" in sys.argv:
    print(json.dumps(interpreter_cases()))
if __name__ == "__main__" and "--interpret-fused" in sys.argv:
    print(json.dumps(interpreter_fused_cases()))
if __name__ == "__main__" and "--interpret-engine" in sys.argv:
    print(json.dumps(interpreter_fused_engine()))
