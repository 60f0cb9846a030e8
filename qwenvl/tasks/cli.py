"""Task commands: `qwenvl ground`, `qwenvl parse-doc`, `qwenvl ocr`, `qwenvl video`, `qwenvl agent`.

Each is one function of qwenvl.tasks.run (the engine, greedy, the cookbook prompt; the answer parsed and its
coordinates mapped back to the ORIGINAL media) with its result printed as JSON. `--answer TEXT` skips the model and
parses the given answer instead (an answer obtained elsewhere, e.g. from the server); the resized size is then
recomputed from --min-pixels/--max-pixels, which must be the ones the answering processor used.
"""

from __future__ import annotations

import json
import sys

from ..errors import InputError
from . import run
from .run import MAX_FRAMES, MIN_PAIR_TOKENS, TaskModel, ground_prompt, video_plan  # noqa: F401  (re-exported)


def add_parsers(subparsers) -> None:
    def common(p):
        p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
        p.add_argument("--device", default=None)
        p.add_argument("--max-tokens", type=int, default=1024)
        p.add_argument("--answer", default=None, help="parse this answer instead of running the model "
                       "(@FILE reads it from a file)")
        p.add_argument("--kv-cache-mb", type=int, default=None, help="KV cache size (default: 256 on CPU)")

    def image_limits(p):  # the processor's resize limits for the image (and so the pixels answers are in)
        p.add_argument("--min-pixels", type=int, default=None)
        p.add_argument("--max-pixels", type=int, default=None)

    g = subparsers.add_parser("ground", help="boxes (or points) for a query, in original image pixels")
    g.add_argument("image")
    g.add_argument("query", help='what to find, e.g. "every red car"')
    g.add_argument("--out", default=None, help="write the image with the boxes drawn (PNG)")
    g.add_argument("--points", action="store_true", help="ask for points instead of boxes")
    g.add_argument("--count", action="store_true", help="detect then count: the cookbook's counting prompt, and "
                   "the count the answer states (else the number of boxes) as \"count\"")
    g.add_argument("--prompt", default=None, help="the full prompt (default: built from the query)")
    image_limits(g)
    common(g)
    g.set_defaults(fn=cmd_ground)

    d = subparsers.add_parser("parse-doc", help="document image or PDF -> layout elements (JSON) and Markdown")
    d.add_argument("file", help="an image or a PDF")
    d.add_argument("--pages", default=None, help="PDF pages, e.g. 1-3,5 (default: all)")
    d.add_argument("--dpi", type=float, default=144.0, help="PDF render resolution")
    d.add_argument("--md", default=None, help="also write the Markdown to this file")
    d.add_argument("--markdown", action="store_true", help="print only the Markdown")
    d.add_argument("--draw-dir", default=None, help="write each page with its element boxes drawn")
    d.add_argument("--prompt", default=None, help="default: the cookbook's 'QwenVL HTML'")
    image_limits(d)
    common(d)
    d.set_defaults(fn=cmd_parse_doc, max_tokens=4096)

    o = subparsers.add_parser("ocr", help="read the text of an image: plain, spotted lines with boxes, or key-value "
                              "extraction to a schema")
    o.add_argument("image")
    mode = o.add_mutually_exclusive_group()
    mode.add_argument("--spot", action="store_true", help="text spotting: line boxes + text, in original pixels")
    mode.add_argument("--kie", default=None, metavar="SCHEMA", help="key-value extraction: a JSON Schema or a "
                      "cookbook key template ({\"key\": \"\", ...} or [keys]), inline JSON or @FILE")
    o.add_argument("--no-constrain", action="store_true", help="--kie: let the model answer freely instead of "
                   "constraining its answer to the schema while generating")
    o.add_argument("--prompt", default=None, help="the full prompt (default: the cookbook's for the mode)")
    image_limits(o)
    common(o)
    o.set_defaults(fn=cmd_ocr)

    v = subparsers.add_parser("video", help="ask about a video of any length (dynamic fps within a token budget)")
    v.add_argument("file")
    v.add_argument("question", nargs="?", default=None, help="what to ask (or one of --when / --dense)")
    ask = v.add_mutually_exclusive_group()
    ask.add_argument("--when", default=None, metavar="EVENT", help="temporal grounding: the cookbook's prompt for "
                     "when EVENT happens (the answer's time ranges in seconds)")
    ask.add_argument("--dense", action="store_true", help="dense captions: the cookbook's prompt for events with "
                     "mm:ss.ff times (the answer's events in seconds)")
    v.add_argument("--video-tokens", type=int, default=16384, help="token budget for the video")
    v.add_argument("--fps", type=float, default=None, help="override the chosen sampling rate")
    v.add_argument("--max-frames", type=int, default=None, help="override the chosen frame cap")
    common(v)
    v.set_defaults(fn=cmd_video)

    a = subparsers.add_parser("agent", help="one GUI-agent step: screenshot + task -> the tool call and the action "
                              "in screen pixels")
    a.add_argument("screenshot")
    a.add_argument("task")
    a.add_argument("--tool", default="mobile_use", choices=["mobile_use", "computer_use"])
    a.add_argument("--history", default=None, help="the previous steps' tool calls: a JSON list of "
                   "{\"name\", \"arguments\"} objects, inline or @FILE")
    image_limits(a)
    common(a)
    a.set_defaults(fn=cmd_agent, max_tokens=256)


# ---------------------------------------------------------------------------------------------- commands
def _model(args) -> TaskModel:
    """The engine, made on first use (so --answer never loads a model)."""
    return TaskModel(model=args.model, device=args.device, kv_cache_mb=args.kv_cache_mb, max_tokens=args.max_tokens,
                     answer=_text_arg(args.answer) if args.answer is not None else None)


def _text_arg(value: str) -> str:
    """An argument given inline or as @FILE."""
    if value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise InputError(f"{value[1:]}: cannot read ({e.strerror})") from None
    return value


def _json_arg(name: str, value: str):
    text = _text_arg(value)
    try:
        return json.loads(text)
    except ValueError as e:
        raise InputError(f"{name}: not valid JSON ({e})") from None


def _print(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2))


def cmd_ground(args) -> int:
    _print(run.ground(_model(args), args.image, args.query, points=args.points, count=args.count, prompt=args.prompt,
                      min_pixels=args.min_pixels, max_pixels=args.max_pixels, out=args.out))
    return 0


def cmd_parse_doc(args) -> int:
    result = run.parse_document(_model(args), args.file, pages=args.pages, dpi=args.dpi, prompt=args.prompt,
                                min_pixels=args.min_pixels, max_pixels=args.max_pixels, draw_dir=args.draw_dir)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(result["markdown"])
    if args.markdown:
        sys.stdout.write(result["markdown"])
    else:
        _print(result)
    return 0


def cmd_ocr(args) -> int:
    schema = _json_arg("--kie", args.kie) if args.kie is not None else None
    _print(run.ocr(_model(args), args.image, spot=args.spot, schema=schema, constrain=not args.no_constrain,
                   prompt=args.prompt, min_pixels=args.min_pixels, max_pixels=args.max_pixels))
    return 0


def cmd_video(args) -> int:
    from .video import dense_caption_prompt, grounding_prompt

    if (args.question is not None) + (args.when is not None) + args.dense != 1:
        raise InputError("qwenvl video: give a question, or --when EVENT, or --dense (one of them)")
    question = grounding_prompt(args.when) if args.when is not None else dense_caption_prompt() if args.dense \
        else args.question
    _print(run.ask_video(_model(args), args.file, question, video_tokens=args.video_tokens, fps=args.fps,
                         max_frames=args.max_frames))
    return 0


def cmd_agent(args) -> int:
    history = _json_arg("--history", args.history) if args.history is not None else []
    _print(run.agent_step(_model(args), args.screenshot, args.task, tool=args.tool, history=history,
                          min_pixels=args.min_pixels, max_pixels=args.max_pixels))
    return 0


def main(argv=None) -> int:
    """`python -m qwenvl.tasks.cli ground|parse-doc|ocr|video|agent ...` (the same as the `qwenvl` subcommands)."""
    import argparse

    from ..errors import QwenVLError

    parser = argparse.ArgumentParser(prog="qwenvl")
    add_parsers(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except QwenVLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
