"""Batch-invariant kernels: a row's result is the same bits whatever else is in the batch.

Why: greedy decoding of a model with near ties (random weights everywhere; a trained model's unsure digits) parts
from itself when one bf16 rounding moves, and cuBLAS picks a GEMM (tile shape, split-K) by the number of rows, the
attention kernels split the context by the batch size, and chunked prefill cuts a prompt where the token budget
ends. So a request run alone, in a batch of 256, with or without CUDA graphs, or recomputed after a preemption, may
produce other tokens (docs/BENCHMARKS.md: on the trained nano model 87.5 % of requests keep their first 32 tokens
between the engine's fast and slow runs). vLLM (VLLM_BATCH_INVARIANT) and SGLang (--enable-deterministic-inference)
fix it the same way, after Thinking Machines' "Defeating Nondeterminism in LLM Inference" (2025): every reduction in
a fixed order that depends on the row only. Here:

- `bi_linear`: x @ w^T (+ bias) with one tile configuration per weight, chosen from the weight's shape and never
  from the number of rows; no split-K: each output's sum over K runs in BLOCK_K steps in order.
- `bi_add_rms_norm`: the residual add and RMSNorm, one program per row (the row's sum of squares in one block).
- `bi_attention`: one paged attention kernel for prefill chunks and decode rows alike. A program takes up to
  BLOCK_M query rows of one sequence and one head, and walks the sequence's KV blocks from the first, one cache
  block per step, with an online softmax. A row's result depends on its own position only: key blocks past its
  position add exact zeros (p = 2^-inf = 0, alpha = 2^0 = 1), so where a prompt was cut into chunks, or whether a
  token was decoded or recomputed in a prefill, does not change a bit.

Speed is the price (docs/BENCHMARKS.md has the numbers): no split-K for batch-1 decode, a 64-row MMA tile for one
row, no split of long contexts. The engine uses them with `LLM(..., batch_invariant=True)` (QWENVL_BATCH_INVARIANT=1).
Runs under TRITON_INTERPRET=1 on CPU tensors for the tests (the interpreter's bf16 tl.dot is wrong in triton 3.9, so
the tiles are upcast to fp32 there and multiplied as sums over K, _dot_by_rows: the maths, not the GPU's bits, are what
the interpreter checks, and its rows are invariant on every CPU's BLAS).
"""

from __future__ import annotations

import math

import torch

from ..quant.fp8_gemv import HAVE_TRITON, HeldLinear, interpreting, tl, triton

# one MMA tile for every row count: 64 rows is Hopper's warpgroup MMA height, so prefill runs at speed; a decode
# row pays for 64 (still bandwidth-bound: 64 FLOP per weight byte)
BLOCK_M, BLOCK_K = 64, 64
ATTN_BLOCK_M = 16  # query rows per attention program (one sequence's)

if HAVE_TRITON:
    @triton.jit
    def _dot_by_rows(a, b):
        """a [M, K] @ b [K, N] in fp32 as a sum over K, for the interpreter: its tl.dot is numpy's matmul, and
        OpenBLAS's AVX2 (Haswell / Zen) sgemm kernel rounds a row differently by its place in the tile (rows 6-11
        of every 12 apart), so a row's bits would depend on its neighbours on such CPUs; this sum's order does not."""
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)

    @triton.jit
    def _bi_matmul_kernel(X, W, Bias, Y, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        xp = X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
        wp = W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            x = tl.load(xp, mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0)
            w = tl.load(wp, mask=(rn < N)[:, None] & (kk < K)[None, :], other=0.0)
            if UPCAST:
                acc += _dot_by_rows(x.to(tl.float32), tl.trans(w.to(tl.float32)))
            else:
                acc = tl.dot(x, tl.trans(w), acc)
            xp += BK
            wp += BK
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        yp = Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        tl.store(yp, acc.to(Y.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])

    @triton.jit
    def _bi_rms_norm_kernel(H, Delta, Wt, HOut, XOut, D, eps, stride_h, stride_d, stride_ho, stride_xo,
                            HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < D
        h = tl.load(H + row * stride_h + cols, mask=ok, other=0.0)
        if HAS_DELTA:  # the residual sum rounded to the model dtype first, as the decoder layer adds it
            d = tl.load(Delta + row * stride_d + cols, mask=ok, other=0.0)
            h = (h.to(tl.float32) + d.to(tl.float32)).to(h.dtype)
            tl.store(HOut + row * stride_ho + cols, h, mask=ok)
        x = h.to(tl.float32)
        var = tl.sum(x * x, axis=0) / D
        y = (x / tl.sqrt(var + eps)).to(h.dtype)
        w = tl.load(Wt + cols, mask=ok, other=0.0)
        tl.store(XOut + row * stride_xo + cols, (w.to(tl.float32) * y.to(tl.float32)).to(h.dtype), mask=ok)

    @triton.jit
    def _bi_attention_kernel(Q, KPool, VPool, Tables, TileRow0, TileLen, TileSeq, Pos, Out, qk_scale,
                             stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                             stride_t, stride_on, stride_oh, GROUP: tl.constexpr, D: tl.constexpr,
                             BS: tl.constexpr, BM: tl.constexpr, UPCAST: tl.constexpr):
        tile = tl.program_id(0)
        head = tl.program_id(1)
        kvh = head // GROUP
        r0 = tl.load(TileRow0 + tile)
        n = tl.load(TileLen + tile)
        seq = tl.load(TileSeq + tile).to(tl.int64)
        m_idx = tl.arange(0, BM)
        rows = (r0 + m_idx).to(tl.int64)
        valid = m_idx < n
        d = tl.arange(0, D)
        q = tl.load(Q + rows[:, None] * stride_qn + head * stride_qh + d[None, :], mask=valid[:, None], other=0.0)
        pos = tl.load(Pos + rows, mask=valid, other=0)
        last = tl.max(pos, axis=0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, D), tl.float32)
        s_idx = tl.arange(0, BS)
        for b in range(0, last // BS + 1):
            blk = tl.load(Tables + seq * stride_t + b).to(tl.int64)
            kpos = b * BS + s_idx
            kmask = (kpos <= last)[:, None]
            k = tl.load(KPool + blk * stride_kb + s_idx[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                        mask=kmask, other=0.0)
            v = tl.load(VPool + blk * stride_vb + s_idx[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                        mask=kmask, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
                s = _dot_by_rows(q, tl.trans(k)) * qk_scale
            else:
                s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(kpos[None, :] <= pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if UPCAST:
                acc = acc * alpha[:, None] + _dot_by_rows(p, v)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + rows[:, None] * stride_on + head * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=valid[:, None])


def available(device) -> bool:
    """Whether the kernels run on `device`: CUDA with triton, or any tensor under the interpreter (tests)."""
    return HAVE_TRITON and (torch.device(device).type == "cuda" or interpreting())


def _launch(x: torch.Tensor) -> dict:
    return {"num_warps": 4, "num_stages": 3} if x.is_cuda else {}


def block_n(n: int) -> int:
    """Output columns per program, from the weight's width only (never from the rows: that is the invariance):
    narrow weights take narrower tiles, so a decode step still has programs for every SM."""
    return 64 if n <= 8192 else 128


def bi_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias) in x's dtype (or out_dtype, e.g. fp32 logits); fp32 accumulation."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    N, K = weight.shape
    if K != shape[-1] or weight.stride(-1) != 1:
        raise ValueError(f"bi_linear: x [..., {shape[-1]}] against weight {tuple(weight.shape)} (contiguous rows)")
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    if M:
        bn = block_n(N)
        _bi_matmul_kernel[(triton.cdiv(N, bn), triton.cdiv(M, BLOCK_M))](
            x2, weight, bias if bias is not None else weight, y, M, N, K, x2.stride(0), weight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BM=BLOCK_M, BN=bn, BK=BLOCK_K, UPCAST=not x.is_cuda, **_launch(x))
    return y.view(*shape[:-1], N)


class InvariantLinear(HeldLinear):
    """A bf16/fp16 nn.Linear (or the one a GemvLinear holds) whose every call is bi_linear."""

    def __init__(self, linear: torch.nn.Module):
        inner = linear.linear if isinstance(linear, HeldLinear) else linear
        super().__init__(inner)
        if inner.weight.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"batch-invariant linears need bf16/fp16 weights, got {inner.weight.dtype}")

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return bi_linear(x, self.linear.weight, self.linear.bias, out_dtype)


def bi_add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(h + delta, RMSNorm(h + delta) * weight) rounded as the eager layer rounds; delta None: (h, RMSNorm(h))."""
    D = h.shape[-1]
    h2 = h.reshape(-1, D)
    d2 = delta.reshape(-1, D) if delta is not None else None
    if h2.stride(-1) != 1 or (d2 is not None and d2.stride(-1) != 1):
        raise ValueError("bi_add_rms_norm: rows must be contiguous")
    h_out = torch.empty_like(h2) if delta is not None else h2
    x_out = torch.empty_like(h2)
    if h2.shape[0]:
        _bi_rms_norm_kernel[(h2.shape[0],)](
            h2, d2 if d2 is not None else h2, weight, h_out, x_out, D, eps, h2.stride(0),
            d2.stride(0) if d2 is not None else 0, h_out.stride(0), x_out.stride(0), HAS_DELTA=delta is not None,
            BLOCK=triton.next_power_of_2(D), **({"num_warps": 8} if h.is_cuda else {}))
    return h_out.view(h.shape), x_out.view(h.shape)


def attention_tiles(chunks: list[tuple[int, int, int]], block_m: int = ATTN_BLOCK_M):
    """Host plan for bi_attention from (first row, rows, table row) per chunk of one sequence: the tiles (first
    row, rows, table row) of at most block_m rows each, as three int32 lists."""
    r0s, lens, seqs = [], [], []
    for row, n, seq in chunks:
        for a in range(0, n, block_m):
            r0s.append(row + a)
            lens.append(min(block_m, n - a))
            seqs.append(seq)
    return r0s, lens, seqs


def bi_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 tile_row0: torch.Tensor, tile_len: torch.Tensor, tile_seq: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """Causal attention of the query rows q [N, H, D] over their sequences' cached keys (written before: a chunk's
    own keys included). positions [N] int32: each row's index in its sequence (it sees keys 0..position);
    tables [S, W] int32 block tables; the tiles (int32 [T]) from attention_tiles. Returns [N, H, D]."""
    N, H, D = q.shape
    _, bs, kvh, _ = k_pool.shape
    out = torch.empty_like(q)
    T = tile_row0.shape[0]
    if T and N:
        _bi_attention_kernel[(T, H)](
            q, k_pool, v_pool, tables, tile_row0, tile_len, tile_seq, positions, out,
            (1.0 / math.sqrt(D)) * math.log2(math.e),
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
            v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), tables.stride(0), out.stride(0), out.stride(1),
            GROUP=H // kvh, D=D, BS=bs, BM=ATTN_BLOCK_M, UPCAST=not q.is_cuda,
            **({"num_warps": 4, "num_stages": 2} if q.is_cuda else {}))
    return out


def attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                        positions: torch.Tensor) -> torch.Tensor:
    """fp32 causal attention of query rows q [N, H, D] of ONE sequence (block table `table` [W]) over its cached
    keys: row i sees keys 0..positions[i]. The check for bi_attention."""
    H, D = q.shape[1], q.shape[2]
    L = int(positions.max()) + 1
    group = H // k_pool.shape[2]
    K = k_pool[table.long()].flatten(0, 1)[:L].float().repeat_interleave(group, 1)
    V = v_pool[table.long()].flatten(0, 1)[:L].float().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), K) / math.sqrt(D)
    keys = torch.arange(L, device=q.device)
    s = s.masked_fill(keys[None, None, :] > positions.to(q.device).long()[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), V)


def invariance_report(t, device) -> dict:
    """The kernels at a decoder's shapes (t: its text config) on `device`: a row's bits alone vs inside a batch
    (other rows, other tile positions), a prompt's attention in one chunk, in three, one row at a time, and the
    relative error against fp32 references. For the GPU test and bench/bench.py."""
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, (n, k) in {"qkv": ((t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim, t.hidden_size),
                         "down": (t.hidden_size, t.intermediate_size)}.items():
        w = (torch.randn(n, k, generator=g, device=device) / k ** 0.5).bfloat16()
        x = torch.randn(300, k, generator=g, device=device).bfloat16()
        y = bi_linear(x, w)
        rows = [0, 1, 63, 64, 200, 299]
        alone = all(torch.equal(bi_linear(x[r:r + 1], w)[0], y[r]) for r in rows)
        perm = torch.randperm(300, generator=g, device=device)
        shuffled = torch.equal(bi_linear(x[perm], w), y[perm])
        ref = x.float() @ w.float().t()
        out[name] = {"alone_equal": alone, "shuffled_equal": shuffled,
                     "rel_err": ((y.float() - ref).norm() / ref.norm()).item()}
    # attention: one sequence of 300 tokens in the pools; its rows in one call, in chunks, and one at a time
    H, KV, D, bs = t.num_attention_heads, t.num_key_value_heads, t.head_dim, 16
    L = 300
    nb = -(-L // bs)
    kp = torch.randn(nb + 1, bs, KV, D, generator=g, device=device).bfloat16()
    vp = torch.randn(nb + 1, bs, KV, D, generator=g, device=device).bfloat16()
    table = torch.randperm(nb, generator=g, device=device).int()[None]
    q = torch.randn(L, H, D, generator=g, device=device).bfloat16()
    pos = torch.arange(L, dtype=torch.int32, device=device)

    def run(chunks):
        r0, ln, sq = (torch.tensor(a, dtype=torch.int32, device=device) for a in attention_tiles(chunks))
        return bi_attention(q, kp, vp, table, r0, ln, sq, pos)

    full = run([(0, L, 0)])
    chunked = run([(0, 37, 0), (37, 200, 0), (237, 63, 0)])
    single = run([(r, 1, 0) for r in range(L)])
    ref = attention_reference(q, kp, vp, table[0], pos)
    out["attention"] = {"chunked_equal": torch.equal(full, chunked), "one_row_tiles_equal": torch.equal(full, single),
                        "rel_err": ((full.float() - ref).norm() / ref.norm()).item()}
    return out
