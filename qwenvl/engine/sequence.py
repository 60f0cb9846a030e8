"""A Sequence: one completion being generated (a request with n > 1 has n of them), and its prompt's
multimodal data (vision items, MRoPE positions and rope_delta computed once at admission)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..preprocess import content_digest
from .sampling import SamplingParams


@dataclass
class VisionItem:
    """One image or video of a prompt, and where its pad tokens sit in the prompt.

    Exactly one of pixel_values (float32, as a caller passed them) and frames (the processor's resized uint8
    frames, preprocess.VisionInput: normalised and patchified on the engine's device) is set."""
    kind: str  # "image" | "video"
    pixel_values: torch.Tensor | None
    grid_thw: tuple[int, int, int]
    second_per_grid: float  # 0 for images
    offset: int  # index of its first pad token in the prompt
    num_tokens: int
    content_hash: bytes  # frames (or pixels) + grid (+ timing): equal only for the same image
    frames: torch.Tensor | None = None  # uint8 [T, 3, H, W]
    staged: torch.Tensor | None = None  # a pinned copy of the frames' bytes (VisionInput.take_staged), used once

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


def content_hash(pixel_values: torch.Tensor, grid_thw, second_per_grid: float = 0.0) -> bytes:
    """The key of float pixel_values given by a caller (the processor's VisionInput has its own, of its frames)."""
    t = pixel_values.detach().cpu().contiguous()
    header = f"{t.dtype}|{tuple(t.shape)}|{tuple(int(x) for x in grid_thw)}|{float(second_per_grid)!r}".encode()
    # preprocess.content_digest (BLAKE3, or SHA-256 on threads): hashing a 1280x720 image's 22.5 MB of float32 pixels
    # took ~15 ms as one SHA-256
    return content_digest(header, t.view(torch.uint8).numpy() if t.numel() else b"")  # no copy of the pixels


@dataclass
class PromptData:
    """Everything derived from the prompt once, shared by the n sequences of a request."""
    token_ids: list[int]
    items: list[VisionItem] = field(default_factory=list)
    positions: torch.Tensor | None = None  # [3, L] long (CPU) when the prompt has vision items
    rope_delta: int = 0  # position of token i >= L is i + rope_delta on all three axes

    def positions_of(self, start: int, end: int) -> torch.Tensor:
        """MRoPE positions [3, end - start] of token indices [start, end) (prompt or generated)."""
        L = len(self.token_ids)
        if self.positions is None:
            return torch.arange(start, end).expand(3, -1)
        parts = []
        if start < L:
            parts.append(self.positions[:, start:min(end, L)])
        if end > L:
            parts.append((torch.arange(max(start, L), end) + self.rope_delta).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    arrival: int  # admission order (FIFO; preempted sequences keep theirs)
    prompt: PromptData
    params: SamplingParams
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at (first) admission
    num_preemptions: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the leading full, computed blocks
    status: Status = Status.WAITING
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    vision_features: dict[int, torch.Tensor] = field(default_factory=dict)  # item index -> ViT output

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt.token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
