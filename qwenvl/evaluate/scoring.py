"""Per-task scores of one answer against a reference record, and their aggregation.

The reference is the record's last assistant message, read with the same parsers as the prediction; the
synthetic generators' `meta` adds what the text cannot carry (the target box of a point or a click). A record
without a known `task` gets one from the data tagger (qwenvl.data.tagging), and anything unrecognised is scored
as general VQA (ANLS and exact match). Unparseable predictions score 0; nothing here raises on model output.

| task | metrics |
| grounding | acc@0.5: first predicted box IoU >= 0.5 with the reference (absent object: no box predicted) |
| point | point_acc: first predicted point inside the target box (meta.box, else within 14 px of the reference) |
| count | count_acc: the stated count equals the reference count |
| ocr | char_acc: 1 - CER of the whole text |
| spotting | f1: lines matched at IoU >= 0.5 with equal text; char_acc of the lines joined in order |
| doc | element_f1: elements matched by type at IoU >= 0.5; text_anls: ANLS of the page text |
| kie | field_acc: fraction of reference keys whose predicted value equals it (case/space-insensitive) |
| chart | relaxed_acc: ChartQA relaxed accuracy (5 % on numbers) |
| video_grounding | mIoU and R@0.5 of the predicted span |
| dense_caption | mIoU: per reference event the best tIoU over predicted events, averaged; R@0.5 likewise |
| gui | action_em: same action type and arguments; a click must land inside the target (meta.box) |
| general | anls, exact |

video_grounding_unseen_fps / dense_caption_unseen_fps (the held-out clips sampled at frame rates training never
uses; synth.video.UNSEEN_FPS) are scored as their base task and reported apart. A record whose meta has an
`eval_group` (e.g. "1 fps") also gets per-group means in its task's `by_group`.
"""
from __future__ import annotations

import re
from typing import Any

from ..synth import VARIANTS as SYNTH_VARIANTS
from ..tasks import grounding as G
from ..tasks import metrics as M
from ..tasks.document import parse_html, parse_kie, parse_text_spotting
from ..tasks.agent import parse_tool_calls, to_action
from ..tasks.video import parse_events, parse_time_range
from ..tasks._json import find_value

TASK_METRICS = {
    "grounding": ("acc@0.5",), "point": ("point_acc",), "count": ("count_acc",), "ocr": ("char_acc",),
    "spotting": ("f1", "char_acc"), "doc": ("element_f1", "text_anls"), "kie": ("field_acc",),
    "chart": ("relaxed_acc",), "video_grounding": ("mIoU", "R@0.5"), "dense_caption": ("mIoU", "R@0.5"),
    "gui": ("action_em",), "general": ("anls", "exact"),
}
# tasks scored exactly as another one, reported under their own name: synth's variants, and its glyphs curriculum
# (OCR of random strings, so a run's glyph reading can be measured on its held-out split with --data)
SCORED_AS = {**SYNTH_VARIANTS, "glyphs": "ocr"}
TASK_METRICS.update({task: TASK_METRICS[base] for task, base in SCORED_AS.items()})
# the synthetic caption task has no dedicated metric
TASK_ALIASES = {"caption": "general"}
# generation budget per task (tokens); the harness caps it with --max-tokens
MAX_TOKENS = {"grounding": 96, "point": 96, "count": 512, "ocr": 256, "spotting": 768, "doc": 1024, "kie": 192,
              "chart": 32, "video_grounding": 48, "dense_caption": 384, "gui": 96, "general": 256}
MAX_TOKENS.update({task: MAX_TOKENS[base] for task, base in SCORED_AS.items()})


def primary_metric(task: str) -> str:
    return TASK_METRICS[eval_task(task)][0]


def eval_task(task: str | None) -> str:
    task = TASK_ALIASES.get(task, task)
    return task if task in TASK_METRICS else "general"


def reference_text(record: dict) -> str:
    """The last assistant message's text (the answer the model should give)."""
    from ..train.data import record_messages

    msgs = record_messages(record)
    for m in reversed(msgs):
        if m["role"] == "assistant":
            return "".join(it.get("text", "") for it in m["content"] if it["type"] == "text")
    return ""


def task_of(record: dict) -> str:
    if record.get("task"):
        return eval_task(record["task"])
    from ..data.tagging import task_for

    return eval_task(task_for(record))


# ----------------------------------------------------------------------------- per-task scores

def _f1(n_match: int, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 and n_ref == 0:
        return 1.0
    p = n_match / n_pred if n_pred else 0.0
    r = n_match / n_ref if n_ref else 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


def match_count(preds: list, refs: list, same) -> int:
    """Greedy one-to-one matching (best IoU first) of predictions to references; same(p, r) -> IoU or None."""
    pairs = sorted(((iou, i, j) for i, p in enumerate(preds) for j, r in enumerate(refs)
                    if (iou := same(p, r)) is not None and iou >= 0.5), reverse=True)
    used_p, used_r, n = set(), set(), 0
    for _, i, j in pairs:
        if i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
            n += 1
    return n


def _norm(text: Any) -> str:
    return " ".join(str(text).strip().lower().split())


def _page_text(elements) -> str:
    parts = []
    for el in elements:
        parts.append("\n".join(" ".join(r) for r in el.rows) if el.rows else el.text)
    return "\n".join(p for p in parts if p)


def _first(items):
    return items[0] if items else None


def _short_answer(pred: str, ref: str) -> str:
    """The answer part of a chart/VQA prediction: the whole stripped text, or its last number when the
    reference is a number and the text is not."""
    text = pred.strip().rstrip(".").strip()
    if M._to_float(ref) is not None and M._to_float(text) is None:
        nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?%?", text)
        return nums[-1] if nums else text
    return text


def _action(text: str):
    call = _first(parse_tool_calls(text))
    try:
        return to_action(call) if call is not None else None
    except Exception:
        return None


def score(task: str, pred: str, record: dict, ref: str | None = None) -> dict[str, float]:
    """Scores (0..1) of prediction `pred` for `record` under `task`'s metrics."""
    task = eval_task(task)
    task = SCORED_AS.get(task, task)
    ref = reference_text(record) if ref is None else ref
    meta = record.get("meta") or {}
    pred = pred or ""
    if task == "grounding":
        rb, pb = G.parse_boxes(ref), G.parse_boxes(pred)
        ok = not pb if not rb else M.iou(_first(pb), rb[0]) >= 0.5
        return {"acc@0.5": float(ok)}
    if task == "point":
        pp = _first(G.parse_points(pred))
        if meta.get("box"):
            return {"point_acc": float(M.point_in_box(pp, meta["box"]))}
        rp = _first(G.parse_points(ref))
        if rp is None:
            return {"point_acc": float(pp is None)}
        return {"point_acc": float(pp is not None and ((pp.x - rp.x) ** 2 + (pp.y - rp.y) ** 2) ** 0.5 <= 14)}
    if task == "count":
        want = meta.get("count", G.count(ref))
        return {"count_acc": float(G.count(pred) == want)}
    if task == "ocr":
        return {"char_acc": M.char_accuracy(pred.strip(), ref.strip())}
    if task == "spotting":
        rs, ps = parse_text_spotting(ref), parse_text_spotting(pred)
        n = match_count(ps, rs, lambda p, r: M.iou(p, r) if _norm(p.label) == _norm(r.label) else None)
        joined = lambda spots: "\n".join(s.label or "" for s in spots)  # noqa: E731
        return {"f1": _f1(n, len(ps), len(rs)), "char_acc": M.char_accuracy(joined(ps), joined(rs))}
    if task == "doc":
        re_, pe = parse_html(ref), parse_html(pred)
        box = lambda el: el.bbox or (0, 0, 0, 0)  # noqa: E731
        n = match_count(pe, re_, lambda p, r: M.iou(box(p), box(r)) if p.type == r.type and p.bbox and r.bbox else None)
        return {"element_f1": _f1(n, len(pe), len(re_)), "text_anls": M.anls(_page_text(pe), _page_text(re_))}
    if task == "kie":
        fields = meta.get("fields")
        if fields is None:
            value = find_value(ref)
            fields = value if isinstance(value, dict) else {}
        if not fields:
            return {"field_acc": float(not pred.strip())}
        got = parse_kie(pred, list(fields)).values
        return {"field_acc": sum(_norm(got.get(k)) == _norm(v) for k, v in fields.items() if got.get(k) is not None)
                / len(fields)}
    if task == "chart":
        return {"relaxed_acc": float(M.relaxed_correctness(_short_answer(pred, ref), ref.strip().rstrip(".")))}
    if task == "video_grounding":
        span = meta.get("span") or parse_time_range(ref)
        t = M.temporal_iou(parse_time_range(pred), span)
        return {"mIoU": t, "R@0.5": float(t >= 0.5)}
    if task == "dense_caption":
        rev, pev = parse_events(ref), parse_events(pred)
        if not rev:
            return {"mIoU": float(not pev), "R@0.5": float(not pev)}
        best = [max((M.temporal_iou((p.start, p.end), (r.start, r.end)) for p in pev), default=0.0) for r in rev]
        return {"mIoU": sum(best) / len(best), "R@0.5": sum(b >= 0.5 for b in best) / len(best)}
    if task == "gui":
        pa, ra = _action(pred), _action(ref)
        if ra is None:
            return {"action_em": float(pa is None)}
        if meta.get("box") and getattr(ra, "x", None) is not None:
            ok = type(pa) is type(ra) and pa.x is not None and M.point_in_box((pa.x, pa.y), meta["box"]) and \
                all(getattr(pa, f) == getattr(ra, f) for f in ("button", "clicks") if hasattr(ra, f))
        else:
            ok = M.action_match(pa, ra)
        return {"action_em": float(ok)}
    return {"anls": M.anls(pred.strip(), ref.strip()), "exact": float(_norm(pred) == _norm(ref))}


def aggregate(rows: list[dict]) -> dict:
    """rows: {"task", "scores"[, "group"]} per sample -> {task: {"n": .., metric: mean, ...}} in TASK_METRICS order;
    a task whose rows carry a "group" also gets {"by_group": {group: {"n": .., metric: mean, ...}}}."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    out = {}
    for task in [t for t in TASK_METRICS if t in by_task]:
        out[task] = _means(by_task[task], TASK_METRICS[task])
        groups: dict[str, list[dict]] = {}
        for r in by_task[task]:
            if r.get("group") is not None:
                groups.setdefault(str(r["group"]), []).append(r)
        if groups:
            out[task]["by_group"] = {g: _means(groups[g], TASK_METRICS[task]) for g in sorted(groups)}
    return out


def _means(rows: list[dict], metrics) -> dict:
    return {"n": len(rows), **{m: sum(r["scores"][m] for r in rows) / len(rows) for m in metrics}}
