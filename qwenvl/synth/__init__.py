"""Deterministic synthetic data for the small-scale recipe (issue 6): JSONL conversations + media files.

    python -m qwenvl.synth --out DIR --tasks all --n 1000 --split train|heldout --seed 0

writes DIR/<task>.jsonl (one record per line, DESIGN.md's message format, media paths relative to DIR, which
is where the trainer resolves them), DIR/media/<task>/..., and DIR/manifest.json. A record:

    {"id": "grounding/train/0/17", "task": "grounding",
     "messages": [{"role": "user", "content": [{"type": "image", "image": "media/grounding/train-0-000017.png"},
                                               {"type": "text", "text": "Locate the red circle, ..."}]},
                  {"role": "assistant", "content": "```json\\n[{\\"bbox_2d\\": [..], \\"label\\": ..}]\\n```"}],
     "meta": {... the ground truth in structured form ...}}

Tasks: grounding (referring expressions incl. relations and absent objects -> bbox_2d), point, count
(detect then count), caption, ocr (plain text), spotting (text-spotting JSON), doc (QwenVL HTML), kie
(receipts/forms -> JSON), chart (values), video_grounding, dense_caption, gui (computer_use tool calls).
Training-only curriculum (not in "all"): glyphs (OCR of random character strings, no word to guess).
Eval-only (not in "all"): video_grounding_unseen_fps, dense_caption_unseen_fps — the base task's clips sampled at
3 or 6 fps (training: 2 fps, or 1, 2 and 4 with the *_dynamic_fps variants), so their MRoPE temporal ids differ
from anything training shows; ocr_single_line, the OCR task's images with one line (issue 6's OCR target).
"""
from __future__ import annotations

import json
import os
import time

from .common import Ctx, sample_rng

_TASKS = {
    "grounding": ("grounding", "gen_grounding"), "point": ("grounding", "gen_point"),
    "count": ("grounding", "gen_count"), "caption": ("grounding", "gen_caption"),
    "ocr": ("documents", "gen_ocr"), "spotting": ("documents", "gen_spotting"), "doc": ("documents", "gen_doc"),
    "kie": ("documents", "gen_kie"), "chart": ("charts", "gen_chart"),
    "video_grounding": ("video", "gen_video_grounding"), "dense_caption": ("video", "gen_dense_caption"),
    "gui": ("gui", "gen_gui"),
}
TASKS = tuple(_TASKS)  # the training tasks ("all"; also the vocabulary's corpus: do not add eval-only ones here)
# Eval-only variants: the same clip as the base task's sample i (drawn from the base task's RNG), sampled at a frame
# rate training never uses (synth.video.UNSEEN_FPS), for the absolute-time vs frame-index MRoPE ablation.
# Long-context variants (stage 3 of docs/NANO.md §4, and a long-video eval): 30-120 s clips with up to 8 events,
# scored as their base task; opt-in like the unseen-fps ones (not in "all").
# Dynamic-FPS variants (training: clip i at 1, 2 or 4 fps, the report's dynamic FPS sampling; the recipe's
# NANO_VIDEO_FPS=dynamic trains on them in place of the base video tasks).
# ocr_single_line (eval-only): OCR sample i's first line alone, issue 6's single-line OCR target at full n.
VARIANTS = {"video_grounding_unseen_fps": "video_grounding", "dense_caption_unseen_fps": "dense_caption",
            "video_grounding_long": "video_grounding", "dense_caption_long": "dense_caption",
            "video_grounding_dynamic_fps": "video_grounding", "dense_caption_dynamic_fps": "dense_caption",
            "ocr_single_line": "ocr"}
# Text-only conversations for stage 0 (synth.text; not in "all": the vocabulary's corpus is unchanged).
TEXT_TASKS = ("text",)
_TASKS["text"] = ("text", "gen_text")
# The reading curriculum: OCR of random character strings (documents.gen_glyphs; not in "all", like "text").
CURRICULUM_TASKS = ("glyphs",)
_TASKS["glyphs"] = ("documents", "gen_glyphs")
_TASKS.update({"video_grounding_unseen_fps": ("video", "gen_video_grounding_unseen_fps"),
               "dense_caption_unseen_fps": ("video", "gen_dense_caption_unseen_fps"),
               "video_grounding_dynamic_fps": ("video", "gen_video_grounding_dynamic_fps"),
               "dense_caption_dynamic_fps": ("video", "gen_dense_caption_dynamic_fps"),
               "video_grounding_long": ("video", "gen_video_grounding_long"),
               "dense_caption_long": ("video", "gen_dense_caption_long"),
               "ocr_single_line": ("documents", "gen_ocr_single_line")})
EVAL_TASKS = tuple(VARIANTS)
SPLITS = ("train", "heldout")
# Bump VERSION whenever a generator's output changes (cached eval suites are keyed by it). 8: training shape scenes get
# near misses (the target's colour or shape on other objects; held-out scenes unchanged); 7: the text task's quote and
# type kinds (copying from anywhere in the prompt); 6: a shortcut with no
# training font on the machine is trained in all its fonts (one-font machines held "select all" out whole); 5: GUI shortcuts all
# trained, (shortcut, font) held out; 4: OCR samples' eval_group (1 line / 2-6 lines); 3: long doc headings wrapped
# inside the page; 2: unseen-fps eval clips at 3 / 6 fps (were 1 / 4).
VERSION = 8


def generator(task: str):
    import importlib

    if task not in _TASKS:
        raise ValueError(f"unknown synth task {task!r}; known: {', '.join(TASKS + EVAL_TASKS)}")
    module, name = _TASKS[task]
    return getattr(importlib.import_module(f".{module}", __name__), name)


def parse_tasks(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    out = list(TASKS) if "all" in tasks else list(tasks)
    for t in out:
        generator(t)  # validates the name
    return out


def make_sample(task: str, index: int, out_dir: str, split: str = "train", seed: int = 0) -> dict:
    """Sample `index` of (task, split, seed), its media written under out_dir; the same bytes every time."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ctx = Ctx(sample_rng(seed, split, VARIANTS.get(task, task), index), split == "heldout", out_dir,
              f"media/{task}/{split}-{seed}-{index:06d}", index)
    record = generator(task)(ctx)
    return {"id": f"{task}/{split}/{seed}/{index}", "task": task, **record}


def generate(out_dir: str, tasks="all", n: int = 1000, split: str = "train", seed: int = 0, start: int = 0,
             progress: bool = False) -> dict:
    """Write n samples per task (indices start..start+n-1) to out_dir/<task>.jsonl; returns the manifest."""
    tasks = parse_tasks(tasks)
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"version": VERSION, "split": split, "seed": seed, "n": n, "start": start, "files": {}, "seconds": {}}
    for task in tasks:
        t0 = time.time()
        path = os.path.join(out_dir, f"{task}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i in range(start, start + n):
                f.write(json.dumps(make_sample(task, i, out_dir, split, seed), ensure_ascii=False) + "\n")
        manifest["files"][task] = os.path.basename(path)
        manifest["seconds"][task] = round(time.time() - t0, 2)
        if progress:
            print(f"{task}: {n} samples in {manifest['seconds'][task]} s -> {path}", flush=True)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


__all__ = ["TASKS", "EVAL_TASKS", "TEXT_TASKS", "VARIANTS", "SPLITS", "VERSION", "generate", "make_sample", "generator", "parse_tasks"]
