"""Building blocks shared by the vision encoder and the decoder."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32, cast back, then scale in the input dtype: the reference's order of rounding.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self._padded: tuple | None = None  # (gate|up [2*Hp, dim], its bias, down [dim, Hp], Hp), see pad_hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._padded
        # (no data_ptr() check here: under torch.compile a data-pointer comparison breaks the graph, and the
        # engine's compiled ViT blocks then ran this MLP eagerly; _apply drops the padded tensors instead)
        if p is not None and not torch.is_grad_enabled() and p[0].dtype == x.dtype:
            gu = F.linear(x, p[0], p[1])
            g, u = gu[..., :p[3]], gu[..., p[3]:]
            return F.linear(F.silu(g) * u, p[2], self.down_proj.bias)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def _apply(self, fn, recurse: bool = True):
        """.to() / .float() / .cuda() give the parameters new storage: the padded copies would be stale."""
        self._padded = None
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def pad_hidden(self, multiple: int = 16) -> bool:
        """For inference on CUDA: widen the hidden size to a multiple of `multiple` with zero rows/columns
        (the same outputs: silu(0) * 0 adds nothing) and fuse gate/up into one matmul. The ViT's 3420 is not a
        multiple of 8, and cuBLAS then falls back from its Hopper kernels to ~3x slower Ampere ones. The
        parameters become views of the padded tensors: no second copy, state_dict unchanged. Training (grad
        enabled) and any later .to()/.float() (new storage) use the plain path. Returns whether it padded."""
        h = self.gate_proj.out_features
        hp = -(-h // multiple) * multiple
        if self._padded is not None or hp == h:
            return False
        w = self.gate_proj.weight
        gu = w.new_zeros(2 * hp, w.shape[1])
        gu[:h], gu[hp:hp + h] = w, self.up_proj.weight
        bgu = None
        if self.gate_proj.bias is not None:
            bgu = w.new_zeros(2 * hp)
            bgu[:h], bgu[hp:hp + h] = self.gate_proj.bias, self.up_proj.bias
        down = w.new_zeros(w.shape[1], hp)
        down[:, :h] = self.down_proj.weight
        self.gate_proj.weight.data, self.up_proj.weight.data = gu[:h], gu[hp:hp + h]
        if bgu is not None:
            self.gate_proj.bias.data, self.up_proj.bias.data = bgu[:h], bgu[hp:hp + h]
        self.down_proj.weight.data = down[:, :h]
        self._padded = (gu, bgu, down, hp)
        return True


@dataclass
class Segments:
    """Segment boundaries of a packed sequence, prepared once per forward and shared by every layer.

    Building them per layer would copy `cu_seqlens` host->device in each layer, and a pageable copy waits
    for the GPU to drain: the CPU could then never run ahead of the kernels it launches.
    """
    cu: torch.Tensor  # [S+1] int32 on the tensors' device
    lengths: list[int]
    _padded: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gather [S, Lmax] row indices, valid [S, Lmax]) for the padded-batch path, built on first use."""
        if self._padded is None:
            dev, n = self.cu.device, int(sum(self.lengths))
            lens = torch.tensor(self.lengths, device=dev)
            ar = torch.arange(self.max_len, device=dev)
            valid = ar[None, :] < lens[:, None]
            gather = (self.cu[:-1, None].long() + ar[None, :]).clamp(max=n - 1)
            self._padded = (gather, valid)
        return self._padded


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`. A host tensor goes to CUDA through pinned memory without blocking: a copy from pageable memory
    first waits for the GPU to drain, so the host could never run ahead of the kernels it launches."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def host_copy_async(t: torch.Tensor):
    """Start copying `t` to the host; returns a function that waits for the copy alone and gives the host tensor.
    A plain `.tolist()` / `.cpu()` is ordered after everything queued on the stream until then: called after the
    next decode step was launched, it would wait for that whole step too."""
    if t.device.type != "cuda":
        return lambda: t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> torch.Tensor:
        done.synchronize()
        return out

    return wait


def segments(cu_seqlens: torch.Tensor, device) -> Segments:
    cu = cu_seqlens.tolist()
    t = torch.tensor(cu, dtype=torch.int32)
    if torch.device(device).type == "cuda":
        t = t.pin_memory()  # a pinned copy does not wait for the GPU to drain
    return Segments(t.to(device, non_blocking=True),
                    [b - a for a, b in zip(cu[:-1], cu[1:])])


def _load_flash_varlen():
    try:  # torch >= 2.10: FlashAttention over packed sequences, no padding
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn
    except ImportError:
        return None


_flash_varlen = _load_flash_varlen()


def _causal_kwargs() -> dict:
    # torch 2.10 spells causal attention is_causal=True; later releases window_size=(-1, 0).
    import inspect

    params = inspect.signature(_flash_varlen).parameters if _flash_varlen is not None else {}
    return {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}


def flash_varlen_usable(q: torch.Tensor) -> bool:
    return (_flash_varlen is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


# Eager inside compiled blocks: traced, the segment list is guarded on its length, one recompile per sample count.
@torch.compiler.disable
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments,
                     causal: bool = False) -> torch.Tensor:
    """Attention inside each segment [cu[i], cu[i+1]) of a packed sequence; q: [N, H, D], k, v: [N, Hkv, D]
    (Hkv divides H: grouped-query attention). causal: each token sees only its segment's earlier tokens
    (packed training rows); else the whole segment (ViT windows and frames).

    seg: the segments, prepared once per forward (`segments`). On CUDA in bf16/fp16 the
    segments go to FlashAttention's varlen kernel as they are; elsewhere they are gathered into a padded
    batch [S, H, Lmax, D] with a key-padding mask for one SDPA call. Either way no token sees another
    segment, and there is no Python loop over (possibly thousands of) windows.
    """
    global _flash_varlen
    gqa = bool(k.shape[1] != q.shape[1])
    if torch.is_autocast_enabled(q.device.type):  # autocast does not reach the varlen op: cast as SDPA would
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if len(seg.lengths) == 1:
        # 4D [1, H, N, D]: 3D inputs miss the fused (flash) kernels and fall back to the math path.
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                             is_causal=causal, enable_gqa=gqa)
        return out[0].transpose(0, 1)
    if flash_varlen_usable(q):
        try:
            if gqa:  # not every torch release takes enable_gqa here; the copy is small next to the matmuls
                k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
            return _flash_varlen(q, k, v, seg.cu, seg.cu, seg.max_len, seg.max_len,
                                 **(_causal_kwargs() if causal else {}))
        except (RuntimeError, TypeError) as e:  # a build without the kernel: padded SDPA from now on
            warnings.warn(f"FlashAttention varlen unavailable ({type(e).__name__}: {e}); using padded SDPA")
            _flash_varlen = None
    gather, valid = seg.padded()

    def pad(x):
        return x[gather].permute(0, 2, 1, 3)  # [S, H, L, D]

    mask = valid[:, None, None, :]
    if causal:
        mask = mask & torch.ones(seg.max_len, seg.max_len, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, enable_gqa=gqa)
    return out.permute(0, 2, 1, 3)[valid]  # back to [N, H, D], segment order preserved
