"""Processor: conversations -> the tensors (and keys) transformers' Qwen2.5-VL processor returns.

Render the official chat template, load + preprocess every image/video in order of appearance, expand each
`<|image_pad|>` / `<|video_pad|>` to t*h*w/4 copies, tokenize, left-pad the batch.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from . import preprocess
from .chat import normalize_messages, render_chat, vision_items
from .errors import InputError
from .media import DEFAULT_MAX_IMAGE_PIXELS, Fetcher
from .tokenizer import Tokenizer


class Processor:
    def __init__(self, tokenizer: Tokenizer | None = None, *, min_pixels: int = preprocess.MIN_PIXELS,
                 max_pixels: int = preprocess.MAX_PIXELS, max_length: int | None = None,
                 fetch: Fetcher | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 item_defaults: dict[str, Any] | None = None):
        """min/max_pixels: the processor's limits (preprocessor_config.json); item_defaults: options applied to
        every image/video item unless the item sets them (e.g. a server-wide max_pixels or fps)."""
        self.tokenizer = tokenizer or Tokenizer.from_pretrained(None)
        # From the tokenizer, not fixed numbers: a pruned vocabulary (qwenvl.vocab) has other ids.
        self.image_pad_id = self.tokenizer.token_to_id("<|image_pad|>")
        self.video_pad_id = self.tokenizer.token_to_id("<|video_pad|>")
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.max_length = max_length
        self.fetch = fetch
        self.max_image_pixels = max_image_pixels
        self.item_defaults = dict(item_defaults or {})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, **kw) -> "Processor":
        """Tokenizer and pixel limits from a checkpoint dir; the Hub defaults where it has no processor files."""
        limits: dict[str, Any] = {}
        if path is not None:
            cfg_path = os.path.join(os.fspath(path), "preprocessor_config.json")
            if os.path.exists(cfg_path):
                try:
                    with open(cfg_path, encoding="utf-8") as f:
                        cfg = json.load(f)
                except json.JSONDecodeError as e:
                    raise InputError(f"{cfg_path}: not valid JSON ({e})") from None
                size = cfg.get("size") or {}
                limits["min_pixels"] = cfg.get("min_pixels", size.get("shortest_edge", preprocess.MIN_PIXELS))
                limits["max_pixels"] = cfg.get("max_pixels", size.get("longest_edge", preprocess.MAX_PIXELS))
        limits.update(kw)
        return cls(Tokenizer.from_pretrained(path), **limits)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        from .chat import CHAT_TEMPLATE

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        cfg = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "patch_size": preprocess.PATCH_SIZE,
               "temporal_patch_size": preprocess.TEMPORAL_PATCH_SIZE, "merge_size": preprocess.MERGE_SIZE,
               "image_mean": list(preprocess.IMAGE_MEAN), "image_std": list(preprocess.IMAGE_STD),
               "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
               "resample": 3, "image_processor_type": "Qwen2VLImageProcessor",
               "processor_class": "Qwen2_5_VLProcessor"}
        with open(os.path.join(path, "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(path, "chat_template.json"), "w", encoding="utf-8") as f:
            json.dump({"chat_template": CHAT_TEMPLATE}, f, indent=2)

    # ------------------------------------------------------------------
    def encode_conversation(self, messages, add_generation_prompt: bool = True) -> dict[str, Any]:
        """One conversation -> {"input_ids": list[int], "images": [VisionInput], "videos": [VisionInput]}.

        A VisionInput holds the resized uint8 frames; it unpacks as (pixel_values, grid) / (pixel_values, grid,
        second_per_grid), making the float pixels on the host then, and the engine makes them on its device."""
        messages = normalize_messages(messages)
        text = render_chat(messages, add_generation_prompt=add_generation_prompt)
        images, videos = [], []
        for item in vision_items(messages):
            opts = {**self.item_defaults, **item}
            kw = dict(min_pixels=self.min_pixels, max_pixels=self.max_pixels, fetch=self.fetch,
                      max_image_pixels=self.max_image_pixels)
            if item["type"] == "image":
                images.append(preprocess.prepare_image(opts, **kw))
            else:
                videos.append(preprocess.prepare_video(opts, **kw))
        if (images and self.image_pad_id is None) or (videos and self.video_pad_id is None):
            raise InputError("this tokenizer has no <|image_pad|> / <|video_pad|> token, so it cannot take media")
        ids = self.tokenizer.encode(text)
        counts = {self.image_pad_id: iter([int(x.grid_thw.prod()) // 4 for x in images]),
                  self.video_pad_id: iter([int(x.grid_thw.prod()) // 4 for x in videos])}
        expanded: list[int] = []
        for tok in ids:  # pads are added tokens, so expanding ids equals expanding the text first
            if tok in counts:
                expanded.extend([tok] * next(counts[tok]))
            else:
                expanded.append(tok)
        if self.max_length is not None and len(expanded) > self.max_length:
            raise InputError(f"the prompt is {len(expanded)} tokens long, over the limit of {self.max_length}")
        return {"input_ids": expanded, "images": images, "videos": videos}

    def __call__(self, conversations, add_generation_prompt: bool = True) -> dict[str, torch.Tensor]:
        """A list of conversations (each a list of messages; a single conversation is accepted too)."""
        if isinstance(conversations, list) and conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if not isinstance(conversations, list) or not conversations:
            raise InputError("conversations must be a non-empty list of message lists")
        encoded = [self.encode_conversation(c, add_generation_prompt) for c in conversations]
        return self.collate(encoded)

    def collate(self, encoded: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        L = max(len(e["input_ids"]) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(encoded), L), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), L), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e["input_ids"])
            ids[i, L - n:] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[i, L - n:] = 1
        out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
        images = [x for e in encoded for x in e["images"]]
        videos = [x for e in encoded for x in e["videos"]]
        if images:
            out["pixel_values"] = torch.cat([p for p, _ in images])
            out["image_grid_thw"] = torch.stack([g for _, g in images])
        if videos:
            out["pixel_values_videos"] = torch.cat([p for p, _, _ in videos])
            out["video_grid_thw"] = torch.stack([g for _, g, _ in videos])
            out["second_per_grid_ts"] = torch.tensor([s for _, _, s in videos], dtype=torch.float32)
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
