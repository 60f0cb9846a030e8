"""The `qwenvl` command. Every subcommand takes --model DIR (default: the embedded model, see hub.py)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time


def _load(model_dir: str | None, device: str | None, dtype: str | None):
    import torch

    from .hub import resolve_model
    from .model import Qwen25VL
    from .processor import Processor

    path = resolve_model(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Qwen25VL.from_pretrained(path, dtype=dtype, device=device)
    return model, Processor.from_pretrained(path)


def _generate(model, proc, messages, max_tokens: int, temperature: float, seed: int | None) -> str:
    batch = proc([messages])
    out = model.generate(**batch, max_new_tokens=max_tokens, temperature=temperature, seed=seed)
    ids = out[0].tolist()
    eos = proc.tokenizer.eos_token_id
    if eos in ids:
        ids = ids[:ids.index(eos)]
    return proc.decode(ids)


def cmd_chat(a) -> int:
    content = []
    for img in a.image or []:
        content.append({"type": "image", "image": img})
    for vid in a.video or []:
        content.append({"type": "video", "video": vid, **({"fps": a.fps} if a.fps else {})})
    content.append({"type": "text", "text": a.prompt})
    model, proc = _load(a.model, a.device, a.dtype)
    print(_generate(model, proc, [{"role": "user", "content": content}], a.max_tokens, a.temperature, a.seed))
    return 0


DEMO_QUERY = "red squares"


def demo_image(path: str) -> list[list[int]]:
    """A scene of coloured shapes like the nano model's training scenes (qwenvl.synth.grounding: <= 448x448, flat
    colours; no download needed): two red squares among three other shapes, saved to `path`. Returns the red
    squares' boxes [x1, y1, x2, y2] in the image's pixels."""
    import random

    from .synth.grounding import Scene, allowed_pairs

    scene = Scene(random.Random(3))
    squares = [o for o in (scene.add("red", "square") for _ in range(2)) if o]
    scene.add_random(3, allowed_pairs(None), exclude={("red", "square")})
    scene.render().save(path)
    return [list(o.box) for o in squares]


def cmd_demo(a) -> int:
    """Detect-then-count on an image (the generated scene unless --image): prints the answer and the boxes in the
    image's pixels, writes the image with the boxes drawn."""
    from .tasks import grounding

    t0 = time.time()
    out_dir = a.out or os.path.join(os.getcwd(), "demo-out")
    os.makedirs(out_dir, exist_ok=True)
    img_path, expected = a.image, None
    if not img_path:
        img_path = os.path.join(out_dir, "demo.png")
        expected = demo_image(img_path)
    model, proc = _load(a.model, a.device, a.dtype)
    prompt = grounding.count_prompt(a.query)
    messages = [{"role": "user", "content": [{"type": "image", "image": img_path}, {"type": "text", "text": prompt}]}]
    answer = _generate(model, proc, messages, a.max_tokens, 0.0, None)
    boxes = grounding.parse_boxes(answer)
    from PIL import Image

    image = Image.open(img_path)
    rh, rw = grounding.resized_hw(image)
    boxes = [grounding.to_original(b, (rh, rw), (image.height, image.width)) for b in boxes]
    drawn = os.path.join(out_dir, "demo_boxes.png")
    grounding.draw(image, boxes, [], drawn)
    report = {"prompt": prompt, "answer": answer, "boxes": [[b.x1, b.y1, b.x2, b.y2, b.label] for b in boxes]}
    if expected is not None:  # the generated scene's truth, to compare with
        report["expected_boxes"] = expected
    report.update(image=img_path, drawn=drawn, seconds=round(time.time() - t0, 2))
    print(json.dumps(report, ensure_ascii=False, indent=2))
    if not boxes:
        from .hub import shipped_nano

        random_weights = not a.model and shipped_nano() is None
        print("(no boxes parsed from the answer", "- expected with random weights)" if random_weights else ")",
              file=sys.stderr)
    return 0


def cmd_average(a) -> int:
    from .checkpoint import average_checkpoints

    print(average_checkpoints(a.checkpoints, a.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwenvl", description="Qwen2.5-VL in plain PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--model", default=None, help="checkpoint dir (Hugging Face layout); default: embedded model")
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        sp.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: the checkpoint's)")
        sp.add_argument("--max-tokens", type=int, default=128)

    c = sub.add_parser("chat", help="answer one prompt about images/videos")
    common(c)
    c.add_argument("--image", action="append", help="image path, file:// or data URL (repeatable)")
    c.add_argument("--video", action="append", help="video file (repeatable)")
    c.add_argument("--fps", type=float, default=None, help="video sampling fps (default 2)")
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("prompt")
    c.set_defaults(fn=cmd_chat)

    d = sub.add_parser("demo", help="detect then count on a sample image: prints JSON, writes the image with boxes")
    common(d)
    d.add_argument("--image", default=None, help="use this image instead of the generated sample")
    d.add_argument("--query", default=DEMO_QUERY, help="what to find and count, plural (default: %(default)s)")
    d.add_argument("--out", default=None, help="output folder (default ./demo-out)")
    d.set_defaults(fn=cmd_demo, max_tokens=160)  # two boxes and the count sentence: ~90 tokens

    m = sub.add_parser("average", help="checkpoint averaging: the mean of the weights of checkpoints of one model")
    m.add_argument("checkpoints", nargs="+", help="checkpoint dirs with the same config (two or more)")
    m.add_argument("--out", required=True, help="output dir (the first checkpoint's tokenizer and processor files too)")
    m.set_defaults(fn=cmd_average)

    # Subcommands that own their argument parsing: `qwenvl train ...` is `qwenvl.train.cli.main([...])`.
    for name, module, help_ in (("train", "train", "fine-tune / pretrain (docs/TRAINING.md)"),
                                ("data", "data", "curation tools on JSONL data"),
                                ("eval", "evaluate", "evaluate a model on a suite or a JSONL dir"),
                                ("synth", "synth", "deterministic synthetic training/eval data (docs/NANO.md)")):
        sp = sub.add_parser(name, help=help_, add_help=False, prefix_chars="\0")
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(fn=lambda a, m=module: importlib.import_module(f"qwenvl.{m}.cli").main(a.rest))
    # Subcommands that register their own parsers.
    for module, hook in (("qwenvl.serve.cli", "add_parser"), ("qwenvl.tasks.cli", "add_parsers")):
        try:
            getattr(importlib.import_module(module), hook)(sub)
        except ImportError as e:  # an optional dependency of that subcommand is missing
            print(f"note: {module} unavailable ({e})", file=sys.stderr) if os.environ.get("QWENVL_DEBUG") else None

    a = p.parse_args(argv)
    from .errors import QwenVLError

    try:
        return a.fn(a) or 0
    except QwenVLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
