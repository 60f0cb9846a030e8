"""Lenient JSON extraction from model text.

Model answers wrap JSON in ```json fences and prose, use Python-style single quotes and trailing
commas (the OCR cookbook's own recorded output has `"text_content": "...",}`), and get cut off at
max_tokens. `loads_lenient` repairs what can be repaired; `find_objects` recovers every complete
`{...}` object from whatever is left, so a truncated list still yields its finished elements.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)(?:```|$)", re.S)
_WORD = re.compile(r"[A-Za-z_]+")
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}


def strip_fences(text: str) -> str:
    """The contents of every ``` fenced block joined by newlines (the text itself when there is none);
    an unclosed fence (truncated output) runs to the end of the text."""
    if "```" not in text:
        return text
    return "\n".join(m.group(1) for m in _FENCE.finditer(text))


def _normalise(src: str) -> str:
    """Rewrite JSON-ish text into strict JSON: single-quoted strings become double-quoted, trailing
    commas before } or ] go, Python True/False/None become true/false/null. Only acts outside strings."""
    out: list[str] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c in "\"'":
            # copy one string, re-quoted with ", escaping any bare " inside a '-string
            j, buf = i + 1, []
            while j < n and src[j] != c:
                if src[j] == "\\" and j + 1 < n:
                    # \' is not a JSON escape; the quote itself is enough inside "..."
                    buf.append("'" if src[j + 1] == "'" else src[j:j + 2])
                    j += 2
                    continue
                buf.append('\\"' if (src[j] == '"' and c == "'") else src[j])
                j += 1
            out.append('"' + "".join(buf) + '"')
            i = j + 1
        elif c == ",":
            k = i + 1
            while k < n and src[k] in " \t\r\n":
                k += 1
            if k < n and src[k] in "}]":
                i += 1  # trailing comma: drop it
                continue
            out.append(c)
            i += 1
        elif c.isalpha():
            m = _WORD.match(src, i)
            word = m.group(0) if m else c
            out.append(_PY_LITERALS.get(word, word))
            i += len(word)
        else:
            out.append(c)
            i += 1
    return "".join(out)


def loads_lenient(src: str) -> Any:
    """json.loads, then again after `_normalise`; None when both fail (never raises)."""
    for candidate in (src, _normalise(src)):
        try:
            return json.loads(candidate)
        except (ValueError, RecursionError):
            continue
    return None


def _bracket_spans(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, opener) of every balanced {...} / [...] span, innermost first as they close.
    Quotes only count inside brackets so an apostrophe in prose ("Here's") does not open a string."""
    stack: list[tuple[str, int]] = []
    quote = None
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'" and stack:
            quote = c
        elif c in "{[":
            stack.append((c, i))
        elif c in "}]":
            want = "{" if c == "}" else "["
            # a stray closer (prose, mismatch) pops only if something matching is open
            if any(o == want for o, _ in stack):
                while stack:
                    opener, start = stack.pop()
                    if opener == want:
                        yield start, i + 1, opener
                        break
        i += 1


def find_objects(text: str) -> list[dict]:
    """Every complete JSON object in `text`, outermost first: a list of objects, one object, objects
    one per line, or a truncated list (its finished elements). An object that fails to parse is
    replaced by the complete objects nested inside it."""
    body = strip_fences(text)
    spans = sorted((s, e) for s, e, o in _bracket_spans(body) if o == "{")
    found: list[dict] = []
    covered_until = -1
    for start, end in spans:
        if start < covered_until:
            continue  # nested inside an object already taken whole
        value = loads_lenient(body[start:end])
        if isinstance(value, dict):
            found.append(value)
            covered_until = end
    return found


def find_value(text: str) -> Any:
    """The first (outermost) complete JSON value, object or array; None when there is none."""
    body = strip_fences(text)
    whole = loads_lenient(body.strip())
    if whole is not None and isinstance(whole, (dict, list)):
        return whole
    spans = sorted(((s, -e) for s, e, _ in _bracket_spans(body)))
    for start, neg_end in spans:
        value = loads_lenient(body[start:-neg_end])
        if isinstance(value, (dict, list)):
            return value
    return None


def walk_dicts(value: Any) -> Iterator[dict]:
    """Every dict inside a parsed JSON value, depth-first, outer before inner."""
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from walk_dicts(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk_dicts(v)
