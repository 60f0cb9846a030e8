"""Weight prefetch into L2 while batch-1 decode attention runs (a side stream, one small Triton kernel).

Why: at batch 1 the decode attention of a layer is latency-bound (B x kv_heads x splits programs: 64 of an H100's
132 SMs, ~3 MB of KV read), so for several microseconds the memory system idles between the q/k/v GEMV and the
o_proj GEMV. Reading o_proj's weights (12.8 MB bf16 / 6.4 MB FP8 at the 7B shape) into the 50 MB L2 in that gap,
on the SMs attention leaves free, lets the o_proj GEMV read them from L2 instead of HBM. The kernel reads the
bytes and stores one word per program (so the loads are not optimised away); nothing reads the sink.

`l2_prefetch(weight, sink)` launches it on the current stream; the runner forks a side stream for it (captured
into the decode CUDA graphs as a parallel branch) and joins before o_proj: `QWENVL_L2_PREFETCH=1` turns it on
(off by default until an H100 measurement says it pays). Runs under TRITON_INTERPRET=1 on CPU tensors for the tests.
"""

from __future__ import annotations

import torch

from ..quant.fp8_gemv import HAVE_TRITON, tl, triton

PROGRAMS = 64  # about the SMs batch-1 attention leaves free on an H100
BLOCK = 2048  # int32 words per program per iteration (8 KiB)

if HAVE_TRITON:

    @triton.jit(do_not_specialize=["words", "per_program"])
    def _l2_prefetch_kernel(W, SINK, words, per_program, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * per_program
        end = tl.minimum(start + per_program, words)
        acc = tl.zeros([BLOCK], dtype=tl.int64)
        for off in range(start, end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            acc += tl.load(W + offs, mask=offs < end, other=0, cache_modifier=".cg").to(tl.int64)
        tl.store(SINK + pid, tl.sum(acc, axis=0))


def sink_for(device) -> torch.Tensor:
    """The kernel's output buffer (one int64 per program): allocate once, reuse for every launch."""
    return torch.zeros(PROGRAMS, dtype=torch.int64, device=device)


def l2_prefetch(weight: torch.Tensor, sink: torch.Tensor) -> None:
    """Read `weight` (contiguous, any dtype, size a multiple of 4 bytes) once, on the current stream; sink[p] gets
    program p's sum of its int32 words (what the tests check coverage with)."""
    if not HAVE_TRITON:
        raise RuntimeError("l2_prefetch needs triton")
    if not weight.is_contiguous() or (weight.numel() * weight.element_size()) % 4:
        raise ValueError("l2_prefetch: the weight must be contiguous and a whole number of 4-byte words")
    words = weight.reshape(-1).view(torch.uint8).view(torch.int32)
    n = words.numel()
    programs = sink.numel()
    per = -(-n // programs)
    per = -(-per // BLOCK) * BLOCK  # whole blocks per program
    launch = {"num_warps": 4} if weight.is_cuda else {}
    _l2_prefetch_kernel[(programs,)](words, sink, n, per, BLOCK=BLOCK, **launch)
