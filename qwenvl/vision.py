"""Vision encoder: patch embedding, 2D rotary, window attention (full in a few blocks), merger.

All images (or all frames of all videos) of a call are packed into one sequence; attention never crosses
an item or a temporal patch (cu_seqlens), and window layers attend inside 112 px windows only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig
from .errors import InputError
from .layers import RMSNorm, SwiGLU, varlen_attention
from .rope import check_grid, frame_cu_seqlens, rotate_half, vision_rotary_freqs, window_index


class PatchEmbedProj(nn.Module):
    """Holds the Conv3d weight in the checkpoint's shape; the stride equals the kernel, so it is one matmul."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c.hidden_size, c.in_channels, c.temporal_patch_size, c.patch_size,
                                               c.patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight.dtype) @ self.weight.view(self.weight.shape[0], -1).t()


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.proj = PatchEmbedProj(c)

    def forward(self, x):
        return self.proj(x)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=True)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).unbind(1)
        # The rotation runs in fp32 (cos/sin are never rounded to bf16), then back to the activation dtype.
        cos, sin = cos[:, None, :], sin[:, None, :]
        qf, kf = q.float(), k.float()
        q = (qf * cos + rotate_half(qf) * sin).to(x.dtype)
        k = (kf * cos + rotate_half(kf) * sin).to(x.dtype)
        out = varlen_attention(q, k, v, cu_seqlens)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(c.hidden_size, 1e-6)
        self.norm2 = RMSNorm(c.hidden_size, 1e-6)
        self.attn = VisionAttention(c)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, bias=True)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate each 2x2 block (4 consecutive rows), MLP with exact GELU."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.ln_q = RMSNorm(c.hidden_size, 1e-6)
        width = c.hidden_size * c.merge_unit
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, c.out_hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class VisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList([VisionBlock(c) for _ in range(c.depth)])
        self.merger = PatchMerger(c)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """pixel_values [N_patches, C*T*P*P] in the processor's row order -> [N_patches/4, out_hidden_size]."""
        c = self.config
        grids = check_grid(grid_thw, c.spatial_merge_size)
        n = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or pixel_values.shape != (n, c.patch_dim):
            raise InputError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected ({n}, {c.patch_dim}) "
                             f"for grid_thw {grids}")
        dev = pixel_values.device
        unit = c.merge_unit
        x = self.patch_embed(pixel_values)
        freqs = vision_rotary_freqs(grids, c.head_dim, c.spatial_merge_size)
        win_idx, cu_window = window_index(grids, c.window_size, c.patch_size, c.spatial_merge_size)
        cu_full = frame_cu_seqlens(grids)
        win_idx = win_idx.to(dev)
        # Reorder merge units into window order; windows stay inside frames, so cu_full is unchanged.
        x = x.view(n // unit, unit, -1)[win_idx].reshape(n, -1)
        freqs = freqs.to(dev).view(n // unit, unit, -1)[win_idx].reshape(n, -1)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        full = set(c.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cu_full if i in full else cu_window, cos, sin)
        x = self.merger(x)
        return x[torch.argsort(win_idx)]
