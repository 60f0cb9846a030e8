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

import math
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


def _to_chw(image: np.ndarray | Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


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
    image = np.asarray(fetch_image(item, fetch, max_image_pixels=max_image_pixels))
    height, width = smart_resize(image.shape[0], image.shape[1], min_pixels=min_pixels, max_pixels=max_pixels)
    image = _pil_bicubic(image, height, width)
    pixel_values, grid = patchify(normalize(_to_chw(image)[None]))
    return pixel_values, torch.tensor(grid, dtype=torch.long)


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
    def processor_resize(frame: torch.Tensor) -> torch.Tensor:  # stage 2's smart_resize, per frame
        height, width = smart_resize(frame.shape[1], frame.shape[2], min_pixels=min_pixels, max_pixels=max_pixels)
        if (height, width) == tuple(frame.shape[1:]):
            return frame
        return _to_chw(_pil_bicubic(frame.permute(1, 2, 0).numpy(), height, width))

    frames, sample_fps = fetch_video(item, fetch, frame_transform=processor_resize, max_image_pixels=max_image_pixels)
    if frames.shape[0] % TEMPORAL_PATCH_SIZE:
        frames = torch.cat([frames, frames[-1:]])
    # Normalise and patchify one temporal patch at a time into the preallocated output: a long video's float copy
    # is never made twice.
    t = frames.shape[0] // TEMPORAL_PATCH_SIZE
    rows_per_t = (frames.shape[2] // PATCH_SIZE) * (frames.shape[3] // PATCH_SIZE)
    pixel_values = torch.empty(t * rows_per_t, 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE**2, dtype=torch.float32)
    for k in range(t):
        chunk, (_, gh, gw) = patchify(normalize(frames[k * TEMPORAL_PATCH_SIZE:(k + 1) * TEMPORAL_PATCH_SIZE]))
        pixel_values[k * rows_per_t:(k + 1) * rows_per_t] = chunk
    return pixel_values, torch.tensor((t, gh, gw), dtype=torch.long), TEMPORAL_PATCH_SIZE / sample_fps
