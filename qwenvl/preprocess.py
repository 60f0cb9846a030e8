"""Images and videos -> `pixel_values`, `grid_thw`, `second_per_grid_ts`, numerically equal to the reference.

The reference pipeline is two stages, and so is this module:

1. qwen-vl-utils 0.0.14 (`fetch_image` / `fetch_video`): load, pick the size (`smart_resize`, its own variant)
   and, for videos, the frame count (`smart_nframes`), then resize: PIL BICUBIC for images, torchvision's
   `F.resize(uint8, BICUBIC, antialias=True)` for videos (reproduced here without torchvision, see
   `resize_like_torchvision`).
2. transformers 4.57 `Qwen2VLImageProcessor` (the slow PIL class, also used for videos): `smart_resize` again (HF
   variant, with the processor's `min_pixels`/`max_pixels`; a no-op unless per-item limits left the range), rescale
   1/255 in float64 then float32, normalise with the CLIP mean/std, pad time to a multiple of 2 by repeating the last
   frame, and patchify into rows of 3*2*14*14 = 1176.

Per-item options (keys of a Qwen-style content item) act in stage 1; the `min_pixels`/`max_pixels` keyword
arguments of `process_image` / `process_video` are the processor's (preprocessor_config.json) limits, stage 2.
A Processor wanting server-wide item defaults merges them first: ``process_video({**defaults, **item})``.

Deliberate differences from the references (each is only reachable where the reference would fail or is arbitrary):
* the qwen-vl-utils `smart_resize` floor branch may return 0 (then PIL raises); we keep at least one factor;
* transparency is composited onto white for every mode, not only RGBA (see `media.to_rgb`);
* a frame-list video's fps is `item["sample_fps"]` (qwen-vl-utils 0.0.14), else `item["fps"]` (0.0.10), else 2.0.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
import weakref
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError, MediaError
from .media import DEFAULT_MAX_IMAGE_PIXELS, Fetcher, VideoReader, describe_source, load_image

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: every side is a whole number of 2x2-merged patches
MIN_PIXELS = 4 * IMAGE_FACTOR**2  # 3136
MAX_PIXELS = 16384 * IMAGE_FACTOR**2  # 12845056
MAX_RATIO = 200

VIDEO_MIN_PIXELS = 128 * IMAGE_FACTOR**2  # 100352 per frame
VIDEO_MAX_PIXELS = 768 * IMAGE_FACTOR**2  # 602112 per frame
VIDEO_TOTAL_PIXELS = 128000 * IMAGE_FACTOR**2 * 0.9  # 90316800: all frames together (qwen-vl-utils MODEL_SEQ_LEN 128000)
FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------------- sizes and counts
def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: float = MIN_PIXELS,
    max_pixels: float = MAX_PIXELS,
    *,
    variant: str = "hf",
) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with min_pixels <= h*w <= max_pixels, aspect kept.

    variant="hf": transformers' `image_processing_qwen2_vl.smart_resize` (the processor stage).
    variant="qwen_vl_utils": qwen-vl-utils 0.0.14's (its fetch_image/fetch_video stage): the first rounding is
    clamped to >= factor, and its floor branch is not (we clamp it anyway: unclamped it returns 0 and PIL fails).
    The two differ only for sides under factor/2, e.g. 13x2000 -> hf 28x700, qwen_vl_utils 28x1988.
    Python's round() is banker's rounding (2.5 -> 2), as in both references.
    """
    if height <= 0 or width <= 0:
        raise MediaError(f"image size {height}x{width} (H x W) is empty")
    if min_pixels > max_pixels:
        raise InputError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise MediaError(
            f"image is {height}x{width} (H x W): aspect ratio {ratio:.1f} is over the limit of {MAX_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if variant == "qwen_vl_utils":
        h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    elif variant != "hf":
        raise InputError(f"unknown smart_resize variant {variant!r} (use 'hf' or 'qwen_vl_utils')")
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _ceil_even(x: float) -> int:
    return math.ceil(x / FRAME_FACTOR) * FRAME_FACTOR


def _floor_even(x: float) -> int:
    return math.floor(x / FRAME_FACTOR) * FRAME_FACTOR


def smart_nframes(item: dict, total_frames: int, video_fps: float) -> int:
    """Number of frames to sample (qwen-vl-utils `smart_nframes`): `nframes` rounded to even, or `fps` (default 2)
    frames per second clamped to [min_frames (4), max_frames (768, and the video length)], floored to even."""
    if "fps" in item and "nframes" in item:
        raise InputError("a video item may give `fps` or `nframes`, not both")
    if "nframes" in item:
        nframes = round(item["nframes"] / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = item.get("fps", FPS)
        min_frames = _ceil_even(item.get("min_frames", FPS_MIN_FRAMES))
        max_frames = _floor_even(item.get("max_frames", min(FPS_MAX_FRAMES, total_frames)))
        nframes = total_frames / video_fps * fps
        nframes = _floor_even(min(max(nframes, min_frames), max_frames, total_frames))
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise MediaError(
            f"cannot sample {nframes} frames from a video of {total_frames} frames: the count must lie in "
            f"[{FRAME_FACTOR}, {total_frames}]"
        )
    return nframes


def video_frame_range(item: dict, total_frames: int, video_fps: float) -> tuple[int, int, int]:
    """(first, last, count) frame indices of `video_start` .. `video_end` (seconds), as qwen-vl-utils 0.0.14's
    decord/torchcodec readers compute them; the whole video when neither is given."""
    start_s, end_s = item.get("video_start"), item.get("video_end")
    if start_s is None and end_s is None:
        return 0, total_frames - 1, total_frames
    duration = total_frames / video_fps
    start = math.ceil(max(0.0, min(start_s, duration)) * video_fps) if start_s is not None else 0
    end = total_frames - 1
    if end_s is not None:
        end = min(math.floor(max(0.0, min(end_s, duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise InputError(
            f"video_start={start_s} / video_end={end_s} select no frames of a {duration:.2f} s video "
            f"({total_frames} frames at {video_fps:.3f} fps)"
        )
    return start, end, end - start + 1


def video_frame_size(item: dict, height: int, width: int, nframes: int) -> tuple[int, int]:
    """Per-frame (height, width) of a sampled video: the qwen-vl-utils pixel budget.

    max per frame = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * 2), int(min_pixels * 1.05)), lowered (never
    raised) by item["max_pixels"]; `resized_height`/`resized_width` override it (snapped with the image limits).
    """
    if "resized_height" in item and "resized_width" in item:
        return smart_resize(item["resized_height"], item["resized_width"], variant="qwen_vl_utils")
    min_pixels = item.get("min_pixels", VIDEO_MIN_PIXELS)
    total_pixels = item.get("total_pixels", VIDEO_TOTAL_PIXELS)
    max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = min(item.get("max_pixels", max_pixels), max_pixels)
    return smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels, variant="qwen_vl_utils")


def num_vision_tokens(grid_thw, merge_size: int = MERGE_SIZE):
    """LLM tokens of one item's grid (t*h*w / merge_size**2); a list for an (N, 3) grid."""
    grid = torch.as_tensor(grid_thw, dtype=torch.long)
    if grid.dim() == 2:
        return [int(g.prod()) // merge_size**2 for g in grid]
    return int(grid.prod()) // merge_size**2


# ---------------------------------------------------------------------------------------------- pixels
def resize_like_torchvision(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision `transforms.functional.resize(uint8 [..., C, H, W], [h, w], BICUBIC, antialias=True)`.

    torchvision (checked in the v1 source, 0.23 and 0.29: `functional.resize` -> `_functional_tensor.resize`)
    returns the input unchanged when the size already matches; otherwise it casts uint8 to float32, calls
    `F.interpolate(mode="bicubic", align_corners=False, antialias=True)`, clamps to [0, 255], rounds (half to even)
    and casts back to uint8. Same steps here.
    """
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    lead = frames.shape[:-3]
    x = frames.reshape(-1, *frames.shape[-3:]).to(torch.float32)
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0, 255).round().to(torch.uint8)
    return x.reshape(*lead, *x.shape[-3:])


def _pil_bicubic(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """The processor-stage resize: transformers' `resize` on uint8 goes through PIL BICUBIC."""
    if frame.shape[:2] == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [T, C, H, W] -> float32, exactly as the slow processor: x*(1/255) in float64, then float32
    (x - mean) / std."""
    x = (frames.to(torch.float64) * (1 / 255)).to(torch.float32)
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def patchify(frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, C, H, W] -> ([t*gh*gw, C*2*14*14], (t, gh, gw)); T is padded to even by repeating the last frame.

    Rows: temporal patch, then 2x2 merge blocks row-major, then the 4 patches of a block row-major. Columns:
    (channel, time, row, column) - the flattened Conv3d weight layout.
    """
    if frames.shape[0] % TEMPORAL_PATCH_SIZE:
        pad = TEMPORAL_PATCH_SIZE - frames.shape[0] % TEMPORAL_PATCH_SIZE
        frames = torch.cat([frames, frames[-1:].expand(pad, *frames.shape[1:])])
    T, C, H, W = frames.shape
    t, gh, gw = T // TEMPORAL_PATCH_SIZE, H // PATCH_SIZE, W // PATCH_SIZE
    m, p = MERGE_SIZE, PATCH_SIZE
    x = frames.reshape(t, TEMPORAL_PATCH_SIZE, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, bh, bw, mh, mw, C, tp, ph, pw)
    return x.reshape(t * gh * gw, C * TEMPORAL_PATCH_SIZE * p * p), (t, gh, gw)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalize_table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, offsets) on `device`: table [3 * 256] float32 is normalize() of every uint8 value of every channel
    (channel c at c * 256), computed here on the host by normalize() itself; offsets [1, 3, 1, 1] int32 = c * 256."""
    device = torch.device(device)
    found = _TABLES.get(device)
    if found is None:
        with torch.inference_mode(False):  # plain tensors, usable in and out of inference mode
            values = torch.arange(256, dtype=torch.uint8).expand(1, 3, 1, 256)
            table = normalize(values).reshape(-1).to(device)
            offsets = (torch.arange(3, dtype=torch.int32) * 256).view(1, 3, 1, 1).to(device)
        found = _TABLES[device] = (table, offsets)
    return found


def pixel_values_from_frames(frames: torch.Tensor, *, max_chunk_values: int = 1 << 24) -> torch.Tensor:
    """uint8 frames [T, 3, H, W] (an image: T = 1; any strides) -> float32 pixel_values [t*gh*gw, 3*2*14*14] on
    the frames' device: bit for bit `patchify(normalize(frames))[0]`, the slow processor's arithmetic, on any device.

    The patch reshuffle moves bytes, then each byte becomes its normalised value by a lookup in normalize()'s own
    outputs for the 256 values of each channel (so no floating-point operation runs on the device). An image's one
    frame is looked up once and then copied to both temporal slots; an odd T > 1 gets its last frame repeated, as
    patchify does. Videos go `max_chunk_values` output values at a time (whole temporal patches), which bounds
    the integer temporaries.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise InputError(f"frames must be uint8 [T, 3, H, W], got {frames.dtype} {tuple(frames.shape)}")
    T, C, H, W = frames.shape
    if T == 0 or H % IMAGE_FACTOR or W % IMAGE_FACTOR:
        raise InputError(f"frames of shape {tuple(frames.shape)}: T must be >= 1 and H, W multiples of {IMAGE_FACTOR}")
    table, offsets = _normalize_table(frames.device)
    tp = TEMPORAL_PATCH_SIZE
    if T == 1:  # an image: look up one frame, duplicate the values
        return _frames_to_values(frames, 1, table, offsets)
    if T % tp:
        frames = torch.cat([frames, frames[-1:].expand(tp - T % tp, -1, -1, -1)])
    t = frames.shape[0] // tp
    rows_per_t = (H // PATCH_SIZE) * (W // PATCH_SIZE)
    per_chunk = max(1, max_chunk_values // (rows_per_t * C * tp * PATCH_SIZE**2))
    if per_chunk >= t:
        return _frames_to_values(frames, tp, table, offsets)
    out = torch.empty(t * rows_per_t, C * tp * PATCH_SIZE**2, dtype=torch.float32, device=frames.device)
    for k in range(0, t, per_chunk):
        n = min(per_chunk, t - k)
        out[k * rows_per_t:(k + n) * rows_per_t] = _frames_to_values(frames[k * tp:(k + n) * tp], tp, table, offsets)
    return out


def _frames_to_values(frames: torch.Tensor, tp: int, table: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """patchify + normalise T = t * tp frames, tp = 1 (an image's frame, duplicated at the end) or 2."""
    T, C, H, W = frames.shape
    t, gh, gw = T // tp, H // PATCH_SIZE, W // PATCH_SIZE
    m, p = MERGE_SIZE, PATCH_SIZE
    x = frames.reshape(t, tp, C, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    x = x.reshape(t * gh * gw, C, tp, p * p)  # the patch order of patchify, still bytes
    values = table.index_select(0, (x + offsets).view(-1))  # uint8 + int32 -> int32 indices c * 256 + byte
    values = values.view(t * gh * gw, C, tp, p * p)
    if tp < TEMPORAL_PATCH_SIZE:
        values = values.expand(-1, -1, TEMPORAL_PATCH_SIZE, -1)
    return values.reshape(t * gh * gw, C * TEMPORAL_PATCH_SIZE * p * p)


def _to_chw(image: np.ndarray | Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


def _image_frames(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 frames [1, 3, H, W], a view of its H x W x 3 bytes (no transposing copy).

    `np.asarray` of a PIL image is read-only; torch warns about wrapping it (writes would be undefined). Frames
    are only ever read (pixel_values_from_frames, hashing, copies to a device), so the warning is silenced."""
    array = np.asarray(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)[None].permute(0, 3, 1, 2)


def dense_frames(frames: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(a dense tensor holding `frames`' bytes in memory order, channels_last): `frames.permute(0, 2, 3, 1)` when
    the frames are a channels-last view (an image straight from PIL, H x W x 3), else `frames` made contiguous.
    The byte stream that is hashed and copied to a device, with no transposing copy for either layout."""
    hwc = frames.permute(0, 2, 3, 1)
    if hwc.is_contiguous() and not frames.is_contiguous():
        return hwc, True
    return frames.contiguous(), False


# ---------------------------------------------------------------------------------------------- the processor's items
HASH_PIECE_BYTES = 1 << 18  # content_hash: buffers above 2 pieces are hashed piece by piece on threads
HASH_THREADS = 12  # a 1280x720 image is 11 pieces: one round on the 16-core GPU hosts (8 took two)
_hash_pool = None
try:  # BLAKE3 where installed (a dependency; the GPU image may lack it): ~3.5x SHA-256's speed on one core
    import blake3 as _blake3
except ImportError:
    _blake3 = None
BLAKE3_THREADS_FROM = 1 << 20  # buffers from this size are hashed on BLAKE3's own thread pool


def content_digest(header: bytes, data, copy_to=None) -> bytes:
    """A 32-byte cryptographic digest of a header and a buffer (anything memoryview takes), for the engine's cache
    keys (collision-resistant: a crafted image must not reuse another request's cached features).
    BLAKE3 where the `blake3` package is installed: BLAKE3(header length | header | buffer), on its own threads from
    BLAKE3_THREADS_FROM bytes; a 1288x728 image's 2.8 MB in 0.29 ms on the 2-core dev box (one core 0.44 ms).
    Else SHA-256: past two pieces of HASH_PIECE_BYTES the pieces are hashed on up to HASH_THREADS threads (hashlib
    releases the GIL) and the digest is SHA-256(header | piece count | the pieces' digests), a tree hash as
    collision-resistant as SHA-256 itself (the same image: 1.55 ms on one core, 1.08 ms on 2 threads).
    The two never mix within a process; keys are not kept across processes.
    copy_to: a writable buffer of the same size that the data is also copied into (SHA-256: each piece on the
    hashing threads, before it is hashed; numpy's copy releases the GIL too): the engine's pinned staging."""
    global _hash_pool
    buf = memoryview(data).cast("B")
    dst = None if copy_to is None else np.frombuffer(memoryview(copy_to).cast("B"), dtype=np.uint8)
    if dst is not None and dst.size != len(buf):
        raise ValueError(f"copy_to holds {dst.size} bytes, the data {len(buf)}")
    src = np.frombuffer(buf, dtype=np.uint8) if dst is not None else None
    if _blake3 is not None:
        if dst is not None:
            np.copyto(dst, src)
        h = _blake3.blake3(max_threads=_blake3.blake3.AUTO if len(buf) >= BLAKE3_THREADS_FROM else 1)
        h.update(len(header).to_bytes(8, "little") + header)
        h.update(buf)
        return h.digest()
    n = -(-len(buf) // HASH_PIECE_BYTES)

    def piece_digest(i: int) -> bytes:
        a, b = i * HASH_PIECE_BYTES, (i + 1) * HASH_PIECE_BYTES
        if dst is None:
            return hashlib.sha256(buf[a:b]).digest()
        np.copyto(dst[a:b], src[a:b])
        return hashlib.sha256(dst[a:b]).digest()

    if n <= 2:
        if dst is not None:
            np.copyto(dst, src)
        h = hashlib.sha256(header)
        h.update(buf)
        return h.digest()
    if _hash_pool is None:
        import concurrent.futures
        import os

        _hash_pool = concurrent.futures.ThreadPoolExecutor(min(HASH_THREADS, os.cpu_count() or 1),
                                                           thread_name_prefix="qwenvl-hash")
    digests = b"".join(_hash_pool.map(piece_digest, range(n)))
    return hashlib.sha256(header + f"|{n} pieces|".encode() + digests).digest()


STAGE_BUDGET_BYTES = 256 << 20  # pinned staging held by VisionInputs not yet sent to a device, at most
_staged_bytes = 0
_staged_lock = threading.Lock()  # the engine encodes prompts on threads


def _reserve_staged(nbytes: int) -> bool:
    global _staged_bytes
    with _staged_lock:
        if _staged_bytes + nbytes > STAGE_BUDGET_BYTES:
            return False
        _staged_bytes += nbytes
        return True


def _release_staged(nbytes: int) -> None:
    global _staged_bytes
    with _staged_lock:
        _staged_bytes -= nbytes


class VisionInput:
    """One image or video as the Processor hands it on: the uint8 frames the model sees (resized; [1, 3, H, W] for an
    image, [T, 3, H, W] with T even for a video), `grid_thw` (int64 [3]) and, for a video, `second_per_grid`.

    The float32 `pixel_values` are made from the frames (`pixel_values_from_frames`) on first use, on the host. The
    engine instead copies the frames (an eighth of the float bytes) to its device and makes them there, and keys
    its encoder and prefix caches by `content_hash()`. Unpacks like the tuples it stands for: (pixel_values,
    grid_thw) for an image, (pixel_values, grid_thw, second_per_grid_ts) for a video; unpacking makes the host
    pixel_values, so code that needs only the grid reads `.grid_thw`. The frames are read, never written.
    """

    __slots__ = ("kind", "frames", "grid_thw", "second_per_grid", "_pixel_values", "_hash", "_staged")

    def __init__(self, kind: str, frames: torch.Tensor, second_per_grid: float = 0.0):
        if kind not in ("image", "video"):
            raise InputError(f"VisionInput kind must be 'image' or 'video', got {kind!r}")
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3 or frames.device.type != "cpu":
            raise InputError(f"VisionInput frames must be uint8 [T, 3, H, W] on the host, got {frames.dtype} "
                             f"{tuple(frames.shape)} on {frames.device}")
        T, _, H, W = frames.shape
        if (kind == "image" and T != 1) or (kind == "video" and T % TEMPORAL_PATCH_SIZE):
            raise InputError(f"a {kind} has {'1 frame' if kind == 'image' else 'an even number of frames'}, got {T}")
        if H % IMAGE_FACTOR or W % IMAGE_FACTOR or not H or not W:
            raise InputError(f"frames of {H}x{W} (H x W): both sides must be positive multiples of {IMAGE_FACTOR}")
        self.kind, self.frames, self.second_per_grid = kind, frames, float(second_per_grid)
        self.grid_thw = torch.tensor((-(-T // TEMPORAL_PATCH_SIZE), H // PATCH_SIZE, W // PATCH_SIZE), dtype=torch.long)
        self._pixel_values: torch.Tensor | None = None
        self._hash: bytes | None = None
        self._staged: torch.Tensor | None = None

    @property
    def pixel_values(self) -> torch.Tensor:
        if self._pixel_values is None:
            self._pixel_values = pixel_values_from_frames(self.frames)
        return self._pixel_values

    def take_staged(self) -> torch.Tensor | None:
        """The pinned copy of the dense frames (`dense_frames` layout) that content_hash(stage=True) made, handed over
        once: the engine sends it to the GPU instead of pinning the frames again when it encodes the item."""
        staged, self._staged = self._staged, None
        return staged

    def content_hash(self, stage: bool = False) -> bytes:
        """content_digest (BLAKE3, or SHA-256) of the uint8 frames, their shape and layout, the grid and the timing:
        equal exactly when the model's input is (for images in the same memory layout, as the processor always gives
        them). Not the hash of the float pixel_values that the engine computes for (pixel_values, grid) tuples: the
        same image given both ways is encoded twice, never confused. A 1288x728 image's 2.8 MB: BLAKE3 0.29 ms,
        SHA-256 on 2 threads 1.1 ms on the 2-core dev box; blake2b 4.3 ms, and the old float32 pixel hash 15 ms."""
        if self._hash is None:
            data, channels_last = dense_frames(self.frames)
            header = (f"uint8 frames|{self.kind}|{tuple(self.frames.shape)}|channels_last={channels_last}|"
                      f"{tuple(self.grid_thw.tolist())}|{self.second_per_grid!r}").encode()
            staged = None
            # stage: the engine's pinned copy for the host->GPU upload, made by the hashing threads in the same pass
            # (a lone pin_memory() of a 1280x720 image is one more serial copy before its ViT can start); bounded by
            # STAGE_BUDGET_BYTES over the inputs not yet uploaded, past which the engine pins when it uploads
            if stage and torch.cuda.is_available() and _reserve_staged(data.numel()):
                try:
                    staged = torch.empty(data.shape, dtype=torch.uint8, pin_memory=True)
                except Exception:
                    _release_staged(data.numel())
                    raise
                weakref.finalize(staged, _release_staged, data.numel())
            self._hash = content_digest(header, data.numpy(), None if staged is None else staged.numpy())
            self._staged = staged
        return self._hash

    def _parts(self) -> tuple:
        if self.kind == "image":
            return self.pixel_values, self.grid_thw
        return self.pixel_values, self.grid_thw, self.second_per_grid

    def __iter__(self):
        return iter(self._parts())

    def __len__(self) -> int:
        return 2 if self.kind == "image" else 3

    def __getitem__(self, i):
        if i in (1, -len(self) + 1):
            return self.grid_thw
        if self.kind == "video" and i in (2, -1):
            return self.second_per_grid
        return self._parts()[i]

    def __repr__(self) -> str:
        return (f"VisionInput({self.kind}, frames {tuple(self.frames.shape)}, grid {self.grid_thw.tolist()}"
                + (f", {self.second_per_grid} s per grid)" if self.kind == "video" else ")"))


# ---------------------------------------------------------------------------------------------- stage 1: qwen-vl-utils
def _image_source(item) -> Any:
    if not isinstance(item, dict):
        return item
    src = item.get("image", item.get("image_url"))
    if isinstance(src, dict):  # OpenAI style {"image_url": {"url": ...}}
        src = src.get("url")
    if src is None:
        raise InputError(f"image item has no 'image' or 'image_url' source: keys {sorted(item)}")
    return src


def fetch_image(
    item, fetch: Fetcher | None = None, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """qwen-vl-utils `fetch_image`: load as RGB and PIL-BICUBIC-resize to the item's limits.

    `item` is a source or a dict with `image`/`image_url` and optional `min_pixels`, `max_pixels` (defaults 3136 and
    12845056) or `resized_height` + `resized_width` (snapped to multiples of 28 with the default limits).
    """
    item = item if isinstance(item, dict) else {"image": item}
    src = _image_source(item)
    image = load_image(src, fetch, max_image_pixels=max_image_pixels)
    try:
        if "resized_height" in item and "resized_width" in item:
            height, width = smart_resize(item["resized_height"], item["resized_width"], variant="qwen_vl_utils")
        else:
            height, width = smart_resize(
                image.height, image.width, min_pixels=item.get("min_pixels", MIN_PIXELS),
                max_pixels=item.get("max_pixels", MAX_PIXELS), variant="qwen_vl_utils",
            )
    except MediaError as e:
        raise MediaError(f"{describe_source(src)}: {e}") from None
    return image.resize((width, height), Image.Resampling.BICUBIC)


def fetch_video(
    item: dict,
    fetch: Fetcher | None = None,
    *,
    frame_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, float]:
    """qwen-vl-utils `fetch_video`: (uint8 frames [T, C, H, W] at the budgeted size, sample_fps).

    `item["video"]` is a path / URL / bytes (sampled with `fps` or `nframes`, `min_frames`, `max_frames`,
    `video_start`, `video_end`) or a list of frames (each through `fetch_image`, padded to even). The frame size comes
    from `min_pixels`, `max_pixels`, `total_pixels` or `resized_height`/`resized_width`. Frames are resized one by
    one as they are decoded; `frame_transform`, if given, is applied to each resized frame before it is kept.
    """
    if "video" not in item:
        raise InputError(f"video item has no 'video' source: keys {sorted(item)}")
    src = item["video"]
    finish = frame_transform or (lambda frame: frame)
    if isinstance(src, (list, tuple)):
        if not src:
            raise MediaError("the video frame list is empty")
        options = {k: v for k, v in item.items() if k not in ("type", "video")}
        frames = [_to_chw(fetch_image({**options, "image": frame}, fetch, max_image_pixels=max_image_pixels))
                  for frame in src]
        if len({tuple(f.shape) for f in frames}) > 1:
            sizes = sorted({f"{f.shape[1]}x{f.shape[2]}" for f in frames})
            raise MediaError(f"the video's frames have different sizes after resizing: {', '.join(sizes)}")
        frames += [frames[-1]] * (_ceil_even(len(frames)) - len(frames))
        sample_fps = float(item.get("sample_fps", item.get("fps", FPS)))
        height, width = video_frame_size(item, frames[0].shape[1], frames[0].shape[2], len(frames))
        return torch.stack([finish(resize_like_torchvision(f, height, width)) for f in frames]), sample_fps

    with VideoReader(src, fetch, max_image_pixels=max_image_pixels) as reader:
        first, last, total = video_frame_range(item, reader.total_frames, reader.fps)
        nframes = smart_nframes(item, total, reader.fps)
        # float32 linspace then round-half-even, exactly as qwen-vl-utils (it decides which frames are used)
        indices = torch.linspace(first, last, nframes).round().long().tolist()
        sample_fps = nframes / max(total, 1e-6) * reader.fps
        height, width = video_frame_size(item, reader.height, reader.width, nframes)
        frames = reader.read(indices, lambda rgb: finish(resize_like_torchvision(_to_chw(rgb), height, width)))
    return torch.stack(frames), sample_fps


# ---------------------------------------------------------------------------------------------- stage 2: the processor
def process_image(
    item,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    fetch: Fetcher | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image item -> (pixel_values float32 [gh*gw, 1176], grid_thw int64 [3] = [1, gh, gw]).

    `item`: a Qwen content item ``{"type": "image", "image": src, "min_pixels": .., "max_pixels": ..}`` or a bare
    source. `min_pixels`/`max_pixels` are the processor's limits (preprocessor_config.json).
    """
    image = prepare_image(item, min_pixels=min_pixels, max_pixels=max_pixels, fetch=fetch,
                          max_image_pixels=max_image_pixels)
    return image.pixel_values, image.grid_thw


def prepare_image(
    item,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    fetch: Fetcher | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> VisionInput:
    """process_image up to the resized uint8 image: a VisionInput, whose pixel_values are process_image's."""
    image = fetch_image(item, fetch, max_image_pixels=max_image_pixels)
    height, width = smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (height, width) != (image.height, image.width):  # the processor's own resize: per-item limits left its range
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return VisionInput("image", _image_frames(image))


def process_video(
    item: dict,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    fetch: Fetcher | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One video item -> (pixel_values_videos float32 [t*gh*gw, 1176], grid_thw int64 [3], second_per_grid_ts).

    `item`: ``{"type": "video", "video": path_or_frame_list, "fps"|"nframes": .., "min_pixels": ..,
    "max_pixels": .., "total_pixels": ..}``. `second_per_grid_ts` = 2 / sample_fps, a float (never cast to int).
    """
    video = prepare_video(item, min_pixels=min_pixels, max_pixels=max_pixels, fetch=fetch,
                          max_image_pixels=max_image_pixels)
    return video.pixel_values, video.grid_thw, video.second_per_grid


def prepare_video(
    item: dict,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    fetch: Fetcher | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> VisionInput:
    """process_video up to the resized uint8 frames (padded to an even count): a VisionInput, whose pixel_values
    are process_video's (made a bounded chunk at a time, so a long video's float copy is never made twice)."""
    def processor_resize(frame: torch.Tensor) -> torch.Tensor:  # stage 2's smart_resize, per frame
        height, width = smart_resize(frame.shape[1], frame.shape[2], min_pixels=min_pixels, max_pixels=max_pixels)
        if (height, width) == tuple(frame.shape[1:]):
            return frame
        return _to_chw(_pil_bicubic(frame.permute(1, 2, 0).numpy(), height, width))

    frames, sample_fps = fetch_video(item, fetch, frame_transform=processor_resize, max_image_pixels=max_image_pixels)
    if frames.shape[0] % TEMPORAL_PATCH_SIZE:
        frames = torch.cat([frames, frames[-1:]])
    return VisionInput("video", frames, TEMPORAL_PATCH_SIZE / sample_fps)
