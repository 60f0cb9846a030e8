"""`qwenvl eval`: score a model on the nano suite (synthetic held-out set) or on the user's JSONL data.

    qwenvl eval --model DIR --suite nano [--n 50]        # generates the held-out set once (cached), then scores
    qwenvl eval --model DIR --suite nano --add-tasks video_grounding_unseen_fps,dense_caption_unseen_fps
                                                         # + the held-out clips sampled at fps unseen in training
    qwenvl eval --model DIR --data my.jsonl|my_dir/      # records with images/videos by path; task from "task"
                                                         # or from the tagger; reference = last assistant turn
Writes OUT/report.json, OUT/report.md, OUT/predictions.jsonl and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..synth import CURRICULUM_TASKS, EVAL_TASKS

SUITES = {"nano": dict(split="heldout", seed=0,
                       tasks=["grounding", "point", "count", "ocr", "spotting", "doc", "kie", "chart",
                              "video_grounding", "dense_caption", "gui"],
                       # opt-in (--add-tasks / --tasks): the eval-only variants (video clips at frame rates training
                       # never uses, OCR single lines ...) and the training curricula's held-out splits (glyphs)
                       extra_tasks=list(EVAL_TASKS) + list(CURRICULUM_TASKS))}


def suite_data(name: str, n: int, root: str | None = None, extra_tasks=(), seed: int | None = None) -> str:
    """The suite's data folder, generated on first use (deterministic: cached by name, generator version, seed, n): the
    suite's tasks, plus any of its opt-in `extra_tasks` asked for (each generated once, into the same folder).
    `seed` (default: the suite's, 0) draws another sample of the same held-out split: data for choosing between
    models (checkpoints, averages, arms) that the reported table, drawn with the suite's seed, never saw."""
    from .. import synth
    from ..hub import cache_dir

    spec = SUITES[name]
    bad = [t for t in extra_tasks if t not in spec.get("extra_tasks", ())]
    if bad:
        raise ValueError(f"suite {name!r} has no extra task(s) {bad}; it has {spec.get('extra_tasks', [])}")
    seed = spec["seed"] if seed is None else seed
    folder = os.path.join(root or os.path.join(cache_dir(), "suites"),
                          f"{name}-v{synth.VERSION}-{spec['split']}-s{seed}-n{n}")
    for tasks, done in [(spec["tasks"], os.path.join(folder, ".complete"))] + \
            [([t], os.path.join(folder, f".complete-{t}")) for t in extra_tasks]:
        if not os.path.exists(done):
            synth.generate(folder, tasks, n, spec["split"], seed)
            open(done, "w").close()
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwenvl eval", description="Evaluate a model per task (grounding, OCR, "
                                "documents, charts, video, agents).")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    p.add_argument("--suite", default=None, choices=sorted(SUITES), help="built-in suite (default nano when no --data)")
    p.add_argument("--data", action="append", help="JSONL file or folder of them (repeatable); replaces --suite")
    p.add_argument("--n", type=int, default=50, help="suite samples per task")
    p.add_argument("--seed", type=int, default=None, help="draw the suite's held-out data with this seed instead of "
                   "its own (0): a validation draw for choosing between models, apart from the reported one")
    p.add_argument("--limit", type=int, default=None, help="at most this many samples per task")
    p.add_argument("--tasks", default=None, help="comma-separated subset of tasks (a suite's opt-in tasks included)")
    p.add_argument("--add-tasks", default=None, help="comma-separated opt-in suite tasks evaluated besides the "
                   f"suite's own: {', '.join(SUITES['nano']['extra_tasks'])}")
    p.add_argument("--out", default="eval-out", help="report folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="cap on every task's generation budget")
    p.add_argument("--backend", default="auto", choices=["auto", "engine", "generate"])
    p.add_argument("--kv-cache-mb", type=int, default=None, help="engine KV cache size (default: CPU 1 GiB, CUDA by "
                   "free memory); set it when several evals share one GPU")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: the checkpoint's)")
    p.add_argument("--suite-root", default=None, help="where suite data is generated (default: the qwenvl cache)")
    a = p.parse_args(argv)

    from .generation import ModelGenerator
    from .harness import evaluate, load_samples, markdown_table, write_report

    tasks = a.tasks.split(",") if a.tasks else None
    added = a.add_tasks.split(",") if a.add_tasks else []
    if a.data and a.seed is not None:
        p.error("--seed draws the suite's data; with --data the records are given")
    if a.data:  # every record is evaluated unless --tasks narrows it
        data = a.data
        tasks = tasks + added if tasks else None
    else:
        spec = SUITES[a.suite or "nano"]
        bad = [t for t in added if t not in spec["extra_tasks"]]
        if bad:
            p.error(f"--add-tasks: {bad} are not opt-in tasks of suite {a.suite or 'nano'} ({spec['extra_tasks']})")
        extra = [t for t in dict.fromkeys((tasks or []) + added) if t in spec["extra_tasks"]]
        data = [suite_data(a.suite or "nano", a.n, a.suite_root, extra, a.seed)]
        if added:
            tasks = list(dict.fromkeys((tasks or spec["tasks"]) + added))
    samples = load_samples(data, a.limit, tasks)
    gen = ModelGenerator(a.model, a.backend, a.device, a.dtype, a.batch_size, kv_cache_mb=a.kv_cache_mb)
    print(f"qwenvl eval: {len(samples)} samples, backend {gen.backend}, model {gen.path}", file=sys.stderr)
    report, rows = evaluate(samples, gen, a.batch_size, a.max_tokens, progress=True)
    report.update(model=gen.path, data=data if len(data) > 1 else data[0], backend=gen.backend,
                  suite=None if a.data else (a.suite or "nano"))
    paths = write_report(report, rows, a.out)
    print(markdown_table(report))
    print(json.dumps({"report": paths["json"], "markdown": paths["markdown"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
