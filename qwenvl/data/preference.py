"""Preference pairs for DPO from supervised records: chosen = the record's answer, rejected = a corrupted copy of it
that fails the task's metric (the report's DPO stage prefers correct over flawed answers; issue 6 makes the
flawed ones by corrupting the ground truth, so no model is needed).

Corruptions, tried in this order until one scores at most `max_score` on the task's primary metric
(evaluate.scoring, the same scorer as the eval) while the chosen answer scores 1:
  1. numbers: every number moved by 30-80 % of its size (at least 2): boxes, points, counts, values, times, clicks;
  2. characters: a growing share of letters and digits replaced (OCR lines, names, field values);
  3. another record's answer of the same task (a confident answer about something else: a box for an absent object).
A record none of them fails (or whose own answer does not score 1, a scorer/data mismatch) gives no pair and is
counted in the report by task.
"""
from __future__ import annotations

import random
import re
import string

from ..evaluate.scoring import primary_metric, reference_text, score, task_of

_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")


def shift_numbers(answer: str, rng: random.Random, strength: float = 1.0) -> str:
    """Every standalone number moved by 30-80 % (times `strength`) of max(its value, 20), at least 2, never below 0;
    a decimal keeps its number of decimals."""
    def move(m: re.Match) -> str:
        text = m.group()
        decimals = len(text.partition(".")[2])
        n = float(text)
        step = max(2, round(rng.uniform(0.3, 0.8) * strength * max(n, 20)))
        return f"{n + step if n - step < 0 or rng.random() < 0.5 else n - step:.{decimals}f}"
    return _NUMBER.sub(move, answer)


def replace_chars(answer: str, rng: random.Random, rate: float) -> str:
    """About `rate` of the letters and digits replaced by another of the same kind (case kept)."""
    out = []
    for ch in answer:
        if ch.isalnum() and ch.isascii() and rng.random() < rate:
            pool = string.digits if ch.isdigit() else string.ascii_lowercase
            new = rng.choice(pool.replace(ch.lower(), ""))
            ch = new.upper() if ch.isupper() else new
        out.append(ch)
    return "".join(out)


def _prompt_only(record: dict) -> dict:
    """The record without its last assistant turn (the DPO prompt), in its own form (messages or conversations)."""
    key = "messages" if "messages" in record else "conversations"
    turns = list(record[key])
    for i in range(len(turns) - 1, -1, -1):
        if turns[i].get("role", turns[i].get("from")) in ("assistant", "gpt"):
            del turns[i]
            break
    return {**record, key: turns}


def preference_pairs(samples: list[tuple[dict, str]], seed: int = 0, max_score: float = 0.5
                     ) -> tuple[list, list, dict]:
    """(pairs, skipped, report) for (record, folder) samples; each pair record is the prompt + "chosen" + "rejected"
    (strings, the form qwenvl train's DPO reads) + "corruption" (which kind made the rejected answer)."""
    rng = random.Random(seed)
    items = [(rec, base, task_of(rec), reference_text(rec)) for rec, base in samples]
    by_task: dict[str, list] = {}
    for _, _, task, ref in items:
        by_task.setdefault(task, []).append(ref)
    pairs, skipped = [], []
    report: dict[str, dict[str, int]] = {}
    for rec, base, task, ref in items:
        metric = primary_metric(task)
        counts = report.setdefault(task, {"records": 0, "pairs": 0, "numbers": 0, "chars": 0, "other": 0})
        counts["records"] += 1

        def candidates():  # lazily: the list of other answers is built only when numbers and characters both pass
            if _NUMBER.search(ref):
                for s in (1.0, 1.5, 2.5):
                    yield "numbers", shift_numbers(ref, rng, s)
            for r in (0.3, 0.6, 0.9):
                yield "chars", replace_chars(ref, rng, r)
            others = [o for o in by_task[task] if o.strip() != ref.strip()]
            for _ in range(3 if others else 0):
                yield "other", rng.choice(others)

        rejected = kind = None
        if ref.strip() and score(task, ref, rec, ref)[metric] >= 1.0:
            for name, cand in candidates():
                if cand.strip() != ref.strip() and score(task, cand, rec, ref)[metric] <= max_score:
                    rejected, kind = cand, name
                    break
        if rejected is None:
            skipped.append((rec, base))
            continue
        counts["pairs"] += 1
        counts[kind] += 1
        pairs.append(({**_prompt_only(rec), "chosen": ref, "rejected": rejected, "corruption": kind}, base))
    return pairs, skipped, {"max_score": max_score, "seed": seed, "by_task": dict(sorted(report.items()))}
