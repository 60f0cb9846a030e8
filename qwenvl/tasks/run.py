"""The capabilities end to end in Python: run the model with the cookbook prompt, parse its answer, map what it
points at back to the ORIGINAL media. Each function returns the JSON-able dict its CLI subcommand prints:

    from qwenvl.tasks import run
    m = run.TaskModel(qwenvl.LLM(path))           # or pass the LLM itself
    run.ground(m, "street.jpg", "every red car", out="boxes.png")["boxes"]
    run.parse_document(m, "paper.pdf", pages="1-2")["markdown"]
    run.ocr(m, "receipt.jpg", schema={"type": "object", "properties": {...}})["values"]
    run.ask_video(m, "match.mp4", "When is the goal scored?")["time_ranges"]
    run.agent_step(m, screenshot, "Turn on wifi", history=[...])["action"]

`TaskModel(answer=TEXT)` parses a given answer instead of running a model (an answer obtained elsewhere, e.g.
from the server); the resized size is then recomputed from min/max_pixels, which must be the ones the
answering processor used.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

from ..errors import InputError

# dynamic fps: each pair of frames (one temporal patch) gets at least this many tokens
MIN_PAIR_TOKENS = 32
MAX_FRAMES = 768


class TaskModel:
    """What the task functions ask: a qwenvl.LLM (`llm`), one loaded from `model` (a checkpoint dir; None = the
    embedded model) on first use, or a fixed `answer` (no model at all). Greedy decoding, `max_tokens` a request
    unless a function asks for another."""

    def __init__(self, llm=None, *, model: str | None = None, device: str | None = None,
                 kv_cache_mb: int | None = None, max_tokens: int = 1024, answer: str | None = None):
        self._llm, self._proc = llm, (llm.processor if llm is not None else None)
        self.model, self.device, self.kv_cache_mb = model, device, kv_cache_mb
        self.max_tokens, self.answer = max_tokens, answer

    @property
    def processor(self):
        if self._proc is None:
            from ..processor import Processor

            self._proc = self.llm.processor if self.answer is None else (
                Processor.from_pretrained(self.model) if self.model else Processor())
        return self._proc

    @property
    def llm(self):
        if self._llm is None:
            import torch

            from ..engine import LLM
            from ..hub import resolve_model

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            mb = self.kv_cache_mb or (256 if device == "cpu" else None)
            self._llm = LLM(resolve_model(self.model), device=device, kv_cache_bytes=mb << 20 if mb else None)
            self._proc = self._llm.processor
        return self._llm

    def ask(self, messages, logits_processors=None, max_tokens: int | None = None) -> tuple[str, list, list]:
        """(answer, image grids, videos [(grid, second_per_grid)]) — or the fixed answer with empty grids.
        `logits_processors(llm)` -> processors for the request (constrained decoding), made once the engine is up."""
        if self.answer is not None:
            return self.answer, [], []
        from ..engine import SamplingParams

        enc = self.llm.processor.encode_conversation(messages)
        prompt = {"prompt_token_ids": enc["input_ids"], "images": enc["images"], "videos": enc["videos"]}
        params = SamplingParams(max_tokens=max_tokens or self.max_tokens, temperature=0.0,
                                logits_processors=logits_processors(self.llm) if logits_processors else None)
        out = self.llm.generate(prompt, params)[0]
        return (out.text, [x.grid_thw.tolist() for x in enc["images"]],  # VisionInputs: unpacking makes pixels
                [(x.grid_thw.tolist(), x.second_per_grid) for x in enc["videos"]])

    def resized_hw(self, image, grids, options) -> tuple[int, int]:
        """The size the model saw: from the processor's grid when it ran, else recomputed."""
        from .grounding import resized_hw

        if grids:
            return grids[0][1] * 14, grids[0][2] * 14
        proc = self.processor
        return resized_hw(image, options.get("min_pixels", proc.min_pixels), options.get("max_pixels", proc.max_pixels))


def _model(model) -> TaskModel:
    return model if isinstance(model, TaskModel) else TaskModel(model)


def _limits(min_pixels, max_pixels) -> dict:
    return {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}


def _image_message(image, options: dict, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image, **options}, {"type": "text", "text": prompt}]}]


def _r(v: float) -> float:
    return round(v, 1)


def _box_json(b, key: str = "label") -> dict:
    return {"bbox_2d": [_r(b.x1), _r(b.y1), _r(b.x2), _r(b.y2)], key: b.label, **b.extra}


# ---------------------------------------------------------------------------------------------- grounding
def ground_prompt(query: str, points: bool = False) -> str:
    if points:
        return (f"Locate {query} with points, report their point coordinates in JSON format like this: "
                '{"point_2d": [x, y], "label": "object"}')
    return f"Locate {query}, output the bbox coordinates in JSON format."


def ground(model, image, query: str, *, points: bool = False, count: bool = False, prompt: str | None = None,
           min_pixels: int | None = None, max_pixels: int | None = None, out: str | None = None) -> dict:
    """Boxes (or points) for `query` in the original image's pixels; `count`: the cookbook's detect-then-count
    prompt and the count the answer states; `out`: write the image with them drawn (PNG)."""
    from ..media import load_image
    from .grounding import count as count_of, count_prompt, draw, parse_boxes, parse_points, to_original

    model = _model(model)
    image = load_image(image)
    prompt = prompt or (count_prompt(query) if count else ground_prompt(query, points))
    opts = _limits(min_pixels, max_pixels)
    answer, grids, _ = model.ask(_image_message(image, opts, prompt))
    rh, rw = model.resized_hw(image, grids, opts)
    hw = (image.height, image.width)
    boxes = to_original(parse_boxes(answer), (rh, rw), hw)
    found = to_original(parse_points(answer), (rh, rw), hw)
    if out:
        draw(image, boxes, found, out)
    result = {"prompt": prompt, "answer": answer, "image_size": [image.width, image.height], "resized_size": [rw, rh],
              "boxes": [_box_json(b) for b in boxes],
              "points": [{"point_2d": [_r(p.x), _r(p.y)], "label": p.label, **p.extra} for p in found],
              "out": out}
    if count:
        result["count"] = count_of(answer)
    return result


# ---------------------------------------------------------------------------------------------- documents
def parse_document(model, file: str, *, pages: str | None = None, dpi: float = 144.0, prompt: str | None = None,
                   min_pixels: int | None = None, max_pixels: int | None = None, draw_dir: str | None = None,
                   max_tokens: int | None = None) -> dict:
    """An image or a PDF (pages like "1-3,5", rendered one at a time) -> per page the QwenVL HTML answer, its
    elements with boxes in the page's pixels, and Markdown; "markdown" joins the pages."""
    from .document import DOC_PARSE_PROMPT, parse_html, to_markdown
    from .grounding import Box, draw, to_original
    from .pdf import iter_pages

    model = _model(model)
    opts = _limits(min_pixels, max_pixels)
    prompt = prompt or DOC_PARSE_PROMPT
    result: dict[str, Any] = {"file": file, "pages": []}
    for n, image in iter_pages(file, pages, dpi):
        answer, grids, _ = model.ask(_image_message(image, opts, prompt), max_tokens=max_tokens)
        rh, rw = model.resized_hw(image, grids, opts)
        elements = parse_html(answer)
        for el in elements:
            if el.bbox is not None:
                b = to_original(Box(*el.bbox), (rh, rw), (image.height, image.width))
                el.bbox = (_r(b.x1), _r(b.y1), _r(b.x2), _r(b.y2))
        if draw_dir:
            os.makedirs(draw_dir, exist_ok=True)
            draw(image, [Box(*e.bbox, label=e.type) for e in elements if e.bbox],
                 out_path=os.path.join(draw_dir, f"page{n}.png"))
        result["pages"].append({"page": n, "size": [image.width, image.height], "resized_size": [rw, rh],
                                "answer": answer, "elements": [dataclasses.asdict(e) for e in elements],
                                "markdown": to_markdown(elements)})
    result["markdown"] = "\n".join(p["markdown"] for p in result["pages"])
    return result


def ocr(model, image, *, spot: bool = False, schema: Any = None, constrain: bool = True, prompt: str | None = None,
        min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """Read the text of an image; `spot`: line boxes + text in original pixels ("lines"); `schema`: key-value
    extraction to a JSON Schema or a cookbook key template ("values", "missing", "extra", "errors", "ok"), the
    answer constrained to the schema while generating unless `constrain` is False."""
    from ..media import load_image
    from .document import OCR_PROMPT, SPOTTING_PROMPT, is_json_schema, kie_prompt, parse_kie, parse_text_spotting
    from .grounding import to_original

    if spot and schema is not None:
        raise InputError("ocr: text spotting and key-value extraction are separate requests; ask for one")
    if schema is not None and not isinstance(schema, (dict, list)):
        raise InputError("the KIE schema must be a JSON Schema, a {\"key\": \"\"} template or a list of keys")
    model = _model(model)
    image = load_image(image)
    opts = _limits(min_pixels, max_pixels)
    prompt = prompt or (kie_prompt(schema) if schema is not None else SPOTTING_PROMPT if spot else OCR_PROMPT)
    processors = None
    if schema is not None and constrain:
        from ..serve.constrained import JsonConstraint

        target = schema if is_json_schema(schema) else template_schema(schema)
        processors = lambda llm: [JsonConstraint(target, llm.tokenizer, sorted(llm.eos_token_ids))]  # noqa: E731
    answer, grids, _ = model.ask(_image_message(image, opts, prompt), processors)
    result = {"prompt": prompt, "answer": answer, "image_size": [image.width, image.height]}
    if spot:
        rh, rw = model.resized_hw(image, grids, opts)
        spots = to_original(parse_text_spotting(answer), (rh, rw), (image.height, image.width))
        result.update(resized_size=[rw, rh], lines=[_box_json(b, "text_content") for b in spots])
    elif schema is not None:
        kie = parse_kie(answer, schema)
        result.update(values=kie.values, missing=kie.missing, extra=kie.extra, errors=kie.errors, ok=kie.ok)
    return result


def template_schema(template) -> dict:
    """The JSON Schema a cookbook key template implies: an object with exactly those keys (nested templates are
    objects, other values strings or null), so a constrained answer has every key asked for."""
    if isinstance(template, list):
        template = {str(k): "" for k in template}
    props = {k: template_schema(v) if isinstance(v, dict) and v else {"type": ["string", "null"]}
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


def ask_video(model, file: str, question: str, *, video_tokens: int = 16384, fps: float | None = None,
              max_frames: int | None = None) -> dict:
    """A question about a video of any length (video_plan: dynamic fps within the token budget, frames decoded by
    seeking); the answer's time ranges and dense-caption events in seconds (hmsf read at the file's frame rate)."""
    from ..media import probe_video
    from .video import parse_events, parse_time_ranges

    model = _model(model)
    total, native_fps, duration = probe_video(file)
    plan = video_plan(duration, total, video_tokens, fps, max_frames)
    messages = [{"role": "user", "content": [{"type": "video", "video": file, **plan["options"]},
                                             {"type": "text", "text": question}]}]
    answer, _, videos = model.ask(messages)
    info = {"planned_frames": plan["nframes"], "planned_tokens": plan["tokens"], **plan["options"]}
    if videos:  # what the processor actually did
        (t, gh, gw), spg = videos[0]
        info.update(frames=2 * t, frame_size=[gw * 14, gh * 14], video_tokens=t * gh * gw // 4,
                    sample_fps=round(2 / spg, 4))
    return {"file": file, "duration_s": round(duration, 3), "native_fps": round(native_fps, 3),
            "total_frames": total, "sampling": info, "question": question, "answer": answer,
            # hmsf timestamps (hh:mm:ss:frames) count frames of the file's own frame rate
            "time_ranges": parse_time_ranges(answer, fps=native_fps),
            "events": [dataclasses.asdict(e) for e in parse_events(answer, fps=native_fps)]}


# ---------------------------------------------------------------------------------------------- agents
def agent_step(model, screenshot, task: str, *, tool: str = "mobile_use", history: Sequence[Any] = (),
               min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """One step of run_agent: the tool description carries the resized screenshot's size, the model's tool call
    becomes a typed action mapped to the screenshot's pixels ("action"; "action_resized" as the model gave it).
    "status": continue (an action to execute), success / failure (the model terminated) or error."""
    from ..media import load_image
    from .agent import action_dict, run_agent, to_action, user_query

    if not isinstance(history, (list, tuple)) or not all(isinstance(h, (dict, str)) or hasattr(h, "arguments")
                                                          for h in history):
        raise InputError("history: expected a list of tool calls ({\"name\": ..., \"arguments\": {...}} objects)")
    model = _model(model)
    screenshot = load_image(screenshot)
    opts = _limits(min_pixels, max_pixels)
    # the tool description must carry the size the processor will resize the screenshot to: its own limits
    proc = model.processor
    min_p, max_p = opts.get("min_pixels", proc.min_pixels), opts.get("max_pixels", proc.max_pixels)

    def model_fn(messages):
        for item in messages[-1]["content"]:  # the screenshot item carries the same limits
            if item.get("type") == "image":
                item.update(opts)
        return model.ask(messages)[0]

    res = run_agent(model_fn, lambda: screenshot, lambda action: None, task, max_steps=1, tool=tool,
                    min_pixels=min_p, max_pixels=max_p, history=history)
    step = res.steps[-1]
    rh, rw = model.resized_hw(screenshot, [], opts)
    return {"task": task, "tool": tool, "query": user_query(task, history),
            "screen_size": [screenshot.width, screenshot.height], "resized_size": [rw, rh], "answer": step.text,
            "tool_call": {"name": step.call.name, "arguments": step.call.arguments}
            if step.call is not None and step.call.ok else None,
            "action": action_dict(step.action) if step.action is not None else None,
            "action_resized": action_dict(to_action(step.call)) if step.action is not None else None,
            "status": "continue" if res.status == "max_steps" else res.status, "error": step.error}
