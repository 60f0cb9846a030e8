"""Constrained JSON decoding: the prefix checker against cases derived by hand from the JSON grammar and the
schema, and the logits processor through the engine (tiny random model: only the constraint makes JSON). The same
for forced tool calls (`<tool_call>` "\n" JSON "\n" `</tool_call>`, tags as single tokens or spelled out)."""

from __future__ import annotations

import json

import pytest
import torch

from qwenvl.engine import LLM, SamplingParams
from qwenvl.errors import InputError
from qwenvl.hub import tiny_random_checkpoint
from qwenvl.serve.constrained import JsonConstraint, ToolCallConstraint, json_prefix_state, tool_calls_prefix_state
from qwenvl.serve.protocol import tool_call_schema, validate_schema
from qwenvl.tasks.agent import parse_tool_calls

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "count": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["a", "bc"]}, "maxItems": 2},
                         "score": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
          "required": ["name", "count"], "additionalProperties": False}


@pytest.mark.parametrize("text, state", [
    ("", "partial"), ("  {", "invalid"), ("{  ", "partial"), ('{"na', "partial"), ('{"x', "invalid"), ("[", "invalid"),
    ('{"name": "c', "partial"), ('{"name": "a\\u00', "partial"), ('{"name": "a\\q', "invalid"),
    ('{"name": "a\nb"', "invalid"),  # a raw control character inside a string
    ('{"name": "cat", "count": 3', "partial"), ('{"name": "cat", "count": 3}', "complete"),
    ('{"name": "cat", "count": 3}\n', "complete"), ('{"name": "cat", "count": 3} x', "invalid"),
    ('{"name": "cat", "count": 3.5', "invalid"), ('{"name": "cat", "count": 01', "invalid"),
    ('{"name": "cat", "count": -', "partial"), ('{"name": "cat"}', "invalid"),  # required count missing
    ('{"name": "cat", "name": "d"', "invalid"),  # a key twice
    ('{"name": "cat", "count": 3, "tags": ["b', "partial"), ('{"name": "cat", "count": 3, "tags": ["x', "invalid"),
    ('{"name": "cat", "count": 3, "tags": ["bc", "a"]}', "complete"),
    ('{"name": "cat", "count": 3, "tags": ["bc", "a", ', "invalid"),  # maxItems 2
    ('{"name": "cat", "count": 3, "score": nu', "partial"), ('{"name": "cat", "count": 3, "score": 2.5e', "partial"),
    ('{"name": "cat", "count": 3, "score": 2.5e+1}', "complete"), ('{"name": "cat", "count": 3, "score": true', "invalid"),
    ('{"name": "cat", "count": 3, ', "partial"), ('{"name": "cat", "count": 3, "tags": [], "score": 1, ', "invalid"),
    ("{" + " " * 9, "invalid"),  # whitespace runs are capped
    ('{"na\\u006de"', "invalid"),  # no escapes in the property names of a closed object
])
def test_prefix_states(text, state):
    assert json_prefix_state(text, SCHEMA) == state


def test_scalars_and_json_object():
    assert json_prefix_state("12", {"type": "integer"}) == "complete"  # may also go on: "123"
    assert json_prefix_state("1.", {"type": "number"}) == "partial"
    assert json_prefix_state("tr", {"type": "boolean"}) == "partial"
    assert json_prefix_state('{"a": [1, {"b": null}]}', None) == "complete"
    assert json_prefix_state('"x"', None) == "invalid"  # json_object: an object


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_random_checkpoint(), kv_cache_bytes=16 << 20, max_num_seqs=8)


def test_engine_output_follows_the_schema(llm):
    schema = {"type": "object", "properties": {"animal": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"},
                                                "n": {"type": "integer", "enum": [1, 2, 3]}},
              "required": ["animal", "ok", "n"], "additionalProperties": False}
    proc = JsonConstraint(schema, llm.tokenizer, llm.eos_token_ids)
    params = SamplingParams(max_tokens=150, temperature=1.0, seed=3, n=3, logits_processors=[proc])
    out = llm.generate("Describe a pet as JSON.", params)[0]
    for c in out.outputs:
        assert c.finish_reason == "stop"
        assert validate_schema(json.loads(c.text), schema) == []
    plain = llm.generate("Describe a pet as JSON.", SamplingParams(max_tokens=20, temperature=1.0, seed=3))[0]
    with pytest.raises(ValueError):  # without the constraint the random model writes no JSON
        json.loads(plain.outputs[0].text)


def test_processor_masks_to_valid_tokens(llm):
    proc = JsonConstraint(SCHEMA, llm.tokenizer, llm.eos_token_ids)
    ids = llm.tokenizer.encode('{"name": "cat", "count": 3')
    logits = torch.randn(llm.config.text.vocab_size, generator=torch.Generator().manual_seed(0))
    out = proc(ids, logits)
    allowed = torch.nonzero(out > float("-inf")).flatten().tolist()
    assert allowed and all(json_prefix_state(proc.text_of(ids + [t]), SCHEMA) != "invalid" for t in allowed)
    assert not set(allowed) & set(llm.eos_token_ids)  # not complete yet: no end of answer
    done = llm.tokenizer.encode('{"name": "cat", "count": 3}')
    assert set(llm.eos_token_ids) <= set(torch.nonzero(proc(done, logits) > float("-inf")).flatten().tolist())


def test_bad_processor_is_refused():
    with pytest.raises(InputError, match="logits_processors"):
        SamplingParams(logits_processors=["not callable"]).validate()


# ---------------------------------------------------------------------------------------------- tool calls
CALL = {"type": "object",  # one call of f(x: integer <= 5), as tool_call_schema writes it (without $defs)
        "properties": {"name": {"const": "f"},
                       "arguments": {"type": "object", "properties": {"x": {"type": "integer", "maximum": 5}},
                                     "required": ["x"], "additionalProperties": False}},
        "required": ["name", "arguments"], "additionalProperties": False}
F1 = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


@pytest.mark.parametrize("text, state", [
    ("", "partial"), ("<tool", "partial"), ("<tool_call>", "partial"), ("<tool_call>\n", "partial"),
    ("x", "invalid"), (" <tool_call>", "invalid"), ("\n<tool_call>", "invalid"),  # nothing before the first call
    ("<tool_call> ", "invalid"), ("<tool_call>\n ", "invalid"),  # exactly one "\n", the JSON right after it
    ("<tool_call>\n{", "partial"), ('<tool_call>\n{"name": "g', "invalid"),  # the name is the const "f"
    ('<tool_call>\n{"name": "f"}', "invalid"),  # arguments are required
    ('<tool_call>\n{"name": "f", "arguments": {"x": "1"', "invalid"),
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}', "partial"),  # the closing literal is still to come
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool', "partial"),
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}} ', "invalid"),  # "\n</tool_call>" right after the JSON
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}}', "invalid"),
    (F1, "complete"),
    ('<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call>', "complete"),  # keys in any order
    ('<tool_call>\n{"name": "f", "arguments": {"x": 9}', "partial"),  # maximum: checked on the whole call...
    ('<tool_call>\n{"name": "f", "arguments": {"x": 9}}', "invalid"),  # ...once it is closed
    (F1 + "\n", "partial"), (F1 + "<", "partial"), (F1 + "\n<tool_call>\n{", "partial"),  # another call
    (F1 + F1, "complete"), (F1 + "\n" + F1, "complete"),
    (F1 + "\n\n", "invalid"), (F1 + " ", "invalid"), (F1 + "x", "invalid"), (F1 + "\n" + F1 + "\n\n", "invalid"),
])
def test_tool_call_prefix_states(text, state):
    assert tool_calls_prefix_state(text, CALL) == state


def test_tool_call_prefix_states_with_single_character_tags():
    """ToolCallConstraint's stand-ins for tags that are one token: the spelled-out tags are then invalid."""
    o, c = "\ue000", "\ue001"
    one = o + '\n{"name": "f", "arguments": {"x": 1}}\n' + c
    assert tool_calls_prefix_state(one, CALL, o, c) == "complete"
    assert tool_calls_prefix_state(one + "\n" + o, CALL, o, c) == "partial"
    assert tool_calls_prefix_state(one[:-1], CALL, o, c) == "partial"
    assert tool_calls_prefix_state("<", CALL, o, c) == "invalid"
    assert tool_calls_prefix_state(one[:-1] + "<", CALL, o, c) == "invalid"


def test_tool_call_schema():
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"$ref": "#/$defs/n"}},
                                          "$defs": {"n": {"type": "integer"}}}},
             {"name": "g"}]  # no parameters: any object

    def call(name, i):
        return {"type": "object", "properties": {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/tool{i}"}},
                "required": ["name", "arguments"], "additionalProperties": False}
    defs = {"tool0": {"type": "object", "properties": {"x": {"$ref": "#/$defs/tool0/$defs/n"}},
                      "$defs": {"n": {"type": "integer"}}},
            "tool1": {"type": "object"}}
    assert tool_call_schema(tools, "g") == {**call("g", 1), "$defs": {"tool1": defs["tool1"]}}
    required = tool_call_schema(tools)
    assert required == {"anyOf": [call("f", 0), call("g", 1)], "$defs": defs}
    # the rebased $ref resolves: x must be an integer; g takes any object
    assert tool_calls_prefix_state('<tool_call>\n{"name": "f", "arguments": {"x": "a', required) == "invalid"
    assert tool_calls_prefix_state('<tool_call>\n{"name": "f", "arguments": {"x": 3}}\n</tool_call>', required) == "complete"
    assert tool_calls_prefix_state('<tool_call>\n{"name": "g", "arguments": {"x": "a"}}\n</tool_call>', required) == "complete"
    assert tool_calls_prefix_state('<tool_call>\n{"name": "h"', required) == "invalid"


TIMER = {"name": "set_timer", "parameters": {"type": "object", "properties": {"minutes": {"enum": [1, 5, 10]}},
                                             "required": ["minutes"], "additionalProperties": False}}
NOTE = {"name": "note", "parameters": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                       "required": ["ok"], "additionalProperties": False}}


class _NoTagTokens:
    """The Qwen tokenizer as a vocabulary without <tool_call> / </tool_call> tokens."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def token_to_id(self, token):
        return None if token in ("<tool_call>", "</tool_call>") else self._tok.token_to_id(token)


def test_tool_call_processor_writes_the_tags_as_their_tokens(llm):
    tok, eos = llm.tokenizer, set(llm.eos_token_ids)
    open_id, close_id = tok.token_to_id("<tool_call>"), tok.token_to_id("</tool_call>")
    assert (open_id, close_id) == (151657, 151658)
    proc = ToolCallConstraint(tool_call_schema([TIMER]), tok, llm.eos_token_ids)
    logits = torch.randn(llm.config.text.vocab_size, generator=torch.Generator().manual_seed(0))

    def allowed(text):
        ids = tok.encode(text)
        return set(torch.nonzero(proc(ids, logits) > float("-inf")).flatten().tolist())
    assert allowed("") == {open_id}  # the open tag, as its one token
    after_open = allowed("<tool_call>")
    assert after_open and all(tok.decode([t]).startswith("\n") for t in after_open)
    assert allowed('<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 5}}\n') == {close_id}
    # after a call: the end, or another call (its tag token, or the "\n" between two calls); nothing else
    assert allowed('<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 5}}\n</tool_call>') == \
        eos | {open_id, tok.encode("\n")[0]}
    assert allowed('<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 5}}\n</tool_call>\n') == {open_id}

    spelled = ToolCallConstraint(tool_call_schema([TIMER]), _NoTagTokens(tok), llm.eos_token_ids)
    assert spelled.tag_ids == (None, None)
    first = set(torch.nonzero(spelled([], logits) > float("-inf")).flatten().tolist())
    assert first and open_id not in first and all("<tool_call>\n".startswith(tok.decode([t])) for t in first)


@pytest.mark.parametrize("tags, seed, n", [("tokens", 1, 2), ("spelled", 3, 1)])
def test_engine_output_is_tool_calls(llm, tags, seed, n):
    """The random model writes calls only because of the constraint: one or more, each valid, then the end.
    (Sampled: the seeds are ones whose answers end within max_tokens; others go on writing calls.)"""
    tok = llm.tokenizer if tags == "tokens" else _NoTagTokens(llm.tokenizer)
    proc = ToolCallConstraint(tool_call_schema([TIMER, NOTE]), tok, llm.eos_token_ids)
    params = SamplingParams(max_tokens=250, temperature=1.0, seed=seed, n=n, logits_processors=[proc])
    for c in llm.generate("Set a timer.", params)[0].outputs:
        assert c.finish_reason == "stop" and c.text.startswith("<tool_call>\n{") and c.text.endswith("}\n</tool_call>")
        calls = parse_tool_calls(c.text)
        assert calls and all(k.ok for k in calls) and c.text.count("<tool_call>") == len(calls)
        for k in calls:
            assert (k.name, sorted(k.arguments)) in [("set_timer", ["minutes"]), ("note", ["ok"])]
            assert k.arguments.get("minutes", 1) in (1, 5, 10) and isinstance(k.arguments.get("ok", True), bool)
        n_open = c.token_ids.count(151657)
        assert n_open == (len(calls) if tags == "tokens" else 0)  # spelled out: ordinary tokens only
    plain = llm.generate("Set a timer.", SamplingParams(max_tokens=20, temperature=1.0, seed=1))[0]
    assert "<tool_call>" not in plain.outputs[0].text
