"""Attention over the paged KV cache.

- write_kv: scatter a step's new K/V rows into the pools at their slots (block * block_size + offset).
- prefill_attention: one sequence's chunk of queries against its cached prefix + the chunk (causal relative
  to the prefix). Plain SDPA; on CUDA with heads expanded and a bottom-right causal bias, so the flash /
  memory-efficient kernels run instead of the N^2 math fallback.
- varlen_prefill_attention: every prefill chunk of a mixed step in one FlashAttention varlen call per layer
  (CUDA, bf16/fp16), keys gathered from the pools by slot; checked against prefill_attention once at start
  (`varlen_prefill_ok`), else the per-chunk loop runs.
- decode_attention_gather: a batch of single-token queries; one gather of the block tables into a padded
  [B, kv_heads, max_len, D] + SDPA with a key-padding mask. Works everywhere (the CPU path).
- decode_attention_triton: a paged flash-decoding kernel (CUDA, bf16/fp16): reads K/V straight from the
  pools through the block tables, the context split over num_splits programs per (sequence, kv head) and
  combined after; static shapes, so it is CUDA-graph capturable. Checked against the gather path once at
  start (`triton_decode_ok`); any failure means the gather path is used.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ..config import env_flag
from ..quant.fp8_gemv import pdl_enabled

log = logging.getLogger(__name__)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """k, v: [N, kv_heads, D] rows for the flat slot indices slots [N] (long)."""
    kvh, d = k_pool.shape[-2:]
    k_pool.view(-1, kvh, d).index_copy_(0, slots, k.to(k_pool.dtype))
    v_pool.view(-1, kvh, d).index_copy_(0, slots, v.to(v_pool.dtype))


def gather_blocks(pool: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """[length, kv_heads, D]: the first `length` tokens stored in the blocks (a 1-D block table)."""
    return pool[blocks].flatten(0, 1)[:length]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                      v_pool: torch.Tensor, blocks: torch.Tensor | None, start: int,
                      gqa_flash: bool = False) -> torch.Tensor:
    """q [n, H, D]; k, v [n, kv_heads, D] of the chunk (already written to the pools); the chunk's tokens are
    start .. start+n-1 of the sequence. Returns [n, H, D]. gqa_flash (where gqa_prefill_ok passed): a chunk with
    no cached prefix goes to SDPA's FlashAttention with its grouped k/v heads as they are (enable_gqa: no expanded
    copies). At W2's 1,281 rows on an H200 (per layer): 0.119 ms, against 0.158 for FlashAttention varlen over the
    grouped heads and 0.168 for the heads expanded; cuDNN took 0.085 but builds an execution plan (~37 ms of host
    time) for every new length, and padded to 256-row buckets it took 0.199 (docs/BENCHMARKS.md 2026-12-06)."""
    n, H, _ = q.shape
    if gqa_flash and start == 0 and q.is_cuda:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                 v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        return out[0].transpose(0, 1)
    if start > 0:  # the prefix lives in the cache (it may come from another request: prefix caching)
        L = start + n
        k = gather_blocks(k_pool, blocks, L)
        v = gather_blocks(v_pool, blocks, L)
    else:
        L = n
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if q.is_cuda:
        with sdpa_kernel(_PREFILL_BACKENDS):
            return _prefill_cuda(qh, kh, vh, n, L, start, H)
    mask = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(diagonal=start)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=kh.shape[1] != H)
    return out[0].transpose(0, 1)


def varlen_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, k_slots: torch.Tensor,
                             cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int) -> torch.Tensor:
    """Several sequences' prefill chunks at once. q [Nq, H, D]: the chunks' queries back to back; chunk i's keys
    and values are its whole sequence so far (cached prefix + the chunk, already in the pools), read at the flat
    slots k_slots[cu_k[i]:cu_k[i + 1]]; causal from the end: query j of a chunk of n against L keys sees keys
    0 .. L - n + j. One kernel launch per layer instead of a gather, a head expansion and an SDPA per chunk
    (a W4 step holds ~11 chunks: 300+ attention calls per step)."""
    from .. import layers

    kvh, d = k_pool.shape[-2:]
    k, v = k_pool.view(-1, kvh, d)[k_slots], v_pool.view(-1, kvh, d)[k_slots]
    rep = q.shape[1] // kvh
    if rep > 1:  # not every torch release takes grouped-query heads here
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return layers._flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **layers._causal_kwargs())


def _varlen_usable(dtype: torch.dtype, dev: torch.device, kv_heads: int, heads: int, head_dim: int) -> bool:
    from .. import layers

    return layers.flash_varlen_usable(torch.empty(1, 1, head_dim, device=dev, dtype=dtype)) and not heads % kv_heads


def gqa_prefill_ok(dtype: torch.dtype, device, kv_heads: int, heads: int, head_dim: int) -> bool:
    """Whether SDPA's FlashAttention takes grouped k/v heads here (enable_gqa) and agrees with the expanded-heads
    path on a causal chunk with no prefix (W2's prefill: the expansion copied 2 x 1,281 x 28 x 128 values per
    layer)."""
    dev = torch.device(device)
    if not _varlen_usable(dtype, dev, kv_heads, heads, head_dim):
        return False
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        n = 77
        q = torch.randn(n, heads, head_dim, generator=g, device=dev).to(dtype)
        k, v = (torch.randn(n, kv_heads, head_dim, generator=g, device=dev).to(dtype) for _ in range(2))
        pool = torch.zeros(1, 16, kv_heads, head_dim, device=dev, dtype=dtype)  # not read: no prefix
        want = prefill_attention(q, k, v, pool, pool, None, 0)
        got = prefill_attention(q, k, v, pool, pool, None, 0, gqa_flash=True)
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        torch.cuda.synchronize(dev)
        if not err < 1e-2:
            log.warning("SDPA flash with grouped k/v heads disagrees (rel err %.3g); heads are expanded", err)
            return False
        return True
    except Exception as e:
        log.warning("SDPA flash with grouped k/v heads unavailable (%s: %s); heads are expanded", type(e).__name__, e)
        return False


def varlen_prefill_ok(dtype: torch.dtype, device, block_size: int, kv_heads: int, heads: int,
                      head_dim: int) -> bool:
    """Whether varlen_prefill_attention is usable here and agrees with prefill_attention (chunks with and without
    a cached prefix) on random data: the varlen kernel's causal mask must align each chunk's queries with the
    end of its keys."""
    dev = torch.device(device)
    if not _varlen_usable(dtype, dev, kv_heads, heads, head_dim):
        return False
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        nb = 16
        kp = torch.randn(nb, block_size, kv_heads, head_dim, generator=g, device=dev).to(dtype)
        vp = torch.randn(nb, block_size, kv_heads, head_dim, generator=g, device=dev).to(dtype)
        chunks = [(0, 23, [3, 7]), (2 * block_size + 5, 19, [0, 9, 4, 12]), (block_size, 1 + block_size, [5, 1, 8])]
        q = torch.randn(sum(n for _, n, _ in chunks), heads, head_dim, generator=g, device=dev).to(dtype)
        k_slots, ref, cu_q, cu_k, r0 = [], [], [0], [0], 0
        for start, n, table in chunks:
            blocks = torch.tensor(table, device=dev)
            pos = torch.arange(start + n, device=dev)
            slots = blocks[pos // block_size] * block_size + pos % block_size
            k_slots.append(slots)
            kc, vc = (p.view(-1, kv_heads, head_dim)[slots[start:]] for p in (kp, vp))
            ref.append(prefill_attention(q[r0:r0 + n], kc, vc, kp, vp, blocks if start else None, start))
            r0 += n
            cu_q.append(r0)
            cu_k.append(cu_k[-1] + start + n)
        cu = [torch.tensor(c, dtype=torch.int32, device=dev) for c in (cu_q, cu_k)]
        out = varlen_prefill_attention(q, kp, vp, torch.cat(k_slots), cu[0], cu[1],
                                       max(n for _, n, _ in chunks), max(s + n for s, n, _ in chunks))
        err = (out.float() - torch.cat(ref).float()).abs().max().item()
        torch.cuda.synchronize(dev)
        if not err < 2e-2:
            log.warning("varlen prefill disagrees with the per-chunk path (max err %.3g); not using it", err)
            return False
        return True
    except Exception as e:  # a build without the kernel, or another signature
        log.warning("varlen prefill unavailable (%s: %s); prefill chunks attend one by one", type(e).__name__, e)
        return False


# Not cuDNN: SDPA prefers it on Hopper, and it builds (~2 ms of CPU) a new graph for every new sequence length,
# which is every prefill chunk of a server (measured: 0.68 s of host time in one 8192-token step of 11 chunks).
_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _prefill_cuda(qh, kh, vh, n, L, start, H):
    """Heads expanded (GQA) and a bottom-right causal bias, so the flash / memory-efficient kernels run."""
    rep = H // kh.shape[1]
    kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
    if start == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(n, L))
    return out[0].transpose(0, 1)


def decode_attention_gather(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """q [B, H, D] (one query per sequence, its K/V already written); block_tables [B, max_blocks] (padded
    with any valid block); context_lens [B]. Returns [B, H, D]."""
    B, H, D = q.shape
    kvh = k_pool.shape[2]
    k = k_pool[block_tables].flatten(1, 2).transpose(1, 2)  # [B, kvh, max_blocks*bs, D]
    v = v_pool[block_tables].flatten(1, 2).transpose(1, 2)
    L = k.shape[2]
    mask = torch.arange(L, device=q.device)[None, :] < context_lens[:, None].to(q.device)
    if q.is_cuda and kvh != H:
        k, v = k.repeat_interleave(H // kvh, dim=1), v.repeat_interleave(H // kvh, dim=1)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None, :],
                                         enable_gqa=k.shape[1] != H)
    return out[:, :, 0]


# ------------------------------------------------------------------------------------------------ Triton
try:
    import triton
    import triton.language as tl

    @triton.jit
    def _merge_head_splits(M, L, Acc, Out, ml_off, acc_off, out_off, num_splits, stride_acc_s,
                           HEAD_DIM: tl.constexpr, MAX_SPLITS: tl.constexpr):
        # flash-decoding's merge of one query head's splits (merge_splits' arithmetic): its [MAX_SPLITS] m and l and
        # [MAX_SPLITS, HEAD_DIM] partial sums in one load each, through L2 (.cg: in the decode kernel they are other
        # programs' writes)
        s = tl.arange(0, MAX_SPLITS)
        d = tl.arange(0, HEAD_DIM)
        ok = s < num_splits
        m_s = tl.load(M + ml_off + s, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(L + ml_off + s, mask=ok, other=0.0, cache_modifier=".cg")
        a_s = tl.load(Acc + acc_off + s[:, None] * stride_acc_s + d[None, :], mask=ok[:, None], other=0.0,
                      cache_modifier=".cg")
        w = tl.exp(m_s - tl.max(m_s, 0))  # split 0 is never empty (ctx >= 1): the max is finite
        o = tl.sum(a_s * w[:, None], 0) / tl.sum(l_s * w, 0)
        tl.store(Out + out_off + d, o.to(Out.dtype.element_ty))

    # Runtime ints that vary from step to step are not specialised on: one compiled kernel serves them all.
    @triton.jit(do_not_specialize=["stride_bt_b", "stride_acc_b", "stride_acc_h", "stride_m_b", "stride_m_h",
                                    "num_splits", "stride_o_b", "stride_o_h"])
    def _paged_decode_kernel(Q, KPool, VPool, BlockTables, ContextLens, Acc, M, L, Out, Counters,
                             stride_q_b, stride_q_h, stride_k_blk, stride_k_tok, stride_k_head, stride_bt_b,
                             stride_acc_b, stride_acc_h, stride_acc_s, stride_m_b, stride_m_h, stride_o_b, stride_o_h,
                             sm_scale, num_splits,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MERGE: tl.constexpr = False,
                             MAX_SPLITS: tl.constexpr = 1, USE_PDL: tl.constexpr = False):
        # One program: one sequence, one kv head (its GROUP query heads), one slice of the context.
        # MERGE: the program that finishes last for its (sequence, kv head) also merges the splits' partials and
        # writes Out (one kernel a layer instead of this one + the merge's two; Counters: one int32 per
        # (sequence, kv head), zero between calls: the merging program puts it back to 0).
        if USE_PDL:  # fp8_gemv's programmatic dependent launch switch: wait for q and the K/V just written
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(ContextLens + b)
        n_tiles = tl.cdiv(ctx, BLOCK_N)
        per_split = tl.cdiv(n_tiles, num_splits)
        t0 = split * per_split
        t1 = tl.minimum(t0 + per_split, n_tiles)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + g
        g_ok = g < GROUP
        q = tl.load(Q + b * stride_q_b + heads[:, None] * stride_q_h + d[None, :], mask=g_ok[:, None], other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        for t in range(t0, t1):
            n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < ctx
            blk = tl.load(BlockTables + b * stride_bt_b + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
            off = blk * stride_k_blk + (n % BLOCK_SIZE) * stride_k_tok + kvh * stride_k_head
            k = tl.load(KPool + off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(VPool + off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * sm_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        ml = b * stride_m_b + heads * stride_m_h + split
        tl.store(M + ml, m_i, mask=g_ok)
        tl.store(L + ml, l_i, mask=g_ok)
        tl.store(Acc + b * stride_acc_b + heads[:, None] * stride_acc_h + split * stride_acc_s + d[None, :], acc,
                 mask=g_ok[:, None])
        if MERGE:
            # every thread's partial stores are issued before the one atomic (release at GPU scope, cumulative
            # over what the barrier made this thread observe); the last program reads the others' through L2 (.cg)
            tl.debug_barrier()
            counter = Counters + b * tl.num_programs(1) + kvh
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                # one query head at a time, all its splits in one load each: the heads' loads are independent, so
                # they overlap (the first version walked the splits one load after another: at 16 splits slower than
                # the separate merge)
                for gi in tl.static_range(GROUP):
                    mg_head = kvh * GROUP + gi
                    _merge_head_splits(M, L, Acc, Out, b * stride_m_b + mg_head * stride_m_h,
                                       b * stride_acc_b + mg_head * stride_acc_h, b * stride_o_b + mg_head * stride_o_h,
                                       num_splits, stride_acc_s, HEAD_DIM=HEAD_DIM, MAX_SPLITS=MAX_SPLITS)
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next call (graph replays)

    @triton.jit
    def _merge_splits_kernel(Acc, M, L, Out, num_splits, stride_acc_bh, stride_acc_s, stride_m_bh, stride_o_bh,
                             HEAD_DIM: tl.constexpr, MAX_SPLITS: tl.constexpr):
        # one program per (sequence, head), the decode kernel's in-kernel merge after it (the compiled merge is two)
        bh = tl.program_id(0)
        _merge_head_splits(M, L, Acc, Out, bh * stride_m_bh, bh * stride_acc_bh, bh * stride_o_bh, num_splits,
                           stride_acc_s, HEAD_DIM=HEAD_DIM, MAX_SPLITS=MAX_SPLITS)

    HAVE_TRITON = True
except Exception:  # no triton (CPU builds of torch)
    HAVE_TRITON = False


@functools.lru_cache(maxsize=8)
def _num_sms(device) -> int:
    dev = torch.device(device)
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 8


def num_splits_for(batch: int, kv_heads: int, device) -> int:
    """Enough programs to fill the GPU about twice when the batch alone would not, at most 16
    (QWENVL_DECODE_MAX_SPLITS, for the bench: 24 to 48 splits were slower at batch 1 on the H200)."""
    sms = _num_sms(device)
    cap = int(os.environ.get("QWENVL_DECODE_MAX_SPLITS", "16"))
    return max(1, min(cap, math.ceil(2 * sms / max(1, batch * kv_heads))))


def merge_splits(acc: torch.Tensor, m: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Flash-decoding's split-K merge: acc [B, H, S, D] (unnormalised), m / lse [B, H, S] (running max, sum of
    exp). Empty splits have m = -inf and weigh 0."""
    w = torch.exp(m - m.max(-1, keepdim=True).values)
    return ((acc * w[..., None]).sum(2) / (lse * w).sum(-1)[..., None]).to(dtype)


def merge_splits_triton(acc: torch.Tensor, m: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """merge_splits in one Triton kernel (acc [B, H, S, D] and m / lse [B, H, S] contiguous fp32). The two kernels
    of the compiled merge took 104 us of the 7B FP8 batch-1 decode step (H100, docs/BENCHMARKS.md twenty-third
    session); this one took 53 us there (W1 +1.8 %, bf16 +1.1 %, twenty-fourth session): the runner's merge where
    its probe passes (QWENVL_TRITON_MERGE=0: the compiled one)."""
    if not (acc.is_contiguous() and m.is_contiguous() and lse.is_contiguous()):
        raise ValueError("merge_splits_triton: acc, m and lse must be contiguous")
    B, H, S, D = acc.shape
    out = torch.empty(B, H, D, dtype=dtype, device=acc.device)
    _merge_splits_kernel[(B * H,)](acc, m, lse, out, S, acc.stride(1), acc.stride(2), m.stride(1), out.stride(1),
                                   HEAD_DIM=D, MAX_SPLITS=max(2, triton.next_power_of_2(S)), num_warps=4)
    return out


@functools.lru_cache(maxsize=8)
def triton_merge_ok(device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether merge_splits_triton runs here and agrees with merge_splits (within one rounding of dtype) on random
    splits, empty ones included; probed once per (device, dtype, head dim), before any graph capture."""
    dev = torch.device(device)
    if not HAVE_TRITON or dev.type != "cuda" or head_dim & (head_dim - 1):
        return False
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        for S in (2, 3, 16):
            acc = torch.randn(2, 5, S, head_dim, generator=g, device=dev)
            m = torch.randn(2, 5, S, generator=g, device=dev) * 4
            lse = torch.rand(2, 5, S, generator=g, device=dev) + 0.5
            m[:, :, S - 1:] = float("-inf")  # an empty split
            lse[:, :, S - 1:] = 0.0
            want, got = merge_splits(acc, m, lse, dtype), merge_splits_triton(acc, m, lse, dtype)
            tol = torch.finfo(dtype).eps * want.float().abs() + 1e-6
            if not ((got.float() - want.float()).abs() <= tol).all():
                log.warning("Triton split merge differs from merge_splits at %d splits; using the compiled merge", S)
                return False
        return True
    except Exception as e:
        log.warning("Triton split merge unavailable (%s: %s); using the compiled merge", type(e).__name__, e)
        return False


_COUNTERS: dict = {}


def _merge_counters(device, n: int) -> torch.Tensor | None:
    """n zeroed int32 counters for the kernel's in-kernel merge, one buffer per device kept for the process (the
    merging program zeroes its counter again, so graph replays and later calls share it). Allocated outside any
    CUDA graph capture; None when a capture would need a bigger one (that call merges apart)."""
    dev = torch.device(device)
    buf = _COUNTERS.get(dev)
    if buf is None or buf.numel() < n:
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _COUNTERS[dev] = torch.zeros(max(n, 8192), dtype=torch.int32, device=dev)
    return buf


def fused_merge_max_splits() -> int:
    """Up to how many splits the runner merges them in the kernel: 0 with QWENVL_DECODE_FUSED_MERGE=0, else
    QWENVL_DECODE_FUSED_MERGE_MAX_SPLITS, 2 by default: the per-head merge of now is faster at 2 splits (batch 64:
    36.6 vs 42.4 us) and slower at batch 1's 16 (16.2 vs 11.2 us; H100, docs/BENCHMARKS.md 2026-12-06 tenth session)."""
    if not env_flag("QWENVL_DECODE_FUSED_MERGE", True):
        return 0
    return int(os.environ.get("QWENVL_DECODE_FUSED_MERGE_MAX_SPLITS", "2"))


def decode_attention_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, num_splits: int = 0,
                            block_n: int = 64, merge=merge_splits, fused_merge: bool = False) -> torch.Tensor:
    """Same contract as decode_attention_gather; block_tables int32 [B, max_blocks], context_lens int32 [B].
    merge: merge_splits, or a compiled copy of it (engine/fused.py). fused_merge: the kernel merges the splits
    itself (the last program of each (sequence, kv head) to finish; `merge` unused). At 16 splits (batch 1) it costs
    more than the two merge kernels it replaces, at 2 (batch >= 33) less (H200 and H100, docs/BENCHMARKS.md
    2026-12-06), so the runner asks for it up to fused_merge_max_splits()."""
    B, H, D = q.shape
    _, bs, kvh, _ = k_pool.shape
    group = H // kvh
    splits = num_splits or num_splits_for(B, kvh, q.device)
    q = q.contiguous()
    acc = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    counters = _merge_counters(q.device, B * kvh) if fused_merge else None
    out = torch.empty_like(q) if counters is not None else acc
    _paged_decode_kernel[(B, kvh, splits)](
        q, k_pool, v_pool, block_tables, context_lens, acc, m, lse, out, counters if counters is not None else m,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), out.stride(0), out.stride(1),
        1.0 / math.sqrt(D), splits,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_SIZE=bs,
        BLOCK_N=block_n, MERGE=counters is not None, MAX_SPLITS=triton.next_power_of_2(splits), num_warps=4,
        enable_fp_fusion=True,  # as measured (triton's default, to turn off in 3.10)
        **({"USE_PDL": True, "launch_pdl": True} if pdl_enabled(q.device) else {}))
    if counters is not None:
        return out
    if splits == 1:
        return (acc[:, :, 0] / lse).to(q.dtype)
    return merge(acc, m, lse, q.dtype)


def triton_decode_ok(dtype: torch.dtype, device, block_size: int, kv_heads: int, heads: int, head_dim: int,
                     fused_merge: bool = False) -> bool:
    """Whether the Triton kernel is usable here and agrees with the gather path on random data (fused_merge: the
    variant that merges its splits in the kernel, called twice to check that it leaves its counters at zero)."""
    dev = torch.device(device)
    if not HAVE_TRITON or dev.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) \
            or head_dim & (head_dim - 1) or heads % kv_heads:
        return False
    name = "Triton paged decode" + (" with the in-kernel merge" if fused_merge else "")
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        nb, B = 64, 5
        kp = torch.randn(nb + 1, block_size, kv_heads, head_dim, generator=g, device=dev).to(dtype)
        vp = torch.randn(nb + 1, block_size, kv_heads, head_dim, generator=g, device=dev).to(dtype)
        q = torch.randn(B, heads, head_dim, generator=g, device=dev).to(dtype)
        max_blocks = 12
        bt = torch.randperm(nb, generator=g, device=dev)[:B * max_blocks].view(B, max_blocks).int()
        ctx = torch.tensor([1, block_size, block_size + 3, 5 * block_size - 1, max_blocks * block_size],
                           dtype=torch.int32, device=dev)
        ref = decode_attention_gather(q, kp, vp, bt.long(), ctx)
        for splits in ((1, 3, 3, 16) if fused_merge else (1, 3)):
            out = decode_attention_triton(q, kp, vp, bt, ctx, num_splits=splits, fused_merge=fused_merge)
            err = (out.float() - ref.float()).abs().max().item()
            if not err < 2e-2:
                log.warning("%s disagrees with the gather path (max err %.3g); not using it", name, err)
                return False
        torch.cuda.synchronize(dev)
        return True
    except Exception as e:  # compile or launch failure
        log.warning("%s unavailable (%s: %s); using %s", name, type(e).__name__, e,
                    "the separate merge" if fused_merge else "the gather path")
        return False
