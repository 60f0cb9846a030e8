"""Decode's rotary + KV-cache write as one Triton kernel: q/k rotated, q written contiguous, k and v stored at
their slots in the paged pools.

Why: in a batch-1 decode step every small kernel costs a few microseconds of GPU time whatever its size, and a
layer ran three for this (the compiled rotary + split, two index_copy_ for K and V). One program per (row, head)
does the same arithmetic with the same roundings as `DecoderOps.rope_qkv` + `attention.write_kv`:
q*cos and rotate_half(q)*sin each rounded to the model dtype, then their sum rounded (the reference's bf16 ops).

`rope_write_kv_ok` checks the kernel against those eager ops once per shape (CUDA, bf16/fp16, head_dim a power of
two); the runner uses it, where that passed, for every step (QWENVL_FUSED_ROPE_KV=0 turns it off): decode steps and
mixed steps on the varlen plan read their keys from the pools; a lone prefill chunk's attention reads the chunk's
own k and v, which the kernel then also writes out contiguous (`kv_out`).
`gemv_rope_ok` checks the same work done in the epilogue of the q/k/v GEMV (fp8_gemv.gemv(..., rope=...): one kernel
less per layer in batch-1 decode) against the GEMV followed by this kernel, bit for bit.
Runs under TRITON_INTERPRET=1 on CPU tensors for the tests.
"""

from __future__ import annotations

import logging

import torch

from ..quant import fp8_gemv
from ..quant.fp8_gemv import HAVE_TRITON, interpreting, pdl_enabled, tl, triton
from .attention import write_kv
from .fused import split_rope_qkv

log = logging.getLogger(__name__)


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["N"])
    def _rope_write_kv_kernel(QKV, COS, SIN, SLOTS, Q, KP, VP, KO, VO, N, stride_qkv, stride_cs,
                              H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
                              KV_OUT: tl.constexpr = False, USE_PDL: tl.constexpr = False):
        if USE_PDL:  # fp8_gemv's programmatic dependent launch switch: wait for the q/k/v GEMV's writes
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        j = tl.program_id(1)  # head: q heads, then k heads, then v heads
        ok = (rows < N)[:, None]
        rows = tl.minimum(rows, N - 1).to(tl.int64)  # clamped: loads need no mask, the stores have one
        offs = tl.arange(0, D)[None, :]
        src = QKV + rows[:, None] * stride_qkv + j * D
        x = tl.load(src + offs)
        slot = tl.load(SLOTS + rows).to(tl.int64)[:, None]
        if j < H + KV:
            rot = tl.load(src + (offs + D // 2) % D).to(tl.float32)
            rot = tl.where(offs < D // 2, -rot, rot)  # rotate_half: [-x2, x1]
            c = tl.load(COS + rows[:, None] * stride_cs + offs).to(tl.float32)
            s = tl.load(SIN + rows[:, None] * stride_cs + offs).to(tl.float32)
            dt = x.dtype
            out = ((x.to(tl.float32) * c).to(dt).to(tl.float32) + (rot * s).to(dt).to(tl.float32)).to(dt)
            if j < H:
                tl.store(Q + (rows[:, None] * H + j) * D + offs, out, mask=ok)
            else:
                tl.store(KP + (slot * KV + (j - H)) * D + offs, out, mask=ok)
                if KV_OUT:
                    tl.store(KO + (rows[:, None] * KV + (j - H)) * D + offs, out, mask=ok)
        else:
            tl.store(VP + (slot * KV + (j - H - KV)) * D + offs, x, mask=ok)
            if KV_OUT:
                tl.store(VO + (rows[:, None] * KV + (j - H - KV)) * D + offs, x, mask=ok)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                  k_pool: torch.Tensor, v_pool: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                  kv_out: bool = False):
    """qkv [N, (H + 2 KV) D] (rows contiguous), cos/sin [N, D] or [N, 1, D] (model dtype), slots [N] (flat pool
    slots) -> q [N, H, D] rotated; k rotated and v written to k_pool/v_pool [blocks, block_size, KV, D] at slots.
    kv_out: returns (q, k, v) with k (rotated) and v also as contiguous [N, KV, D] tensors (a prefill whose
    attention reads the chunk's own keys)."""
    N = qkv.shape[0]
    H, KV, D = heads, kv_heads, head_dim
    if qkv.shape[-1] != (H + 2 * KV) * D or qkv.stride(-1) != 1:
        raise ValueError(f"rope_write_kv: qkv {tuple(qkv.shape)} is not [N, {(H + 2 * KV) * D}] with contiguous rows")
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("rope_write_kv: the KV pools must be contiguous")
    cos2, sin2 = cos.reshape(N, D), sin.reshape(N, D)
    if cos2.stride(-1) != 1 or sin2.stride(-1) != 1 or cos2.stride(0) != sin2.stride(0):
        cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    q = torch.empty(N, H, D, dtype=qkv.dtype, device=qkv.device)
    k = v = None
    if kv_out:
        k, v = (torch.empty(N, KV, D, dtype=qkv.dtype, device=qkv.device) for _ in range(2))
    if N:
        # no FMA contraction: with it the backend may fold round(a*b) + round(c*d) into fma(a, b, round(c*d))
        # (after narrowing the bf16 products, which is exact), one rounding fewer than the eager ops
        cuda = qkv.is_cuda
        pdl = {"USE_PDL": True, "launch_pdl": True} if cuda and pdl_enabled(qkv.device) else {}
        # a block of rows per program: one (row, head) of 128 values each left ~0.9 TB/s on an H100 at 8192 rows
        rows = 1 if N == 1 else 8
        launch = {"num_warps": 4 if rows > 1 else 1} if cuda else {}
        _rope_write_kv_kernel[(-(-N // rows), H + 2 * KV)](
            qkv, cos2, sin2, slots, q, k_pool, v_pool, k if kv_out else q, v if kv_out else q, N, qkv.stride(0),
            cos2.stride(0), H=H, KV=KV, D=D, ROWS=rows, KV_OUT=kv_out, enable_fp_fusion=False, **launch, **pdl)
    return (q, k, v) if kv_out else q


def rope_write_kv_eager(qkv, cos, sin, slots, k_pool, v_pool, heads: int, kv_heads: int, head_dim: int,
                        kv_out: bool = False):
    """The runner's unfused ops themselves (fused.split_rope_qkv, DecoderOps.rope_qkv's arithmetic, then
    attention.write_kv): what the kernel must equal; q, or (q, k, v) with kv_out."""
    N = qkv.shape[0]
    q, k, v = split_rope_qkv(qkv, cos.reshape(N, 1, head_dim), sin.reshape(N, 1, head_dim), heads, kv_heads, head_dim)
    write_kv(k_pool, v_pool, slots, k, v)
    return (q, k, v) if kv_out else q


_OK: dict[tuple, bool] = {}


def _bit_equal_or_warn(pairs, what: str, reference: str, dev) -> bool:
    """A probe's verdict: every (name, got, want) pair equal bit for bit (same shapes); else a warning that names
    the differing element counts. Synchronises CUDA (probes run before graph capture)."""
    diffs = {name: int((a != b).sum()) if a.shape == b.shape else -1 for name, a, b in pairs}
    ok = not any(diffs.values())
    if not ok:
        log.warning("%s differs from %s (elements differing: %s); not using it", what, reference, diffs)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return ok


def rope_write_kv_ok(device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                     block_size: int = 16) -> bool:
    """Whether the kernel runs here and equals the eager ops bit for bit on random data (once per shape;
    synchronises: call before capturing CUDA graphs)."""
    dev = torch.device(device)
    if not HAVE_TRITON or dtype not in (torch.bfloat16, torch.float16) or head_dim & (head_dim - 1):
        return False
    if dev.type != "cuda" and not interpreting():
        return False
    key = (str(dev), dtype, heads, kv_heads, head_dim, block_size)
    if key in _OK:
        return _OK[key]
    ok = False
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        N, blocks = 3, 4
        qkv = torch.randn(N, (heads + 2 * kv_heads) * head_dim, generator=g, device=dev).to(dtype)
        ang = torch.randn(N, head_dim, generator=g, device=dev) * 3
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        slots = torch.randperm(blocks * block_size, generator=g, device=dev)[:N]
        pools = [torch.zeros(blocks, block_size, kv_heads, head_dim, dtype=dtype, device=dev) for _ in range(4)]
        q = rope_write_kv(qkv, cos, sin, slots, pools[0], pools[1], heads, kv_heads, head_dim)
        want = rope_write_kv_eager(qkv, cos, sin, slots, pools[2], pools[3], heads, kv_heads, head_dim)
        pairs = [("q", q, want), ("k", pools[0], pools[2]), ("v", pools[1], pools[3])]
        # the prefill form: 11 rows (a full block of 8 and a ragged one), k and v also returned
        n2 = 11
        qkv2 = torch.randn(n2, qkv.shape[1], generator=g, device=dev).to(dtype)
        ang2 = torch.randn(n2, head_dim, generator=g, device=dev) * 3
        cos2, sin2 = ang2.cos().to(dtype), ang2.sin().to(dtype)
        slots2 = torch.randperm(blocks * block_size, generator=g, device=dev)[:n2]
        got = rope_write_kv(qkv2, cos2, sin2, slots2, pools[0], pools[1], heads, kv_heads, head_dim, kv_out=True)
        q2, k2, v2 = rope_write_kv_eager(qkv2, cos2, sin2, slots2, pools[2], pools[3], heads, kv_heads, head_dim,
                                         kv_out=True)
        pairs += [("q2", got[0], q2), ("k2", got[1], k2), ("v2", got[2], v2), ("k2 pool", pools[0], pools[2]),
                  ("v2 pool", pools[1], pools[3])]
        ok = _bit_equal_or_warn(pairs, "fused rotary + KV write", "the eager ops", dev)
    except Exception as e:  # compile or launch failure
        log.warning("fused rotary + KV write unavailable (%s: %s)", type(e).__name__, e)
    _OK[key] = ok
    return ok


_GEMV_OK: dict[tuple, bool] = {}


def gemv_rope_ok(device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, weight_dtype: torch.dtype,
                 block_size: int = 16, K: int = 96) -> bool:
    """Whether fp8_gemv.gemv(..., rope=...) runs here and equals gemv() then rope_write_kv bit for bit (random
    weights of `weight_dtype`, bias, the RMSNorm prologue, one decode row; once per shape; synchronises)."""
    dev = torch.device(device)
    key = (str(dev), dtype, heads, kv_heads, head_dim, weight_dtype, block_size)
    if key in _GEMV_OK:
        return _GEMV_OK[key]
    ok = False
    gemv_runs = interpreting() if dev.type != "cuda" else fp8_gemv.gemv_ok(dev, weight_dtype)  # CPU: the tests
    if gemv_runs and rope_write_kv_ok(dev, dtype, heads, kv_heads, head_dim, block_size):
        try:
            g = torch.Generator(device=dev).manual_seed(1)
            N = (heads + 2 * kv_heads) * head_dim
            w = torch.randn(N, K, generator=g, device=dev) * 0.1
            scale = None
            if weight_dtype == fp8_gemv.FP8:
                scale = w.abs().amax(1) / 448.0
                w = (w / scale[:, None]).to(weight_dtype)
            else:
                w = w.to(weight_dtype)
            bias = torch.randn(N, generator=g, device=dev).to(dtype)
            x = torch.randn(1, K, generator=g, device=dev).to(dtype)
            nw = (torch.rand(K, generator=g, device=dev) + 0.5).to(dtype)
            ang = torch.randn(1, head_dim, generator=g, device=dev) * 3
            cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
            slots = torch.tensor([5], device=dev)
            pools = [torch.zeros(2, block_size, kv_heads, head_dim, dtype=dtype, device=dev) for _ in range(4)]
            cfg = (None if fp8_gemv.rope_route(1, N, K, heads, kv_heads, head_dim, dev, w.element_size())
                   else fp8_gemv.GemvConfig(8, 32, 1, 4, 1, False, 16 // w.element_size()))  # one the epilogue takes
            q = fp8_gemv.gemv(x, w, scale, bias, cfg, norm_weight=nw,
                              rope=(cos, sin, slots, pools[0], pools[1], heads, kv_heads, head_dim))
            y = fp8_gemv.gemv(x, w, scale, bias, cfg, norm_weight=nw)
            want = rope_write_kv(y, cos, sin, slots, pools[2], pools[3], heads, kv_heads, head_dim)
            ok = _bit_equal_or_warn([("q", q, want), ("k", pools[0], pools[2]), ("v", pools[1], pools[3])],
                                    "q/k/v GEMV with the rotary + KV write epilogue", "the two kernels", dev)
        except Exception as e:  # compile or launch failure
            log.warning("q/k/v GEMV with the rotary + KV write epilogue unavailable (%s: %s)", type(e).__name__, e)
    _GEMV_OK[key] = ok
    return ok
