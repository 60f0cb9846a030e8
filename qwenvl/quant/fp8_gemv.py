"""Weight-only FP8 GEMV/skinny GEMM for decode: y[M, N] = x[M, K] @ (W[N, K] * scale[N])^T (+ bias), small M.

Why: at batch 1..16 a decode step is bound by reading weights. The scaled_mm path (fp8.py) quantises the
activations (extra kernels), pads M to 16 and runs cuBLAS kernels not tuned for M=1, so FP8 decoded slower
than bf16. This kernel reads each e4m3 weight byte once, converts it in registers and multiplies it with the
bf16/fp16 activation in fp32; the per-output-channel scale (and the bias) are applied once per output, then
one rounding to the activation dtype. The activations are not quantised: it is the "dequant" path's maths
(weight-only), with fp32 accumulation and a single final rounding.

Two code paths in one kernel (constexpr USE_DOT):
  FMA  (M == 1 by default): a [BLOCK_N, BLOCK_K] tile of fp8 rows (BLOCK_K contiguous bytes per row: 16-byte
       vector loads), w.to(fp32) * x into an fp32 register tile, summed over K once at the end. With
       GemvConfig.vec each thread first sums the products of its own 16-byte load, so the register tile is
       vec times smaller and more programs (more loads in flight) fit an SM: the M = 1 default since the seventh
       session's sweep (FP8 gate/up 50.1 -> 46.3 us, down 29.8 -> 26.6 us on an H100).
  DOT  (M > 1): out^T = W @ x^T with tl.dot on a [BLOCK_N, BLOCK_K] weight tile converted to the activation
       dtype (exact: e4m3 fits in bf16/fp16) and x padded to BLOCK_M = 16 rows (swap-AB: the weight tile is
       the big operand), fp32 accumulator.
Split-K (SPLIT_K > 1): when cdiv(N, BLOCK_N) programs cannot keep the memory system busy (o_proj, down_proj,
k/v at TP), each program does a K range and writes an fp32 partial to a workspace [SPLIT_K, M, N]; a second
small kernel sums the partials in a fixed order (deterministic), applies scale and bias and rounds.

The config is picked from the shape (`pick_config`; `set_tuned` overrides it per (M, N, K), e.g. with the
winners of bench/bench_fp8_gemv.py). No autotuning at run time, no host sync, the only allocations are the
output and the fixed-size workspace: CUDA-graph capturable (compile happens on the first eager call: the
engine runs every bucket eagerly before capturing it).

Dispatch (FP8Linear.forward): `use_gemv(x, ...)`: CUDA, triton importable, x bf16/fp16, M <= max_m (default
16), compute capability >= 8.9 (triton's e4m3 conversion), the kernel probed once per device against an fp32
reference (`gemv_ok`). Switch: env QWENVL_FP8_GEMV=0 (off) / QWENVL_FP8_GEMV_MAX_M, or `set_enabled()`.

bf16/fp16 weights (`gemv`, no scale): the same kernel reads 2-byte weights. Why: at batch 1 the bf16 decode step
is bound by reading 14 GB of weights, and cuBLAS's GEMV reaches ~2.4 TB/s on the 7B shapes (PEERS.md: 5.87 ms per
step in one CUDA graph, a ~170 tok/s ceiling, below the issue's 190). `GemvLinear` routes an nn.Linear's small-M
calls through it; on CUDA the engine wraps its decoder linears and lm_head (QWENVL_BF16_GEMV=0 turns it off), for
M <= QWENVL_BF16_GEMV_MAX_M (default 1: batch-1 decode and single-row logits). Measured on an H100, 7B, M = 1
(docs/BENCHMARKS.md 2026-12-05): a step's linears 4.90 ms against cuBLAS's 5.26 (3.0-3.1 TB/s on gate_up, down
and lm_head), engine W1 decode +5 % (heuristic configs) / +8 % (swept configs).

CPU testing: in a process started with TRITON_INTERPRET=1 (set before triton is imported: triton's own library
functions such as tl.sum must be interpreted too), fp8_gemv on CPU tensors runs these same kernel functions
under Triton's interpreter; e4m3 loads and casts work there (checked with triton 3.9).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import torch
import torch.nn.functional as F

from ..config import env_flag

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # CPU builds of torch come without triton
    triton = tl = None
    HAVE_TRITON = False

FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------------------------------------- switch
def _env_enabled() -> bool:
    return env_flag("QWENVL_FP8_GEMV", True)


def _env_max_m() -> int:
    return int(os.environ.get("QWENVL_FP8_GEMV_MAX_M", "16"))


def _env_bf16() -> tuple[bool, int]:
    return env_flag("QWENVL_BF16_GEMV", True), int(os.environ.get("QWENVL_BF16_GEMV_MAX_M", "1"))


_bf16_on, _bf16_max_m = _env_bf16()
# "pdl": programmatic dependent launch (Hopper+): each GEMV may be scheduled while the kernel before it finishes,
# waits for its writes (griddepcontrol.wait) and lets the next kernel launch early. Off unless QWENVL_GEMV_PDL=1
# until measured (docs/BENCHMARKS.md, sixth session).
_STATE = {"enabled": _env_enabled(), "max_m": _env_max_m(), "bf16_enabled": _bf16_on, "bf16_max_m": _bf16_max_m,
          "pdl": env_flag("QWENVL_GEMV_PDL", False)}


def set_enabled(enabled: bool | None = None, max_m: int | None = None, bf16_enabled: bool | None = None,
                bf16_max_m: int | None = None, pdl: bool | None = None) -> dict:
    """Turn the FP8 GEMV path (enabled, max_m) and the bf16/fp16 one of GemvLinear (bf16_enabled, bf16_max_m)
    on/off and set the largest M each takes, and programmatic dependent launch of the kernels (pdl) (None: leave
    as is). Returns the old settings (pass them back as keywords to restore). Takes effect for eager calls at
    once; a captured CUDA graph keeps the kernels it recorded."""
    old = dict(_STATE)
    for key, val in (("enabled", enabled), ("max_m", max_m), ("bf16_enabled", bf16_enabled),
                     ("bf16_max_m", bf16_max_m), ("pdl", pdl)):
        if val is not None:
            _STATE[key] = type(_STATE[key])(val)
    return old


def settings() -> dict:
    return dict(_STATE)


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    use_dot: bool = False
    vec: int = 1  # FMA path: each thread first sums `vec` contiguous products (vec x fewer fp32 accumulators)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_TUNED: dict[tuple[int, int, int], GemvConfig] = {}


def set_tuned(table: dict | None) -> None:
    """Per-shape configs {(M, N, K): GemvConfig or its dict} used instead of pick_config's heuristic; None
    clears them."""
    _TUNED.clear()
    for key, cfg in (table or {}).items():
        _TUNED[tuple(int(v) for v in key)] = cfg if isinstance(cfg, GemvConfig) else GemvConfig(**cfg)


def normalize_split(k_blocks: int, split: int) -> tuple[int, int]:
    """(split, blocks per split) with no empty split: every split gets cdiv(k_blocks, split) blocks except
    possibly the last."""
    split = max(1, min(split, k_blocks))
    per = -(-k_blocks // split)
    return -(-k_blocks // per), per


def max_split(M: int, K: int) -> int:
    """Split-K adds a workspace write + read of split * M * N fp32 values: at most 16 splits, and at most
    1/10 of the weight bytes (N * K) in workspace traffic (8 * split * M * N <= N * K / 10)."""
    return max(1, min(16, K // (80 * M)))


def auto_split(M: int, N: int, K: int, block_n: int, block_k: int, use_dot: bool, num_sms: int = 132) -> int:
    """Split K until about 8 programs per SM exist (one ~4 KiB weight load in flight per program: enough bytes
    in flight to cover DRAM latency), within max_split; no empty split."""
    programs = -(-N // block_n) * (-(-M // 16) if use_dot else M)
    k_blocks = -(-K // block_k)
    target = 8 * num_sms
    split = 1
    if programs < target:
        per = max(1, k_blocks * programs // target)  # blocks per split: cdiv(k_blocks, per) * programs >= target
        split = min(-(-k_blocks // per), max_split(M, K))
    return normalize_split(k_blocks, split)[0]


def tuned_key(M: int, N: int, K: int, weight_bytes: int = 1) -> tuple[int, ...]:
    """set_tuned's key of a shape: (M, N, K) for FP8 weights, (M, N, K, weight_bytes) for 2-byte ones."""
    return (M, N, K) if weight_bytes == 1 else (M, N, K, weight_bytes)


WEIGHT_BYTES_PER_PROGRAM = 64 * 1024  # M == 1: K is split until a program reads about this much of its weight rows


def pick_config(M: int, N: int, K: int, num_sms: int = 132, weight_bytes: int = 1) -> GemvConfig:
    """Heuristic, from the winners of bench/bench_fp8_gemv.py's sweeps on an H100 (7B shapes; docs/BENCHMARKS.md
    2026-12-05 and the seventh session's M = 1 sweep).
    M == 1 (FMA path), where N gives >= 2 programs of 8 rows per SM: 8-row tiles, 4 warps, each thread summing its
    own 16-byte load first (vec: 8 bf16 or 16 e4m3 products; a quarter of the fp32 accumulators, so more programs
    fit an SM and more loads are in flight), no split-K; BLOCK_K 1024 (FP8: 512 when N gives >= 16 programs per SM,
    e.g. gate/up). The sweep: FP8 qkv 8.4 -> 8.2, o_proj 7.5 -> 7.2, gate_up 50.1 -> 46.3, down_proj 29.8 -> 26.8 us;
    bf16 down_proj 49.2 -> 47.1 us. Smaller N (tensor-parallel shards): [16, 512 / weight_bytes] tiles, 8 warps,
    K split until a program reads ~64 KiB of weights.
    M > 1: a [64, 128] weight tile with tl.dot and 3 pipeline stages, split-K by auto_split (the [32, 128]
    single-stage tile before was 15-45 % slower). set_tuned entries win (keyed by tuned_key)."""
    key = tuned_key(M, N, K, weight_bytes)
    if key in _TUNED:
        return _TUNED[key]
    vec = 16 // weight_bytes
    if M == 1 and -(-N // 8) >= 2 * num_sms:
        bk = 512 if weight_bytes == 1 and -(-N // 8) >= 16 * num_sms else 1024
        bk = min(bk, max(16, triton_next_pow2(K)))
        return GemvConfig(8, bk, 1, 4, 1, False, min(vec, bk))
    bn, bk, warps, stages, dot = (16, 512 // weight_bytes, 8, 1, False) if M == 1 else (64, 128, 4, 3, True)
    bk = min(bk, max(16, triton_next_pow2(K)))
    if M == 1:
        per_program = -(-bn * K * weight_bytes // WEIGHT_BYTES_PER_PROGRAM)
        split = normalize_split(-(-K // bk), min(per_program, max_split(M, K)))[0]
        return GemvConfig(bn, bk, split, warps, stages, dot, min(vec, bk))
    return GemvConfig(bn, bk, auto_split(M, N, K, bn, bk, dot, num_sms), warps, stages, dot)


def rope_unsupported(cfg: GemvConfig, split: int, N: int, heads: int, kv_heads: int, head_dim: int,
                     residual: bool = False) -> str:
    """Why gemv's rope epilogue cannot run with this config and shape ('' when it can): it needs the FMA path
    without split-K, whole heads of an even tile's halves, and no residual."""
    half = cfg.block_n // 2
    if cfg.use_dot or split > 1:
        return "needs the FMA path without split-K"
    if N != (heads + 2 * kv_heads) * head_dim:
        return f"output {N} is not (heads {heads} + 2 x kv_heads {kv_heads}) x head_dim {head_dim}"
    if residual:
        return "takes no residual"
    if cfg.block_n % 2 or head_dim % 2 or (head_dim // 2) % half:
        return f"tile of {cfg.block_n} rows does not split head_dim {head_dim} into rotary halves"
    return ""


def rope_route(rows: int, N: int, K: int, heads: int, kv_heads: int, head_dim: int, device,
               weight_bytes: int) -> bool:
    """Whether gemv(..., rope=...) runs for `rows` input rows with the config gemv would pick (no set config)."""
    cfg = pick_config(rows, N, K, num_sms(device), weight_bytes)
    split = normalize_split(-(-K // cfg.block_k), cfg.split_k)[0]
    return not rope_unsupported(cfg, split, N, heads, kv_heads, head_dim)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=8)
def num_sms(device) -> int:
    dev = torch.device(device)
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4


# ---------------------------------------------------------------------------------------------- kernels
if HAVE_TRITON:
    try:
        from triton.language.extra import libdevice
    except ImportError:  # older triton
        from triton.language.extra.cuda import libdevice

    @triton.jit
    def _mul_rn(a, b, EXACT: tl.constexpr):
        """a * b rounded on its own: never contracted into an FMA with a later add (CUDA's __fmul_rn; triton's
        interpreter, which has no libdevice, never contracts)."""
        if EXACT:
            return libdevice.mul_rn(a, b)
        else:
            return a * b

    @triton.jit
    def _silu_mul_rn(g, u, LIBDEVICE: tl.constexpr):
        """F.silu(g) * u rounded as the eager ops round it (g, u in the model dtype): silu in fp32 with CUDA's expf
        and an IEEE division (ATen's kernel), rounded to the dtype, times u in fp32, rounded again. LIBDEVICE False:
        triton's interpreter, which has no libdevice (its exp is numpy's)."""
        gf = g.to(tl.float32)
        if LIBDEVICE:
            e = libdevice.exp(-gf)
        else:
            e = tl.exp(-gf)
        act = tl.div_rn(gf, 1.0 + e).to(g.dtype)
        return (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)

    @triton.jit
    def _rope_store(y, pid_n, m, COS, SIN, SLOTS, QO, KP, VP, stride_cs, BLOCK_N: tl.constexpr, RH: tl.constexpr,
                    RKV: tl.constexpr, RD: tl.constexpr, EXACT: tl.constexpr):
        """The ROPE epilogue: y [BLOCK_N] (rounded) holds dims d..d+BLOCK_N/2 of one head, then the same dims + RD/2
        (the rotary partners: the tile's rows were chosen so); q/k heads rotated as DecoderOps.rope_qkv rounds
        (x*cos and rotate_half(x)*sin each rounded, then their sum), q to QO [M, RH, RD], k and v to their pools
        [blocks * block_size, RKV, RD] at SLOTS[m]."""
        lo, hi = tl.split(tl.trans(tl.reshape(y, [2, BLOCK_N // 2])))
        p0 = pid_n * (BLOCK_N // 2)
        hd = p0 // (RD // 2)  # the tile's head: q heads, then k heads, then v heads
        d_lo = p0 % (RD // 2) + tl.arange(0, BLOCK_N // 2)
        d_hi = d_lo + RD // 2
        if hd < RH + RKV:
            dt = lo.dtype
            c_lo = tl.load(COS + m * stride_cs + d_lo).to(tl.float32)
            c_hi = tl.load(COS + m * stride_cs + d_hi).to(tl.float32)
            s_lo = tl.load(SIN + m * stride_cs + d_lo).to(tl.float32)
            s_hi = tl.load(SIN + m * stride_cs + d_hi).to(tl.float32)
            lo_f, hi_f = lo.to(tl.float32), hi.to(tl.float32)
            new_lo = (_mul_rn(lo_f, c_lo, EXACT).to(dt).to(tl.float32)
                      + _mul_rn(-hi_f, s_lo, EXACT).to(dt).to(tl.float32)).to(dt)
            new_hi = (_mul_rn(hi_f, c_hi, EXACT).to(dt).to(tl.float32)
                      + _mul_rn(lo_f, s_hi, EXACT).to(dt).to(tl.float32)).to(dt)
            if hd < RH:
                dst = QO + (m * RH + hd) * RD
            else:
                dst = KP + (tl.load(SLOTS + m).to(tl.int64) * RKV + (hd - RH)) * RD
            tl.store(dst + d_lo, new_lo)
            tl.store(dst + d_hi, new_hi)
        else:
            dst = VP + (tl.load(SLOTS + m).to(tl.int64) * RKV + (hd - RH - RKV)) * RD
            tl.store(dst + d_lo, lo)
            tl.store(dst + d_hi, hi)

    @triton.jit(do_not_specialize=["M", "stride_ym", "stride_rm"])
    def _fp8_gemv_kernel(X, W, S, Bias, Y, WS, G, R, M, N, K, stride_xm, stride_wn, stride_ym, stride_rm, k_per_split,
                         eps, COS, SIN, SLOTS, QO, KP, VP, stride_cs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                         USE_DOT: tl.constexpr, HAS_SCALE: tl.constexpr, PROLOGUE: tl.constexpr,
                         HAS_RES: tl.constexpr, USE_PDL: tl.constexpr = False, PIPELINE: tl.constexpr = False,
                         VEC: tl.constexpr = 1, ROPE: tl.constexpr = False, RH: tl.constexpr = 1,
                         RKV: tl.constexpr = 1, RD: tl.constexpr = 2, EXACT_MUL: tl.constexpr = False,
                         SILU_OUT: tl.constexpr = False):
        # PROLOGUE (FMA path only): 0 x as it is; 1 RMSNorm(x) * G (the row's rstd from the same loads, applied
        # once per output); 2 silu(x[:, :K]) * x[:, K:] rounded as the eager ops round. HAS_RES: y + R[m, n]
        # after y's own rounding (the residual add of a decoder layer, rounded as the eager add).
        # ROPE (FMA path, no split): the output is a fused q/k/v projection of RH + 2 RKV heads of RD dims; a tile
        # takes dims d..d+BLOCK_N/2 of a head and their rotary partners d+RD/2.. (a row's sum does not depend on
        # where it sits in the tile: the same values as the plain kernel), and _rope_store writes rotated q and k
        # and v where decode wants them instead of Y: the rotary + KV-write kernel after the GEMV, folded in.
        # SILU_OUT (FMA path, no split): the weight is SwiGLU's fused [gate; up] (N = 2I); a tile takes BLOCK_N/2
        # gate rows and the same up rows and stores silu(gate) * up [M, I] (the silu kernel before down, folded in;
        # each output computed once, where down's silu prologue computes it in every program).
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        if ROPE:
            r = tl.arange(0, BLOCK_N)
            pair = pid_n * (BLOCK_N // 2) + r % (BLOCK_N // 2)
            offs_n = (pair // (RD // 2)) * RD + pair % (RD // 2) + (r // (BLOCK_N // 2)) * (RD // 2)
        elif SILU_OUT:
            r = tl.arange(0, BLOCK_N)
            gate_rows = tl.minimum(pid_n * (BLOCK_N // 2) + r % (BLOCK_N // 2), N // 2 - 1)
            offs_n = gate_rows + (r // (BLOCK_N // 2)) * (N // 2)  # the tile's second half: the same up rows
        else:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.minimum(offs_n, N - 1)  # clamped: loads need no row mask, the store has one
        offs_k = tl.arange(0, BLOCK_K)
        k_start = pid_k * k_per_split
        w_ptrs = W + rows.to(tl.int64)[:, None] * stride_wn + (k_start + offs_k)[None, :]
        if USE_DOT:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            xrows = tl.minimum(offs_m, M - 1)
            x_ptrs = X + xrows.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :]
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            x_row = X + pid_m.to(tl.int64) * stride_xm
            x_ptrs = x_row + k_start + offs_k
            acc2 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
            ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        k_end = tl.minimum(k_start + k_per_split, K)  # the last split may have fewer blocks
        if PIPELINE:  # (FMA path) each weight tile is loaded one iteration ahead; the weights are read-only, so the
            # first is requested before waiting for the previous kernel
            w_next = tl.load(w_ptrs, mask=((k_start + offs_k) < k_end)[None, :], other=0.0,
                             eviction_policy="evict_first")
        if USE_PDL:  # launched before the previous kernel ended: wait for its writes, let the next one launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if not USE_DOT:
            if PROLOGUE == 1:
                g_ptrs = G + k_start + offs_k
                if SPLIT:  # each split scales by the whole row's rstd: its sum of squares first
                    for k0 in range(0, K, BLOCK_K):
                        xs = tl.load(x_row + k0 + offs_k, mask=(k0 + offs_k) < K, other=0.0).to(tl.float32)
                        ss += xs * xs
        for k in range(k_start, k_end, BLOCK_K):
            if PIPELINE:
                w = w_next
                w_next = tl.load(w_ptrs + BLOCK_K, mask=((k + BLOCK_K + offs_k) < k_end)[None, :], other=0.0,
                                 eviction_policy="evict_first")
            if EVEN_K:
                if not PIPELINE:
                    w = tl.load(w_ptrs, eviction_policy="evict_first")
                if USE_DOT:
                    x = tl.load(x_ptrs)
                else:
                    x = tl.load(x_ptrs, eviction_policy="evict_last")
                    if PROLOGUE == 1:
                        g = tl.load(g_ptrs, eviction_policy="evict_last")
                    if PROLOGUE == 2:
                        u = tl.load(x_ptrs + K, eviction_policy="evict_last")
            else:
                k_ok = (k + offs_k) < K
                if not PIPELINE:
                    w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
                if USE_DOT:
                    x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                else:
                    x = tl.load(x_ptrs, mask=k_ok, other=0.0, eviction_policy="evict_last")
                    if PROLOGUE == 1:
                        g = tl.load(g_ptrs, mask=k_ok, other=0.0, eviction_policy="evict_last")
                    if PROLOGUE == 2:
                        u = tl.load(x_ptrs + K, mask=k_ok, other=0.0, eviction_policy="evict_last")
            if USE_DOT:
                acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)  # [BLOCK_N, BLOCK_M], fp32
            else:
                xf = x.to(tl.float32)
                if PROLOGUE == 1:
                    if not SPLIT:
                        ss += xf * xf
                    xf = xf * g.to(tl.float32)
                    g_ptrs += BLOCK_K
                if PROLOGUE == 2:  # F.silu(g) * u in x's dtype: silu in fp32, rounded; the product rounded.
                    # exp2 and the approximate division: each x element is computed by every thread that holds
                    # its column (the layout replicates x across the tile's rows), so its cost is multiplied
                    act = tl.fdiv(xf, 1.0 + tl.exp2(xf * -1.4426950408889634)).to(x.dtype).to(tl.float32)
                    xf = (act * u.to(tl.float32)).to(x.dtype).to(tl.float32)
                prod = w.to(tl.float32) * xf[None, :]
                if VEC > 1:  # each thread sums its own VEC contiguous products first: VEC times fewer accumulators
                    prod = tl.sum(tl.reshape(prod, [BLOCK_N, BLOCK_K // VEC, VEC]), axis=2)
                acc2 += prod
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        n_ok = offs_n < N
        if USE_DOT:
            y = acc
            out_offs = offs_m[None, :] * stride_ym + offs_n[:, None]
            res_offs = offs_m[None, :] * stride_rm + offs_n[:, None]
            ws_offs = (pid_k * M + offs_m[None, :]) * N + offs_n[:, None]
            ok = n_ok[:, None] & (offs_m < M)[None, :]
        else:
            y = tl.sum(acc2, axis=1)
            if PROLOGUE == 1:
                y = y * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
            out_offs = pid_m * stride_ym + offs_n
            res_offs = pid_m * stride_rm + offs_n
            ws_offs = (pid_k * M + pid_m) * N + offs_n
            ok = n_ok
        if not SPLIT:
            if HAS_SCALE:
                s = tl.load(S + rows).to(tl.float32)
                if USE_DOT:
                    s = s[:, None]
                y = y * s
            if HAS_BIAS:
                b = tl.load(Bias + rows).to(tl.float32)
                if USE_DOT:
                    b = b[:, None]
                y = y + b
            y = y.to(Y.dtype.element_ty)
            if HAS_RES:
                y = (y.to(tl.float32) + tl.load(R + res_offs, mask=ok, other=0.0).to(tl.float32)).to(Y.dtype.element_ty)
            if ROPE:
                _rope_store(y, pid_n, pid_m.to(tl.int64), COS, SIN, SLOTS, QO, KP, VP, stride_cs, BLOCK_N, RH, RKV,
                            RD, EXACT_MUL)
            elif SILU_OUT:
                gate, up = tl.split(tl.trans(tl.reshape(y, [2, BLOCK_N // 2])))
                outs = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
                tl.store(Y + pid_m * stride_ym + outs, _silu_mul_rn(gate, up, EXACT_MUL), mask=outs < N // 2)
            else:
                tl.store(Y + out_offs, y, mask=ok)
        else:
            tl.store(WS + ws_offs, y, mask=ok)

    @triton.jit(do_not_specialize=["M", "stride_ym", "stride_rm", "split_k"])
    def _splitk_reduce_kernel(WS, S, Bias, Y, R, M, N, stride_ym, stride_rm, split_k, BLOCK: tl.constexpr,
                              HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RES: tl.constexpr,
                              USE_PDL: tl.constexpr = False):
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0)
        m = tl.program_id(1)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(split_k):  # fixed order: deterministic
            acc += tl.load(WS + (s * M + m) * N + offs, mask=ok, other=0.0)
        y = acc
        if HAS_SCALE:
            y = y * tl.load(S + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(Bias + offs, mask=ok, other=0.0).to(tl.float32)
        y = y.to(Y.dtype.element_ty)
        if HAS_RES:
            y = (y.to(tl.float32) + tl.load(R + m * stride_rm + offs, mask=ok, other=0.0).to(tl.float32)).to(
                Y.dtype.element_ty)
        tl.store(Y + m * stride_ym + offs, y, mask=ok)


@functools.lru_cache(maxsize=8)
def pdl_ok(device) -> bool:
    """Programmatic dependent launch: compute capability 9.0+ and a triton with griddepcontrol (3.3+)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not HAVE_TRITON or torch.cuda.get_device_capability(dev) < (9, 0):
        return False
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return True


def pdl_enabled(device) -> bool:
    """Programmatic dependent launch switched on (set_enabled(pdl=...), QWENVL_GEMV_PDL) and usable on device."""
    return _STATE["pdl"] and pdl_ok(device)


def interpreting() -> bool:
    """Whether triton was imported under TRITON_INTERPRET=1 (its kernels, ours and triton's own library
    functions, are then run by the interpreter on CPU tensors). It is read when the kernels are decorated, so
    it must be set before the first `import triton` of the process (tests run it in a subprocess)."""
    if not HAVE_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(_fp8_gemv_kernel, InterpretedFunction):
        return False
    _fix_interpreter()
    return True


def _fix_interpreter() -> None:
    """Two gaps of triton's CPU interpreter (seen in 3.9) that the GPU does not have, closed in this process so
    the kernel runs unchanged: (1) tl.dot on bf16 operands multiplies their raw bit patterns (the interpreter
    holds bf16 as uint16 numpy arrays; fp16 and fp32 are fine); (2) fp32 -> bf16 casts truncate instead of
    rounding to nearest even (and its explicit "rtne" mode does not carry into the exponent). Patched here:
    bf16 dot operands are widened to fp32 first (exact, like the GPU's bf16 products into an fp32
    accumulator); fp32 -> bf16 rounds to nearest even, as the GPU's cvt.rn.bf16.f32."""
    import numpy as np
    from triton.runtime import interpreter as I

    B = I.InterpreterBuilder
    if getattr(B, "_qwenvl_fixed", False):
        return
    dot, cast = B.create_dot, B.cast_impl

    def create_dot(self, a, b, d, *args):
        if a.dtype.scalar == tl.bfloat16:
            a = cast(self, a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = cast(self, b, tl.float32)
        return dot(self, a, b, d, *args)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return I.TensorHandle(out, tl.bfloat16)
        return cast(self, src, dst_type)

    B.create_dot, B.cast_impl, B._qwenvl_fixed = create_dot, cast_impl, True


# ---------------------------------------------------------------------------------------------- launch
def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
             config: GemvConfig | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x @ (weight * scale)^T + bias in x's dtype (or out_dtype, see gemv). x [..., K] bf16/fp16 (last dim
    contiguous), weight float8_e4m3fn [N, K] (rows contiguous, any row stride), scale [N] or [N, 1] (any float
    dtype), bias [N]. CUDA tensors, or CPU tensors in a TRITON_INTERPRET=1 process (see interpreting())."""
    if weight.dtype != FP8:
        raise TypeError(f"fp8_gemv: weight must be float8_e4m3fn, got {weight.dtype} (gemv takes bf16/fp16 weights)")
    return gemv(x, weight, scale, bias, config, out_dtype=out_dtype)


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
         silu_mul: bool = False, residual: torch.Tensor | None = None, rope: tuple | None = None,
         silu_out: bool = False, out_dtype: torch.dtype | None = None,
         _pipeline: bool | None = None) -> torch.Tensor:
    """y = x @ (weight [* scale])^T + bias in x's dtype: fp8_gemv's kernel for float8_e4m3fn weights (scale
    required) or weights of x's dtype (bf16/fp16; scale optional).

    A decoder layer's elementwise work around its decode linears, fused (one kernel instead of three):
      norm_weight [K]: the input is RMSNorm(x) * norm_weight (eps), normalised in fp32 without rounding it to x's
                       dtype first (the row's rstd is taken from the same loads and applied once per output);
      silu_mul:        x is [..., 2K], the input is silu(x[..., :K]) * x[..., K:] rounded as F.silu(g) * u rounds;
      residual [..., N]: returns residual + y, y rounded first (the layer's residual add, rounded as eager).
      rope (cos, sin, slots, k_pool, v_pool, heads, kv_heads, head_dim): y is a fused q/k/v projection; returns q
                       [M, heads, head_dim] rotated, and writes k (rotated) and v to the pools [blocks, block_size,
                       kv_heads, head_dim] at slots [M]: rope_kv.rope_write_kv's work in the GEMV's epilogue (cos,
                       sin [M, head_dim]; FMA path without split-K only: rope_route says when it applies).
      silu_out:        the weight is SwiGLU's fused [gate; up] [2I, K]; returns silu(y[..., :I]) * y[..., I:] [..., I]
                       rounded as gemv then F.silu(g) * u round (in the epilogue on the FMA path without split-K,
                       else as torch ops after the kernel). Not with residual or rope.
    out_dtype: y's dtype (default x's); torch.float32 stores the fp32 accumulator unrounded (the engine's fp32
                       logits), and rounding that to x's dtype gives the default's bits. Not with residual or rope.
    The prologues run in the kernel on its FMA path (M = 1 by default); on the DOT path they run as torch ops
    before it (same results as eager). _pipeline (tests): the FMA loop that loads each weight tile one iteration
    ahead, which programmatic dependent launch uses (None: with it)."""
    if not HAVE_TRITON:
        raise RuntimeError("gemv needs triton")
    if weight.dtype == FP8:
        if scale is None:
            raise ValueError("gemv: float8_e4m3fn weights need their per-channel scale")
    elif weight.dtype != x.dtype:
        raise TypeError(f"gemv: weight dtype {weight.dtype} is neither float8_e4m3fn nor x's dtype {x.dtype}")
    if norm_weight is not None and silu_mul:
        raise ValueError("gemv: norm_weight and silu_mul are two prologues; pass one")
    if out_dtype is not None and out_dtype != x.dtype and (residual is not None or rope is not None or silu_out):
        raise ValueError("gemv: out_dtype other than x's is for a plain output (no residual, rope or silu_out)")
    if silu_out and (residual is not None or rope is not None or weight.shape[0] % 2):
        raise ValueError("gemv: silu_out takes an even number of output rows [gate; up] and no residual or rope")
    interpret = not x.is_cuda
    if interpret and not interpreting():
        raise RuntimeError("gemv on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    N, K = weight.shape
    if x.shape[-1] != (2 * K if silu_mul else K):
        raise ValueError(f"gemv: x has {x.shape[-1]} features, the weight [{N}, {K}] takes "
                         f"{'2 x ' if silu_mul else ''}{K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    has_scale = scale is not None
    s = scale.reshape(-1) if has_scale else weight  # a valid pointer, never read
    if has_scale and s.stride(0) != 1:
        s = s.contiguous()
    cfg = config or pick_config(M, N, K, num_sms(x.device), weight.element_size())
    prologue = 1 if norm_weight is not None else 2 if silu_mul else 0
    if prologue and cfg.use_dot:  # the DOT path takes x as it is: the prologue as torch ops first
        if prologue == 1:
            from ..layers import rms_norm
            x2 = rms_norm(x2, norm_weight, eps)
        else:
            x2 = _silu_mul_halves(x2)
        prologue = 0
    g = norm_weight if prologue == 1 else s  # a valid pointer, never read
    if prologue == 1 and (g.shape != (K,) or g.stride(0) != 1):
        if g.numel() != K:
            raise ValueError(f"gemv: norm_weight has {g.numel()} values for {K} features")
        g = g.reshape(K).contiguous()
    has_res = residual is not None
    r = s
    if has_res:
        if residual.shape[-1] != N or residual.numel() != M * N:
            raise ValueError(f"gemv: residual {tuple(residual.shape)} does not match the output [{M}, {N}]")
        r = residual.reshape(M, N)
        if r.stride(-1) != 1:
            r = r.contiguous()
    bk = cfg.block_k
    k_blocks = -(-K // bk)
    split, per = normalize_split(k_blocks, cfg.split_k)
    if silu_out and (cfg.use_dot or split > 1 or cfg.block_n % 2):  # no epilogue there: the eager ops after
        y = gemv(x2, weight, scale, bias, cfg, norm_weight=norm_weight, eps=eps, silu_mul=silu_mul)
        return _silu_mul_halves(y).view(*lead, N // 2)
    epilogue_kw, rope_args = {}, (s, s, s, s, s, s, 0)  # valid pointers, never read
    if rope is not None:
        cos, sin, slots, k_pool, v_pool, H, KV, D = rope
        why = rope_unsupported(cfg, split, N, H, KV, D, residual is not None)
        if why:
            raise ValueError(f"gemv: rope epilogue: {why}")
        cos, sin = cos.reshape(M, D), sin.reshape(M, D)
        if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
            cos, sin = cos.contiguous(), sin.contiguous()
        if not (k_pool.is_contiguous() and v_pool.is_contiguous()) or k_pool.shape[-2:] != (KV, D):
            raise ValueError(f"gemv: rope epilogue: the KV pools must be contiguous [..., {KV}, {D}]")
        q = torch.empty(M, H, D, dtype=x.dtype, device=x.device)
        rope_args = (cos, sin, slots, q, k_pool, v_pool, cos.stride(0))
        epilogue_kw = {"ROPE": True, "RH": H, "RKV": KV, "RD": D, "EXACT_MUL": not interpret}
    if silu_out:
        epilogue_kw = {"SILU_OUT": True, "EXACT_MUL": not interpret}
    n_out = N // 2 if silu_out else N
    y = q if rope is not None else torch.empty(M, n_out, dtype=out_dtype or x.dtype, device=x.device)
    if M == 0:
        return y if rope is not None else y.view(*lead, n_out)
    k_per_split = per * bk
    even_k = K % bk == 0
    block_m = 16 if cfg.use_dot else 1
    ws = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
    has_bias = bias is not None
    b = bias if has_bias else s  # a valid pointer, never read
    grid = (-(-n_out // (cfg.block_n // 2 if silu_out else cfg.block_n)), split, -(-M // block_m))
    pdl = not interpret and pdl_enabled(x.device)
    pdl_kw = {"USE_PDL": True, "launch_pdl": True} if pdl else {}
    pipe_kw = {"PIPELINE": True} if (pdl if _pipeline is None else _pipeline) and not cfg.use_dot else {}
    # FMA contraction on explicitly: the configs were swept with it (triton's default, to turn off in 3.10)
    kw = {} if interpret else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": True}
    if not cfg.use_dot and cfg.vec > 1:
        if bk % cfg.vec:
            raise ValueError(f"gemv: vec {cfg.vec} does not divide block_k {bk}")
        kw["VEC"] = cfg.vec
    _fp8_gemv_kernel[grid](x2, weight, s, b, y, ws, g, r, M, N, K, x2.stride(0), weight.stride(0), y.stride(0),
                           r.stride(0) if has_res else 0, k_per_split, float(eps), *rope_args, BLOCK_M=block_m,
                           BLOCK_N=cfg.block_n, BLOCK_K=bk, SPLIT=split > 1, EVEN_K=even_k, HAS_BIAS=has_bias,
                           USE_DOT=cfg.use_dot, HAS_SCALE=has_scale, PROLOGUE=prologue, HAS_RES=has_res, **kw,
                           **pdl_kw, **pipe_kw, **epilogue_kw)
    if rope is not None:
        return y
    if silu_out:
        return y.view(*lead, n_out)
    if split > 1:
        rb = 1024 if N >= 1024 else triton_next_pow2(N)
        kw = {} if interpret else {"num_warps": 4, "enable_fp_fusion": True}
        _splitk_reduce_kernel[(-(-N // rb), M)](ws, s, b, y, r, M, N, y.stride(0), r.stride(0) if has_res else 0,
                                                split, BLOCK=rb, HAS_BIAS=has_bias, HAS_SCALE=has_scale,
                                                HAS_RES=has_res, **kw, **pdl_kw)
    return y.view(*lead, N)


# ---------------------------------------------------------------------------------------------- checks
def _silu_mul_halves(gu: torch.Tensor) -> torch.Tensor:
    """F.silu(g) * u of a fused [..., 2I] gate/up tensor (eager, in its dtype)."""
    half = gu.shape[-1] // 2
    return F.silu(gu[..., :half]) * gu[..., half:]


def reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None = None):
    """x @ (weight * scale)^T + bias in float64 (the weights dequantised exactly; no TF32 whatever the
    matmul settings), reshaped to [M, N]; scale None: 1."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = x @ weight.double().t()
    if scale is not None:
        y = y * scale.reshape(1, -1).double()
    return y if bias is None else y + bias.double()


def error_bound(x, weight, scale, bias, ref, out_dtype) -> torch.Tensor:
    """Elementwise bound on |fp8_gemv - reference|: one rounding to out_dtype (half an ulp: eps/2 relative)
    plus the kernel's fp32 summation of K exact products in any order (gamma_K = K u / (1 - K u), u = 2^-24,
    on sum |x||w| * scale; counted twice, for a split-K's partial sums and slack), plus the scale/bias
    roundings (a few u). The reference is float64 (its own error is far below these)."""
    K = x.shape[-1]
    u = 2.0 ** -24
    gamma = K * u / (1 - K * u)
    absdot = x.reshape(-1, K).double().abs() @ weight.double().abs().t()
    if scale is not None:
        absdot = absdot * scale.reshape(1, -1).double().abs()
    if bias is not None:
        absdot = absdot + bias.double().abs()
    half_ulp = torch.finfo(out_dtype).eps / 2
    return half_ulp * ref.abs() * (1 + 4 * u) + (2 * gamma + 4 * u) * absdot * (1 + half_ulp) + 1e-30


_OK: dict[tuple[str, torch.dtype], bool] = {}


def gemv_ok(device, weight_dtype: torch.dtype = FP8) -> bool:
    """Whether the kernel can be used on `device` for weights of `weight_dtype` (float8_e4m3fn, or bf16 for the
    2-byte path): CUDA, triton, compute capability >= 8.9 for e4m3 (8.0 for bf16), and one run per code path
    (FMA, DOT, split-K, bias, ragged K) within error_bound of the float64 reference. Probed once per device and
    dtype (synchronises: call before capturing CUDA graphs; fp8_backend and wrap_linear do)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return False
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (str(dev), weight_dtype)
    if key in _OK:
        return _OK[key]
    ok = False
    need = (8, 9) if weight_dtype == FP8 else (8, 0)
    if HAVE_TRITON and torch.cuda.get_device_capability(dev) >= need:
        try:
            ok = _self_test(dev, weight_dtype)
        except Exception as e:  # compile or launch failure
            log.warning("GEMV kernel for %s weights unavailable on %s (%s: %s); using the matmul path",
                        weight_dtype, dev, type(e).__name__, e)
    _OK[key] = ok
    return ok


def _probe_weight(N: int, K: int, g: torch.Generator, dev, weight_dtype: torch.dtype, std: float):
    """(weight [N, K] of weight_dtype, its per-channel scale or None) from randn * std, for the probes."""
    w = torch.randn(N, K, generator=g, device=dev) * std
    if weight_dtype != FP8:
        return w.to(weight_dtype), None
    scale = (w.abs().amax(1, keepdim=True) / 448.0).clamp(min=1e-12)
    return (w / scale).to(FP8), scale


def _self_test(dev, weight_dtype: torch.dtype = FP8) -> bool:
    g = torch.Generator(device=dev).manual_seed(0)
    for M, N, K, bias, split in ((1, 96, 512, True, None), (1, 80, 320, False, 3), (5, 64, 640, True, None),
                                 (3, 48, 272, False, 2)):
        q, scale = _probe_weight(N, K, g, dev, weight_dtype, 0.02)
        x = torch.randn(M, K, generator=g, device=dev).to(torch.bfloat16 if weight_dtype == FP8 else weight_dtype)
        b = torch.randn(N, generator=g, device=dev).to(x.dtype) if bias else None
        cfg = pick_config(M, N, K, num_sms(dev), q.element_size())
        cfg = dataclasses.replace(cfg, split_k=split) if split else None
        got = gemv(x, q, scale, b, config=cfg).double()
        ref = reference(x, q, scale, b)
        bound = error_bound(x, q, scale, b, ref, x.dtype)
        if not bool(((got - ref).abs() <= bound).all()):
            log.warning("GEMV kernel (%s weights) disagrees with the float64 reference (M=%d N=%d K=%d, max err "
                        "%.3g); not using it", weight_dtype, M, N, K, (got - ref).abs().max().item())
            return False
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return True


def prologue_reference(x: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                       silu_mul: bool = False) -> torch.Tensor:
    """The input gemv's prologue feeds the matmul, [M, K] in float64: RMSNorm(x) * norm_weight unrounded (as the
    kernel), or silu(g) * u with the eager ops' roundings (x's dtype), or x."""
    x = x.reshape(-1, x.shape[-1])
    if norm_weight is not None:
        xd = x.double()
        return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double().reshape(1, -1)
    if silu_mul:
        K = x.shape[-1] // 2
        return (F.silu(x[:, :K].float()).to(x.dtype) * x[:, K:]).double()
    return x.double()


_FUSED_OK: dict[tuple[str, torch.dtype], bool] = {}


def fused_gemv_ok(device, weight_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether gemv's prologues and residual epilogue work on `device` (gemv_ok, then one run of each against the
    float64 reference of the same maths, within 1 % of the output scale: a check of the kernel's indexing, not of
    its rounding, which the tests bound). Probed once per device and dtype (synchronises)."""
    if not gemv_ok(device, weight_dtype):
        return False
    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (str(dev), weight_dtype)
    if key not in _FUSED_OK:
        try:
            _FUSED_OK[key] = _fused_self_test(dev, weight_dtype)
        except Exception as e:
            log.warning("fused GEMV prologues unavailable on %s (%s: %s); decode layers run them apart", dev,
                        type(e).__name__, e)
            _FUSED_OK[key] = False
    return _FUSED_OK[key]


def _fused_self_test(dev, weight_dtype: torch.dtype) -> bool:
    g = torch.Generator(device=dev).manual_seed(1)
    act = torch.bfloat16 if weight_dtype == FP8 else weight_dtype
    for M, N, K, kind, split in ((1, 96, 512, "norm", None), (1, 80, 640, "norm", 2), (1, 64, 320, "silu", 3),
                                 (2, 48, 256, "silu", None)):
        q, scale = _probe_weight(N, K, g, dev, weight_dtype, 0.05)
        x = torch.randn(M, 2 * K if kind == "silu" else K, generator=g, device=dev).to(act)
        nw = (torch.rand(K, generator=g, device=dev) + 0.5).to(act) if kind == "norm" else None
        res = torch.randn(M, N, generator=g, device=dev).to(act)
        cfg = pick_config(M, N, K, num_sms(dev), q.element_size())
        cfg = dataclasses.replace(cfg, split_k=split or cfg.split_k, use_dot=False)
        got = gemv(x, q, scale, None, cfg, norm_weight=nw, eps=1e-6, silu_mul=kind == "silu", residual=res).double()
        ref = reference(prologue_reference(x, nw, 1e-6, kind == "silu"), q, scale) + res.double()
        err = (got - ref).abs().max().item() / ref.abs().max().clamp_min(1e-30).item()
        if not err < 1e-2:
            log.warning("fused GEMV (%s, M=%d N=%d K=%d split %s) off the reference by %.3g; not using it", kind, M,
                        N, K, split, err)
            return False
    torch.cuda.synchronize(dev)
    return True


_SILU_OUT_OK: dict[tuple[str, torch.dtype], bool] = {}


def silu_out_ok(device, weight_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether gemv(..., silu_out=True) equals the plain gemv followed by F.silu(g) * u on `device`: bit for bit on
    CUDA (the same roundings), within one unit in the last place under the interpreter (numpy's exp), at M = 1 with
    the RMSNorm prologue, a ragged last tile and the heuristic's config. Probed once per device and weight dtype
    (synchronises: before any graph capture)."""
    dev = torch.device(device)
    if not (fused_gemv_ok(dev, weight_dtype) if dev.type == "cuda" else interpreting()):
        return False
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (str(dev), weight_dtype)
    if key not in _SILU_OUT_OK:
        try:
            g = torch.Generator(device=dev).manual_seed(2)
            act = torch.bfloat16 if weight_dtype == FP8 else weight_dtype
            ok = True
            for I, K in ((300, 512), (1024, 768)):  # 300: the last tile half empty
                w, scale = _probe_weight(2 * I, K, g, dev, weight_dtype, 0.05)
                x = torch.randn(1, K, generator=g, device=dev).to(act)
                nw = (torch.rand(K, generator=g, device=dev) + 0.5).to(act)
                y = gemv(x, w, scale, norm_weight=nw)
                want, got = _silu_mul_halves(y), gemv(x, w, scale, norm_weight=nw, silu_out=True)
                if dev.type == "cuda":
                    ok &= bool(torch.equal(got, want))
                else:
                    ulp = torch.finfo(act).eps * want.float().abs().clamp_min(torch.finfo(act).tiny)
                    ok &= bool(((got.float() - want.float()).abs() <= ulp).all())
            if not ok:
                log.warning("gemv's silu epilogue differs from gemv + F.silu(g) * u on %s; not using it", dev)
            _SILU_OUT_OK[key] = ok
        except Exception as e:
            log.warning("gemv's silu epilogue unavailable on %s (%s: %s)", dev, type(e).__name__, e)
            _SILU_OUT_OK[key] = False
    return _SILU_OUT_OK[key]


def use_gemv(x: torch.Tensor, weight: torch.Tensor, in_features: int, force: bool = False) -> bool:
    """The dispatch rule of FP8Linear.forward (cheap: no device work after the first probe). force: even when
    switched off (a module whose backend is 'gemv')."""
    return fp8_route(x.numel() // max(1, in_features), x.dtype, x.device, weight, force)


def fp8_route(rows: int, dtype: torch.dtype, device, weight: torch.Tensor, force: bool = False) -> bool:
    """use_gemv for an input of `rows` rows of `dtype` on `device`."""
    if not (_STATE["enabled"] or force) or torch.device(device).type != "cuda":
        return False
    if dtype not in (torch.bfloat16, torch.float16) or weight.dtype != FP8 or rows > _STATE["max_m"]:
        return False
    return gemv_ok(device)


def use_bf16_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """GemvLinear's dispatch rule: switched on (the default; off by QWENVL_BF16_GEMV=0 or
    set_enabled(bf16_enabled=False)), CUDA, weight of x's dtype (bf16/fp16), at most bf16_max_m rows, the kernel's
    probe passed."""
    return bf16_route(x.numel() // max(1, weight.shape[1]), x.dtype, x.device, weight)


def bf16_route(rows: int, dtype: torch.dtype, device, weight: torch.Tensor) -> bool:
    """use_bf16_gemv for an input of `rows` rows of `dtype` on `device`."""
    if not _STATE["bf16_enabled"] or torch.device(device).type != "cuda":
        return False
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if weight.dtype != dtype or rows > _STATE["bf16_max_m"]:
        return False
    return gemv_ok(device, weight.dtype)


class HeldLinear(torch.nn.Module):
    """A plain nn.Linear held, not copied (the model's own module keeps its weights), behind another forward: the
    base of the engine's wrappers (GemvLinear here, batch_invariant.InvariantLinear)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        if type(linear) is not torch.nn.Linear:
            raise TypeError(f"{type(self).__name__} wraps a plain nn.Linear, got {type(linear).__name__}")
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias


class GemvLinear(HeldLinear):
    """An nn.Linear whose small-M calls run the GEMV kernel (use_bf16_gemv), every other call the linear itself.
    For the engine's decode linears."""

    def gemv_operands(self, rows: int, dtype: torch.dtype, device) -> tuple | None:
        """(weight, scale, bias) for gemv() when an input of `rows` rows would run the kernel, else None (the
        engine's fused decode layers call gemv with these and their prologue/epilogue)."""
        if bf16_route(rows, dtype, device, self.linear.weight):
            return self.linear.weight, None, self.linear.bias
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_bf16_gemv(x, self.linear.weight):
            return gemv(x, self.linear.weight, None, self.linear.bias)
        return self.linear(x)


def wrap_linear(m: torch.nn.Module) -> torch.nn.Module:
    """GemvLinear(m) for a plain nn.Linear with 2-byte weights on CUDA while the bf16 path is switched on (the
    kernel's probe run now, before any CUDA graph capture), else m unchanged (FP8Linear, tensor-parallel linears
    and CPU modules keep their paths)."""
    if not _STATE["bf16_enabled"]:
        return m
    w = getattr(m, "weight", None)
    if type(m) is not torch.nn.Linear or w is None or not w.is_cuda or w.dtype not in (torch.bfloat16, torch.float16):
        return m
    if not gemv_ok(w.device, w.dtype):
        return m
    return GemvLinear(m)


def bytes_moved(M: int, N: int, K: int, weight_bytes: int = 1, act_bytes: int = 2) -> int:
    """Bytes a perfect kernel reads/writes: the weights once, x once, y once, the scales."""
    return N * K * weight_bytes + M * K * act_bytes + M * N * act_bytes + N * 4


__all__ = ["GemvConfig", "GemvLinear", "HAVE_TRITON", "auto_split", "bf16_route", "bytes_moved", "error_bound",
           "fp8_gemv", "fp8_route", "fused_gemv_ok", "gemv", "gemv_ok", "pick_config", "prologue_reference",
           "reference", "rope_route", "rope_unsupported", "set_enabled", "silu_out_ok", "set_tuned", "settings", "tuned_key", "use_bf16_gemv", "use_gemv", "wrap_linear"]
