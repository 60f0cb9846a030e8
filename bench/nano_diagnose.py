"""Two CPU diagnoses of a nano checkpoint (docs/NANO.md §7, run 12b; docs/BENCHMARKS.md, eleventh session).

    python bench/nano_diagnose.py prompts --model runs/nano/latest [--scenes 12]
        detect-all prompt ("Outline the position of each red square ...") against detect-then-count ("Please first
        output bbox coordinates and names of every red squares ...") on synth scenes with two red squares among three
        other shapes: the fraction of red squares found at IoU >= 0.5 with each (what `qwenvl demo` asks).
    python bench/nano_diagnose.py ocr --predictions EVAL_DIR/eval_predictions.jsonl [--n 50]
        an eval's OCR character accuracy by font size and font, joining its predictions with the nano suite's meta.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prompts(model: str, scenes: int) -> dict:
    from qwenvl.engine import LLM, SamplingParams
    from qwenvl.synth.grounding import Scene, allowed_pairs
    from qwenvl.tasks import grounding as G
    from qwenvl.tasks.metrics import iou

    llm = LLM(model)
    kinds = {"detect_all": G.detect_prompt("red square"), "detect_then_count": G.count_prompt("red squares")}
    found, total = collections.Counter(), 0
    for seed in range(scenes):
        scene = Scene(random.Random(seed))
        squares = [o for o in (scene.add("red", "square") for _ in range(2)) if o]
        scene.add_random(3, allowed_pairs(None), exclude={("red", "square")})
        path = os.path.join(tempfile.gettempdir(), f"nano-diagnose-{seed}.png")
        scene.render().save(path)
        truth, total = [scene.rbox(o) for o in squares], total + len(squares)
        for kind, prompt in kinds.items():
            conv = [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": prompt}]}]
            text = llm.chat([conv], SamplingParams(max_tokens=160, temperature=0))[0].outputs[0].text
            boxes = [[b.x1, b.y1, b.x2, b.y2] for b in G.parse_boxes(text)]
            found[kind] += sum(any(iou(b, t) >= 0.5 for b in boxes) for t in truth)
    return {kind: round(found[kind] / total, 3) for kind in kinds} | {"red_squares": total}


def ocr(predictions: str, n: int) -> dict:
    from qwenvl.evaluate.cli import suite_data
    from qwenvl.evaluate.harness import load_samples

    with open(predictions) as f:
        rows = {r["id"]: r for r in map(json.loads, f)}
    groups = collections.defaultdict(list)
    for rec, _ in load_samples(suite_data("nano", n)):
        if rec["task"] != "ocr" or rec["id"] not in rows:
            continue
        m, score = rec["meta"], rows[rec["id"]]["scores"]["char_acc"]
        band = "12-15 px" if m["font_size"] <= 15 else "16-21 px" if m["font_size"] <= 21 else "22-28 px"
        groups[band].append(score)
        groups[m["font"]].append(score)
    return {k: {"n": len(v), "char_acc": round(sum(v) / len(v), 3)} for k, v in sorted(groups.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--model", default="runs/nano/latest")
    p.add_argument("--scenes", type=int, default=12)
    o = sub.add_parser("ocr")
    o.add_argument("--predictions", required=True)
    o.add_argument("--n", type=int, default=50, help="the eval's --n (samples per task)")
    a = ap.parse_args(argv)
    print(json.dumps(prompts(a.model, a.scenes) if a.cmd == "prompts" else ocr(a.predictions, a.n), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
