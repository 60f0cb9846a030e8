"""Rule-based filters (the report's stage-2 rules): repetitive answers, truncated or malformed answers, broken
boxes. `check(record)` lists the reasons a record fails; `filter_records` splits a set and counts them.

Rules
  empty       no assistant turn, or an empty answer
  repetition  a word/number n-gram (n = 2..8) repeated 4+ times in a row (one word: 6+), a line repeated 3+
              times in a row, or the same JSON object twice in one answer (duplicate boxes / lines)
  truncated   unclosed ``` fence, brackets, <tool_call> or <html>; an answer that stops on a comma, colon, or a
              dangling word ("the", "and", ...)
  malformed   the format the answer claims does not parse (a cut-off answer counts as truncated only): JSON
              that does not load, a <tool_call> without a JSON object, HTML without elements, a
              video-grounding answer without a time span
  boxes       a complete bbox_2d / point_2d / data-bbox that is not 4 (2) numbers, has x1 >= x2 or y1 >= y2, is
              negative, or lies outside the image the model sees (resized with the processor's min/max_pixels)
"""
from __future__ import annotations

import os
import re

from ..tasks._json import find_objects, loads_lenient, strip_fences

RULES = ("empty", "repetition", "truncated", "malformed", "boxes")
_DANGLING = {"the", "a", "an", "and", "or", "of", "to", "with", "in", "on", "for", "is", "are", "but", "that"}


def answer_text(record: dict) -> str | None:
    from ..evaluate.scoring import reference_text

    if "text" in record and "messages" not in record and "conversations" not in record:
        return str(record["text"])
    try:
        return reference_text(record)
    except Exception:  # noqa: BLE001 - a record we cannot read at all
        return None


# ----------------------------------------------------------------------------- rules

def repetition(text: str, min_repeats: int = 4) -> bool:
    tokens = re.findall(r"[A-Za-z]+|\d+", text.lower())  # numbers count: boxes with new numbers are not repeats
    for n in range(1, 9):
        need = min_repeats + 2 if n == 1 else min_repeats
        for start in range(n):  # every phase of the n-gram grid
            grams = [tuple(tokens[i:i + n]) for i in range(start, len(tokens) - n + 1, n)]
            run = 1
            for a, b in zip(grams, grams[1:]):
                run = run + 1 if a == b else 1
                if run >= need:
                    return True
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip() not in ("```", "```json")]
    if any(lines[i] == lines[i + 1] == lines[i + 2] for i in range(len(lines) - 2)):
        return True
    objs = [repr(sorted(o.items(), key=str)) for o in find_objects(text)]
    return len(objs) != len(set(objs))


def _balanced(text: str) -> bool:
    """Brackets outside strings all close (JSON-ish parts of the answer)."""
    depth, quote, i = 0, None, 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c == '"' and depth:
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        i += 1
    return depth <= 0 and quote is None


def truncated(text: str) -> bool:
    t = text.rstrip()
    if t.count("```") % 2 or not _balanced(strip_fences(t)):
        return True
    if t.count("<tool_call>") > t.count("</tool_call>") or ("<html" in t and "</html>" not in t):
        return True
    if re.search(r"<[^<>]*$", t):  # a tag cut off
        return True
    last = re.findall(r"[A-Za-z]+|\S", t[-40:])
    return bool(last) and (last[-1] in (",", ":", ";", "(", "-") or last[-1].lower() in _DANGLING)


def malformed(text: str, record: dict | None = None) -> bool:
    from ..tasks.agent import parse_tool_calls
    from ..tasks.document import parse_html
    from ..tasks.video import parse_time_range

    body = strip_fences(text).strip()
    if "```json" in text or body[:1] in "[{":
        if loads_lenient(body) is None:
            return True
    if "<tool_call>" in text:
        calls = parse_tool_calls(text)
        if not calls or any(not c.ok or not isinstance(c.arguments, dict) for c in calls):
            return True
    if "<html" in text and not parse_html(text):
        return True
    task = (record or {}).get("task")
    if task == "video_grounding" and parse_time_range(text) is None:
        return True
    return False


_BOX_RES = [(re.compile(r'"bbox_2d"\s*:\s*(\[[^\]]*\])'), 4), (re.compile(r'"point_2d"\s*:\s*(\[[^\]]*\])'), 2),
            (re.compile(r'data-bbox="([^"]*)"'), 4)]


def image_bounds(record: dict, base_dir: str | None, min_pixels: int, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) of the coordinate space of the record's single image, or None when unknown."""
    from ..preprocess import smart_resize
    from ..train.data import image_size, record_messages

    try:
        items = [it for m in record_messages(record) for it in m["content"] if it["type"] in ("image", "video")]
    except Exception:  # noqa: BLE001
        return None
    if len(items) != 1 or items[0]["type"] != "image" or not isinstance(items[0]["image"], str):
        return None
    src = items[0]["image"]
    if base_dir and not src.startswith(("/", "http://", "https://", "data:", "file://")):
        src = os.path.join(base_dir, src)
    try:
        h, w = image_size(src)
    except Exception:  # noqa: BLE001 - missing media is the trainer's business, not a box error
        return None
    coords = record.get("coords", "resized")
    if coords == "original":
        return w, h
    if coords == "norm1000":
        return 1000, 1000
    if coords == "norm1":
        return 1, 1
    item = items[0]
    h1, w1 = smart_resize(h, w, min_pixels=item.get("min_pixels", min_pixels), max_pixels=item.get("max_pixels", max_pixels))
    rh, rw = smart_resize(h1, w1, min_pixels=min_pixels, max_pixels=max_pixels)
    return rw, rh


def broken_boxes(text: str, bounds: tuple[int, int] | None = None) -> bool:
    for pattern, n in _BOX_RES:
        for m in pattern.finditer(text):
            nums = re.findall(r"-?\d+(?:\.\d+)?", m.group(1))
            if len(nums) != n:
                return True
            v = [float(x) for x in nums]
            if min(v) < 0:
                return True
            if n == 4 and (v[0] >= v[2] or v[1] >= v[3]):
                return True
            if bounds and (max(v[0::2]) > bounds[0] or max(v[1::2]) > bounds[1]):
                return True
    return False


def check(record: dict, base_dir: str | None = None, rules=RULES, min_pixels: int = 3136,
          max_pixels: int = 12845056) -> list[str]:
    """The rules `record` fails (empty list: keep it)."""
    text = answer_text(record)
    if not text or not text.strip():
        return ["empty"] if "empty" in rules else []
    failed = []
    if "repetition" in rules and repetition(text):
        failed.append("repetition")
    cut = truncated(text)
    if "truncated" in rules and cut:
        failed.append("truncated")
    if "malformed" in rules and not cut and malformed(text, record):  # a cut-off answer is reported as truncated
        failed.append("malformed")
    if "boxes" in rules and re.search(r"bbox_2d|point_2d|data-bbox", text):
        if broken_boxes(text, image_bounds(record, base_dir, min_pixels, max_pixels)):
            failed.append("boxes")
    return failed


def filter_records(records: list[dict], base_dir: str | None = None, rules=RULES, **kw) -> tuple[list, list, dict]:
    """(kept, removed, report); each removed record carries "removed_by": [rules]."""
    kept, removed, counts = [], [], {r: 0 for r in rules}
    for rec in records:
        failed = check(rec, base_dir, rules, **kw)
        if failed:
            removed.append({**rec, "removed_by": failed})
            for r in failed:
                counts[r] += 1
        else:
            kept.append(rec)
    report = {"records": len(records), "kept": len(kept), "removed": len(removed),
              "removed_fraction": round(len(removed) / max(1, len(records)), 4), "by_rule": counts}
    return kept, removed, report
