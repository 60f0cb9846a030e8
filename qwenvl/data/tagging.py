"""Domain tagging by rules (the report's stage 1 used a classifier, Qwen2-VL-Instag; these rules cover the
formats this project reads and writes). A tag is "domain.subdomain"; `task_for` maps it to an eval task."""
from __future__ import annotations

import re

TAG_TASK = {
    "grounding.box": "grounding", "grounding.point": "point", "grounding.count": "count", "ocr.text": "ocr",
    "ocr.spotting": "spotting", "document.html": "doc", "document.kie": "kie", "chart.qa": "chart",
    "video.grounding": "video_grounding", "video.dense_caption": "dense_caption", "agent.gui": "gui",
    "vqa.caption": "general", "vqa.general": "general", "video.general": "general",
    "text.coding": "general", "text.math": "general", "text.general": "general",
}
TAGS = tuple(TAG_TASK)


def _parts(record: dict) -> tuple[str, str, str, set]:
    """(system text, user text, last answer, media kinds) of a record in any supported format."""
    from ..train.data import record_messages

    if "text" in record and "messages" not in record and "conversations" not in record:
        return "", "", str(record["text"]), set()
    msgs = record_messages(record)
    text = lambda m: "".join(it.get("text", "") for it in m["content"] if it["type"] == "text")  # noqa: E731
    system = "\n".join(text(m) for m in msgs if m["role"] == "system")
    user = "\n".join(text(m) for m in msgs if m["role"] == "user")
    answers = [text(m) for m in msgs if m["role"] == "assistant"]
    media = {it["type"] for m in msgs for it in m["content"] if it["type"] in ("image", "video")}
    return system, user, answers[-1] if answers else "", media


def tag(record: dict) -> str:
    system, user, answer, media = _parts(record)
    u, a = user.lower(), answer
    if "video" in media:
        if "start_time" in a or "localize a series" in u or "dense caption" in u:
            return "video.dense_caption"
        if re.search(r"happens in|when does|start(ing)? and end(ing)? time", u + " " + a.lower()):
            return "video.grounding"
        return "video.general"
    if "<tool_call>" in a or "<tools>" in system:
        return "agent.gui"
    if "how many" in u or re.search(r"\bcount\b", u):
        return "grounding.count"
    if "text_content" in a or "spotting" in u:
        return "ocr.spotting"
    if "data-bbox" in a or "qwenvl html" in u:
        return "document.html"
    if "point_2d" in a or re.search(r"<points?\b", a) or re.search(r"\bpoint to\b|with points", u):
        return "grounding.point"
    if "bbox_2d" in a or "<|box_start|>" in a or re.search(r"\b(locate|bbox|bounding box|detect|outline the position)", u):
        return "grounding.box"
    if "key-value" in u or ("extract" in u and "json" in u):
        return "document.kie"
    if re.search(r"\b(chart|plot|graph|bar|axis)\b", u):
        return "chart.qa"
    if re.search(r"read (all )?the text|\bocr\b|text (in|from) the image|recogni[sz]e the text", u):
        return "ocr.text"
    if media:
        return "vqa.caption" if re.search(r"\b(describe|caption)\b", u) else "vqa.general"
    if re.search(r"```|\bdef |\bclass |#include|function\s*\(|\bcode\b|\bpython\b", u + "\n" + a):
        return "text.coding"
    if re.search(r"\d\s*[-+*/^=]\s*\d|\bsolve\b|\bequation\b", u):
        return "text.math"
    return "text.general"


def task_for(record: dict) -> str:
    return TAG_TASK[tag(record)]


def tag_records(records: list[dict]) -> tuple[list[dict], dict]:
    """Each record gets "domain": tag; returns (records, {"counts": {tag: n}})."""
    counts: dict[str, int] = {}
    out = []
    for r in records:
        t = tag(r)
        counts[t] = counts.get(t, 0) + 1
        out.append({**r, "domain": t})
    return out, {"records": len(records), "counts": dict(sorted(counts.items()))}
