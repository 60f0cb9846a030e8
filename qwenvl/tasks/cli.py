"""Task commands: `qwenvl ground`, `qwenvl parse-doc`, `qwenvl ocr`, `qwenvl video`, `qwenvl agent`.

Each runs the model (the engine, greedy) with the cookbook prompt, parses the answer with qwenvl.tasks and maps
coordinates back to the ORIGINAL media. `--answer TEXT` skips the model and parses the given answer instead
(an answer obtained elsewhere, e.g. from the server); the resized size is then recomputed from
--min-pixels/--max-pixels, which must be the ones the answering processor used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from ..errors import InputError

# dynamic fps: each pair of frames (one temporal patch) gets at least this many tokens
MIN_PAIR_TOKENS = 32
MAX_FRAMES = 768


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
    v.add_argument("question")
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


# ---------------------------------------------------------------------------------------------- the model
class _Model:
    """The engine, made on first use (so --answer never loads a model)."""

    def __init__(self, args):
        self.args = args
        self._llm = None
        self._proc = None

    @property
    def processor(self):
        if self._proc is None:
            from ..processor import Processor

            self._proc = self.llm.processor if self._llm is not None else (
                Processor.from_pretrained(self.args.model) if self.args.model else Processor())
        return self._proc

    @property
    def llm(self):
        if self._llm is None:
            import torch

            from ..engine import LLM
            from ..hub import resolve_model

            device = self.args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            mb = self.args.kv_cache_mb or (256 if device == "cpu" else None)
            self._llm = LLM(resolve_model(self.args.model), device=device,
                            kv_cache_bytes=mb << 20 if mb else None)
            self._proc = self._llm.processor
        return self._llm

    def ask(self, messages, logits_processors=None) -> tuple[str, list, list]:
        """(answer, image grids, videos [(grid, second_per_grid)]) — or the --answer text with empty grids.
        `logits_processors(llm)` -> processors for the request (constrained decoding), made once the engine is up."""
        if self.args.answer is not None:
            return _text_arg(self.args.answer), [], []
        from ..engine import SamplingParams

        enc = self.llm.processor.encode_conversation(messages)
        prompt = {"prompt_token_ids": enc["input_ids"], "images": enc["images"], "videos": enc["videos"]}
        params = SamplingParams(max_tokens=self.args.max_tokens, temperature=0.0,
                                logits_processors=logits_processors(self.llm) if logits_processors else None)
        out = self.llm.generate(prompt, params)[0]
        return out.text, [g.tolist() for _, g in enc["images"]], [(g.tolist(), s) for _, g, s in enc["videos"]]

    def resized_hw(self, image, grids, options) -> tuple[int, int]:
        """The size the model saw: from the processor's grid when it ran, else recomputed."""
        from .grounding import resized_hw

        if grids:
            return grids[0][1] * 14, grids[0][2] * 14
        proc = self.processor
        return resized_hw(image, options.get("min_pixels", proc.min_pixels), options.get("max_pixels", proc.max_pixels))


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


def _options(args) -> dict:
    return {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}


def _r(v: float) -> float:
    return round(v, 1)


def _print(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2))


# ---------------------------------------------------------------------------------------------- ground
def ground_prompt(query: str, points: bool = False) -> str:
    if points:
        return (f"Locate {query} with points, report their point coordinates in JSON format like this: "
                '{"point_2d": [x, y], "label": "object"}')
    return f"Locate {query}, output the bbox coordinates in JSON format."


def cmd_ground(args) -> int:
    from ..media import load_image
    from .grounding import count, count_prompt, draw, parse_boxes, parse_points, to_original

    image = load_image(args.image)
    prompt = args.prompt or (count_prompt(args.query) if args.count else ground_prompt(args.query, args.points))
    opts = _options(args)
    model = _Model(args)
    messages = [{"role": "user", "content": [{"type": "image", "image": image, **opts},
                                             {"type": "text", "text": prompt}]}]
    answer, grids, _ = model.ask(messages)
    rh, rw = model.resized_hw(image, grids, opts)
    hw = (image.height, image.width)
    boxes = to_original(parse_boxes(answer), (rh, rw), hw)
    points = to_original(parse_points(answer), (rh, rw), hw)
    if args.out:
        draw(image, boxes, points, args.out)
    result = {"prompt": prompt, "answer": answer, "image_size": [image.width, image.height], "resized_size": [rw, rh],
              "boxes": [_box_json(b) for b in boxes],
              "points": [{"point_2d": [_r(p.x), _r(p.y)], "label": p.label, **p.extra} for p in points],
              "out": args.out}
    if args.count:
        result["count"] = count(answer)
    _print(result)
    return 0


def _box_json(b, key: str = "label") -> dict:
    return {"bbox_2d": [_r(b.x1), _r(b.y1), _r(b.x2), _r(b.y2)], key: b.label, **b.extra}


# ---------------------------------------------------------------------------------------------- parse-doc
def cmd_parse_doc(args) -> int:
    from .document import DOC_PARSE_PROMPT, parse_html, to_markdown
    from .grounding import Box, draw, to_original

    from .pdf import iter_pages

    model = _Model(args)
    opts = _options(args)
    prompt = args.prompt or DOC_PARSE_PROMPT
    result = {"file": args.file, "pages": []}
    for n, image in iter_pages(args.file, args.pages, args.dpi):
        messages = [{"role": "user", "content": [{"type": "image", "image": image, **opts},
                                                 {"type": "text", "text": prompt}]}]
        answer, grids, _ = model.ask(messages)
        rh, rw = model.resized_hw(image, grids, opts)
        elements = parse_html(answer)
        for el in elements:
            if el.bbox is not None:
                b = to_original(Box(*el.bbox), (rh, rw), (image.height, image.width))
                el.bbox = (_r(b.x1), _r(b.y1), _r(b.x2), _r(b.y2))
        if args.draw_dir:
            os.makedirs(args.draw_dir, exist_ok=True)
            draw(image, [Box(*e.bbox, label=e.type) for e in elements if e.bbox],
                 out_path=os.path.join(args.draw_dir, f"page{n}.png"))
        result["pages"].append({"page": n, "size": [image.width, image.height], "resized_size": [rw, rh],
                                "answer": answer, "elements": [dataclasses.asdict(e) for e in elements],
                                "markdown": to_markdown(elements)})
    markdown = "\n".join(p["markdown"] for p in result["pages"])
    result["markdown"] = markdown
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(markdown)
    if args.markdown:
        sys.stdout.write(markdown)
    else:
        _print(result)
    return 0


# ---------------------------------------------------------------------------------------------- ocr
def cmd_ocr(args) -> int:
    from ..media import load_image
    from .document import OCR_PROMPT, SPOTTING_PROMPT, is_json_schema, kie_prompt, parse_kie, parse_text_spotting
    from .grounding import to_original

    schema = _json_arg("--kie", args.kie) if args.kie is not None else None
    if schema is not None and not isinstance(schema, (dict, list)):
        raise InputError("--kie: expected a JSON Schema, a {\"key\": \"\"} template or a list of keys")
    image = load_image(args.image)
    opts = _options(args)
    default = kie_prompt(schema) if schema is not None else SPOTTING_PROMPT if args.spot else OCR_PROMPT
    prompt = args.prompt or default
    processors = None
    if schema is not None and not args.no_constrain:
        from ..serve.constrained import JsonConstraint

        target = schema if is_json_schema(schema) else _template_schema(schema)
        processors = lambda llm: [JsonConstraint(target, llm.tokenizer, sorted(llm.eos_token_ids))]  # noqa: E731
    model = _Model(args)
    messages = [{"role": "user", "content": [{"type": "image", "image": image, **opts},
                                             {"type": "text", "text": prompt}]}]
    answer, grids, _ = model.ask(messages, processors)
    result = {"prompt": prompt, "answer": answer, "image_size": [image.width, image.height]}
    if args.spot:
        rh, rw = model.resized_hw(image, grids, opts)
        spots = to_original(parse_text_spotting(answer), (rh, rw), (image.height, image.width))
        result.update(resized_size=[rw, rh], lines=[_box_json(b, "text_content") for b in spots])
    elif schema is not None:
        kie = parse_kie(answer, schema)
        result.update(values=kie.values, missing=kie.missing, extra=kie.extra, errors=kie.errors, ok=kie.ok)
    _print(result)
    return 0


def _template_schema(template) -> dict:
    """The JSON Schema a cookbook key template implies: an object with exactly those keys (nested templates are
    objects, other values strings or null), so the constrained answer has every key asked for."""
    if isinstance(template, list):
        template = {str(k): "" for k in template}
    props = {k: _template_schema(v) if isinstance(v, dict) and v else {"type": ["string", "null"]}
             for k, v in template.items()}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


# ---------------------------------------------------------------------------------------------- video
def video_plan(duration_s: float, total_frames: int, token_budget: int = 16384, fps: float | None = None,
               max_frames: int | None = None) -> dict:
    """Sampling options for a video of any length within `token_budget` video tokens.

    Frames: 2 fps, but at most max_frames (768, and fewer when the budget could not give every pair of frames
    MIN_PAIR_TOKENS tokens), so an hour-long video is sampled at 768 / 3600 s = 0.21 fps. Frame size: the budget
    shared out over the frames (a pair of H x W frames costs H*W/784 tokens), capped at 768 tokens per pair.
    Memory is bounded too: only the sampled frames are decoded, each resized as soon as it is read.
    Returns the video item options (fps, max_frames, min_pixels, max_pixels, total_pixels) and the plan.
    """
    if duration_s <= 0 or total_frames < 1:
        raise InputError(f"the video has no duration ({duration_s} s, {total_frames} frames)")
    if token_budget < 2 * MIN_PAIR_TOKENS:
        raise InputError(f"--video-tokens must be at least {2 * MIN_PAIR_TOKENS}")
    cap = max_frames or min(MAX_FRAMES, max(4, (2 * token_budget // MIN_PAIR_TOKENS) // 2 * 2))
    fps = fps or min(2.0, cap / duration_s)
    nframes = max(2, math.floor(min(max(duration_s * fps, 4), cap, total_frames) / 2) * 2)  # as smart_nframes
    pair_tokens = min(768, token_budget * 2 // nframes)
    min_pixels = min(16, pair_tokens // 2) * 784  # small frames are upscaled to this (ceil): keep it under max
    max_pixels = pair_tokens * 784
    return {"options": {"fps": fps, "max_frames": cap, "min_pixels": min_pixels, "max_pixels": max_pixels,
                        "total_pixels": token_budget * 784},
            "nframes": nframes, "tokens": nframes // 2 * pair_tokens}


def cmd_video(args) -> int:
    from ..media import probe_video
    from .video import parse_events, parse_time_ranges

    total, native_fps, duration = probe_video(args.file)
    plan = video_plan(duration, total, args.video_tokens, args.fps, args.max_frames)
    model = _Model(args)
    messages = [{"role": "user", "content": [{"type": "video", "video": args.file, **plan["options"]},
                                             {"type": "text", "text": args.question}]}]
    answer, _, videos = model.ask(messages)
    info = {"planned_frames": plan["nframes"], "planned_tokens": plan["tokens"], **plan["options"]}
    if videos:  # what the processor actually did
        (t, gh, gw), spg = videos[0]
        info.update(frames=2 * t, frame_size=[gw * 14, gh * 14], video_tokens=t * gh * gw // 4,
                    sample_fps=round(2 / spg, 4))
    _print({"file": args.file, "duration_s": round(duration, 3), "native_fps": round(native_fps, 3),
            "total_frames": total, "sampling": info, "question": args.question, "answer": answer,
            # hmsf timestamps (hh:mm:ss:frames) count frames of the file's own frame rate
            "time_ranges": parse_time_ranges(answer, fps=native_fps),
            "events": [dataclasses.asdict(e) for e in parse_events(answer, fps=native_fps)]})
    return 0


# ---------------------------------------------------------------------------------------------- agent
def cmd_agent(args) -> int:
    """One step of run_agent: the tool description carries the resized screenshot's size, the model's
    coordinates are mapped back to the screenshot's pixels."""
    from ..media import load_image
    from .agent import action_dict, run_agent, to_action, user_query

    history = _json_arg("--history", args.history) if args.history is not None else []
    if not isinstance(history, list) or not all(isinstance(h, (dict, str)) for h in history):
        raise InputError("--history: expected a JSON list of {\"name\": ..., \"arguments\": {...}} objects")
    screenshot = load_image(args.screenshot)
    opts = _options(args)
    model = _Model(args)
    # the tool description must carry the size the processor will resize the screenshot to: its own limits
    proc = model.processor if args.answer is not None else model.llm.processor
    min_p, max_p = opts.get("min_pixels", proc.min_pixels), opts.get("max_pixels", proc.max_pixels)

    def model_fn(messages):
        for item in messages[-1]["content"]:  # the screenshot item carries the same limits
            if item.get("type") == "image":
                item.update(opts)
        return model.ask(messages)[0]

    executed = []
    res = run_agent(model_fn, lambda: screenshot, executed.append, args.task, max_steps=1, tool=args.tool,
                    min_pixels=min_p, max_pixels=max_p, history=history)
    step = res.steps[-1]
    rh, rw = model.resized_hw(screenshot, [], opts)
    out = {"task": args.task, "tool": args.tool, "query": user_query(args.task, history),
           "screen_size": [screenshot.width, screenshot.height], "resized_size": [rw, rh], "answer": step.text,
           "tool_call": {"name": step.call.name, "arguments": step.call.arguments} if step.call and step.call.ok
           else None,
           "action": action_dict(step.action) if step.action is not None else None,
           "action_resized": action_dict(to_action(step.call)) if step.action is not None else None,
           "status": "continue" if res.status == "max_steps" else res.status, "error": step.error}
    _print(out)
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
