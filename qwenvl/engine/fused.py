"""The decoder's elementwise work between the matmuls, as a few functions that torch.compile can fuse.

Eagerly, one 7B decode step launches ~1,200 kernels: per layer two RMSNorms of 8 kernels each (fp32 cast, pow,
mean, add, rsqrt, mul, cast, scale), two residual adds, 5 for the rotary, 2 for SwiGLU's silu * up, 9 to merge
the split-K partials of the paged decode attention, a copy of q. Under a CUDA graph there is no launch cost left,
but every kernel still takes a few microseconds of the GPU, ~3 ms a step in all: the measured gap between W1 and
the copy-bandwidth floor (docs/BENCHMARKS.md). Compiled, each function below is one or two kernels.

`DecoderOps(..., compiled=False)` holds them as plain functions (the same arithmetic, op for op, as the modules
they stand in for: `layers.rms_norm`, `rope.rotate_half`, `F.silu(g) * u`), so eager results are unchanged;
`compiled=True` wraps each in `torch.compile(fullgraph=True)` with the row count dynamic (one compile serves every
batch size and prefill length beyond 1; `dynamic`/QWENVL_COMPILE_OPS_DYNAMIC: see `_compile`; `backend` is for
tests: "aot_eager" traces the same graphs without code generation).
The runner switches it on on CUDA by default (`QWENVL_COMPILE_OPS=0` turns it off): W1 +24 % / W4 +33 % on an
H200 (docs/BENCHMARKS.md 2026-12-05) and the GPU logprob test
(tests/test_engine_cuda.py::test_compiled_decoder_ops_close_to_reference_logits) passed on an H100 the same day;
it costs compile time at engine start, and falls back to eager if the compiled functions disagree with the
eager ones on a self-test (`DecoderOps.check`).
"""

from __future__ import annotations

import logging
import os
import types

import torch
import torch.nn.functional as F

from ..config import env_flag
from ..layers import rms_norm
from ..rope import rotate_half
from .attention import merge_splits

log = logging.getLogger(__name__)


# inductor computes a fused chain of bf16 ops in fp32 and rounds once at the end unless told to round where the eager
# ops round (after each op): without it a quarter of the RMSNorm / rotary / silu * up outputs were one bf16 step off
# the eager ops', enough to part greedy tokens at near ties (the fast-paths check); with it they are bit-equal
EXACT_CASTS = {"emulate_precision_casts": True}


def compile_ops_requested() -> bool:
    return env_flag("QWENVL_COMPILE_OPS", True)


def split_rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                   head_dim: int):
    """qkv [N, (H + 2 KV) D] -> q [N, H, D] (contiguous, for the decode kernel), k, v [N, KV, D]; q and k rotated in
    the model dtype (cos, sin [N, 1, D]) as the reference does."""
    H, KV, D = heads, kv_heads, head_dim
    N = qkv.shape[0]
    qk = qkv[:, :(H + KV) * D].view(N, H + KV, D)
    qk = qk * cos + rotate_half(qk) * sin
    q, k = qk.split([H, KV], dim=1)
    return q.contiguous(), k, qkv[:, (H + KV) * D:].view(N, KV, D)


def silu_mul_eager(gu: torch.Tensor) -> torch.Tensor:
    """gu [..., 2I] -> silu(gu[..., :I]) * gu[..., I:] (SwiGLU on the fused gate/up output), as the module does."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


class DecoderOps:
    """add_rms_norm, rope_qkv, silu_mul, merge_splits for one decoder shape (heads, kv heads, head dim, eps)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, eps: float, compiled: bool = False,
                 backend: str = "inductor", dynamic: str | None = None, kernels: dict | None = None):
        """kernels: functions that stand in for some of the ops as they are, not compiled (the runner's Triton
        silu * up, which has its own probe); a failed `check` puts the eager ops back for these too."""
        H, KV, D = heads, kv_heads, head_dim

        def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor):
            """(h + delta, RMSNorm(h + delta)) with the residual sum rounded to h's dtype first, as the
            decoder layer adds it; delta None: (h, RMSNorm(h))."""
            if delta is not None:
                h = h + delta
            return h, rms_norm(h, weight, eps)

        def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
            return split_rope_qkv(qkv, cos, sin, H, KV, D)

        self.eager = {"add_rms_norm": add_rms_norm, "rope_qkv": rope_qkv, "silu_mul": silu_mul_eager,
                      "merge_splits": merge_splits}
        self.shape = (H, KV, D)
        self.compiled = compiled
        self.dynamic = dynamic if dynamic is not None else os.environ.get("QWENVL_COMPILE_OPS_DYNAMIC", "rows")
        if self.dynamic not in ("rows", "all"):
            raise ValueError(f"QWENVL_COMPILE_OPS_DYNAMIC={self.dynamic!r}: 'rows' or 'all'")
        kernels = kernels or {}
        for name, fn in self.eager.items():
            setattr(self, name, kernels[name] if name in kernels else self._compile(fn, backend) if compiled else fn)

    def _compile(self, fn, backend: str):
        """dynamic 'rows': only the row count (dim 0 of each input of 2+ dims) is symbolic, the feature sizes are
        compiled in as constants. 'all' (dynamic=True, as before 2026-12-05's sixth session) makes every size a
        runtime value: the functions take their weights as arguments, so nothing specialises the hidden sizes,
        and inductor's kernels then index with divisions by runtime values (W4's mixed-step profile on an H100:
        silu * up at ~1.2 TB/s, the rotary at ~0.45, against ~3 for a plain copy). One compile for 1 row, one
        for all other row counts (and, after one recompile, any other size that varies, e.g. the split count)."""
        fn = _own_code(fn)
        kw = dict(fullgraph=True, backend=backend, options=EXACT_CASTS if backend == "inductor" else None)
        if self.dynamic == "all":
            return torch.compile(fn, dynamic=True, **kw)
        compiled = torch.compile(fn, dynamic=None, **kw)

        def call(*args):
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() >= 2:
                    torch._dynamo.maybe_mark_dynamic(a, 0)
            return compiled(*args)

        return call

    def check(self, device, dtype: torch.dtype, hidden: int, tol: float = 3e-2) -> bool:
        """Compiled vs eager on random inputs at a few row counts (1 is specialised apart under dynamic shapes);
        an exception or a relative error above tol switches the eager functions back in and returns False."""
        if not self.compiled:
            return True
        try:
            with torch.inference_mode():  # as the runner calls them: grad mode is one of dynamo's guards
                self._check(device, dtype, hidden, tol)
            return True
        except Exception as e:  # compile failure or mismatch: eager from now on
            log.warning("compiled decoder ops unusable (%s: %s); running them eagerly", type(e).__name__, e)
            for name, fn in self.eager.items():
                setattr(self, name, fn)
            self.compiled = False
            return False

    def _check(self, device, dtype: torch.dtype, hidden: int, tol: float) -> None:
        H, KV, D = self.shape
        g = torch.Generator(device=device).manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=g, device=device).to(dtype)

        for n in (1, 3, 37):
            h, d, w = rand(n, hidden), rand(n, hidden), rand(hidden)
            cos, sin = rand(n, 1, D), rand(n, 1, D)
            acc = torch.randn(n, H, 3, D, generator=g, device=device)
            m = torch.randn(n, H, 3, generator=g, device=device)
            m[..., -1] = float("-inf")  # an empty split
            lse = torch.rand(n, H, 3, generator=g, device=device) + 0.5
            for name, args in (("add_rms_norm", (h, d, w)), ("add_rms_norm", (h, None, w)),
                               ("rope_qkv", (rand(n, (H + 2 * KV) * D), cos, sin)),
                               ("silu_mul", (rand(n, 2 * hidden),)), ("merge_splits", (acc, m, lse, dtype))):
                got, want = getattr(self, name)(*args), self.eager[name](*args)
                for a, b in zip(_tuple(got), _tuple(want)):
                    if a.shape != b.shape or _rel_err(a, b) > tol:
                        raise RuntimeError(f"compiled {name} differs from eager ({_rel_err(a, b):.3g}, "
                                           f"shapes {tuple(a.shape)} / {tuple(b.shape)})")


def _own_code(fn):
    """fn with a copy of its code object: dynamo keeps compiled variants and its recompile limit (8) per code
    object, so without a copy every DecoderOps built in a process (one per engine) would share one budget, and a
    process that builds a few engines hit it (with fullgraph=True, a hard failure)."""
    g = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    g.__kwdefaults__, g.__qualname__, g.__doc__ = fn.__kwdefaults__, fn.__qualname__, fn.__doc__
    return g


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
