"""Rejection sampling: sample k answers per record, keep those that match the ground truth by the task's metric
(and pass the rule filters: no repetition, truncation or broken boxes), as the report did for its reasoning
data. Each kept answer replaces the record's last assistant turn.

The same samples give on-policy DPO pairs (issue 6's DPO stage: "rejected = the model's answer when it fails the
task metric"): chosen = the record's own answer, rejected = a distinct sampled answer below `min_score` (or failing
a rule), the model's actual mistakes rather than corrupted copies (`preference.preference_pairs`)."""
from __future__ import annotations

from typing import Callable

from ..evaluate.harness import prompt_messages
from ..evaluate.scoring import primary_metric, reference_text, score, task_of
from .filters import check
from .preference import _prompt_only

Sampler = Callable[[list, int], list[list[str]]]  # (conversations, k) -> k answers each


def _with_answer(record: dict, answer: str) -> dict:
    """The record with its last assistant turn's text replaced (messages or LLaVA conversations)."""
    rec = dict(record)
    key = "messages" if "messages" in rec else "conversations"
    turns = [dict(t) for t in rec[key]]
    for t in reversed(turns):
        if t.get("role", t.get("from")) in ("assistant", "gpt"):
            t["content" if "content" in t else "value"] = answer
            break
    rec[key] = turns
    return rec


def reject_sample(samples: list[tuple[dict, str]], sampler: Sampler, k: int = 4, min_score: float = 1.0,
                  keep: str = "first", batch: int = 32, pairs: list | None = None,
                  pairs_per_record: int = 1) -> tuple[list, list, dict]:
    """Returns (accepted, rejected, report). keep="first": one record per input (its first passing answer);
    "all": every distinct passing answer. Records with no passing answer are rejected.
    pairs: a list to append on-policy DPO pairs to, (pair record, folder) as `preference_pairs` makes them, up to
    `pairs_per_record` per record (its first distinct failing answers), for records whose own answer scores 1."""
    if keep not in ("first", "all"):
        raise ValueError("keep must be first or all")
    accepted, rejected = [], []
    n_cand = n_pass = 0
    n_pairs: dict[str, int] = {}
    by_task: dict[str, list[int]] = {}
    for s in range(0, len(samples), batch):
        part = samples[s:s + batch]
        answers = sampler([prompt_messages(rec, base) for rec, base in part], k)
        for (rec, base), cands in zip(part, answers):
            task = task_of(rec)
            ref = reference_text(rec)
            passing, failing = [], []
            for c in cands:
                n_cand += 1
                value = score(task, c, rec, ref)[primary_metric(task)]
                ok = value >= min_score
                ok = ok and not check({**_with_answer(rec, c), "task": rec.get("task")}, base,
                                      ("empty", "repetition", "truncated", "boxes"))
                n_pass += bool(ok)
                if ok and c not in passing:
                    passing.append(c)
                if not ok and c.strip() != ref.strip() and c not in [f for f, _ in failing]:
                    failing.append((c, value))
            if pairs is not None and failing and score(task, ref, rec, ref)[primary_metric(task)] >= 1.0:
                for c, value in failing[:pairs_per_record]:
                    pairs.append(({**_prompt_only(rec), "chosen": ref, "rejected": c, "corruption": "model",
                                   "rejected_score": round(float(value), 4)}, base))
                    n_pairs[task] = n_pairs.get(task, 0) + 1
            stats = by_task.setdefault(task, [0, 0])
            stats[0] += 1
            if passing:
                stats[1] += 1
                for c in passing[:1] if keep == "first" else passing:
                    accepted.append((_with_answer(rec, c), base))
            else:
                rejected.append((rec, base))
    report = {"records": len(samples), "k": k, "accepted_records": len(samples) - len(rejected),
              "rejected_records": len(rejected), "output_records": len(accepted),
              "candidate_pass_rate": round(n_pass / max(1, n_cand), 4),
              "by_task": {t: {"records": a, "accepted": b} for t, (a, b) in by_task.items()}}
    if pairs is not None:
        report["pairs_by_task"] = dict(sorted(n_pairs.items()))
    return accepted, rejected, report
