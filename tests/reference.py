"""Helpers that build the transformers 4.57.6 reference model on the same random weights as ours."""

from __future__ import annotations

import torch

import qwenvl


def hf_model(cfg: qwenvl.ModelConfig, seed: int = 0, attn: str = "sdpa"):
    """A transformers Qwen2_5_VLForConditionalGeneration from our config, every parameter (norms and
    biases included) drawn at random so that no code path hides behind a zero bias or a unit norm."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hf_cfg = Qwen2_5_VLConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = attn
    torch.manual_seed(seed)
    m = Qwen2_5_VLForConditionalGeneration(hf_cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return m
