"""Short clips (PyAV, MPEG-4 in MP4) with events at known seconds: temporal grounding and dense captions.

Without PyAV (or with QWENVL_SYNTH_VIDEO=frames) a clip is a folder of PNG frames sampled at 2 fps (FRAMES_FPS,
the training rate: frame i shows time i / 2) and the video item is that frame list with `"sample_fps": 2`
(DESIGN.md's message format allows a video as a list of frames). The random draws are the same, so both formats
show the same events; `meta["format"]` says which one a record has.

Each clip (4-16 s, 4-24 fps, a few frame sizes that are multiples of 28) shows a static distractor and 1-3
events that do not overlap in time: a coloured shape that appears at `start`, moves (or stays still) and is
gone at `end`; frame i (time i / fps) shows it iff start <= i / fps < end. Times are multiples of 0.5 s.
Held out: (colour, shape, motion) combinations; training clips never show them.
The video item carries min/max_pixels equal to the frame size so the frames stay at their native size.

Frame rates: what sets a video's MRoPE temporal ids is the rate the processor *samples* it at (second_per_grid =
2 / sample_fps), not the file's own fps — an mp4 at any source fps is sampled at the item's `fps` (default 2), a frame
list is taken at its `sample_fps`. The base tasks sample every clip at 2 fps (second_per_grid 1, absolute temporal
ids 0, 2, 4, ...). The dynamic-FPS training variants (video_grounding_dynamic_fps / dense_caption_dynamic_fps, the
report's dynamic FPS sampling) sample clip i at DYNAMIC_FPS[i % 3] (1, 2 or 4 fps), the eval-only variants
(video_grounding_unseen_fps / dense_caption_unseen_fps) at UNSEEN_FPS[i % 2] (3 or 6 fps: rates neither training
regime shows; second_per_grid 2/3 or 1/3). A variant clip is the base task's clip i (same draws, events and answer)
at that rate: frames written at it (frames format) or the same mp4 with `"fps"` set on the item.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
from PIL import Image, ImageDraw

from ..tasks.video import dense_caption_prompt, format_time, grounding_prompt
from .common import COLORS, Ctx, allowed, light_background
from .grounding import SHAPES, draw_shape

MOTIONS = {"moves to the right": (1, 0), "moves to the left": (-1, 0), "moves up": (0, -1), "moves down": (0, 1),
           "stays still": (0, 0)}
FRAME_SIZES = [(112, 168), (140, 196), (168, 224), (112, 140)]  # (h, w)
FPS_CHOICES = [4, 5, 8, 10, 12, 15, 24]
COMBO_TASK = "video"
FRAMES_FPS = 2
# Dynamic FPS (the report's §2.1.3): the *_dynamic_fps training variants sample clip i at DYNAMIC_FPS[i % 3]; the base
# tasks sample every clip at FRAMES_FPS (2). The eval-only variants use rates neither regime trains on.
DYNAMIC_FPS = (1, 2, 4)
UNSEEN_FPS = (3, 6)
LONG_SECONDS, LONG_MAX_EVENTS = (30, 120), 8  # the long-context variants (stage 3 of docs/NANO.md §4)


def video_format() -> str:
    """"mp4" (PyAV installed) or "frames"; QWENVL_SYNTH_VIDEO=mp4|frames chooses."""
    fmt = os.environ.get("QWENVL_SYNTH_VIDEO")
    if fmt:
        if fmt not in ("mp4", "frames"):
            raise ValueError(f"QWENVL_SYNTH_VIDEO must be mp4 or frames, got {fmt!r}")
        return fmt
    try:
        import av  # noqa: F401
        return "mp4"
    except ImportError:
        return "frames"


def _combos(heldout: bool) -> list[tuple]:
    return [(c, s, m) for c in COLORS for s in SHAPES for m in MOTIONS if allowed(COMBO_TASK, heldout, c, s, m)]


def _events(rng: random.Random, duration: float, heldout: bool, max_events: int = 3) -> list[dict]:
    """1..max_events non-overlapping events on a 0.5 s grid; in a held-out clip the first event's combo is unseen."""
    n = rng.randint(1, min(max_events, int(duration // 3)))
    while True:
        cuts = sorted(rng.sample(range(1, int(duration * 2)), 2 * n))  # half-seconds
        if all(cuts[2 * i + 1] - cuts[2 * i] >= 3 for i in range(n)):  # every event lasts >= 1.5 s
            break
    events, used = [], set()
    for i in range(n):
        start, end = cuts[2 * i] / 2, cuts[2 * i + 1] / 2
        pool = _combos(heldout and i == 0)
        color, shape, motion = rng.choice([c for c in pool if c[:2] not in used])
        used.add((color, shape))
        events.append({"start": start, "end": end, "color": color, "shape": shape, "motion": motion,
                       "description": f"A {color} {shape} {motion}."})
    return events


def write_video(path: str, frames: list[np.ndarray], fps: int) -> None:
    import av

    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 1_500_000
        stream.codec_context.thread_count = 1  # one thread: the same bytes every time
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_clip(ctx: Ctx, sample_fps: float | None = None, long: bool = False) -> tuple[str | list[str], dict]:
    """(the mp4's path, or the frame files' paths, relative to out_dir; meta). sample_fps: the rate the processor
    is to sample the clip at (default: FRAMES_FPS, the processor's default for an mp4); it draws nothing from
    ctx.rng, so the clip's content does not depend on it. long: 30-120 s with up to 8 events (4-16 s, 3 events)."""
    rng = ctx.rng
    h, w = rng.choice(FRAME_SIZES)
    fps = rng.choice(FPS_CHOICES)
    duration = float(rng.randint(*LONG_SECONDS) if long else rng.randint(4, 16))
    events = _events(rng, duration, ctx.heldout, LONG_MAX_EVENTS if long else 3)
    bg = light_background(rng)
    base = Image.new("RGB", (w, h), bg)
    dc, ds = rng.choice([c for c in _combos(False) if c[:2] not in {(e["color"], e["shape"]) for e in events}])[:2]
    s0 = h // 6
    draw_shape(ImageDraw.Draw(base), ds, rng.randint(0, w - s0), rng.randint(0, h - s0), s0, COLORS[dc])
    for e in events:  # path: start and end positions of the moving shape's top-left corner
        s = rng.randint(h // 6, h // 4)
        dx, dy = MOTIONS[e["motion"]]
        x0 = rng.randint(0, w - s) if dx == 0 else (0 if dx > 0 else w - s)
        y0 = rng.randint(0, h - s) if dy == 0 else (0 if dy > 0 else h - s)
        x1 = x0 if dx == 0 else w - s - x0
        y1 = y0 if dy == 0 else h - s - y0
        e["path"] = [x0, y0, x1, y1, s]
    fmt = video_format()
    rate = fps if fmt == "mp4" else (sample_fps or FRAMES_FPS)
    frames = []
    for i in range(int(duration * rate)):
        t = i / rate
        img = base.copy()
        d = ImageDraw.Draw(img)
        for e in events:
            if e["start"] <= t < e["end"]:
                x0, y0, x1, y1, s = e["path"]
                a = (t - e["start"]) / (e["end"] - e["start"])
                draw_shape(d, e["shape"], round(x0 + a * (x1 - x0)), round(y0 + a * (y1 - y0)), s, COLORS[e["color"]])
        frames.append(img)
    meta = {"fps": rate, "duration": duration, "frame_hw": [h, w], "n_frames": len(frames), "events": events,
            "distractor": [dc, ds]}
    if sample_fps is not None:  # (meta of the training clips unchanged)
        meta.update(sample_fps=sample_fps, eval_group=f"{sample_fps:g} fps")
    if fmt == "mp4":  # (meta as before the frames format existed: the same bytes)
        rel, path = ctx.media_path(".mp4")
        write_video(path, [np.asarray(f) for f in frames], fps)
        return rel, meta
    meta["format"] = "frames"
    rel = []
    for i, f in enumerate(frames):
        r, path = ctx.media_path(f"/{i:03d}.png")
        f.save(path, format="PNG", optimize=False)
        rel.append(r)
    return rel, meta


def _record(rel: str | list[str], meta: dict, prompt: str, answer: str) -> dict:
    h, w = meta["frame_hw"]
    item = {"type": "video", "video": rel, "min_pixels": 28 * 28, "max_pixels": h * w}
    if isinstance(rel, list):
        item["sample_fps"] = meta["fps"]
    elif "sample_fps" in meta:  # an mp4 sampled at another rate than the processor's default 2 fps
        item["fps"] = meta["sample_fps"]
    return {"messages": [{"role": "user", "content": [item, {"type": "text", "text": prompt}]},
                         {"role": "assistant", "content": answer}], "meta": meta}


def gen_video_grounding(ctx: Ctx, sample_fps: float | None = None, long: bool = False) -> dict:
    rel, meta = make_clip(ctx, sample_fps, long)
    e = meta["events"][0] if ctx.heldout else ctx.rng.choice(meta["events"])
    query = e["description"][0].lower() + e["description"][1:].rstrip(".")
    meta.update(query=query, span=[e["start"], e["end"]], combo=[e["color"], e["shape"], e["motion"]])
    answer = f"The given query happens in {e['start']:.1f} - {e['end']:.1f} seconds."
    return _record(rel, meta, grounding_prompt(query), answer)


def gen_dense_caption(ctx: Ctx, sample_fps: float | None = None, long: bool = False) -> dict:
    rel, meta = make_clip(ctx, sample_fps, long)
    e0 = meta["events"][0]
    meta["combo"] = [e0["color"], e0["shape"], e0["motion"]]
    events = [{"start_time": format_time(e["start"], "mm:ss.ff"), "end_time": format_time(e["end"], "mm:ss.ff"),
               "description": e["description"]} for e in meta["events"]]
    answer = "```json\n" + json.dumps(events, indent=None).replace("}, {", "},\n {") + "\n```"
    return _record(rel, meta, dense_caption_prompt("mm:ss.ff"), answer)


def unseen_fps(ctx: Ctx) -> int:
    """The sampling rate of an eval-only variant's clip: alternating over UNSEEN_FPS by sample index."""
    return UNSEEN_FPS[ctx.index % len(UNSEEN_FPS)]


def dynamic_fps(ctx: Ctx) -> int:
    """The sampling rate of a dynamic-FPS training clip: cycling over DYNAMIC_FPS by sample index."""
    return DYNAMIC_FPS[ctx.index % len(DYNAMIC_FPS)]


def gen_video_grounding_dynamic_fps(ctx: Ctx) -> dict:
    return gen_video_grounding(ctx, dynamic_fps(ctx))


def gen_dense_caption_dynamic_fps(ctx: Ctx) -> dict:
    return gen_dense_caption(ctx, dynamic_fps(ctx))


def gen_video_grounding_unseen_fps(ctx: Ctx) -> dict:
    return gen_video_grounding(ctx, unseen_fps(ctx))


def gen_dense_caption_unseen_fps(ctx: Ctx) -> dict:
    return gen_dense_caption(ctx, unseen_fps(ctx))


def gen_video_grounding_long(ctx: Ctx) -> dict:
    return gen_video_grounding(ctx, long=True)


def gen_dense_caption_long(ctx: Ctx) -> dict:
    return gen_dense_caption(ctx, long=True)
