"""Rotary positions: MRoPE position ids for the decoder (absolute-time temporal ids), the text rotary
tables, and the 2D rotary table and window index of the vision encoder.

MRoPE rule (the Qwen team's original code, transformers 4.49): a text token gets (p, p, p); a vision block
of llm grid (t, h, w) starting at `s` gets T = s + floor(k * second_per_grid_t * tokens_per_second) for
temporal patch k (0 for images), H = s + row, W = s + col; text after the block continues at max + 1.
transformers 4.52-5.2 cast second_per_grid_t to int first and 5.3+ continue text after a video at
s + max(h, w); both deviate from that rule and we do not copy them.

`temporal="frame"` is an ablation (docs/NANO.md §4), not a released model's behaviour: a video's temporal id is its
temporal patch index k (Qwen2-VL's rule), whatever the fps; everything else is unchanged. The model reads it from
ModelConfig.mrope_temporal ("absolute", the default, is the rule above).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import MROPE_TEMPORAL
from .errors import InputError


def _grid_list(grid_thw) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    if isinstance(grid_thw, torch.Tensor):
        grid_thw = grid_thw.tolist()
    return [tuple(int(x) for x in g) for g in grid_thw]


# ----------------------------------------------------------------------------------------- decoder positions
TEMPORAL_MODES = MROPE_TEMPORAL  # ModelConfig.mrope_temporal's values


def video_time_factors(second_per_grid: float, tokens_per_second: float, temporal: str = "absolute") -> tuple[float, float]:
    """(a, b) with temporal id floor(k * a * b) for a video's temporal patch k (multiplied in that order, as the
    reference does): (second_per_grid, tokens_per_second) for absolute time (the released models), (1, 1) for
    temporal="frame" (the patch index, independent of fps)."""
    if temporal == "absolute":
        return second_per_grid, tokens_per_second
    if temporal == "frame":
        return 1.0, 1.0
    raise InputError(f"MRoPE temporal mode must be one of {TEMPORAL_MODES}, got {temporal!r}")


def _spg_list(second_per_grid_ts, n_videos: int) -> list[float]:
    """Seconds per temporal grid of each video as floats (1.0 each when not given)."""
    if second_per_grid_ts is None:
        return [1.0] * n_videos
    return [float(x) for x in (second_per_grid_ts.tolist() if isinstance(second_per_grid_ts, torch.Tensor)
                               else second_per_grid_ts)]


def mrope_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    *,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    vision_start_token_id: int = 151652,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2,
    temporal: str = "absolute",
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D position ids [3, B, S] and rope_deltas [B, 1] for a (left-padded) batch.

    Padded positions get 1 (as transformers 4.x). rope_delta = max position + 1 - S (S the padded length),
    so decode step i of row b uses position S + i + delta[b] on all three axes.
    Images and videos are consumed in global order across the batch, as the processor lays them out.
    temporal: "absolute" (video temporal ids follow second_per_grid_ts) or "frame" (the temporal patch index).
    """
    video_time_factors(1.0, tokens_per_second, temporal)  # validates the mode
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    B, S = input_ids.shape
    images, videos = _grid_list(image_grid_thw), _grid_list(video_grid_thw)
    spgs = _spg_list(second_per_grid_ts, len(videos))
    if len(spgs) != len(videos):
        raise InputError(f"second_per_grid_ts has {len(spgs)} values for {len(videos)} videos")
    mask = torch.ones(B, S, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    ids_cpu = input_ids.cpu()
    positions = torch.ones(3, B, S, dtype=torch.long)
    deltas = torch.zeros(B, 1, dtype=torch.long)
    img_i = vid_i = 0
    m = spatial_merge_size
    for b in range(B):
        row = ids_cpu[b][mask[b]].tolist()
        blocks: list[tuple] = []  # (start, t, lh, lw, time factors) of each vision block, in order
        i = 0
        n = len(row)
        while i < n:
            tok = row[i]
            is_block = (tok == image_token_id or tok == video_token_id) and i > 0 and row[i - 1] == vision_start_token_id
            if not is_block:
                i += 1
                continue
            if tok == image_token_id:
                if img_i >= len(images):
                    raise InputError(f"row {b}: more image blocks in input_ids than image_grid_thw entries ({len(images)})")
                t, h, w = images[img_i]
                factors = (0.0, 0.0)
                img_i += 1
            else:
                if vid_i >= len(videos):
                    raise InputError(f"row {b}: more video blocks in input_ids than video_grid_thw entries ({len(videos)})")
                t, h, w = videos[vid_i]
                factors = video_time_factors(spgs[vid_i], tokens_per_second, temporal)
                vid_i += 1
            lh, lw = h // m, w // m
            count = t * lh * lw
            if row[i:i + count] != [tok] * count:
                raise InputError(f"row {b}: a vision block needs {count} consecutive pad tokens for grid {(t, h, w)}")
            blocks.append((i, t, lh, lw, *factors))
            i += count
        pos, _ = positions_from_blocks(n, blocks)
        # index_copy_, not positions[:, b, mask[b]] = pos: that boolean-mask assignment takes ~7 ms at 1.3k tokens
        positions[:, b].index_copy_(1, mask[b].nonzero().squeeze(1), pos)
        deltas[b, 0] = (int(pos.max()) + 1 if pos.numel() else 0) - S
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def positions_from_blocks(n: int, blocks) -> tuple[torch.Tensor, int]:
    """Position ids [3, n] of one sample of n tokens whose vision blocks are `blocks`, (start, t, lh, lw, a, b) in
    order (lh, lw: the merged grid; a, b: video_time_factors, 0 for images), every other token text; and the largest
    id (-1 for n == 0). Text advances all three ids by 1; a block takes its (t, h, w) ids from where the text before
    it stopped, and the text after it starts at the block's largest id + 1."""
    chunks: list[torch.Tensor] = []
    nxt = i = 0  # next free position id, next token
    for start, t, lh, lw, a, b in blocks:
        if start > i:
            chunks.append(torch.arange(nxt, nxt + start - i).expand(3, -1))
            nxt += start - i
        block, top = _block_ids(t, lh, lw, a, b)
        chunks.append(block + nxt)
        nxt += top + 1
        i = start + t * lh * lw
    if n > i:
        chunks.append(torch.arange(nxt, nxt + n - i).expand(3, -1))
        nxt += n - i
    return (torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)), nxt - 1


@functools.lru_cache(maxsize=1024)
def _block_ids(t: int, lh: int, lw: int, spg: float, tps: float) -> tuple[torch.Tensor, int]:
    """(t, h, w) ids [3, t*lh*lw] of one vision block relative to its start, and its largest id (+1 is the advance
    of the text after it), cached per shape and time factors (video_time_factors; 0 for images)."""
    t_ids = torch.floor(torch.arange(t, dtype=torch.float64) * spg * tps).long()
    block = torch.stack([t_ids.view(t, 1, 1).expand(t, lh, lw).flatten(),
                         torch.arange(lh).view(1, lh, 1).expand(t, lh, lw).flatten(),
                         torch.arange(lw).view(1, 1, lw).expand(t, lh, lw).flatten()])
    return block, int(block.max())


def packed_mrope_positions(input_ids: torch.Tensor, seq_lens: Sequence[int], image_grid_thw=None, video_grid_thw=None,
                           second_per_grid_ts=None, *, image_token_id: int = 151655, video_token_id: int = 151656,
                           vision_start_token_id: int = 151652, spatial_merge_size: int = 2,
                           tokens_per_second: float = 2, temporal: str = "absolute") -> torch.Tensor | None:
    """Position ids [3, T] of a packed row (1-D ids, samples laid end to end, positions restarting in each): the same
    ids as mrope_positions on each sample alone, vectorised over the row instead of a Python loop over its tokens.

    A text token's id is the count of text tokens before it in its sample plus (largest id + 1) of every vision block
    before it: an exclusive cumulative sum of per-token advances (1 per text token, largest id + 1 on a block's last
    token, 0 on its other tokens), restarted per sample; a block's tokens add their (t, h, w) ids to the id of the
    block's first token. Returns None when the row is not well formed (a block without its grid, a block not made of
    `count` pad tokens inside its sample, unused grids): mrope_positions then decides (and raises its errors).
    temporal: as in mrope_positions.
    """
    video_time_factors(1.0, tokens_per_second, temporal)  # validates the mode
    ids = input_ids.reshape(-1).cpu()
    T = ids.shape[0]
    lens = torch.as_tensor(list(seq_lens), dtype=torch.long)
    if T == 0 or int(lens.sum()) != T:
        return None
    starts = torch.cumsum(lens, 0) - lens  # first token of each sample
    sample_of = torch.repeat_interleave(torch.arange(len(lens)), lens)
    prev = torch.cat([ids.new_full((1,), -1), ids[:-1]])
    prev[starts] = -1  # a sample's first token has no predecessor
    is_img, is_vid = ids == image_token_id, ids == video_token_id
    first = (is_img | is_vid) & (prev == vision_start_token_id)
    block_at = first.nonzero().flatten().tolist()
    images, videos = _grid_list(image_grid_thw), _grid_list(video_grid_thw)
    spgs = _spg_list(second_per_grid_ts, len(videos))
    kinds = is_img[first].tolist()  # True: image block, False: video block
    if sum(kinds) != len(images) or len(kinds) - sum(kinds) != len(videos) or len(spgs) != len(videos):
        return None
    ends = (starts + lens).tolist()
    sample_idx = sample_of[first].tolist() if block_at else []
    m = spatial_merge_size
    adv = torch.ones(T, dtype=torch.long)
    blocks, spans, toks, tops = [], [], [], []
    img_i = vid_i = 0
    last_end = 0
    for s, is_image, smp in zip(block_at, kinds, sample_idx):
        if is_image:
            (t, h, w), factors, tok = images[img_i], (0.0, 0.0), image_token_id
            img_i += 1
        else:
            (t, h, w), tok = videos[vid_i], video_token_id
            factors = video_time_factors(spgs[vid_i], tokens_per_second, temporal)
            vid_i += 1
        block, top = _block_ids(t, h // m, w // m, *factors)
        e = s + block.shape[1]
        if s < last_end or e > ends[smp]:
            return None
        last_end = e
        blocks.append(block)
        spans.append(s)
        toks.append(tok)
        tops.append(top)
    if blocks:
        counts = torch.tensor([b.shape[1] for b in blocks])
        span_at = torch.tensor(spans)
        where = torch.repeat_interleave(span_at - (torch.cumsum(counts, 0) - counts), counts) + \
            torch.arange(int(counts.sum()))  # every block token, in block order
        if not torch.equal(ids[where], torch.repeat_interleave(torch.tensor(toks), counts)):
            return None
        adv[where] = 0
        adv[span_at + counts - 1] = torch.tensor(tops) + 1
    cum = torch.cumsum(adv, 0) - adv  # exclusive: advances before each token
    base = cum - cum[starts][sample_of]
    pos = base.expand(3, T).clone()
    if blocks:
        block_base = base[where]
        pos[:, where] = torch.cat(blocks, dim=1) + block_base
    return pos


@functools.lru_cache(maxsize=16)
def _inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def mrope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, mrope_section: Sequence[int],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, S, head_dim] from positions [3, B, S]: frequency pairs split into contiguous
    (temporal, height, width) sections; computed in fp32, then cast to the model dtype (as the reference)."""
    inv = _inv_freq(head_dim, theta).to(positions.device)
    freqs = positions[..., None].float() * inv  # [3, B, S, hd/2]
    parts, start = [], 0
    for axis, size in enumerate(mrope_section):
        parts.append(freqs[axis, ..., start:start + size])
        start += size
    sel = torch.cat(parts, dim=-1)
    emb = torch.cat([sel, sel], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ----------------------------------------------------------------------------------------- vision
@functools.lru_cache(maxsize=1024)
def _vision_pos_ids(t: int, h: int, w: int, m: int) -> torch.Tensor:
    """(row, col) patch ids in the processor's row order: 2x2 merge blocks row-major, patches inside."""
    hpos = torch.arange(h).view(h, 1).expand(h, w)
    wpos = torch.arange(w).view(1, w).expand(h, w)

    def order(p):
        return p.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()

    return torch.stack([order(hpos), order(wpos)], dim=-1).repeat(t, 1)


def vision_pos_ids(grid_thw, spatial_merge_size: int = 2) -> torch.Tensor:
    """(row, col) ids [N, 2] of every patch of every item, in the processor's row order."""
    return torch.cat([_vision_pos_ids(t, h, w, spatial_merge_size) for t, h, w in _grid_list(grid_thw)])


def vision_rotary_angles(pos: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotary angles [N, head_dim/2] of (row, col) ids [N, 2]: head_dim/4 row frequencies then head_dim/4 column
    ones; computed where `pos` is (the ViT plan sends the small id table to the GPU, not the angle tables)."""
    inv = _inv_freq(head_dim // 2, theta).to(pos.device)
    return (pos[..., None].float() * inv).flatten(1)


def vision_rotary_freqs(grid_thw, head_dim: int, spatial_merge_size: int = 2, theta: float = 10000.0) -> torch.Tensor:
    """Per-patch rotary angles [N, head_dim/2]: head_dim/4 row frequencies then head_dim/4 column ones."""
    return vision_rotary_angles(vision_pos_ids(grid_thw, spatial_merge_size), head_dim, theta)


@functools.lru_cache(maxsize=1024)
def _window_index_one(t: int, lh: int, lw: int, win: int) -> tuple[torch.Tensor, list[int]]:
    idx = torch.arange(t * lh * lw).reshape(t, lh, lw)
    pad_h, pad_w = win - lh % win, win - lw % win  # equals win when divisible: an all-pad row (dropped below)
    nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
    idx = F.pad(idx, (0, pad_w, 0, pad_h), value=-100).reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4)
    idx = idx.reshape(t, nh * nw, win * win)
    seqlens = (idx != -100).sum(-1).flatten()
    flat = idx.flatten()
    return flat[flat != -100], seqlens.tolist()


def window_index(grid_thw, window_size: int = 112, patch_size: int = 14,
                 spatial_merge_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation of merged tokens into window order, and window boundaries in patches (cu_window_seqlens).

    Windows are window_size px squares (4x4 merged tokens for the released models), never crossing a frame
    or an item; empty pad windows are dropped.
    """
    win = window_size // spatial_merge_size // patch_size
    unit = spatial_merge_size**2
    index, cu = [], [0]
    offset = 0
    for t, h, w in _grid_list(grid_thw):
        lh, lw = h // spatial_merge_size, w // spatial_merge_size
        idx, seqlens = _window_index_one(t, lh, lw, win)
        index.append(idx + offset)
        for s in seqlens:
            if s:
                cu.append(cu[-1] + s * unit)
        offset += t * lh * lw
    return torch.cat(index), torch.tensor(cu, dtype=torch.int32)


def frame_cu_seqlens(grid_thw) -> torch.Tensor:
    """Boundaries of full-attention segments: one per temporal patch of every item."""
    lens = [h * w for t, h, w in _grid_list(grid_thw) for _ in range(t)]
    return F.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


def check_grid(grid_thw, spatial_merge_size: int = 2, name: str = "grid_thw") -> list[tuple[int, int, int]]:
    grids = _grid_list(grid_thw)
    for g in grids:
        t, h, w = g
        if t < 1 or h < spatial_merge_size or w < spatial_merge_size or h % spatial_merge_size or w % spatial_merge_size:
            raise InputError(f"{name} entry {g} is invalid: t >= 1 and h, w positive multiples of {spatial_merge_size}")
    return grids

