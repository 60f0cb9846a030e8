"""CPU diagnoses of a nano checkpoint (docs/NANO.md §7, run 12b; docs/BENCHMARKS.md, eleventh session).

    python bench/nano_diagnose.py prompts --model runs/nano/latest [--scenes 12]
        detect-all prompt ("Outline the position of each red square ...") against detect-then-count ("Please first
        output bbox coordinates and names of every red squares ...") on synth scenes with two red squares among three
        other shapes: the fraction of red squares found at IoU >= 0.5 with each (what `qwenvl demo` asks).
    python bench/nano_diagnose.py ocr --predictions EVAL_DIR/eval_predictions.jsonl [--n 50 | --data DIR --tasks T]
        an eval's OCR character accuracy by font size and font, joining its predictions with the nano suite's meta
        (or with the records of --data, for the tasks in --tasks).
    python bench/nano_diagnose.py flaws --predictions EVAL_DIR/predictions.jsonl
        how many of an eval's answers loop or stop mid-answer by the curation's own rules (`qwenvl data filter`'s
        repetition and truncated), per task: what training on flawed records teaches (the SFT curation check, NANO.md §5).
    python bench/nano_diagnose.py video --predictions EVAL_DIR/predictions.jsonl
        do an eval's video answers read the clip? Per video task: distinct answers, the most common one's count,
        malformed answers (no span / no event parsed), the model's mIoU and that of the best constant answer (the
        one of its own answers to the base task's 2 fps short clips, or to the task itself when the eval did not
        run the base task, that scores best given to every clip): the floor a model that ignores the pixels gets
        (the temporal-id ablation's rule 3, NANO.md §4).
    python bench/nano_diagnose.py glyphs --model runs/nano/latest [--size 56 --font-size 24]
        do the merged vision tokens carry a glyph's identity? A linear probe (softmax regression, 2,000 images to fit,
        400 held out) for which of 36 letters/digits is drawn anywhere on the canvas, on the checkpoint's vision
        tokens, on those of the same shape from random weights, and on the raw pixels.
    python bench/nano_diagnose.py learn --variant merger [--init random|DIR --steps 300 --lr 1e-3]
        how fast a glyph is learned with a direct gradient: the same 36-glyph task (24 px on 56x56, batches of 64
        new images, AdamW), a linear head on the ViT's merged tokens (`merger`), on its 16 patch states before the
        merger (`pre_merger`), on those scaled to unit RMS as the merger's ln_q does (`pre_merger_rmsnorm`), on a
        textbook ViT of the same width and depth over the same patches (`textbook`: learned positions, LayerNorm,
        GELU MLP), or a 3-layer CNN (`cnn`); held-out accuracy every 50 steps, and for nano's ViT a linear probe of
        its patch states before and after (what the ViT itself learned).
    python bench/nano_diagnose.py readout --model runs/nano/latest [--size 112 --font-size 24 --n 150]
        does the model SAY the glyph its vision tokens carry? One glyph of the 36 per image, the glyph task's OCR
        prompt, greedy (engine, fp32): the answer's first character against the glyph (compare with `glyphs`).
    python bench/nano_diagnose.py copy --model runs/nano/latest [--n 12 --split train]
        does the model copy the words an instruction quotes? GUI typing samples (synth `gui`, a focused field:
        `type` with the quoted text) as trained, and the same words in the text task's "Repeat exactly: X" alone,
        after the GUI tool system prompt, and after 20 filler sentences: how many answers contain the words.
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


def ocr(predictions: str, n: int, data: str | None = None, tasks: str = "ocr") -> dict:
    """OCR character accuracy by font size band and by font. Predictions made since the fifteenth session carry each
    sample's font and size; older ones are matched by id to data regenerated here (--data, or the suite), which only
    works if this machine has the fonts of the one that made them (the GPU hosts had only Pillow's until then)."""
    with open(predictions) as f:
        rows = [r for r in map(json.loads, f) if r["task"] in tasks.split(",")]
    if rows and all("font" in r for r in rows):
        drawn = [(r, r) for r in rows]
    else:
        from qwenvl.evaluate.cli import suite_data
        from qwenvl.evaluate.harness import load_samples, reference_text

        by_id = {r["id"]: r for r in rows}
        drawn, mismatched = [], 0
        for rec, _ in load_samples(data or suite_data("nano", n)):
            r = by_id.get(rec["id"])
            if r is None:
                continue
            if r["reference"] != reference_text(rec):
                mismatched += 1
                continue
            drawn.append((r, rec["meta"]))
        if mismatched:
            raise SystemExit(f"{mismatched} predictions answer other samples than {data or 'the suite made here'} "
                             "(same ids, other text: data made with other fonts?). Regenerate the data with the fonts "
                             "of the machine that made the predictions (QWENVL_FONT_DIRS, bench/devcarry.sh).")
    groups = collections.defaultdict(list)
    for r, m in drawn:
        score = r["scores"]["char_acc"]
        band = "12-15 px" if m["font_size"] <= 15 else "16-21 px" if m["font_size"] <= 21 else "22-28 px"
        groups[band].append(score)
        groups[m["font"]].append(score)
    return {k: {"n": len(v), "char_acc": round(sum(v) / len(v), 3)} for k, v in sorted(groups.items())}


def linear_probe(fit_x, fit_y, test_x, test_y, classes: int, steps: int) -> tuple[float, float]:
    """Softmax regression on features standardised with the fit set's statistics (Adam, L2 1e-3): held-out accuracy
    and the last fit loss."""
    import torch

    mu, sd = fit_x.mean(0), fit_x.std(0) + 1e-5
    fit_x, test_x = (fit_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(fit_x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(fit_x @ w + b, fit_y) + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((test_x @ w + b).argmax(1) == test_y).float().mean().item(), loss.item()


def glyphs(model: str, size: int, font_size: int, n: int = 2400, n_fit: int = 2000) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from nano_probe import GLYPHS, make_text
    from qwenvl import preprocess
    from qwenvl.model import Qwen25VL

    torch.manual_seed(0)
    rng = random.Random(0)
    images, labels = [], []
    for _ in range(n):
        im, text = make_text("char", rng, size, font_size)
        images.append(im)
        labels.append(GLYPHS.index(text))
    y = torch.tensor(labels)
    inputs = [preprocess.prepare_image({"type": "image", "image": im}, min_pixels=3136, max_pixels=448 * 448)
              for im in images]  # made once, read by both models

    def vision_tokens(m) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([m.visual(pix.float(), torch.as_tensor(grid).reshape(1, 3)).reshape(-1)
                                for pix, grid in inputs]).float()

    def probe(x: torch.Tensor) -> dict:
        acc, loss = linear_probe(x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:], len(GLYPHS), steps=300)
        return {"dim": x.shape[1], "fit_loss": round(loss, 3), "held_out_acc": round(acc, 3)}

    trained = Qwen25VL.from_pretrained(model).float().eval()
    pixels = torch.tensor(np.stack([np.asarray(im.convert("L"), dtype=np.float32).ravel() for im in images]))
    return {"chance": round(1 / len(GLYPHS), 3), "raw_pixels": probe(pixels),
            "checkpoint": probe(vision_tokens(trained)),
            "random_weights": probe(vision_tokens(Qwen25VL.random(trained.config).float().eval()))}


def readout(model: str, size: int, font_size: int, n: int) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from nano_probe import make_text
    from qwenvl.engine import LLM, SamplingParams
    from qwenvl.synth.documents import OCR_PROMPT

    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        convs, glyphs = [], []
        for i in range(n):
            im, glyph = make_text("char", rng, size, font_size)
            im.save(os.path.join(tmp, f"{i}.png"))
            convs.append([{"role": "user", "content": [{"type": "image", "image": os.path.join(tmp, f"{i}.png")},
                                                       {"type": "text", "text": OCR_PROMPT}]}])
            glyphs.append(glyph)
        outs = LLM(model, dtype=torch.float32, device="cpu").chat(convs, SamplingParams(max_tokens=4, temperature=0.0))
    answers = [o.outputs[0].text.strip() for o in outs]
    return {"n": n, "size": size, "font_size": font_size,
            "first_char_acc": round(sum(a[:1] == g for a, g in zip(answers, glyphs)) / n, 3),
            "exact": round(sum(a == g for a, g in zip(answers, glyphs)) / n, 3),
            "examples": [f"{g} -> {a!r}" for g, a in zip(glyphs[:10], answers[:10])]}


def copy(model: str, n: int, split: str) -> dict:
    import torch

    from qwenvl import synth
    from qwenvl.engine import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        rows, start = [], 0
        while len(rows) < n:  # typing samples are ~1 in 16 GUI samples
            synth.generate(tmp, ["gui"], 64, split, 7, start=start)
            with open(os.path.join(tmp, "gui.jsonl")) as f:
                rows += [r for r in map(json.loads, f) if r["meta"]["action"]["action"] == "type"]
            start += 64
        rows = rows[:n]
        texts = [r["meta"]["action"]["text"] for r in rows]

        def absolute(messages):
            return [dict(m, content=[dict(c, image=os.path.join(tmp, c["image"])) if c.get("type") == "image" else c
                                     for c in m["content"]]) if isinstance(m["content"], list) else m
                    for m in messages[:-1]]

        system = rows[0]["messages"][0]
        variants = {"gui typing, as trained": [absolute(r["messages"]) for r in rows],
                    "repeat exactly": [[{"role": "user", "content": f"Repeat exactly: {t}"}] for t in texts],
                    "repeat exactly, after the tool system prompt": [
                        [system, {"role": "user", "content": f"Repeat exactly: {t}"}] for t in texts],
                    "repeat exactly, after 20 filler sentences": [
                        [{"role": "user", "content": "The user query: Open the link. " * 20 + f"Repeat exactly: {t}"}]
                        for t in texts]}
        llm = LLM(model, dtype=torch.float32, device="cpu")
        out = {"n": n, "split": split}
        for name, convs in variants.items():
            answers = [o.outputs[0].text for o in llm.chat(convs, SamplingParams(max_tokens=48, temperature=0.0))]
            out[name] = {"copied": sum(t in a for t, a in zip(texts, answers)),
                         "examples": [f"{t!r} -> {a[-60:]!r}" for t, a in zip(texts[:3], answers[:3])]}
    return out


def learn(variant: str, init: str, steps: int, lr: float, patch_embed_lr_mult: float = 1.0, warmup_steps: int = 0,
          size: int = 56, font_size: int = 24) -> dict:
    import time

    import numpy as np
    import torch
    import torch.nn as nn

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from nano_probe import GLYPHS, make_text
    from qwenvl import preprocess
    from qwenvl.layers import rms_norm
    from qwenvl.model import Qwen25VL

    torch.manual_seed(0)
    rng = random.Random(0)
    side = size // 14  # patches per side

    def batch(n: int):
        ims, ys = zip(*[make_text("char", rng, size, font_size) for _ in range(n)])
        y = torch.tensor([GLYPHS.index(t) for t in ys])
        if variant == "cnn":
            return torch.stack([torch.tensor(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in ims]), None, y
        prepared = [preprocess.prepare_image({"type": "image", "image": im}, min_pixels=size * size,
                                             max_pixels=size * size) for im in ims]
        return (torch.cat([p.float() for p, _ in prepared]),
                torch.cat([torch.as_tensor(g).reshape(1, 3) for _, g in prepared]), y)

    class Textbook(nn.Module):
        def __init__(self, d: int, depth: int, heads: int, ffn: int, patch_dim: int):
            super().__init__()
            self.embed, self.pos = nn.Linear(patch_dim, d), nn.Parameter(torch.zeros(side * side, d))
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, ffn, 0.0, batch_first=True,
                                                                        norm_first=True), depth,
                                             enable_nested_tensor=False)

        def forward(self, x, grid):
            return self.enc(self.embed(x).view(-1, side * side, self.pos.shape[1]) + self.pos)

    class PreMerger(nn.Module):
        """The ViT's blocks, read before the merger (patch states back in the processor's order)."""

        def __init__(self, vis, norm: bool = False):
            super().__init__()
            self.vis, self.norm = vis, norm

        def forward(self, x, grid):
            h, plan = self.vis.patch_states(x, grid)
            if self.norm:  # the merger's ln_q without its weight: each patch state scaled to unit RMS
                h = rms_norm(h, h.new_ones(h.shape[-1]), 1e-6)
            return h.view(h.shape[0] // 4, 4, -1)[plan.reverse_idx]

    def probe_patch_states(vis) -> float:
        """Held-out accuracy of a softmax regression on the ViT's (standardised) patch states, 1,000 images to fit:
        what the ViT itself has learned, whatever the head on top did."""
        feats = PreMerger(vis)
        with torch.no_grad():
            fit = batch(1000)
            f, ft = (feats(b[0], b[1]).reshape(len(b[2]), -1) for b in (fit, test))
        return round(linear_probe(f, fit[2], ft, test[2], len(GLYPHS), steps=200)[0], 3)

    if variant == "cnn":
        net = nn.Sequential(nn.Conv2d(3, 32, 5, 2, 2), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                            nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveMaxPool2d(1))
        body = lambda x, grid: net(x)  # noqa: E731
    else:
        from qwenvl.config import preset

        # (from_pretrained loads for inference, every parameter frozen: train them all, as from random)
        model = Qwen25VL.random(preset("nano")) if init == "random" else \
            Qwen25VL.from_pretrained(init).requires_grad_(True)
        vis = model.float().visual.train()
        c = vis.config
        net = {"merger": vis, "pre_merger": PreMerger(vis), "pre_merger_rmsnorm": PreMerger(vis, norm=True),
               "textbook": Textbook(c.hidden_size, c.depth, c.num_heads, c.intermediate_size, c.patch_dim)}[variant]
        body = net
    test = batch(400)
    probes = {"before": probe_patch_states(vis)} if variant not in ("cnn", "textbook") else {}
    with torch.no_grad():
        dim = body(*batch(1)[:2]).numel()
    head = nn.Linear(dim, len(GLYPHS))
    patch_embed = [p for n, p in net.named_parameters() if "patch_embed." in n]
    rest = [p for n, p in net.named_parameters() if "patch_embed." not in n]
    opt = torch.optim.AdamW([{"params": rest + list(head.parameters())},
                             {"params": patch_embed, "lr": lr * patch_embed_lr_mult}], lr=lr, weight_decay=0.05,
                            betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
    curve, t0 = {}, time.time()
    for step in range(steps + 1):
        if step % 50 == 0:
            with torch.no_grad():
                logits = head(body(test[0], test[1]).reshape(len(test[2]), -1))
            curve[step] = round((logits.argmax(1) == test[2]).float().mean().item(), 3)
            print(f"step {step}: held-out accuracy {curve[step]} ({time.time() - t0:.0f} s)", file=sys.stderr)
        if step == steps:
            break
        x, grid, y = batch(64)
        loss = nn.functional.cross_entropy(head(body(x, grid).reshape(len(y), -1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    if probes:
        probes["after"] = probe_patch_states(vis)
    return {"variant": variant, "init": init, "lr": lr, "patch_embed_lr_mult": patch_embed_lr_mult,
            "warmup_steps": warmup_steps,
            "chance": round(1 / len(GLYPHS), 3), "held_out_acc": curve,
            "patch_state_probe": probes}


def flaws(predictions: str) -> dict:
    """Answers of an eval's predictions.jsonl that fail the rule filter's repetition / truncated checks, per task."""
    from qwenvl.data.filters import repetition, truncated

    per: dict[str, collections.Counter] = {}
    for line in open(predictions, encoding="utf-8"):
        p = json.loads(line)
        text, c = p.get("prediction") or "", per.setdefault(p["task"], collections.Counter())
        c["n"] += 1
        c["repetition"] += bool(repetition(text))
        c["truncated"] += bool(truncated(text))
    total = sum(per.values(), collections.Counter())
    return {"all": dict(total), "by_task": {t: dict(c) for t, c in sorted(per.items())}}


def video(predictions: str) -> dict:
    """Per video task of an eval's predictions.jsonl: answer spread, malformed answers, mIoU against the best
    constant answer drawn from the model's own answers to the base (2 fps) task."""
    from qwenvl.evaluate.scoring import score
    from qwenvl.tasks.video import parse_events, parse_time_range

    rows: dict[str, list[dict]] = {}
    for line in open(predictions, encoding="utf-8"):
        p = json.loads(line)
        if p["task"].startswith(("video_grounding", "dense_caption")):
            rows.setdefault(p["task"], []).append(p)
    out = {}
    for task, rs in sorted(rows.items()):
        base = "video_grounding" if task.startswith("video_grounding") else "dense_caption"
        answers = collections.Counter(r["prediction"] or "" for r in rs)
        parsed = (lambda t: parse_time_range(t) is not None) if base == "video_grounding" else \
            (lambda t: bool(parse_events(t)))
        candidates = {r["prediction"] or "" for r in rows.get(base, rs)}
        const = max((sum(score(task, c, {}, r["reference"])["mIoU"] for r in rs) / len(rs), c) for c in candidates)
        out[task] = {"n": len(rs), "distinct": len(answers), "most_common": answers.most_common(1)[0][1],
                     "malformed": sum(not parsed(r["prediction"] or "") for r in rs),
                     "mIoU": round(100 * sum(r["scores"]["mIoU"] for r in rs) / len(rs), 1),
                     "best_constant_mIoU": round(100 * const[0], 1), "best_constant": const[1]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--model", default="runs/nano/latest")
    p.add_argument("--scenes", type=int, default=12)
    o = sub.add_parser("ocr")
    o.add_argument("--predictions", required=True)
    o.add_argument("--n", type=int, default=50, help="the eval's --n (samples per task)")
    o.add_argument("--data", help="the eval's --data folder (default: the nano suite at --n)")
    o.add_argument("--tasks", default="ocr", help="comma list of the tasks to score (e.g. glyphs,ocr_single_line)")
    fl = sub.add_parser("flaws")
    fl.add_argument("--predictions", required=True)
    vi = sub.add_parser("video")
    vi.add_argument("--predictions", required=True)
    g = sub.add_parser("glyphs")
    g.add_argument("--model", default="runs/nano/latest")
    g.add_argument("--size", type=int, default=56, help="canvas side in px (56: 2x2 vision tokens)")
    g.add_argument("--font-size", type=int, default=24)
    lr_ = sub.add_parser("learn")
    lr_.add_argument("--variant", choices=["merger", "pre_merger", "pre_merger_rmsnorm", "textbook", "cnn"],
                     default="merger")
    lr_.add_argument("--init", default="random", help="random, or a checkpoint directory for the ViT")
    lr_.add_argument("--steps", type=int, default=300)
    lr_.add_argument("--lr", type=float, default=1e-3)
    lr_.add_argument("--patch-embed-lr-mult", type=float, default=1.0,
                     help="the ViT patch embedding's learning rate as a multiple of --lr (train's patch_embed_lr)")
    lr_.add_argument("--warmup-steps", type=int, default=0, help="linear warmup of every learning rate")
    ro = sub.add_parser("readout")
    ro.add_argument("--model", default="runs/nano/latest")
    ro.add_argument("--size", type=int, default=112, help="canvas side in px (112: the glyph task's smallest)")
    ro.add_argument("--font-size", type=int, default=24)
    ro.add_argument("--n", type=int, default=150)
    cp = sub.add_parser("copy")
    cp.add_argument("--model", default="runs/nano/latest")
    cp.add_argument("--n", type=int, default=12)
    cp.add_argument("--split", choices=["train", "heldout"], default="train")
    a = ap.parse_args(argv)
    result = (prompts(a.model, a.scenes) if a.cmd == "prompts"
              else ocr(a.predictions, a.n, a.data, a.tasks) if a.cmd == "ocr"
              else flaws(a.predictions) if a.cmd == "flaws"
              else video(a.predictions) if a.cmd == "video"
              else glyphs(a.model, a.size, a.font_size) if a.cmd == "glyphs"
              else readout(a.model, a.size, a.font_size, a.n) if a.cmd == "readout"
              else copy(a.model, a.n, a.split) if a.cmd == "copy"
              else learn(a.variant, a.init, a.steps, a.lr, a.patch_embed_lr_mult, a.warmup_steps))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
