"""Vision encoder: patch embedding, 2D rotary, window attention (full in a few blocks), merger.

All images (or all frames of all videos) of a call are packed into one sequence; attention never crosses
an item or a temporal patch (cu_seqlens), and window layers attend inside 112 px windows only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig
from .errors import InputError
from .layers import RMSNorm, Segments, SwiGLU, segments, to_device, varlen_attention
from .rope import check_grid, frame_cu_seqlens, rotate_half, vision_pos_ids, vision_rotary_angles, window_index


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

    def forward(self, x: torch.Tensor, seg: Segments, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).unbind(1)
        # The rotation runs in fp32 (cos/sin are never rounded to bf16), then back to the activation dtype.
        cos, sin = cos[:, None, :], sin[:, None, :]
        qf, kf = q.float(), k.float()
        q = (qf * cos + rotate_half(qf) * sin).to(x.dtype)
        k = (kf * cos + rotate_half(kf) * sin).to(x.dtype)
        out = varlen_attention(q, k, v, seg)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(c.hidden_size, 1e-6)
        self.norm2 = RMSNorm(c.hidden_size, 1e-6)
        self.attn = VisionAttention(c)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, bias=True)

    def forward(self, x, seg, cos, sin):
        x = x + self.attn(self.norm1(x), seg, cos, sin)
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


@dataclass
class VisionPlan:
    win_idx: torch.Tensor  # merge units in window order
    reverse_idx: torch.Tensor  # back to the processor's order
    cos: torch.Tensor  # [N, head_dim] fp32, rows in window order
    sin: torch.Tensor
    window: Segments  # window-attention segments
    full: Segments  # one segment per frame (temporal patch) of each item


class VisionTransformer(nn.Module):
    PLAN_CACHE_ROWS = 1 << 17  # patches whose plans stay cached (~85 MB of fp32 rotary tables at head_dim 80)

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList([VisionBlock(c) for _ in range(c.depth)])
        self.merger = PatchMerger(c)
        self._plans: OrderedDict = OrderedDict()

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def pad_mlp_hidden(self, multiple: int = 16) -> bool:
        """Inference speed on CUDA: see SwiGLU.pad_hidden (the 7B/72B ViT's 3420-wide MLP). Same outputs."""
        return any([blk.mlp.pad_hidden(multiple) for blk in self.blocks])

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """pixel_values [N_patches, C*T*P*P] in the processor's row order -> [N_patches/4, out_hidden_size]."""
        x, plan = self.patch_states(pixel_values, grid_thw)
        return self.merger(x)[plan.reverse_idx]

    def patch_states(self, pixel_values: torch.Tensor, grid_thw) -> tuple[torch.Tensor, "VisionPlan"]:
        """The last block's output [N_patches, hidden], merge units in window order (plan.reverse_idx puts units back
        in the processor's order), and the plan: what the merger reads."""
        c = self.config
        grids = check_grid(grid_thw, c.spatial_merge_size)
        n = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or pixel_values.shape != (n, c.patch_dim):
            raise InputError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected ({n}, {c.patch_dim}) "
                             f"for grid_thw {grids}")
        unit = c.merge_unit
        x = self.patch_embed(pixel_values)
        plan = self._plan(grids, pixel_values.device)
        # Reorder merge units into window order; windows stay inside frames, so the frame segments hold.
        x = x.view(n // unit, unit, -1)[plan.win_idx].reshape(n, -1)
        full = set(c.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            x = blk(x, plan.full if i in full else plan.window, plan.cos, plan.sin)
        return x, plan

    def _plan(self, grids: list[tuple[int, int, int]], device) -> "VisionPlan":
        """Window order, rotary tables and segment boundaries of a grid list, cached per (grids, device):
        the engine sees the same few image shapes again and again."""
        key = (tuple(grids), str(device))
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        c = self.config
        n, unit = sum(t * h * w for t, h, w in grids), c.merge_unit
        win_idx, cu_window = window_index(grids, c.window_size, c.patch_size, c.spatial_merge_size)
        # (row, col) ids in window order go to the device; the fp32 angle tables (2 x N x head_dim) are made there
        pos = vision_pos_ids(grids, c.spatial_merge_size).view(n // unit, unit, 2)[win_idx].reshape(n, 2)
        freqs = vision_rotary_angles(to_device(pos, device), c.head_dim)
        emb = torch.cat([freqs, freqs], dim=-1)
        plan = VisionPlan(to_device(win_idx, device), to_device(torch.argsort(win_idx), device), emb.cos(), emb.sin(),
                          segments(cu_window, device), segments(frame_cu_seqlens(grids), device))
        self._plans[key] = plan
        # Bounded by rows, not entries: a plan for a packed step of many images holds big rotary tables.
        while len(self._plans) > 1 and sum(p.cos.shape[0] for p in self._plans.values()) > self.PLAN_CACHE_ROWS:
            self._plans.popitem(last=False)
        return plan
