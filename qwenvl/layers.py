"""Building blocks shared by the vision encoder and the decoder."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale in the input dtype: the reference's order of rounding.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Non-causal attention inside each segment [cu[i], cu[i+1]) of a packed sequence; q, k, v: [N, H, D].

    Segments are gathered into a padded batch [S, H, Lmax, D] with a key-padding mask, one SDPA call:
    no token ever sees another segment, and there is no Python loop over (possibly thousands of) windows.
    """
    cu = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if len(lens) == 1:
        # 4D [1, H, N, D]: 3D inputs miss the fused (flash) kernels and fall back to the math path.
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
        return out[0].transpose(0, 1)
    n, H, D = q.shape
    L = max(lens)
    lens_t = torch.tensor(lens, device=q.device)
    starts = torch.tensor(cu[:-1], device=q.device)
    ar = torch.arange(L, device=q.device)
    valid = ar[None, :] < lens_t[:, None]  # [S, L]
    gather = (starts[:, None] + ar[None, :]).clamp(max=n - 1)  # [S, L]

    def pad(x):
        return x[gather].permute(0, 2, 1, 3)  # [S, H, L, D]

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :])
    out = out.permute(0, 2, 1, 3)[valid]  # back to [N, H, D], segment order preserved
    return out
