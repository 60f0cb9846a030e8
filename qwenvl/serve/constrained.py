"""Constrained decoding for `response_format` (json_object / json_schema): a logits processor that only lets
through tokens keeping the answer a valid prefix of a JSON document that follows the schema.

`json_prefix_state(text, schema)` parses a prefix by recursive descent against the schema and says whether it
is 'invalid', 'partial' (can still become a valid document) or 'complete' (a valid document now). Enforced while
generating: type, properties / required / additionalProperties (keys are matched as they are typed), items,
minItems / maxItems, enum / const, anyOf / oneOf, $ref to #/$defs or #/definitions, integer vs number. Checked
only once the value is complete (serve.protocol.validate_schema runs on the whole answer): minimum / maximum,
minLength / maxLength, allOf; `pattern` and `format` are not enforced.

`tool_calls_prefix_state(text, schema)` does the same for forced tool calls (`tool_choice` "required" or a named
function): one or more blocks `<tool_call>` "\n" JSON "\n" `</tool_call>` (the Qwen2.5 function-calling format),
each JSON following the call schema, an optional "\n" between blocks, nothing after the last.

`JsonConstraint` is the processor: at each step it tries candidate tokens in the order of their logits and
keeps the first `keep` that extend the text validly (with temperature > 0 the sample is among those, a top-k
of valid tokens); the end-of-sequence tokens are allowed only when the document is complete. Whitespace runs
are capped so a model cannot stall in indentation, and property names of closed objects take no escapes.
`ToolCallConstraint` is the same processor over the tool-call grammar; where the vocabulary has `<tool_call>` /
`</tool_call>` as single tokens those tokens (and only they) write the tags, else the tags are spelled out.
"""

from __future__ import annotations

import functools
import json

import torch

from .protocol import validate_schema

MAX_WHITESPACE = 8  # consecutive whitespace characters allowed between tokens (none before the document)


class _Partial(Exception):
    """The input ended inside a value that can still be completed."""


class _Invalid(Exception):
    pass


@functools.lru_cache(maxsize=256)
def _spellings_of(key: str) -> frozenset[str]:
    options = json.loads(key)
    return frozenset({json.dumps(o, ensure_ascii=False) for o in options} | {json.dumps(o) for o in options} |
                     {json.dumps(o, ensure_ascii=False, separators=(",", ":")) for o in options})


def _spellings(options: list) -> frozenset[str]:
    """How an enum / const value may be written: compact or with spaces, escaped or not."""
    return _spellings_of(json.dumps(options, sort_keys=True))


class _Parser:
    def __init__(self, text: str, root: dict):
        self.s, self.i, self.n, self.root = text, 0, len(text), root

    # ---------------------------------------------------------------------------------------- characters
    def peek(self) -> str:
        if self.i >= self.n:
            raise _Partial
        return self.s[self.i]

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise _Invalid
        self.i += 1

    def ws(self) -> None:
        start = self.i
        while self.i < self.n and self.s[self.i] in " \t\n\r":
            self.i += 1
        if self.i - start > MAX_WHITESPACE:
            raise _Invalid

    def literal(self, word: str) -> None:
        for ch in word:
            self.expect(ch)

    # ---------------------------------------------------------------------------------------- schema
    def resolve(self, s):
        seen = 0
        while isinstance(s, dict) and "$ref" in s and seen < 32:
            target = self.root
            ref = s["$ref"]
            for part in ref.lstrip("#/").split("/") if ref.startswith("#") else []:
                target = target.get(part, {}) if isinstance(target, dict) else {}
            s, seen = target, seen + 1
        return s if isinstance(s, dict) else {}

    def value(self, schema) -> None:
        s = self.resolve(schema)
        alts = s.get("anyOf") or s.get("oneOf")
        if alts:
            self.alternatives([{**{k: v for k, v in s.items() if k not in ("anyOf", "oneOf")}, **self.resolve(a)}
                               for a in alts])
            return
        start = self.i
        if "const" in s or "enum" in s:
            options = [s["const"]] if "const" in s else list(s["enum"])
            self.one_of_values(options)
            return
        t = s.get("type")
        types = set(t if isinstance(t, list) else [t] if t else
                    ["object", "array", "string", "number", "boolean", "null"])
        ch = self.peek()
        if ch == "{" and "object" in types:
            self.object(s)
        elif ch == "[" and "array" in types:
            self.array(s)
        elif ch == '"' and "string" in types:
            self.string()
        elif (ch == "-" or ch.isdigit()) and types & {"number", "integer"}:
            self.number(integer="number" not in types)
        elif ch in "tf" and "boolean" in types:
            self.literal("true" if ch == "t" else "false")
        elif ch == "n" and "null" in types:
            self.literal("null")
        else:
            raise _Invalid

    def alternatives(self, schemas: list[dict]) -> None:
        """Valid if any alternative is; the parser continues from the furthest complete one."""
        partial, ends = False, []
        for sub in schemas:
            p = _Parser(self.s, self.root)
            p.i = self.i
            try:
                p.value(sub)
                ends.append(p.i)
            except _Partial:
                partial = True
            except _Invalid:
                pass
        if ends:
            # a complete alternative ending later wins; the text after it is parsed by the caller
            self.i = max(ends)
            return
        if partial:
            raise _Partial
        raise _Invalid

    def one_of_values(self, options: list) -> None:
        """enum / const: the text so far must be a prefix of one option's JSON (compact or with spaces)."""
        rest = self.s[self.i:]
        spellings = _spellings(options)
        best = None
        for sp in spellings:
            if rest.startswith(sp):
                best = max(best or 0, len(sp))
        if best is not None:
            self.i += best
            return
        if any(sp.startswith(rest) for sp in spellings):
            raise _Partial
        raise _Invalid

    def object(self, s: dict) -> None:
        props = s.get("properties") or {}
        extra = s.get("additionalProperties", True)
        required = set(s.get("required") or [])
        self.expect("{")
        self.ws()
        seen: set[str] = set()
        if self.peek() == "}":
            if required:
                raise _Invalid
            self.i += 1
            return
        while True:
            key = self.key(props, extra is False, seen)
            seen.add(key)
            self.ws()
            self.expect(":")
            self.ws()
            sub = props[key] if key in props else (extra if isinstance(extra, dict) else {})
            self.value(sub)
            self.ws()
            ch = self.peek()
            if ch == ",":
                self.i += 1
                self.ws()
                if extra is False and not set(props) - seen:
                    raise _Invalid  # no key left to write
                continue
            if ch == "}":
                if required - seen:
                    raise _Invalid
                self.i += 1
                return
            raise _Invalid

    def key(self, props: dict, closed: bool, seen: set[str]) -> str:
        """An object key; with additionalProperties false it must be (a prefix of) an unused property name."""
        if self.peek() != '"':
            raise _Invalid
        start = self.i
        try:
            text = self.string()
        except _Partial:
            if closed:
                typed = self.s[start + 1:]  # property names are matched as typed: no escapes in them
                if "\\" in typed or not any(k.startswith(typed) for k in props if k not in seen):
                    raise _Invalid from None
            raise
        if closed and "\\" in self.s[start:self.i]:
            raise _Invalid
        if text in seen or (closed and text not in props):
            raise _Invalid
        return text

    def string(self) -> str:
        self.expect('"')
        start = self.i
        while True:
            ch = self.peek()
            if ch == '"':
                self.i += 1
                return json.loads(self.s[start - 1:self.i])
            if ch == "\\":
                self.i += 1
                esc = self.peek()
                if esc == "u":
                    for _ in range(4):
                        self.i += 1
                        if self.peek() not in "0123456789abcdefABCDEF":
                            raise _Invalid
                elif esc not in '"\\/bfnrt':
                    raise _Invalid
                self.i += 1
            elif ord(ch) < 0x20:
                raise _Invalid
            else:
                self.i += 1

    def number(self, integer: bool) -> None:
        # JSON grammar: -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?; the end of input inside a
        # number is a partial value (more digits may follow), told apart from "complete" by the caller.
        if self.peek() == "-":
            self.i += 1
        ch = self.peek()
        if ch == "0":
            self.i += 1
        elif ch.isdigit():
            while self.i < self.n and self.s[self.i].isdigit():
                self.i += 1
        else:
            raise _Invalid
        if self.i >= self.n:
            raise _Partial
        if self.s[self.i] == "." and not integer:
            self.i += 1
            if not self.peek().isdigit():
                raise _Invalid
            while self.i < self.n and self.s[self.i].isdigit():
                self.i += 1
        if self.i < self.n and self.s[self.i] in "eE" and not integer:
            self.i += 1
            if self.peek() in "+-":
                self.i += 1
            if not self.peek().isdigit():
                raise _Invalid
            while self.i < self.n and self.s[self.i].isdigit():
                self.i += 1
        if self.i >= self.n:
            raise _Partial

    def array(self, s: dict) -> None:
        items = s.get("items") or {}
        lo, hi = s.get("minItems", 0), s.get("maxItems", float("inf"))
        self.expect("[")
        self.ws()
        if self.peek() == "]":
            if lo > 0:
                raise _Invalid
            self.i += 1
            return
        count = 0
        while True:
            if count >= hi:
                raise _Invalid
            self.value(items)
            count += 1
            self.ws()
            ch = self.peek()
            if ch == ",":
                self.i += 1
                self.ws()
                continue
            if ch == "]":
                if count < lo:
                    raise _Invalid
                self.i += 1
                return
            raise _Invalid


def json_prefix_state(text: str, schema: dict | None) -> str:
    """'invalid', 'partial' or 'complete' for `text` as the start of a JSON answer following `schema`
    (None or {}: any JSON object, as response_format json_object)."""
    schema = schema if schema else {"type": "object"}
    p = _Parser(text, schema)
    try:
        p.value(schema)
        p.ws()
        if p.i != p.n:
            return "invalid"
    except _Invalid:
        return "invalid"
    except _Partial:
        return "complete" if _complete(text, schema) else "partial"
    return "complete" if _complete(text, schema) else "invalid"


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def tool_calls_prefix_state(text: str, schema: dict, open_tag: str = TOOL_CALL_OPEN,
                            close_tag: str = TOOL_CALL_CLOSE) -> str:
    """'invalid', 'partial' or 'complete' for `text` as the start of one or more tool calls
    `open_tag` "\n" JSON(schema) "\n" `close_tag`, with at most one "\n" between two calls; complete right after
    a closing tag. (ToolCallConstraint passes one-character stand-ins for the tags that are single tokens.)"""
    p = _Parser(text, schema)
    try:
        while True:
            p.literal(open_tag + "\n")
            start = p.i
            p.value(schema)
            if not _complete(text[start:p.i], schema):
                return "invalid"  # closed, yet breaks a bound checked only on whole values (maximum, ...)
            p.literal("\n" + close_tag)
            if p.i == p.n:
                return "complete"
            if p.s[p.i] == "\n":
                p.i += 1
    except _Invalid:
        return "invalid"
    except _Partial:
        return "partial"


def _complete(text: str, schema: dict) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return not validate_schema(value, schema)


def token_pieces(tokenizer) -> list[str | None]:
    """The text of every token id on its own (None for special tokens and for byte pieces of a multi-byte
    character, which cannot be checked alone); cached on the tokenizer."""
    pieces = getattr(tokenizer, "_constrained_pieces", None)
    if pieces is None:
        special = getattr(tokenizer, "special_ids", set())
        pieces = []
        for i in range(tokenizer.vocab_size):
            if i in special:
                pieces.append(None)
                continue
            piece = tokenizer.decode([i])
            pieces.append(piece if piece and "\ufffd" not in piece else None)
        tokenizer._constrained_pieces = pieces
    return pieces


def tokens_by_first_char(tokenizer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({first character: token ids}, ids of all tokens starting with a non-ASCII character); cached."""
    cached = getattr(tokenizer, "_constrained_first", None)
    if cached is None:
        groups: dict[str, list[int]] = {}
        other: list[int] = []
        for t, piece in enumerate(token_pieces(tokenizer)):
            if piece is not None:
                groups.setdefault(piece[0], []).append(t)
                if ord(piece[0]) > 127:
                    other.append(t)
        cached = ({c: torch.tensor(ids) for c, ids in groups.items()}, torch.tensor(other))
        tokenizer._constrained_first = cached
    return cached


def _schema_chars(schema) -> set[str]:
    """Every non-ASCII character of the schema's strings (enum / const values, property names): outside a free
    string these are the only non-ASCII characters that can be valid."""
    out: set[str] = set()

    def walk(x):
        if isinstance(x, str):
            out.update(ch for ch in x if ord(ch) > 127)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k), walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(schema)
    return out


_ASCII = [chr(c) for c in range(32, 127)] + ["\t", "\n", "\r"]
_FREE_STRING_PROBE = "\u00e9"  # any non-control character is valid inside a free string


class JsonConstraint:
    """A logits processor `(output_token_ids, logits [V]) -> logits` for one JSON schema (see module doc).
    Stateless between calls (the text is rebuilt from the token ids), so one instance serves n > 1 samples.

    Each step first finds the characters that may come next (a probe of each ASCII character, of the schema's
    own non-ASCII characters and of one free-string character); only tokens starting with one of them are
    checked whole, in the order of their logits."""

    def __init__(self, schema: dict | None, tokenizer, eos_token_ids, keep: int = 8):
        self.schema = schema
        self.pieces = token_pieces(tokenizer)
        self.by_first, self.non_ascii = tokens_by_first_char(tokenizer)
        self.eos = sorted(int(t) for t in eos_token_ids)
        self.keep = keep
        self.schema_chars = sorted(_schema_chars(schema or {}))

    def state(self, text: str) -> str:
        return json_prefix_state(text, self.schema)

    def text_of(self, token_ids: list[int]) -> str:
        return "".join(self.pieces[t] or "" for t in token_ids if t < len(self.pieces))

    def allowed(self, token_ids: list[int], logits: torch.Tensor) -> list[int]:
        """Up to `keep` token ids, best first, that keep the answer valid (the eos ids once it is complete)."""
        text = self.text_of(token_ids)
        ok = list(self.eos) if self.state(text) == "complete" else []
        first = {c for c in _ASCII + self.schema_chars if self.state(text + c) != "invalid"}
        free_string = self.state(text + _FREE_STRING_PROBE) != "invalid"

        # `first` holds ASCII and schema characters; in a free string every non-ASCII character may follow
        groups = [self.by_first[c] for c in first if c in self.by_first and not (free_string and ord(c) > 127)]
        if free_string:
            groups.append(self.non_ascii)
        if not groups:
            return ok or list(self.eos)
        cand = torch.cat(groups)
        cand = cand[cand < logits.numel()]
        order = cand[torch.argsort(logits[cand.to(logits.device)].float().cpu(), descending=True)].tolist()
        memo: dict[str, bool] = {c: True for c in first}  # prefix of a piece -> whether text + it is valid

        def valid(piece: str | None) -> bool:
            if piece is None:  # a token this constraint never writes
                return False
            for k in range(2, len(piece) + 1):  # shortest prefix first: most pieces fail early, shared
                head = piece[:k]
                r = memo.get(head)
                if r is None:
                    r = memo[head] = self.state(text + head) != "invalid"
                if not r:
                    return False
            return True

        done = 0
        for t in order:
            piece = self.pieces[t]
            if valid(piece):
                ok.append(t)
                done += 1
                if done >= self.keep:
                    break
        return ok or list(self.eos)  # nothing can extend it: end the answer (the check after will say why)

    def __call__(self, token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        keep = torch.tensor(self.allowed(token_ids, logits), dtype=torch.long, device=logits.device)
        out = torch.full_like(logits, float("-inf"))
        out[keep] = logits[keep]
        return out


_TAG_STANDINS = ("\ue000", "\ue001")  # private-use characters standing for the single-token tags


def _tag_pieces(tokenizer, tag_ids: tuple) -> list[str | None]:
    """token_pieces with each single-token tag (id, or None where spelled out) as its stand-in character, and no
    other piece holding a stand-in; cached on the tokenizer."""
    cached = getattr(tokenizer, "_constrained_tag_pieces", None)
    if cached is None or cached[0] != tag_ids:
        a, b = _TAG_STANDINS
        pieces = [None if p is not None and (a in p or b in p) else p for p in token_pieces(tokenizer)]
        for t, c in zip(tag_ids, _TAG_STANDINS):
            if t is not None:
                pieces[t] = c
        cached = tokenizer._constrained_tag_pieces = (tag_ids, pieces)
    return cached[1]


class ToolCallConstraint(JsonConstraint):
    """The JsonConstraint processor over forced tool calls (tool_calls_prefix_state): `schema` is the JSON schema
    of one call's {"name": ..., "arguments": ...} (serve.protocol.tool_call_schema). A tag that is one token in the
    vocabulary (`Tokenizer.token_to_id("<tool_call>")`, 151657 / 151658 in Qwen's) is written only as that token;
    a tag the vocabulary lacks is spelled out in ordinary tokens."""

    def __init__(self, schema: dict, tokenizer, eos_token_ids, keep: int = 8):
        super().__init__(schema, tokenizer, eos_token_ids, keep)
        ids = tuple(_tag_id(tokenizer, tag) for tag in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE))
        self.tag_ids = ids
        self.tags = tuple(c if t is not None else tag
                          for t, c, tag in zip(ids, _TAG_STANDINS, (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)))
        if any(t is not None for t in ids):
            self.pieces = _tag_pieces(tokenizer, ids)
            self.by_first = {**self.by_first, **{c: torch.tensor([t]) for t, c in zip(ids, _TAG_STANDINS)
                                                  if t is not None}}
            self.schema_chars = sorted(set(self.schema_chars) | {c for t, c in zip(ids, _TAG_STANDINS)
                                                                  if t is not None})

    def state(self, text: str) -> str:
        return tool_calls_prefix_state(text, self.schema, *self.tags)


def _tag_id(tokenizer, tag: str) -> int | None:
    """The id of `tag` where it is one added token (which token_pieces leaves out), else None: spelled out (an
    ordinary token that happens to spell the whole tag is then one way to spell it)."""
    t = tokenizer.token_to_id(tag) if hasattr(tokenizer, "token_to_id") else None
    ok = isinstance(t, int) and 0 <= t < tokenizer.vocab_size and token_pieces(tokenizer)[t] is None
    return t if ok else None
