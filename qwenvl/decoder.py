"""Qwen2.5 decoder: GQA with q/k/v bias, MRoPE, RMSNorm, SwiGLU; a static KV cache for generation."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TextConfig
from .layers import RMSNorm, Segments, SwiGLU, varlen_attention
from .rope import rotate_half


class KVCache:
    """Contiguous per-layer K/V buffers [B, kv_heads, max_len, head_dim], filled left to right."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, c: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # rotation in the model dtype, as the reference
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if isinstance(mask, Segments):  # one packed row of samples (training): causal inside each, no padding
            out = varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), mask, causal=True)
            return self.o_proj(out.reshape(B, T, -1))
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(c, layer)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Checkpoint names: model.embed_tokens, model.layers.N.*, model.norm."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(c, i) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos, sin, mask=None, cache: KVCache | None = None, start: int = 0):
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, start)
        return self.norm(h)


def attention_mask_4d(key_mask: torch.Tensor, q_len: int, start: int) -> torch.Tensor:
    """Boolean [B, 1, q_len, start+q_len]: causal and no padded keys. A query at a padded position would
    see no key at all (NaN in SDPA), so it may see itself; its output is never used."""
    B, K = key_mask.shape
    dev = key_mask.device
    q_pos = torch.arange(start, start + q_len, device=dev)
    k_pos = torch.arange(K, device=dev)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_mask.bool()[:, None, :]
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None]
    return allowed[:, None]
