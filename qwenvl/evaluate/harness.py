"""Evaluation harness: JSONL records (synthetic held-out set or the user's own) -> answers -> per-task scores,
a JSON report, a Markdown table and the per-sample predictions."""
from __future__ import annotations

import glob
import json
import os
import sys
import time
from typing import Callable

from .scoring import MAX_TOKENS, TASK_METRICS, aggregate, reference_text, score, task_of

MEDIA_KEYS = ("image", "video")


def load_samples(paths, limit: int | None = None, tasks=None) -> list[tuple[dict, str]]:
    """(record, base_dir) from JSONL files or folders of them (sorted); `limit` per task; `tasks` filters."""
    from ..train.data import iter_records

    files = []
    for p in [paths] if isinstance(paths, str) else paths:
        files += sorted(glob.glob(os.path.join(p, "*.jsonl"))) if os.path.isdir(p) else [p]
    if not files:
        raise FileNotFoundError(f"no JSONL files in {paths}")
    out, seen, bad = [], {}, 0
    for f in files:
        base = os.path.dirname(os.path.abspath(f))
        for rec in iter_records([f]):
            try:
                task = task_of(rec)
                prompt_messages(rec, base)
            except Exception:  # noqa: BLE001 - a record that is not a conversation cannot be evaluated
                bad += 1
                continue
            if tasks and task not in tasks and rec.get("task") not in tasks:
                continue
            if limit is not None and seen.get(task, 0) >= limit:
                continue
            seen[task] = seen.get(task, 0) + 1
            out.append((rec, base))
    if bad:
        print(f"qwenvl eval: skipped {bad} record(s) that are not readable conversations", file=sys.stderr)
    return out


def _absolute(src, base_dir: str):
    if isinstance(src, (list, tuple)):
        return [_absolute(s, base_dir) for s in src]
    if isinstance(src, str) and not src.startswith(("http://", "https://", "data:", "file://", "/")):
        return os.path.join(base_dir, src)
    return src


def prompt_messages(record: dict, base_dir: str) -> list[dict]:
    """The conversation up to (not including) its last assistant turn, media paths made absolute."""
    from ..train.data import record_messages

    msgs = record_messages(record)
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    out = []
    for m in msgs[:last]:
        content = [{**it, it["type"]: _absolute(it[it["type"]], base_dir)} if it["type"] in MEDIA_KEYS else it
                   for it in m["content"]]
        out.append({**m, "content": content})
    return out


def evaluate(samples: list[tuple[dict, str]], model_fn: Callable[[list, int], list[str]], batch_size: int = 8,
             max_tokens: int | None = None, progress: bool = False) -> tuple[dict, list[dict]]:
    """Generate for every sample (grouped by task, `batch_size` * 4 conversations per call) and score.
    Returns (report, rows); rows hold id, task, prediction, reference and scores in input order."""
    t0 = time.time()
    rows: list[dict | None] = [None] * len(samples)
    by_task: dict[str, list[int]] = {}
    for i, (rec, _) in enumerate(samples):
        by_task.setdefault(task_of(rec), []).append(i)
    for task, idx in by_task.items():
        budget = MAX_TOKENS[task] if max_tokens is None else min(max_tokens, MAX_TOKENS[task])
        chunk = max(1, batch_size * 4)
        for s in range(0, len(idx), chunk):
            part = idx[s:s + chunk]
            answers = model_fn([prompt_messages(*samples[i]) for i in part], budget)
            if len(answers) != len(part):
                raise RuntimeError(f"the model returned {len(answers)} answers for {len(part)} prompts")
            for i, pred in zip(part, answers):
                rec = samples[i][0]
                ref = reference_text(rec)
                rows[i] = {"id": rec.get("id", str(i)), "task": task, "prediction": pred, "reference": ref,
                           "scores": score(task, pred, rec, ref)}
                meta = rec.get("meta") or {}
                if meta.get("eval_group") is not None:
                    rows[i]["group"] = meta["eval_group"]
                # how a synthetic sample was drawn, kept with its answer: breakdowns need no regenerated data, which
                # differs on a machine with other fonts
                rows[i].update({k: meta[k] for k in ("font", "font_size") if k in meta})
            if progress:
                print(f"  {task}: {min(s + chunk, len(idx))}/{len(idx)}", flush=True)
    report = {"n": len(samples), "seconds": round(time.time() - t0, 2), "tasks": aggregate(rows)}
    return report, rows


def markdown_table(report: dict) -> str:
    lines = ["| task | n | metric | score |", "|---|---:|---|---:|"]
    for task, res in report["tasks"].items():
        for name, r in [(task, res)] + [(f"{task} ({g})", gr) for g, gr in res.get("by_group", {}).items()]:
            for j, m in enumerate(TASK_METRICS[task]):
                lines.append(f"| {name if j == 0 else ''} | {r['n'] if j == 0 else ''} | {m} | {100 * r[m]:.1f} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, rows: list[dict], out_dir: str) -> dict:
    """report.json, report.md and predictions.jsonl under out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in
             (("json", "report.json"), ("markdown", "report.md"), ("predictions", "predictions.jsonl"))}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths["markdown"], "w") as f:
        head = f"Model: `{report.get('model', '?')}` - data: `{report.get('data', '?')}` - {report['n']} samples\n\n"
        f.write(head + markdown_table(report))
    with open(paths["predictions"], "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return paths
