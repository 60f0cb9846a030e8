"""SwiGLU's silu(gate) * up as one Triton kernel over the fused gate/up output, rounded as the eager ops round.

Why: the compiled `F.silu(g) * u` (fused.DecoderOps.silu_mul) ran at ~1.15 TB/s on an H100 in prefill (W4's mixed
step: ~810 us per layer at 8,192 rows, a third of a plain copy's speed), and prefill steps launch it once per layer
over [rows, 2 x 18,944] for the 7B shape. This kernel reads each row's gate and up halves with 16-byte loads and
writes the product once: silu in fp32 (libdevice exp and an IEEE division, as ATen's kernel), rounded to the model
dtype, times up in fp32, rounded again: the eager ops' two roundings.

`silu_mul_ok` checks it against the eager ops once per (device, dtype); the runner uses it where that passed
(QWENVL_TRITON_SILU=0 keeps the compiled op). Runs under TRITON_INTERPRET=1 on CPU tensors for the tests.
"""

from __future__ import annotations

import logging

import torch

from ..quant.fp8_gemv import HAVE_TRITON, interpreting, tl, triton
from .fused import silu_mul_eager

log = logging.getLogger(__name__)

if HAVE_TRITON:
    from ..quant.fp8_gemv import _silu_mul_rn  # CUDA's expf and an IEEE division, as ATen's silu

    @triton.jit(do_not_specialize=["N"])
    def _silu_mul_kernel(GU, Y, N, I, stride_gu, stride_y, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                         LIBDEVICE: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = (rows < N)[:, None] & (cols < I)[None, :]
        rows = rows.to(tl.int64)[:, None]
        g = tl.load(GU + rows * stride_gu + cols[None, :], mask=ok, other=0.0)
        u = tl.load(GU + rows * stride_gu + I + cols[None, :], mask=ok, other=0.0)
        tl.store(Y + rows * stride_y + cols[None, :], _silu_mul_rn(g, u, LIBDEVICE), mask=ok)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [N, 2I] (rows contiguous) -> silu(gu[:, :I]) * gu[:, I:] [N, I] in gu's dtype."""
    if gu.dim() != 2 or gu.shape[1] % 2 or gu.stride(-1) != 1:
        raise ValueError(f"silu_mul: expected [N, 2I] with contiguous rows, got {tuple(gu.shape)}")
    N, I = gu.shape[0], gu.shape[1] // 2
    y = torch.empty(N, I, dtype=gu.dtype, device=gu.device)
    if N:
        rows, block = (1, 256) if N < 4 else (4, 1024)  # decode rows: more, smaller programs
        block = min(block, triton.next_power_of_2(I))
        launch = {"num_warps": 4} if gu.is_cuda else {}
        _silu_mul_kernel[(-(-N // rows), -(-I // block))](gu, y, N, I, gu.stride(0), y.stride(0), BLOCK=block,
                                                           ROWS=rows, LIBDEVICE=gu.is_cuda, **launch)
    return y


_OK: dict[tuple, bool] = {}


def silu_mul_ok(device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs here and equals the eager ops on random data (once per device and dtype; on CUDA
    bit for bit, under the interpreter, whose exp is numpy's, within one rounding; synchronises: call before
    capturing CUDA graphs)."""
    dev = torch.device(device)
    if not HAVE_TRITON or dtype not in (torch.bfloat16, torch.float16):
        return False
    if dev.type != "cuda" and not interpreting():
        return False
    key = (str(dev), dtype)
    if key in _OK:
        return _OK[key]
    ok = False
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        for n, i in ((1, 1100), (7, 300)):  # one row (decode); a ragged row block and column block
            gu = (torch.randn(n, 2 * i, generator=g, device=dev) * 4).to(dtype)
            got, want = silu_mul(gu), silu_mul_eager(gu)
            if dev.type == "cuda":
                bad = int((got != want).sum())
            else:  # numpy's exp under the interpreter: at most one unit in the last place
                ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
                bad = int(((got.float() - want.float()).abs() > ulp).sum())
            if bad:
                raise RuntimeError(f"{bad} of {want.numel()} values differ from F.silu(g) * u at [{n}, {2 * i}]")
        ok = True
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except Exception as e:  # compile or launch failure, or a mismatch
        log.warning("silu * up kernel unusable (%s: %s); the compiled op stays", type(e).__name__, e)
    _OK[key] = ok
    return ok
