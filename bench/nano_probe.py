"""Can the nano pipeline learn an answer that only the image holds? A CPU-sized probe of trainer + export + engine
(docs/NANO.md §7, "What the CPU probes show").

    python bench/nano_probe.py --task colour   --steps 150 --size 112              # colour of a plain image
    python bench/nano_probe.py --task quadrant --steps 200 --size 112 --theta 1e6  # where a red square is
    python bench/nano_probe.py --task flash    --steps 300 --size 112 --theta 1e6  # when a clip turns red
    python bench/nano_probe.py --task box      --steps 400 --size 224 --theta 100  # the red square's box, in pixels
    python bench/nano_probe.py --task char     --steps 400 --size 112 --font-size 24  # one letter or digit
    python bench/nano_probe.py --task word     --steps 400 --size 224 --font-size 24  # four random letters, in order

Writes N training samples (one fixed prompt per task, so only the pixels tell the answers apart), trains the nano
shape from random weights with the real trainer (packed rows, the recipe's AdamW settings), exports, and answers 40
(`--heldout`) held-out images through the engine (greedy). Prints the loss curve (means of 10 steps) and held-out accuracy
(chance: 1/8 colours, 1/4 quadrants); with --json, writes them. `--theta` overrides the LLM's rope_theta
(MRoPE): the width axis gets the lowest frequencies of the (t, h, w) split, the question this probe was written for;
`--mrope-section T,H,W` replaces the split (rotary pairs per axis, summing to head_dim/2: 8,12,12 for nano).
`flash` is the other side of that trade-off: a 4-12 s grey clip at 2 fps is red from second a to b, and the answer
"a - b" can only come from the temporal ids (the t axis gets the highest frequencies, so a low theta makes its
wavelengths a few seconds long); it reports exact-match accuracy and the mean temporal IoU. `--mrope-temporal
frame` trains with frame-index temporal ids instead of absolute time, `--train-fps 1,2,4` samples the training clips at
those rates in turn (dynamic FPS), and `--eval-fps 2,3,6` answers the same held-out clips at each rate (issue 6's
temporal-id ablation at probe scale, docs/NANO.md §4).
`box` is grounding reduced to its core: one red square (side 1/8 to 3/8 of the canvas) anywhere on grey, answered
as "[x1, y1, x2, y2]" in pixels like the synth grounding task's bbox_2d; it reports Acc@0.5, the mean IoU, and the
mean IoU of the best pixel-blind answer (the training set's mean box), the floor a model that ignores the image gets.
`char` and `word` are OCR reduced to its core (issue 6's OCR: run 12b writes the answer format's prior, not the
glyphs): `char` one of 36 upper-case letters and digits anywhere on the canvas (recognising a glyph; chance 1/36),
`word` four random upper-case letters on one line (reading glyphs in order, which also needs the width axis); both
in DejaVu Sans at `--font-size` px, black on light grey; they report exact match and character accuracy.
`--model DIR` starts from a trained checkpoint instead of random weights (e.g. runs/nano/latest: does a model that
has trained read glyphs after a few hundred steps of nothing else?).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30),
           "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 40, 180), "orange": (250, 140, 20)}
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
PROMPTS = {"colour": "What colour is this image?", "quadrant": "Where is the red square?",
           "flash": "When is the screen red?", "box": "Outline the red square with a bounding box.",
           "char": "Read the text in the image.", "word": "Read the text in the image."}
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
FLASH_FPS, FLASH_SECONDS = 2, (4, 12)


def draw_clip(rng: random.Random) -> tuple[int, int, int]:
    """(seconds, a, b): a clip of 4-12 whole seconds, red for seconds [a, b)."""
    seconds = rng.randint(*FLASH_SECONDS)
    a = rng.randrange(seconds)
    return seconds, a, rng.randint(a + 1, seconds)


def render_clip(clip: tuple[int, int, int], size: int, fps: int = FLASH_FPS) -> tuple[list[Image.Image], str]:
    """The clip's frames at `fps` and its answer "a - b" (the same seconds whatever the rate)."""
    seconds, a, b = clip
    frames = [Image.new("RGB", (size, size), (220, 30, 30) if a <= i / fps < b else (128, 128, 128))
              for i in range(seconds * fps)]
    return frames, f"{a} - {b}"


def make_text(task: str, rng: random.Random, size: int, font_size: int) -> tuple[Image.Image, str]:
    """`char`: one glyph; `word`: four random letters (no vocabulary word to guess from), anywhere they fit."""
    from qwenvl.synth.common import font

    text = rng.choice(GLYPHS) if task == "char" else "".join(rng.choice(GLYPHS[:26]) for _ in range(4))
    fnt = font("dejavu-sans", font_size)
    x1, y1, x2, y2 = fnt.getbbox(text)
    im = Image.new("RGB", (size, size if task == "char" else size // 2), (225, 225, 225))
    x = rng.randrange(-x1, max(-x1 + 1, im.width - x2))
    y = rng.randrange(-y1, max(-y1 + 1, im.height - y2))
    ImageDraw.Draw(im).text((x, y), text, font=fnt, fill=(10, 10, 10))
    return im, text


def make_sample(task: str, rng: random.Random, size: int, font_size: int = 24) -> tuple[Image.Image, str]:
    if task in ("char", "word"):
        return make_text(task, rng, size, font_size)
    if task == "colour":
        name = rng.choice(list(COLOURS))
        w, h = rng.choice([size // 2, size * 3 // 4, size]), rng.choice([size // 2, size * 3 // 4, size])
        noise = torch.randint(-12, 13, (h, w, 3), generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        arr = (torch.tensor(COLOURS[name])[None, None] + noise).clamp(0, 255).to(torch.uint8).numpy()
        return Image.fromarray(arr), name
    if task == "box":
        s = rng.randrange(size // 8, size * 3 // 8 + 1)
        x0, y0 = rng.randrange(0, size - s), rng.randrange(0, size - s)
        im = Image.new("RGB", (size, size), (128, 128, 128))
        ImageDraw.Draw(im).rectangle([x0, y0, x0 + s - 1, y0 + s - 1], fill=(220, 30, 30))
        return im, json.dumps([x0, y0, x0 + s, y0 + s])
    q, s = rng.randrange(4), rng.randrange(size // 8, size // 4)
    x0 = rng.randrange(0, size // 2 - s) + (size // 2 if q % 2 else 0)
    y0 = rng.randrange(0, size // 2 - s) + (size // 2 if q >= 2 else 0)
    im = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(im).rectangle([x0, y0, x0 + s, y0 + s], fill=(220, 30, 30))
    return im, QUADRANTS[q]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=list(PROMPTS), default="colour")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--theta", type=float, default=None, help="LLM rope_theta (default: the nano preset's)")
    ap.add_argument("--mrope-section", help="LLM MRoPE pairs per (t, h, w) axis, e.g. 4,14,14 (default: the preset's)")
    ap.add_argument("--pack-length", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--font-size", type=int, default=24, help="char/word: glyph size in px")
    ap.add_argument("--model", default="nano", help="a checkpoint to start from (default: random weights)")
    ap.add_argument("--heldout", type=int, default=40, help="held-out samples answered at the end")
    ap.add_argument("--data-workers", type=int, default=0,
                    help="processes building rows (0: the training process; the GPU outruns it ~20x)")
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="train for this wall time (cosine over it) instead of --steps")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "qwenvl-nano-probe"))
    ap.add_argument("--json")
    ap.add_argument("--mrope-temporal", choices=["absolute", "frame"], default=None,
                    help="flash: video temporal ids in seconds (the report's) or frame indices (the ablation)")
    ap.add_argument("--eval-fps", default=str(FLASH_FPS),
                    help="flash: the held-out clips are answered at each of these sampling rates (training: 2 fps)")
    ap.add_argument("--train-fps", default=str(FLASH_FPS),
                    help="flash: training clip i is sampled at the (i mod n)-th of these rates (1,2,4: dynamic FPS)")
    a = ap.parse_args(argv)
    eval_fps = [int(v) for v in a.eval_fps.split(",")]
    train_fps = [int(v) for v in a.train_fps.split(",")]

    from qwenvl.engine import LLM, SamplingParams
    from qwenvl.train import TrainConfig, train
    from qwenvl.train import trainer

    if a.mrope_section:  # TrainConfig has no field for it: the preset's shape with the split replaced, which the
        section = [int(v) for v in a.mrope_section.split(",")]  # exported config.json (rope_scaling) carries on
        base_preset, head_dim = trainer.preset, trainer.preset("nano").text.head_dim
        if len(section) != 3 or min(section) < 0 or sum(section) * 2 != head_dim:
            ap.error(f"--mrope-section needs three ints summing to head_dim/2 = {head_dim // 2}")

        def sectioned(name):
            config = base_preset(name)
            config.text.mrope_section = section
            return config

        trainer.preset = sectioned

    os.makedirs(os.path.join(a.out, "img"), exist_ok=True)
    rng = random.Random(0)
    prompt = PROMPTS[a.task]

    def clip_record(clip, fps, stem):
        """The clip's frames at fps saved as img/STEM_KKK.png; (the user turn as a record, the answer)."""
        frames, answer = render_clip(clip, a.size, fps)
        paths = [f"img/{stem}_{k:03d}.png" for k in range(len(frames))]
        for frame, path in zip(frames, paths):
            frame.save(os.path.join(a.out, path))
        video = {"type": "video", "video": paths, "sample_fps": fps, "min_pixels": 784, "max_pixels": a.size * a.size}
        return {"messages": [{"role": "user", "content": [video, {"type": "text", "text": prompt}]}]}, answer

    def write(split, n):
        rows = []
        for i in range(n):
            if a.task == "flash":
                fps = train_fps[i % len(train_fps)]  # dynamic FPS (the report's 2.1.3) when several rates are given
                rec, answer = clip_record(draw_clip(rng), fps, f"{split}{i}")
                rec["messages"].append({"role": "assistant", "content": answer})
                rows.append((rec, answer))
                continue
            im, answer = make_sample(a.task, rng, a.size, a.font_size)
            path = f"img/{split}{i}.png"
            im.save(os.path.join(a.out, path))
            rows.append(({"images": [path], "messages": [{"role": "user", "content": "<image>" + prompt},
                                                         {"role": "assistant", "content": answer}]}, answer))
        return rows

    train_rows = [rec for rec, _ in write("train", a.samples)]
    with open(os.path.join(a.out, "train.jsonl"), "w") as f:
        for rec in train_rows:
            f.write(json.dumps(rec) + "\n")
    if a.task == "flash":  # the same held-out clips (seconds and answers) rendered at every evaluation rate
        clips = [draw_clip(rng) for _ in range(a.heldout)]
        held_by_fps = {fps: [clip_record(clip, fps, f"test{fps}fps{i}") for i, clip in enumerate(clips)]
                       for fps in eval_fps}
        held = held_by_fps[eval_fps[0]]
    else:
        held = write("test", a.heldout)
    cfg = TrainConfig(model=a.model, train_files=[os.path.join(a.out, "train.jsonl")], output_dir=os.path.join(a.out, "run"),
                      lr=a.lr, warmup_steps=10,
                      max_steps=a.steps if a.train_seconds is None else 10**8, max_train_seconds=a.train_seconds,
                      data_workers=a.data_workers, pack_length=a.pack_length, save_every=0,
                      resume=False, max_pixels=a.size * a.size, chunk_size=512, weight_decay=0.05, adam_beta2=0.95,
                      rope_theta=a.theta, mrope_temporal=a.mrope_temporal)
    t0 = time.time()
    summary = train(cfg)
    seconds = time.time() - t0
    with open(os.path.join(a.out, "run", "log.jsonl")) as f:
        curve = [json.loads(line)["loss"] for line in f]
    means = [round(sum(curve[i:i + 10]) / len(curve[i:i + 10]), 3) for i in range(0, len(curve), 10)]
    with open(os.path.join(summary["final"], "config.json")) as f:  # what the engine loads
        exported = json.load(f)
    llm_section = (exported.get("text_config", exported).get("rope_scaling") or {}).get("mrope_section")
    llm = LLM(summary["final"], kv_cache_bytes=256 << 20)  # small: several probes may share one GPU
    def flash_conv(rec):
        return [{"role": "user", "content": [
            {**rec["messages"][0]["content"][0], "video": [os.path.join(a.out, p) for p in
                                                         rec["messages"][0]["content"][0]["video"]]},
            {"type": "text", "text": prompt}]}]

    if a.task == "flash":
        convs = [flash_conv(rec) for rec, _ in held]
    else:
        convs = [[{"role": "user", "content": [{"type": "image", "image": os.path.join(a.out, rec["images"][0])},
                                               {"type": "text", "text": prompt}]}] for rec, _ in held]
    preds = [o.text.strip() for o in llm.chat(convs, SamplingParams(max_tokens=24 if a.task == "box" else 8,
                                                                      temperature=0.0))]
    acc = sum(p == ans for p, (_, ans) in zip(preds, held)) / len(held)
    result = {"task": a.task, "steps": len(curve), "samples_seen": summary.get("seen"), "size": a.size, "theta": a.theta,
              "mrope_section": llm_section, "train_s": round(seconds, 1),
              "loss_means_per_10_steps": means, "held_out_accuracy": acc,
              "chance": {"colour": 1 / len(COLOURS), "quadrant": 1 / len(QUADRANTS)}.get(a.task),
              "predictions": preds[:12], "answers": [ans for _, ans in held[:12]]}
    if a.task == "box":
        from qwenvl.tasks.metrics import iou as box_iou

        def parse(text):
            try:
                box = json.loads(text)
                return [float(v) for v in box] if isinstance(box, list) and len(box) == 4 else None
            except (ValueError, TypeError):
                return None

        truth = [json.loads(ans) for _, ans in held]
        ious = [box_iou(b, t) if b else 0.0 for b, t in zip(map(parse, preds), truth)]
        mean_box = [sum(json.loads(r["messages"][1]["content"])[i] for r in train_rows) / len(train_rows)
                    for i in range(4)]
        result.update(held_out_accuracy=sum(v >= 0.5 for v in ious) / len(ious), mean_iou=round(sum(ious) / len(ious), 3),
                      pixel_blind_mean_iou=round(sum(box_iou(mean_box, t) for t in truth) / len(truth), 3),
                      parsed=sum(parse(p) is not None for p in preds))
    if a.task in ("char", "word"):
        from qwenvl.tasks.metrics import char_accuracy

        result["char_accuracy"] = round(sum(char_accuracy(p, ans) for p, (_, ans) in zip(preds, held)) / len(held), 3)
        result["chance"] = 1 / len(GLYPHS) if a.task == "char" else None
    if a.task == "flash":
        from qwenvl.tasks.metrics import mean_iou
        from qwenvl.tasks.video import parse_time_range

        result["mrope_temporal"] = exported.get("mrope_temporal", "absolute")
        result["mean_iou"] = round(mean_iou([parse_time_range(p) for p in preds],
                                            [parse_time_range(ans) for _, ans in held]), 3)
        result["by_fps"] = {}
        for fps in eval_fps:  # the first rate's answers are the ones above
            rows = held_by_fps[fps]
            got = preds if fps == eval_fps[0] else [o.text.strip() for o in llm.chat(
                [flash_conv(rec) for rec, _ in rows], SamplingParams(max_tokens=8, temperature=0.0))]
            result["by_fps"][fps] = {
                "exact": sum(p == ans for p, (_, ans) in zip(got, rows)) / len(rows),
                "mean_iou": round(mean_iou([parse_time_range(p) for p in got],
                                           [parse_time_range(ans) for _, ans in rows]), 3),
                "predictions": got[:8]}
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
