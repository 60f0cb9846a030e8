"""Scores for parsed outputs: grounding (IoU, Acc@0.5, point-in-box), documents (ANLS, relaxed
accuracy, character accuracy), video (temporal IoU, mIoU, R@k) and agents (action match).

Each follows the benchmark's usual definition (CAPABILITIES.md §5.1); a missing prediction (None,
parse failure) always scores 0 rather than raising, so a whole eval run never dies on one answer.
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Iterable, Sequence

from .grounding import Box, Point

# ----------------------------------------------------------------------------- grounding

def _xyxy(box: Any) -> tuple[float, float, float, float]:
    if isinstance(box, Box):
        return box.xyxy
    x1, y1, x2, y2 = (float(v) for v in box)
    return x1, y1, x2, y2


def iou(a: Any, b: Any) -> float:
    """Intersection over union of two boxes (Box or [x1, y1, x2, y2]); 0.0 when either is None or
    the union has no area (two zero-area boxes)."""
    if a is None or b is None:
        return 0.0
    ax1, ay1, ax2, ay2 = _xyxy(a)
    bx1, by1, bx2, by2 = _xyxy(b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _pairs(preds: Sequence, gts: Sequence) -> list:
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground truths")
    return list(zip(preds, gts))


def acc_at_iou(preds: Sequence, gts: Sequence, threshold: float = 0.5) -> float:
    """RefCOCO-style accuracy: fraction of samples whose predicted box has IoU >= threshold with the
    ground truth (one box each; None = no prediction = wrong). 0.0 for no samples."""
    return _mean(float(iou(p, g) >= threshold and p is not None) for p, g in _pairs(preds, gts))


def point_in_box(point: Any, box: Any) -> bool:
    """Is the point (Point or (x, y)) inside the box, edges included? False for None."""
    if point is None or box is None:
        return False
    x, y = point.xy if isinstance(point, Point) else (float(point[0]), float(point[1]))
    x1, y1, x2, y2 = _xyxy(box)
    return x1 <= x <= x2 and y1 <= y <= y2


def point_accuracy(points: Sequence, boxes: Sequence) -> float:
    """ScreenSpot-style click accuracy: fraction of predicted points inside their target box."""
    return _mean(float(point_in_box(p, b)) for p, b in _pairs(points, boxes))


# ----------------------------------------------------------------------------- text

def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insert, delete, substitute all cost 1) of two strings or sequences of hashable items.
    Bit-parallel (Myers 1999, Hyyro's global-distance form): the shorter sequence is one Python int of bits,
    so a 2,000-character page costs ~2,000 big-int steps instead of 4 M table cells (ANLS of whole documents)."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict = {}  # per item of b: the bit mask of its positions
    for i, item in enumerate(b):
        peq[item] = peq.get(item, 0) | (1 << i)
    mask, last = (1 << m) - 1, 1 << (m - 1)
    pv, mv, dist = mask, 0, m  # vertical deltas of the DP column: all +1 (column 0 is 0..m)
    for item in a:
        eq = peq.get(item, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = (mv | ~(xh | pv)) & mask
        mh = pv & xh
        if ph & last:
            dist += 1
        elif mh & last:
            dist -= 1
        ph = ((ph << 1) | 1) & mask  # row 0 grows by 1 per item of a: a +1 horizontal delta enters at the top
        mh = (mh << 1) & mask
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv
    return dist


def _norm(text: Any) -> str:
    return " ".join(str(text).strip().lower().split())


def anls(pred: Any, answers: Sequence[str] | str, threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity for one question (DocVQA): max over the ground-truth
    answers of 1 - NL, where NL = edit distance / max(len) after lowercasing and collapsing
    whitespace; NL >= threshold scores 0 (the DocVQA definition; lmms-eval keeps NL == 0.5)."""
    if pred is None:
        return 0.0
    if isinstance(answers, str):
        answers = [answers]
    p = _norm(pred)
    best = 0.0
    for answer in answers:
        g = _norm(answer)
        length = max(len(p), len(g))
        nl = levenshtein(p, g) / length if length else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def mean_anls(preds: Sequence, answers: Sequence, threshold: float = 0.5) -> float:
    return _mean(anls(p, a, threshold) for p, a in _pairs(preds, answers))


def _to_float(text: str) -> float | None:
    text = text.strip().replace(",", "")  # "1,234" is a number in chart answers
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(pred: Any, target: Any, tolerance: float = 0.05) -> bool:
    """ChartQA: numbers match within `tolerance` relative error ("12%" = 0.12); anything else (or a
    target of 0) needs a case-insensitive exact match. As Qwen-VL's evaluate_vqa.py / lmms-eval."""
    if pred is None:
        return False
    pred, target = str(pred).strip(), str(target).strip()
    p, t = _to_float(pred), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= tolerance
    return pred.lower() == target.lower()


def relaxed_accuracy(preds: Sequence, targets: Sequence, tolerance: float = 0.05) -> float:
    return _mean(float(relaxed_correctness(p, t, tolerance)) for p, t in _pairs(preds, targets))


def char_accuracy(pred: Any, target: str) -> float:
    """1 - CER, floored at 0: CER = character edit distance / len(target). An empty target scores 1.0
    only for an empty prediction."""
    pred = "" if pred is None else str(pred)
    if not target:
        return 1.0 if not pred else 0.0
    return max(0.0, 1.0 - levenshtein(pred, target) / len(target))


# ----------------------------------------------------------------------------- video

def temporal_iou(pred: Any, gt: Any) -> float:
    """IoU of two (start, end) spans, as Charades-STA evaluation computes it:
    max(min(e1, e2) - max(s1, s2), 0) / (max(e1, e2) - min(s1, s2)); 0.0 for None or zero length."""
    if pred is None or gt is None:
        return 0.0
    (s1, e1), (s2, e2) = sorted(map(float, pred)), sorted(map(float, gt))
    union = max(e1, e2) - min(s1, s2)
    return max(min(e1, e2) - max(s1, s2), 0.0) / union if union > 0 else 0.0


def mean_iou(preds: Sequence, gts: Sequence) -> float:
    """mIoU over samples (one predicted span each; None counts 0)."""
    return _mean(temporal_iou(p, g) for p, g in _pairs(preds, gts))


def recall_at_k(preds: Sequence, gts: Sequence, k: int = 1, threshold: float = 0.5) -> float:
    """R@k, IoU>=threshold: fraction of samples where any of the first k predicted spans reaches the
    threshold. Each prediction is a span, a ranked list of spans, or None."""
    def top_k(p):
        if p is None:
            return []
        if len(p) == 2 and not isinstance(p[0], (list, tuple)):
            return [p]
        return list(p)[:k]
    return _mean(float(any(temporal_iou(s, g) >= threshold for s in top_k(p))) for p, g in _pairs(preds, gts))


def temporal_grounding_scores(preds: Sequence, gts: Sequence, thresholds: Sequence[float] = (0.3, 0.5, 0.7)) -> dict:
    """{"mIoU": .., "R@1,IoU=0.3": .., ...} as Charades-STA reports them (top-1 predictions)."""
    top1 = [p[0] if p is not None and len(p) and isinstance(p[0], (list, tuple)) else p for p in preds]
    scores = {"mIoU": mean_iou(top1, gts)}
    for t in thresholds:
        scores[f"R@1,IoU={t}"] = recall_at_k(top1, gts, 1, t)
    return scores


# ----------------------------------------------------------------------------- agents

_COORD_FIELDS = (("x", "y"), ("x2", "y2"))


def action_match(pred: Any, gt: Any, coord_tolerance: float = 0.0) -> bool:
    """Step-level exact match: same action type and same arguments; text compared case-insensitively
    after stripping, numbers exactly, each (x, y) within `coord_tolerance` pixels (Euclidean) of the
    ground truth's. None never matches."""
    if pred is None or gt is None or type(pred) is not type(gt):
        return False
    names = [f.name for f in fields(gt)]
    coord_names = {n for pair in _COORD_FIELDS for n in pair}
    for kx, ky in _COORD_FIELDS:
        if kx not in names:
            continue
        p, g = (getattr(pred, kx), getattr(pred, ky)), (getattr(gt, kx), getattr(gt, ky))
        if None in p or None in g:
            if p != g:
                return False
        elif math.dist(p, g) > coord_tolerance:
            return False
    for name in names:
        if name in coord_names:
            continue
        p, g = getattr(pred, name), getattr(gt, name)
        if isinstance(g, str) or isinstance(p, str):
            if _norm(p) != _norm(g):
                return False
        elif isinstance(g, tuple):
            if tuple(_norm(v) for v in p) != tuple(_norm(v) for v in g):
                return False
        elif p != g:
            return False
    return True


def action_accuracy(preds: Sequence, gts: Sequence, coord_tolerance: float = 0.0) -> float:
    """Fraction of steps whose predicted action matches (AndroidControl-style step EM)."""
    return _mean(float(action_match(p, g, coord_tolerance)) for p, g in _pairs(preds, gts))
