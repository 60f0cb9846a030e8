"""Text-only conversations for stage 0 of the nano recipe (docs/NANO.md §4): the LLM learns, without images, to
copy what the prompt names and to write the answer formats of the vision tasks.

The nano model at 112 M tokens (NANO.md §7) wrote well-formed answers but often failed to copy the prompt's words
into them ("the pink star right of the black diamond" came back as "... left of ..."): a skill that text alone can
teach, at a fraction of an image sample's cost. Each record is one user turn and one assistant turn, drawn from:

- copy:     "Repeat exactly: <phrase>"                           -> the phrase (a referring expression or words)
- box_json: "Write the box of the <label> as JSON: x1=.., ..."   -> the grounding answer, exactly as
                                                                   synth.grounding writes it
- span:     "Write the span from <a> to <b> seconds ..."          -> "The given query happens in a - b seconds."
- quote:    <0-20 sentences> "Repeat exactly the quoted words: '<words>'." <0-6 sentences> -> the words
- type:     <0-20 sentences> "The user query: Type '<words>' into the <F> field." -> the GUI typing tool call
            (synth.gui's answer without the screenshot)

The last two were added when run 18a (NANO.md §7) copied in the "Repeat exactly" format it was taught but not once
other text stood around the words (0 of 12 after 20 filler sentences) and never typed the words a GUI instruction
quotes (0 of 17): copying from anywhere in the prompt, not from its end.

Deterministic per (seed, split, index) like every synth task; not in synth.TASKS (the vocabulary's corpus), so the
pruned vocabulary is unchanged.
"""
from __future__ import annotations

import json

from .common import COLORS, Ctx, sentence, words
from .grounding import RELATIONS, SHAPES, SIZES

KINDS = ("copy", "copy", "box_json", "span", "quote", "quote", "type", "type")
FIELDS = ("Name", "Email", "Password", "Username", "Phone", "City", "Address", "Title", "Comment", "Code")


def _phrase(ctx: Ctx) -> str:
    rng = ctx.rng
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    form = rng.randrange(4)
    if form == 0:
        return f"{color} {shape}"
    if form == 1:
        return f"{rng.choice(list(SIZES))} {color} {shape}"
    if form == 2:
        return f"{color} {shape} {rng.choice(RELATIONS)} the {rng.choice(list(COLORS))} {rng.choice(SHAPES)}"
    return words(rng, rng.randint(2, 8))


def gen_text(ctx: Ctx) -> dict:
    rng = ctx.rng
    kind = rng.choice(KINDS)
    if kind == "copy":
        phrase = _phrase(ctx)
        prompt, answer, meta = f"Repeat exactly: {phrase}", phrase, {"phrase": phrase}
    elif kind == "box_json":
        label = _phrase(ctx)
        x1, y1 = rng.randrange(0, 400), rng.randrange(0, 400)
        box = [x1, y1, x1 + rng.randrange(8, 120), y1 + rng.randrange(8, 120)]
        prompt = (f"Write the box of the {label} as JSON: x1={box[0]}, y1={box[1]}, x2={box[2]}, y2={box[3]}.")
        answer = "```json\n" + json.dumps([{"bbox_2d": box, "label": label}]) + "\n```"
        meta = {"label": label, "box": box}
    elif kind in ("quote", "type"):
        text = words(rng, rng.randint(1, 4))
        n_before = rng.choice((0, rng.randint(1, 20)))
        before = " ".join(sentence(rng) for _ in range(n_before))
        if kind == "quote":
            after = " ".join(sentence(rng) for _ in range(rng.randint(0, 6)))
            prompt = " ".join(x for x in (before, f"Repeat exactly the quoted words: '{text}'.", after) if x)
            answer = text
        else:
            prompt = " ".join(x for x in (before, f"The user query: Type '{text}' into the {rng.choice(FIELDS)} field.")
                              if x)
            answer = ("<tool_call>\n" + json.dumps({"name": "computer_use", "arguments": {"action": "type", "text": text}})
                      + "\n</tool_call>")
        meta = {"phrase": text, "filler_sentences": n_before}
    else:
        a = rng.randrange(0, 60) / 2
        b = a + rng.randrange(3, 30) / 2
        prompt = f"Write the span from {a:.1f} to {b:.1f} seconds as the answer to a video grounding query."
        answer, meta = f"The given query happens in {a:.1f} - {b:.1f} seconds.", {"span": [a, b]}
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "meta": {"kind": kind, **meta}}
