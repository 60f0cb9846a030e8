"""Constrained JSON decoding: the prefix checker against cases derived by hand from the JSON grammar and the
schema, and the logits processor through the engine (tiny random model: only the constraint makes JSON)."""

from __future__ import annotations

import json

import pytest
import torch

from qwenvl.engine import LLM, SamplingParams
from qwenvl.errors import InputError
from qwenvl.hub import resolve_model
from qwenvl.serve.constrained import JsonConstraint, json_prefix_state
from qwenvl.serve.protocol import validate_schema

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
    return LLM(resolve_model(None, quiet=True), kv_cache_bytes=16 << 20, max_num_seqs=8)


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
