"""Training data: JSONL records -> token-level samples (input_ids, labels, uint8 vision frames), read as a stream.

Record formats (one JSON object per line):

* messages (DESIGN.md's message format; images/videos by path, relative to `media_root` or the JSONL's folder)::
      {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", ...}]},
                    {"role": "assistant", "content": "..."}]}
  String contents may hold `<image>` / `<video>` markers filled from the record's "images" / "videos" lists.
* LLaVA / ShareGPT::
      {"image": "a.jpg" | "images": [...], "video": ... , "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                                          {"from": "gpt", "value": "..."}]}
  Media without any marker go in front of the first user turn.
* plain text (pretraining): {"text": "..."} -> text + <|endoftext|>, loss on every token.
* pre-tokenized: {"input_ids": [...], "labels": [...]} (labels optional: every token).
* DPO pairs (see dpo.py): a prompt in one of the forms above plus "chosen" and "rejected".

Optional record keys: "coords": "resized" (default: box numbers are already in the model's resized-image pixels),
"original" (pixels of the original image: rescaled here), "norm1000" (Qwen2-VL 0..1000) or "norm1" (0..1). Boxes
are found as `"bbox_2d": [x1, y1, x2, y2]`, `"point_2d": [x, y]`, `data-bbox="x1 y1 x2 y2"` (QwenVL HTML) and
`<|box_start|>(x1,y1),(x2,y2)<|box_end|>`, and rescaled to the image the model sees, computed with the same
min/max_pixels as the pixels themselves (inference must use the same limits: CAPABILITIES.md 2.6).

Labels: -100 except on what the model should learn to write. loss_on="assistant": every assistant turn's content
and its <|im_end|> (not the "<|im_start|>assistant\\n" header nor the "\\n" after <|im_end|>); "last": only the final
assistant turn (DPO responses); "all": every token except vision tokens (pretraining).

Each record is first *measured* (token count from the text and the media headers, no pixel decoding) so that the
packer can plan on lengths alone, then *encoded* (pixels loaded) only by the rank that trains on it.
A record that cannot be used (bad JSON, missing or corrupt media, too long, malformed) is skipped and counted in a
`SkipStats`; when the skipped fraction passes `max_bad_fraction` training stops with a `DataError` report.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .. import preprocess
from ..chat import DEFAULT_SYSTEM_PROMPT, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, normalize_messages
from ..errors import InputError, QwenVLError
from ..tokenizer import ADDED_TOKEN_IDS

IGNORE = -100
# Ids in the FULL Qwen vocabulary only, kept for callers that assume it (trainer.dummy_batch, tests). ChatEncoder
# reads its own from its tokenizer (encoder.image_pad, .endoftext, ...): a pruned vocabulary (qwenvl.vocab) differs.
IMAGE_PAD, VIDEO_PAD = ADDED_TOKEN_IDS["<|image_pad|>"], ADDED_TOKEN_IDS["<|video_pad|>"]
ENDOFTEXT = ADDED_TOKEN_IDS["<|endoftext|>"]


class DataError(QwenVLError):
    """Too many bad records: the data (or its paths/options) is wrong, not a sample here and there."""


class BadSample(QwenVLError):
    """One record that cannot be trained on; the reader skips it and counts it under `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------------ samples
@dataclass
class Sample:
    """One sequence. labels are aligned with input_ids (not shifted); the loss shifts inside each sample.

    Images and videos are kept as the processor's resized uint8 frames (`preprocess.VisionInput`, an eighth of the
    float32 bytes): packed rows carry them to the training process, which makes the pixel values on its device
    (packing.device_pixels). `pixel_values` / `pixel_values_videos` give the host float32 values on demand."""

    input_ids: list[int]
    labels: list[int]
    images: list[preprocess.VisionInput] = field(default_factory=list)
    image_grid_thw: list[list[int]] = field(default_factory=list)
    videos: list[preprocess.VisionInput] = field(default_factory=list)
    video_grid_thw: list[list[int]] = field(default_factory=list)
    second_per_grid_ts: list[float] = field(default_factory=list)
    ref_logp: float | None = None  # DPO: precomputed reference log-prob of the response

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def pixel_values(self) -> torch.Tensor | None:
        """float32 [image patches, 1176] on the host (the processor's values), None without images."""
        return torch.cat([v.pixel_values for v in self.images]) if self.images else None

    @property
    def pixel_values_videos(self) -> torch.Tensor | None:
        return torch.cat([v.pixel_values for v in self.videos]) if self.videos else None

    @property
    def n_labels(self) -> int:
        """Tokens the loss is taken on (label positions after the in-sample shift)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class Measured:
    """What the packer needs to know about a record, computed without decoding pixels."""

    index: int  # position of the record in its chunk
    length: int  # LLM tokens (a DPO pair: chosen + rejected)
    record: dict


# ------------------------------------------------------------------------------------------------ formats
_MARKER = re.compile(r"<image>|<video>")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "observation": "tool", "tool": "tool", "function_call": "assistant"}


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _split_markers(text: str, images: list, videos: list, where: str) -> list[dict]:
    """A string with <image>/<video> markers -> content items, taking media from the lists in order."""
    items: list[dict] = []
    pos = 0
    for m in _MARKER.finditer(text):
        if m.start() > pos:
            items.append({"type": "text", "text": text[pos:m.start()]})
        pool, kind = (images, "image") if m.group() == "<image>" else (videos, "video")
        if not pool:
            raise BadSample("marker mismatch", f"{where}: more {m.group()} markers than {kind}s")
        items.append({"type": kind, kind: pool.pop(0)})
        pos = m.end()
    if pos < len(text):
        items.append({"type": "text", "text": text[pos:]})
    return items


def record_messages(record: dict) -> list[dict]:
    """Any supported conversation record -> Qwen-style messages (normalized; media paths as written)."""
    images = _as_list(record.get("images", record.get("image")))
    # "video" is one video (a path or a list of frames); "videos" a list of them
    videos = list(record["videos"]) if "videos" in record else [record["video"]] if record.get("video") else []
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise BadSample("malformed record", "'conversations' must be a list")
        raw = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or "value" not in t:
                raise BadSample("malformed record", f"conversations[{i}] needs 'from' and 'value'")
            role = _ROLES.get(t.get("from", t.get("role")))
            if role is None:
                raise BadSample("malformed record", f"conversations[{i}]: unknown speaker {t.get('from')!r}")
            raw.append({"role": role, "content": t["value"]})
    elif "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list):
            raise BadSample("malformed record", "'messages' must be a list")
    else:
        raise BadSample("malformed record", f"no 'messages', 'conversations', 'text' or 'input_ids' (keys {sorted(record)})")
    n_img, n_vid = len(images), len(videos)
    messages = []
    for i, m in enumerate(raw):
        if isinstance(m, dict) and isinstance(m.get("content"), str) and (images or videos or _MARKER.search(m["content"])):
            m = {**m, "content": _split_markers(m["content"], images, videos, f"message {i}")}
        messages.append(m)
    if images or videos:  # media without markers: in front of the first user turn
        if len(images) != n_img or len(videos) != n_vid:
            raise BadSample("marker mismatch", f"{len(images)} image(s) / {len(videos)} video(s) have no marker")
        first_user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
        if first_user is None:
            raise BadSample("malformed record", "media given but no user turn to put them in")
        content = first_user["content"]
        content = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        first_user["content"] = ([{"type": "image", "image": x} for x in images] +
                                 [{"type": "video", "video": x} for x in videos] + content)
    try:
        return normalize_messages(messages)
    except InputError as e:
        raise BadSample("malformed record", str(e)) from None


# ------------------------------------------------------------------------------------------------ boxes
_BOX_PATTERNS = [
    # (regex, which numbers are x (even index) / y): all four forms list x, y alternately
    re.compile(r'("bbox_2d"\s*:\s*\[)\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*,\s*([-\d.]+)\s*(\])'),
    re.compile(r'("point_2d"\s*:\s*\[)\s*([-\d.]+)\s*,\s*([-\d.]+)\s*(\])'),
    re.compile(r'(data-bbox=")\s*([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)\s*(")'),
    re.compile(r'(<\|box_start\|>\()\s*([-\d.]+)\s*,\s*([-\d.]+)\s*\)\s*,\s*\(\s*([-\d.]+)\s*,\s*([-\d.]+)\s*(\)<\|box_end\|>)'),
]
_SEPARATORS = [", ", ", ", " ", None]


def rescale_boxes(text: str, coords: str, orig_hw: tuple[int, int], resized_hw: tuple[int, int]) -> str:
    """Box/point numbers in `text` -> integer pixels of the resized image, clamped to [0, side - 1]
    (qwen-vl-finetune's convert_to_qwen25vl_format). coords: original | norm1000 | norm1."""
    (oh, ow), (rh, rw) = orig_hw, resized_hw
    src_w, src_h = {"original": (ow, oh), "norm1000": (1000, 1000), "norm1": (1, 1)}[coords]

    def scale(values: list[str]) -> list[int]:
        out = []
        for i, v in enumerate(values):
            side, src = (rw, src_w) if i % 2 == 0 else (rh, src_h)
            out.append(min(max(round(float(v) * side / src), 0), side - 1))
        return out

    for pattern, sep in zip(_BOX_PATTERNS, _SEPARATORS):
        def sub(m, sep=sep):
            head, *nums, tail = m.groups()
            v = scale(nums)
            if sep is None:  # legacy tokens: (x1,y1),(x2,y2)
                return f"{head}{v[0]},{v[1]}),({v[2]},{v[3]}{tail}"
            return head + sep.join(str(x) for x in v) + tail
        text = pattern.sub(sub, text)
    return text


# ------------------------------------------------------------------------------------------------ encoder
class ChatEncoder:
    """Records -> Samples. Tokenizer and media preprocessing are the package's own (the Processor's pieces).

    min/max_pixels are applied both as per-image defaults (qwen-vl-utils stage) and as the processor's limits,
    so an image is resized once, to the size the grounding boxes are rescaled to. Items may override them.
    """

    def __init__(self, tokenizer=None, *, min_pixels: int = preprocess.MIN_PIXELS, max_pixels: int = 1280 * 28 * 28,
                 video_min_pixels: int = preprocess.VIDEO_MIN_PIXELS, video_max_pixels: int = preprocess.VIDEO_MAX_PIXELS,
                 video_total_pixels: float = 24576 * 28 * 28, fps: float = preprocess.FPS,
                 max_frames: int = preprocess.FPS_MAX_FRAMES, media_root: str | None = None,
                 loss_on: str = "assistant", max_length: int | None = None):
        if tokenizer is None:
            from ..tokenizer import Tokenizer
            tokenizer = Tokenizer.from_pretrained(None)
        if loss_on not in ("assistant", "last", "all"):
            raise InputError(f"loss_on must be assistant, last or all, got {loss_on!r}")
        self.tokenizer = tokenizer
        ids = {name: tokenizer.token_to_id(tok) for name, tok in (
            ("image_pad", "<|image_pad|>"), ("video_pad", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"), ("endoftext", "<|endoftext|>"), ("im_end", "<|im_end|>"))}
        if None in ids.values():
            raise InputError(f"the tokenizer lacks {[n for n, i in ids.items() if i is None]} (Qwen2.5-VL tokens)")
        self.image_pad, self.video_pad = ids["image_pad"], ids["video_pad"]
        self.vision_start, self.vision_end = ids["vision_start"], ids["vision_end"]
        self.endoftext, self.im_end = ids["endoftext"], ids["im_end"]
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.image_defaults = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        self.video_defaults = {"min_pixels": video_min_pixels, "max_pixels": video_max_pixels,
                               "total_pixels": video_total_pixels, "fps": fps, "max_frames": max_frames}
        self.media_root = media_root
        self.loss_on = loss_on
        self.max_length = max_length
        self._header = {}

    @classmethod
    def from_processor(cls, processor, **kw) -> "ChatEncoder":
        """Tokenizer and pixel limits of a qwenvl.Processor (what inference will use)."""
        kw.setdefault("min_pixels", processor.min_pixels)
        kw.setdefault("max_pixels", processor.max_pixels)
        return cls(processor.tokenizer, **kw)

    # ---------------------------------------------------------------- public
    def measure(self, record: dict, base_dir: str | None = None, pair: bool = False) -> int:
        """LLM length of the record (pair=True: a DPO pair, both sequences) from the text and media headers only."""
        if pair:
            return sum(len(s) for s in self.encode_pair(record, base_dir, pixels=False))
        return len(self.encode(record, base_dir, pixels=False))

    def encode(self, record: dict, base_dir: str | None = None, pixels: bool = True, loss_on: str | None = None) -> Sample:
        """The Sample of a record; pixels=False leaves the vision tensors out (grids are still exact)."""
        if not isinstance(record, dict):
            raise BadSample("malformed record", f"expected a JSON object, got {type(record).__name__}")
        if "input_ids" in record:
            ids = [int(x) for x in record["input_ids"]]
            labels = [int(x) for x in record.get("labels", ids)]
            if len(labels) != len(ids) or any(x in (self.image_pad, self.video_pad) for x in ids):
                raise BadSample("malformed record", "pre-tokenized records need len(labels) == len(input_ids), no media")
            sample = Sample(ids, labels)
        elif "text" in record and "messages" not in record and "conversations" not in record:
            ids = self.tokenizer.encode(str(record["text"])) + [self.endoftext]
            sample = Sample(ids, list(ids))
        else:
            sample = self._encode_chat(record_messages(record), record, base_dir, pixels, loss_on or self.loss_on)
        self._check_length(sample)
        return sample

    def encode_pair(self, record: dict, base_dir: str | None = None, pixels: bool = True) -> tuple[Sample, Sample]:
        """DPO: (prompt + chosen, prompt + rejected), labels on the response only."""
        out = []
        for key in ("chosen", "rejected"):
            if key not in record:
                raise BadSample("malformed record", "a preference record needs 'chosen' and 'rejected'")
            resp = record[key]
            if isinstance(resp, str):
                resp = [{"role": "assistant", "content": resp}]
            elif isinstance(resp, dict):
                resp = [resp]
            prompt = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
            if "prompt" in prompt:  # TRL style
                p = prompt.pop("prompt")
                prompt["messages"] = [{"role": "user", "content": p}] if isinstance(p, str) else p
            conv_key = "conversations" if "conversations" in prompt else "messages"
            turns = list(prompt.get(conv_key, []))
            if conv_key == "conversations":
                resp = [{"from": "gpt", "value": r["content"]} for r in resp]
            s = self.encode({**prompt, conv_key: turns + list(resp)}, base_dir, pixels, loss_on="last")
            ref = record.get(f"ref_{key}_logp")
            s.ref_logp = None if ref is None else float(ref)
            out.append(s)
        return out[0], out[1]

    # ---------------------------------------------------------------- internals
    def _check_length(self, sample: Sample) -> None:
        if self.max_length is not None and len(sample) > self.max_length:
            raise BadSample("too long", f"{len(sample)} tokens > max_length {self.max_length}")
        if sample.n_labels == 0:
            raise BadSample("no target tokens", "nothing to learn (no assistant tokens?)")

    def _resolve(self, src, base_dir):
        if isinstance(src, str) and not src.startswith(("http://", "https://", "data:", "file://", "/")):
            root = self.media_root or base_dir
            if root:
                return os.path.join(root, src)
        return src

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _header_ids(self, role: str) -> list[int]:
        if role not in self._header:
            self._header[role] = self._tokens(f"<|im_start|>{role}\n")
        return self._header[role]

    def _encode_chat(self, messages, record, base_dir, pixels, loss_on) -> Sample:
        coords = record.get("coords", "resized")
        if coords not in ("resized", "original", "norm1000", "norm1"):
            raise BadSample("malformed record", f"coords must be resized, original, norm1000 or norm1, got {coords!r}")
        sample = Sample([], [])
        vision: list[tuple[str, int, tuple[int, int], tuple[int, int]]] = []  # kind, tokens, orig hw, resized hw
        for m in messages:
            for item in m["content"]:
                if item["type"] == "image":
                    vision.append(self._image(item, base_dir, pixels, sample))
                elif item["type"] == "video":
                    vision.append(self._video(item, base_dir, pixels, sample))
        if coords != "resized":
            images = [v for v in vision if v[0] == "image"]
            if len(images) != 1 or len(vision) != 1:
                raise BadSample("ambiguous boxes", f"coords={coords!r} needs exactly one image, got {len(vision)} media")
            _, _, orig_hw, resized_hw = images[0]
        pads = iter(n for _, n, _, _ in vision)
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]}] + messages
            last_assistant += 1
        ids, labels = sample.input_ids, sample.labels
        for i, m in enumerate(messages):
            body = "".join(IMAGE_PLACEHOLDER if it["type"] == "image" else VIDEO_PLACEHOLDER if it["type"] == "video"
                           else it["text"] for it in m["content"])
            if coords != "resized" and m["role"] == "assistant":
                body = rescale_boxes(body, coords, orig_hw, resized_hw)
            learn = m["role"] == "assistant" and (loss_on == "assistant" or (loss_on == "last" and i == last_assistant))
            if learn:  # header, then content + <|im_end|> apart: the split the model sees when generating
                head = self._header_ids("assistant")
                body_ids = self._tokens(body + "<|im_end|>")
                msg, mask = head + body_ids + self._tokens("\n"), [0] * len(head) + [1] * len(body_ids) + [0]
            else:
                msg = self._tokens(f"<|im_start|>{m['role']}\n{body}<|im_end|>\n")
                mask = [int(loss_on == "all")] * len(msg)
            for tok, keep in zip(msg, mask):
                if tok in (self.image_pad, self.video_pad):  # one pad per image/video in the text -> its token count
                    n = next(pads, None)
                    if n is None:
                        raise BadSample("marker mismatch", "more vision pad tokens in the text than media items")
                    ids.extend([tok] * n)
                    labels.extend([IGNORE] * n)
                else:
                    ids.append(tok)
                    labels.append(tok if keep and tok not in (self.vision_start, self.vision_end) else IGNORE)
        if next(pads, None) is not None:
            raise BadSample("marker mismatch", "vision pad tokens written in the text")
        return sample

    def _check_limit(self, sample: Sample, n_tokens: int) -> None:
        # Fail before decoding pixels when the vision tokens alone are too many.
        if self.max_length is not None and n_tokens > self.max_length:
            raise BadSample("too long", f"a media item alone is {n_tokens} tokens > max_length {self.max_length}")

    def _image(self, item, base_dir, pixels, sample):
        item = {**self.image_defaults, **item, "image": self._resolve(item["image"], base_dir)}
        h, w = image_size(item["image"])
        grid = image_grid(h, w, item, self.min_pixels, self.max_pixels)
        n = grid[0] * grid[1] * grid[2] // 4
        self._check_limit(sample, n)
        if pixels:  # the resized uint8 image; its pixel values are made where they are used
            image = preprocess.prepare_image(item, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
            g = image.grid_thw.tolist()
            if g != grid:  # the header-only size must predict the real one exactly (packing relies on it)
                raise BadSample("size mismatch", f"{item['image']}: header grid {grid} != decoded grid {g}")
            sample.images.append(image)
        sample.image_grid_thw.append(grid)
        return "image", n, (h, w), (grid[1] * 14, grid[2] * 14)

    def _video(self, item, base_dir, pixels, sample):
        src = item["video"]
        src = [self._resolve(f, base_dir) for f in src] if isinstance(src, (list, tuple)) else self._resolve(src, base_dir)
        item = {**self.video_defaults, **item, "video": src}
        if "nframes" in item:
            item.pop("fps", None)
        grid = video_grid(item, self.min_pixels, self.max_pixels)
        n = grid[0] * grid[1] * grid[2] // 4
        self._check_limit(sample, n)
        spg = None
        if pixels:
            video = preprocess.prepare_video(item, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
            if video.grid_thw.tolist() != grid:
                raise BadSample("size mismatch", f"video header grid {grid} != decoded grid {video.grid_thw.tolist()}")
            spg = video.second_per_grid
            sample.videos.append(video)
        sample.video_grid_thw.append(grid)
        sample.second_per_grid_ts.append(float(spg) if spg is not None else 1.0)
        return "video", n, (0, 0), (grid[1] * 14, grid[2] * 14)


def image_size(src) -> tuple[int, int]:
    """(height, width) from the file header (PIL reads no pixels here)."""
    from PIL import Image

    from ..media import load_image, resolve_source

    if not isinstance(src, (str, bytes, os.PathLike)):
        img = load_image(src)
        return img.height, img.width
    try:
        resolved = resolve_source(src, None, "image")
    except QwenVLError as e:
        raise BadSample("missing media", str(e)) from None
    try:
        import io
        with Image.open(io.BytesIO(resolved) if isinstance(resolved, bytes) else resolved) as im:
            return im.height, im.width
    except Exception as e:
        raise BadSample("corrupt media", f"{src}: not a readable image ({type(e).__name__})") from None


def image_grid(h: int, w: int, item: dict, min_pixels: int, max_pixels: int) -> list[int]:
    """[1, gh, gw] of preprocess.process_image for an h x w image: its two smart_resize stages."""
    if "resized_height" in item and "resized_width" in item:
        h1, w1 = preprocess.smart_resize(item["resized_height"], item["resized_width"], variant="qwen_vl_utils")
    else:
        h1, w1 = preprocess.smart_resize(h, w, min_pixels=item.get("min_pixels", preprocess.MIN_PIXELS),
                                         max_pixels=item.get("max_pixels", preprocess.MAX_PIXELS),
                                         variant="qwen_vl_utils")
    h2, w2 = preprocess.smart_resize(h1, w1, min_pixels=min_pixels, max_pixels=max_pixels)
    return [1, h2 // 14, w2 // 14]


def video_grid(item: dict, min_pixels: int, max_pixels: int) -> list[int]:
    """[t, gh, gw] of preprocess.process_video, from the container header (or the first frame's header)."""
    src = item["video"]
    if isinstance(src, (list, tuple)):
        h, w = image_size(src[0])
        h, w = image_grid(h, w, {k: v for k, v in item.items() if k != "video"}, 1, float("inf"))[1:]
        h, w = h * 14, w * 14
        nframes = len(src) + len(src) % 2
    else:
        from ..media import VideoReader
        with VideoReader(src) as r:
            first, last, total = preprocess.video_frame_range(item, r.total_frames, r.fps)
            nframes = preprocess.smart_nframes(item, total, r.fps)
            h, w = r.height, r.width
    h, w = preprocess.video_frame_size(item, h, w, nframes)
    h, w = preprocess.smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
    return [math.ceil(nframes / 2), h // 14, w // 14]


# ------------------------------------------------------------------------------------------------ skipping
@dataclass
class SkipStats:
    """Counts of records seen and skipped (by reason), with the first few examples for the report."""

    max_bad_fraction: float = 0.01
    min_seen: int = 50  # do not judge the fraction on the first handful of records
    seen: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def ok(self) -> None:
        self.seen += 1

    def skip(self, where: str, err: Exception, check: bool = True) -> None:
        """Count a skipped record; check=False never raises (used where only one rank sees the failure, so that
        ranks never disagree on stopping)."""
        self.seen += 1
        self.skipped += 1
        reason = getattr(err, "reason", None) or type(err).__name__
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {err}")
        if check and self.seen >= self.min_seen and self.skipped > self.max_bad_fraction * self.seen:
            raise DataError(self.report())

    def report(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        lines = [f"{self.skipped} of {self.seen} records skipped ({self.skipped / max(self.seen, 1):.1%}, "
                 f"limit {self.max_bad_fraction:.1%}); by reason: {reasons}", "first examples:"]
        return "\n".join(lines + [f"  {e}" for e in self.examples])

    def state_dict(self) -> dict:
        return {"seen": self.seen, "skipped": self.skipped, "reasons": dict(self.reasons), "examples": list(self.examples)}

    def load_state_dict(self, d: dict) -> None:
        self.seen, self.skipped = d["seen"], d["skipped"]
        self.reasons, self.examples = dict(d["reasons"]), list(d["examples"])


# ------------------------------------------------------------------------------------------------ streaming
@dataclass
class Position:
    """Where the stream is: epoch, file index, byte offset in that file (exact resume without re-reading)."""

    epoch: int = 0
    file: int = 0
    offset: int = 0


class JsonlStream:
    """Reads records from JSONL files in order, epoch after epoch, from any saved `Position`.

    Yields (where, record_or_error, base_dir): a line that is not valid JSON comes back as a BadSample so the
    caller counts it. Nothing but the current line is held in memory.
    """

    def __init__(self, paths: list[str]):
        if isinstance(paths, str):
            paths = [paths]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"training file(s) not found: {', '.join(missing)}")
        if not paths:
            raise DataError("no training files given")
        self.paths = list(paths)

    def read(self, pos: Position, limit: int) -> tuple[list[tuple[str, Any, str]], Position]:
        """Up to `limit` records from `pos` (stopping at the end of an epoch) and the position after them."""
        out = []
        epoch, fi, offset = pos.epoch, pos.file, pos.offset
        while len(out) < limit and fi < len(self.paths):
            path = self.paths[fi]
            base_dir = os.path.dirname(os.path.abspath(path))
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(offset)
                while len(out) < limit and offset < size:
                    line = f.readline()
                    where = f"{os.path.basename(path)}@{offset}"
                    offset += len(line)
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        rec = BadSample("bad json", str(e))
                    out.append((where, rec, base_dir))
            if offset >= size:
                fi, offset = fi + 1, 0
        if fi >= len(self.paths):
            epoch, fi, offset = epoch + 1, 0, 0
        return out, Position(epoch, fi, offset)


def shuffled(items: list, seed: int, *key) -> list:
    """A permutation that depends only on (seed, key): the same chunk always comes out in the same order."""
    rng = random.Random(hash_key(seed, *key))
    items = list(items)
    rng.shuffle(items)
    return items


def hash_key(*parts) -> int:
    h = 1469598103934665603
    for p in parts:
        for b in str(p).encode() + b"|":
            h = ((h ^ b) * 1099511628211) % (1 << 64)
    return h


def iter_records(paths: list[str]) -> Iterator[dict]:
    """Every valid JSON record of the files once, in order (for tools and tests)."""
    stream = JsonlStream(paths)
    pos = Position()
    while pos.epoch == 0:
        batch, pos = stream.read(pos, 1024)
        for _, rec, _ in batch:
            if not isinstance(rec, Exception):
                yield rec
        if not batch:
            break
