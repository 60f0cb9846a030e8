"""Video: temporal grounding and dense-caption answers -> seconds; prompt builders.

The model was trained on timestamps in seconds and in hour-minute-second-frame (hmsf) form (paper
§2.1.3); the cookbook shows "The given query happens in 64.0 - 72.0 seconds." and dense captions as
JSON with 'mm:ss.ff' strings ("00:21.80" = 21.8 s: the part after the dot is a decimal fraction,
the cookbook parses it with strptime's %f). hmsf "00:01:04:12" is 1 min 4 s + 12 frames, so it
needs the video's fps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ._json import find_objects, walk_dicts

# ----------------------------------------------------------------------------- prompts

def grounding_prompt(query: str) -> str:
    """Temporal grounding, video_understanding cookbook wording."""
    return f"Give the query: '{query}', when does the described content occur in the video?"


def charades_prompt(query: str) -> str:
    """Temporal grounding as lmms-eval's temporal_grounding_charades asks it."""
    return ("Please find the visual event described by a sentence in the video, determining its starting and "
            "ending times. The format should be: 'The event happens in the start time - end time'. For example, "
            "The event 'person turn a light on' happens in the 24.3 - 30.4 seconds. Now I will give you the "
            f"textual sentence: {query}. Please return its start time and end time.")


def dense_caption_prompt(time_format: str = "mm:ss.ff") -> str:
    """Dense captioning with JSON output (cookbook wording); time_format e.g. 'mm:ss.ff', 'seconds', 'hmsf'."""
    return ("Localize a series of activity events in the video, output the start and end timestamp for each "
            "event, and describe each event with sentences. Provide the result in json format with "
            f"'{time_format}' format for time depiction.")


# ----------------------------------------------------------------------------- times

# one timestamp: 64 / 64.0 / 1:04 / 01:04.50 / 00:01:04 / 00:01:04:12 (hmsf)
_TIME = r"\d+(?:\.\d+)?(?::\d+(?:\.\d+)?){0,3}"
_UNIT = r"(?:seconds?|secs?|s|minutes?|mins?|hours?|hrs?|h)\b"
_RANGE = re.compile(
    r"(between\s+)?(?<![\d.:])(" + _TIME + r")\s*(" + _UNIT + r")?\s*"
    r"(-|–|—|~|to|till|until|and)\s*"
    r"(" + _TIME + r")(?![\d:])\s*(" + _UNIT + r")?", re.I)


def _unit_scale(unit: str | None) -> float:
    if not unit:
        return 1.0
    u = unit.lower()
    if u.startswith("m"):
        return 60.0
    if u.startswith("h"):
        return 3600.0
    return 1.0


def parse_time(value: Any, fps: float | None = None) -> float | None:
    """One timestamp -> seconds: a number, "64.0", "64.0s", "64 seconds", "1:04", "01:04.50" (mm:ss.ff),
    "00:01:04" (hh:mm:ss), "00:01:04:12" (hmsf; frames / fps). None when unparseable.
    Raises InputError for hmsf without fps (frames cannot be turned into seconds)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"\s*(" + _TIME + r")\s*(" + _UNIT + r")?\s*\.?\s*", value, re.I)
    if not m:
        return None
    parts = m.group(1).split(":")
    if len(parts) == 4:
        if not fps:
            raise InputError(f"timestamp {value!r} is hh:mm:ss:frames (hmsf); pass the video's fps to convert it")
        h, mi, s, frames = (float(p) for p in parts)
        return h * 3600 + mi * 60 + s + frames / fps
    seconds = 0.0
    for p in parts:  # ss | mm:ss | hh:mm:ss, each with optional .fraction
        seconds = seconds * 60 + float(p)
    return seconds * (_unit_scale(m.group(2)) if len(parts) == 1 else 1.0)


def parse_time_ranges(text: str, fps: float | None = None) -> list[tuple[float, float]]:
    """Every "A - B" / "A to B" / "A – B" / "between A and B" span in the text, in seconds, each
    ordered (start <= end). A unit after B ("64 - 72 seconds", "1 - 2 minutes") applies to both."""
    ranges = []
    for m in _RANGE.finditer(text):
        between, a, unit_a, connector, b, unit_b = m.groups()
        if connector.lower() == "and" and not between:
            continue  # "2 people and 3 dogs" is not a span; "between 2 and 3" is
        scale_b = _unit_scale(unit_b)
        scale_a = _unit_scale(unit_a) if unit_a else scale_b
        start, end = parse_time(a, fps), parse_time(b, fps)
        if start is None or end is None:
            continue
        if ":" not in a:
            start *= scale_a
        if ":" not in b:
            end *= scale_b
        ranges.append((min(start, end), max(start, end)))
    return ranges


def parse_time_range(text: str, fps: float | None = None) -> tuple[float, float] | None:
    """The first span in a temporal-grounding answer, e.g. "The given query happens in 64.0 - 72.0
    seconds." -> (64.0, 72.0); None when the answer has none."""
    ranges = parse_time_ranges(text, fps)
    return ranges[0] if ranges else None


def format_time(seconds: float, style: str = "seconds", fps: float | None = None) -> str:
    """Seconds -> "64.0" (seconds), "01:04.00" (mm:ss.ff), "00:01:04" (hh:mm:ss) or "00:01:04:12" (hmsf)."""
    if seconds < 0:
        raise InputError(f"timestamp must be >= 0, got {seconds}")
    if style == "seconds":
        return f"{seconds:.1f}"
    if style == "mm:ss.ff":
        cs = round(seconds * 100)
        return f"{cs // 6000:02d}:{cs // 100 % 60:02d}.{cs % 100:02d}"
    if style == "hh:mm:ss":
        s = round(seconds)
        return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"
    if style == "hmsf":
        if not fps:
            raise InputError("hmsf timestamps need fps")
        s, frames = int(seconds), round((seconds - int(seconds)) * fps)
        if frames >= fps:  # rounding reached the next second
            s, frames = s + 1, 0
        return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}:{frames:02d}"
    raise InputError(f"unknown time style {style!r}; use seconds, mm:ss.ff, hh:mm:ss or hmsf")


# ----------------------------------------------------------------------------- dense captions

@dataclass
class Event:
    start: float
    end: float
    caption: str
    extra: dict = field(default_factory=dict)


_START_KEYS = ("start_time", "start", "begin", "start_timestamp")
_END_KEYS = ("end_time", "end", "stop", "end_timestamp")
_CAPTION_KEYS = ("caption", "description", "event", "sentence", "text", "content")
_LINE = re.compile(r"^\s*(?:(?:[-*]|\d+[.)])\s+)?\[?(" + _TIME + r")\s*(?:s|seconds)?\s*(?:-|–|—|~|to)\s*(" + _TIME
                   + r")\s*(?:s|seconds)?\]?\s*[:,\-–]?\s*(.+?)\s*$", re.M | re.I)


def _first(d: dict, keys: tuple) -> Any:
    return next((d[k] for k in keys if k in d), None)


def parse_events(text: str, fps: float | None = None) -> list[Event]:
    """Dense-caption answer -> events in answer order. JSON objects with start_time/end_time (numbers
    or strings in any `parse_time` form; also a "timestamp": [s, e] pair) and caption/description;
    objects whose times don't parse are skipped. Falls back to "00:00.0 - 00:21.8: caption" lines."""
    events = []
    for obj in find_objects(text):
        for d in walk_dicts(obj):
            start, end = _first(d, _START_KEYS), _first(d, _END_KEYS)
            pair = d.get("timestamp", d.get("timestamps"))
            if start is None and isinstance(pair, (list, tuple)) and len(pair) == 2:
                start, end = pair
            caption = _first(d, _CAPTION_KEYS)
            if start is None or end is None or caption is None:
                continue
            s, e = parse_time(start, fps), parse_time(end, fps)
            if s is None or e is None:
                continue
            used = {*_START_KEYS, *_END_KEYS, *_CAPTION_KEYS, "timestamp", "timestamps"}
            events.append(Event(s, e, str(caption).strip(), {k: v for k, v in d.items() if k not in used}))
    if events:
        return events
    for m in _LINE.finditer(text):
        s, e = parse_time(m.group(1), fps), parse_time(m.group(2), fps)
        if s is not None and e is not None:
            events.append(Event(s, e, m.group(3)))
    return events
