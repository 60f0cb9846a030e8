"""Qwen25VL: vision encoder + decoder. forward(...) -> logits; a simple, correct generate with a KV cache."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .config import ModelConfig
from .decoder import Decoder, KVCache, attention_mask_4d
from .errors import InputError
from .layers import segments
from .rope import mrope_cos_sin, mrope_positions, packed_mrope_positions
from .vision import VisionTransformer


class Qwen25VL(nn.Module):
    """Module names follow the Hub checkpoints: visual.*, model.* (decoder), lm_head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.visual = VisionTransformer(config.vision)
        self.model = Decoder(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu") -> "Qwen25VL":
        from .checkpoint import load_model

        return load_model(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | os.PathLike, layout: str = "hub", max_shard_bytes: int = 5 * 2**30) -> None:
        from .checkpoint import save_model

        save_model(self, path, layout=layout, max_shard_bytes=max_shard_bytes)

    @classmethod
    def random(cls, config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
               std: float = 0.02) -> "Qwen25VL":
        """Random weights (normal(0, std), norms at 1), built straight on `device` in `dtype`."""
        with torch.device("meta"):
            m = cls(config)
        m = m.to_empty(device=device).to(dtype)
        if config.text.tie_word_embeddings:
            m.lm_head.weight = m.model.embed_tokens.weight
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "layernorm" in name \
                        or name.endswith("norm.weight") or name.endswith("ln_q.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=g)
        return m

    # read from the embeddings, never quantised (an FP8 lm_head's weight is float8)
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None) -> torch.Tensor:
        """Token embeddings with image then video features scattered over their pad tokens."""
        c = self.config
        h = self.model.embed_tokens(input_ids)
        for pix, grid, tok, what in ((pixel_values, image_grid_thw, c.image_token_id, "image"),
                                     (pixel_values_videos, video_grid_thw, c.video_token_id, "video")):
            slots = input_ids == tok
            n_slots = int(slots.sum())
            if pix is None:
                if n_slots:
                    raise InputError(f"input_ids hold {n_slots} {what} pad tokens but no {what} pixels were given")
                continue
            if grid is None:
                raise InputError(f"{what} pixels given without {what}_grid_thw")
            feats = self.visual(pix.to(device=h.device), grid)
            if feats.shape[0] != n_slots:
                raise InputError(f"{what} features ({feats.shape[0]} tokens from {what}_grid_thw) do not match the "
                                 f"{n_slots} {what} pad tokens in input_ids")
            h = h.masked_scatter(slots[..., None], feats.to(h.dtype))
        return h

    def positions(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                  second_per_grid_ts=None):
        c = self.config
        return mrope_positions(input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts,
                               image_token_id=c.image_token_id, video_token_id=c.video_token_id,
                               vision_start_token_id=c.vision_start_token_id,
                               spatial_merge_size=c.vision.spatial_merge_size,
                               tokens_per_second=c.vision.tokens_per_second, temporal=c.mrope_temporal)

    def _cos_sin(self, positions):
        t = self.config.text
        return mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section, self.dtype)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                position_ids=None, seq_lens: list[int] | None = None) -> torch.Tensor:
        """Logits [B, T, V] in the model dtype.

        seq_lens: for packed training (B == 1), the lengths of the samples laid end to end in the row; each
        sample attends only to itself and its MRoPE positions restart at 0.
        """
        return self.lm_head(self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw,
                                               pixel_values_videos, video_grid_thw, second_per_grid_ts,
                                               position_ids, seq_lens))

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                      pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                      position_ids=None, seq_lens: list[int] | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, D] (forward without the head; training picks the rows it needs)."""
        h = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        mask = None
        if seq_lens is not None:
            if input_ids.shape[0] != 1 or sum(seq_lens) != input_ids.shape[1]:
                raise InputError(f"seq_lens {seq_lens} must sum to the length of a single packed row "
                                 f"(input_ids shape {tuple(input_ids.shape)})")
            if position_ids is None:
                position_ids = self._packed_positions(input_ids, seq_lens, image_grid_thw, video_grid_thw,
                                                      second_per_grid_ts)
            mask = segments(torch.tensor([0] + list(seq_lens)).cumsum(0), h.device)  # causal per sample
        elif position_ids is None:
            position_ids, _ = self.positions(input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                             second_per_grid_ts)
        cos, sin = self._cos_sin(position_ids.to(h.device))
        if mask is None and attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask_4d(attention_mask.to(h.device), input_ids.shape[1], 0)
        return self.model(h, cos, sin, mask)

    def _packed_positions(self, input_ids, seq_lens, image_grid_thw, video_grid_thw, second_per_grid_ts):
        c = self.config
        pos = packed_mrope_positions(input_ids, seq_lens, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                     image_token_id=c.image_token_id, video_token_id=c.video_token_id,
                                     vision_start_token_id=c.vision_start_token_id,
                                     spatial_merge_size=c.vision.spatial_merge_size,
                                     tokens_per_second=c.vision.tokens_per_second, temporal=c.mrope_temporal)
        if pos is not None:
            return pos.unsqueeze(1)
        return self._packed_positions_per_sample(input_ids, seq_lens, image_grid_thw, video_grid_thw,
                                                 second_per_grid_ts)

    def _packed_positions_per_sample(self, input_ids, seq_lens, image_grid_thw, video_grid_thw, second_per_grid_ts):
        # One padded row per sample: mrope_positions consumes grids in order, exactly the packing order (and raises
        # on a malformed row).
        L = max(seq_lens)
        rows = input_ids.new_full((len(seq_lens), L), self.config.bos_token_id)
        mask = torch.zeros(len(seq_lens), L, dtype=torch.long)
        for i, seg in enumerate(input_ids[0].split(list(seq_lens))):
            rows[i, :len(seg)] = seg
            mask[i, :len(seg)] = 1
        pos, _ = self.positions(rows, mask, image_grid_thw, video_grid_thw, second_per_grid_ts)
        return pos.to(mask.device)[:, mask.bool()].unsqueeze(1)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 seed: int | None = None) -> torch.Tensor:
        """New tokens [B, <= max_new_tokens]; rows that stopped are filled with pad_token_id."""
        B, S = input_ids.shape
        dev = self.device
        input_ids = input_ids.to(dev)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(dev)
        eos = set([self.config.eos_token_id] if eos_token_id is None else
                  ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)))
        pad = self.config.bos_token_id if pad_token_id is None else pad_token_id
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None

        h = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        pos, deltas = self.positions(input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts)
        t = self.config.text
        cache = KVCache(t.num_hidden_layers, B, t.num_key_value_heads, S + max_new_tokens, t.head_dim, self.dtype, dev)
        key_mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], dim=1)
        cos, sin = self._cos_sin(pos.to(dev))
        mask = attention_mask_4d(key_mask[:, :S], S, 0)
        hidden = self.model(h, cos, sin, mask, cache, 0)
        logits = self.lm_head(hidden[:, -1]).float()
        deltas = deltas.to(dev)
        out = []
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for step in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, top_k, gen)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            out.append(tok)
            done |= torch.isin(tok, torch.tensor(sorted(eos), device=dev))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            cur = S + step
            p = (cur + deltas).view(1, B, 1).expand(3, B, 1)
            cos, sin = self._cos_sin(p)
            mask = attention_mask_4d(key_mask[:, :cur + 1], 1, cur)
            hidden = self.model(self.model.embed_tokens(tok[:, None]), cos, sin, mask, cache, cur)
            logits = self.lm_head(hidden[:, -1]).float()
        return torch.stack(out, dim=1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy when temperature == 0; otherwise temperature, then top-k, then top-p (nucleus) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
