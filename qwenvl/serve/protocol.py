"""OpenAI chat-completions requests -> (messages, SamplingParams, options); results -> response JSON.

Errors are `APIError`s carrying the HTTP status and the OpenAI error body fields (message, type, param, code).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..tasks._json import strip_fences


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> APIError:
    return APIError(status, message, "invalid_request_error", param, code)


@dataclass
class ChatRequest:
    messages: list[dict]
    params: Any  # SamplingParams
    stream: bool = False
    include_usage: bool = False
    tools: list[dict] = field(default_factory=list)  # the "function" dicts
    parse_tools: bool = False
    response_format: dict | None = None
    top_logprobs: int | None = None  # None: no logprobs in the response
    tool_schema: dict | None = None  # tool_choice "required" / a named function: the schema of one call


_SAMPLING = {  # OpenAI name -> (SamplingParams name, type check, description)
    "temperature": ("temperature", lambda v: _num(v) and 0 <= v <= 2, "a number in [0, 2]"),
    "top_p": ("top_p", lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "presence_penalty": ("presence_penalty", lambda v: _num(v) and -2 <= v <= 2, "a number in [-2, 2]"),
    "frequency_penalty": ("frequency_penalty", lambda v: _num(v) and -2 <= v <= 2, "a number in [-2, 2]"),
    "seed": ("seed", lambda v: _int(v), "an integer"),
    "n": ("n", lambda v: _int(v) and 1 <= v <= 16, "an integer in [1, 16]"),
    # extensions (as vLLM)
    "top_k": ("top_k", lambda v: _int(v) and v >= -1, "an integer >= -1"),
    "min_p": ("min_p", lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": ("repetition_penalty", lambda v: _num(v) and 0 < v <= 10, "a number in (0, 10]"),
    "ignore_eos": ("ignore_eos", lambda v: isinstance(v, bool), "a boolean"),
    "skip_special_tokens": ("skip_special_tokens", lambda v: isinstance(v, bool), "a boolean"),
}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_request(body: Any, served: list[str], max_model_len: int, default_max_tokens: int) -> ChatRequest:
    from ..chat import normalize_messages
    from ..engine import SamplingParams

    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("'model' is required (a string)", "model")
    if model not in served:
        raise APIError(404, f"The model '{model}' does not exist (served: {', '.join(served)})",
                       "invalid_request_error", "model", "model_not_found")
    if "messages" not in body:
        raise bad("'messages' is required", "messages")
    raw = body["messages"]
    if isinstance(raw, list):  # OpenAI's newer "developer" role is the system prompt
        raw = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in raw]
    try:
        messages = normalize_messages(raw)
    except InputError as e:
        raise bad(str(e), "messages") from None

    kw: dict[str, Any] = {}
    for name, (target, ok, what) in _SAMPLING.items():
        if body.get(name) is not None:
            if not ok(body[name]):
                raise bad(f"'{name}' must be {what}, got {body[name]!r}", name)
            kw[target] = body[name]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and not (_int(max_tokens) and max_tokens >= 1):
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise bad(f"'{name}' must be an integer >= 1, got {max_tokens!r}", name)
    kw["max_tokens"] = min(max_tokens or default_max_tokens, max_model_len)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise bad("'stop' must be a non-empty string or a list of at most 4 of them", "stop")
        kw["stop"] = stops
    if body.get("logit_bias"):
        raise bad("'logit_bias' is not supported by this server", "logit_bias", "unsupported_parameter")

    top_logprobs = None
    if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
        raise bad("'logprobs' must be a boolean", "logprobs")
    if body.get("top_logprobs") is not None:
        if not body.get("logprobs"):
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if not (_int(body["top_logprobs"]) and 0 <= body["top_logprobs"] <= 20):
            raise bad("'top_logprobs' must be an integer in [0, 20]", "top_logprobs")
    if body.get("logprobs"):
        top_logprobs = body.get("top_logprobs") or 0
        kw["logprobs"] = top_logprobs

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")

    tools = _parse_tools(body)
    use_tools, tool_schema = _parse_tool_choice(body.get("tool_choice"), tools)
    response_format = _parse_response_format(body.get("response_format"))
    if tool_schema is not None:
        response_format = None  # the forced tool calls are the answer (as vLLM: the tool's schema wins)

    if use_tools or (response_format and response_format["type"] == "json_schema"):
        messages = _with_system_text(messages, tools if use_tools else [], response_format)
    try:
        params = SamplingParams(**kw)
    except InputError as e:
        m = re.search(r"SamplingParams\.(\w+)", str(e))
        raise bad(str(e), m.group(1) if m else None) from None
    return ChatRequest(messages, params, stream, bool(opts.get("include_usage")), tools, use_tools,
                       response_format, top_logprobs, tool_schema)


def _parse_tools(body: dict) -> list[dict]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad("'tools' must be a list", "tools")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                      f"tools[{i}]")
        out.append(fn)
    return out


def _parse_tool_choice(choice, tools: list[dict]) -> tuple[bool, dict | None]:
    """(whether the tools are advertised and the answer parsed for calls, the schema of one call where
    tool_choice forces calls: "required" -> any of the tools, {"type": "function", "function": {"name": X}} -> X).
    'auto' (the default with tools) and 'none' leave the answer free."""
    if choice is None:
        choice = "auto" if tools else "none"
    if choice in ("auto", "none"):
        return bool(tools) and choice == "auto", None
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if choice != "required" and not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
        raise bad("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                  "{'name': ...}}", "tool_choice")
    if not tools:
        raise bad("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified",
                  "tool_choice")
    name = None if choice == "required" else fn["name"]
    if name is not None and name not in {t["name"] for t in tools}:
        raise bad(f"Invalid value for 'tool_choice': no function named {name!r} in 'tools' (given: "
                  f"{', '.join(repr(t['name']) for t in tools)})", "tool_choice", "invalid_value")
    return True, tool_call_schema(tools, name)


def tool_call_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON schema of one call's body {"name": ..., "arguments": ...}: the function `name`'s, else anyOf over
    all the tools. Each tool's parameters (any object where it has none) move to #/$defs/tool<i>, their local
    $refs rebased there, so that they resolve from this root."""
    defs, alts = {}, []
    for i, fn in enumerate(tools):
        if name is not None and fn["name"] != name:
            continue
        key = f"tool{i}"
        params = fn.get("parameters")
        defs[key] = _rebase_refs(params if isinstance(params, dict) and params else {"type": "object"},
                                 f"#/$defs/{key}")
        alts.append({"type": "object", "properties": {"name": {"const": fn["name"]},
                                                      "arguments": {"$ref": f"#/$defs/{key}"}},
                     "required": ["name", "arguments"], "additionalProperties": False})
    return {**(alts[0] if len(alts) == 1 else {"anyOf": alts}), "$defs": defs}


def _rebase_refs(x, base: str):
    """`x` with each "$ref": "#..." pointing below `base` ("#/$defs/a" -> base + "/$defs/a")."""
    if isinstance(x, dict):
        return {k: (base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else
                    _rebase_refs(v, base)) for k, v in x.items()}
    if isinstance(x, list):
        return [_rebase_refs(v, base) for v in x]
    return x


def _parse_response_format(rf) -> dict | None:
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise bad("'response_format.json_schema' must be {'name': ..., 'schema': {...}}", "response_format")
        return {"type": "json_schema", "schema": js.get("schema", {}), "name": js.get("name", "")}
    return {"type": "json_object"}


def _with_system_text(messages: list[dict], tools: list[dict], response_format: dict | None) -> list[dict]:
    """Put the tools block (Qwen-Agent format) and/or the JSON schema instruction in the system message."""
    from ..chat import DEFAULT_SYSTEM_PROMPT
    from ..tasks.agent import tools_system_prompt

    if messages[0]["role"] == "system":
        system = "".join(it.get("text", "") for it in messages[0]["content"] if it["type"] == "text")
        rest = messages[1:]
    else:
        system, rest = DEFAULT_SYSTEM_PROMPT, messages
    if response_format and response_format["type"] == "json_schema":
        system += ("\n\nAnswer with a single JSON value that follows this JSON schema, and nothing else:\n"
                   + json.dumps(response_format["schema"], ensure_ascii=False))
    if tools:
        system = tools_system_prompt(tools, system)
    return [{"role": "system", "content": [{"type": "text", "text": system}]}] + rest


# ---------------------------------------------------------------------------------------------- outputs
def split_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content before the first <tool_call>, OpenAI tool_calls) of an answer; ([text], []) without calls."""
    from ..tasks.agent import parse_tool_calls

    if "<tool_call>" not in text:
        return text, []
    calls = []
    for c in parse_tool_calls(text):
        if not c.ok:
            continue
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}})
    if not calls:
        return text, []
    content = text.split("<tool_call>")[0].strip()
    return content or None, calls


def check_json(text: str, response_format: dict) -> str:
    """The JSON document of an answer (fences stripped), validated; raises APIError(500, model_error)."""
    doc = strip_fences(text).strip()
    try:
        value = json.loads(doc)
    except ValueError as e:
        raise _invalid(f"the answer is not valid JSON ({e}): {text[:200]!r}") from None
    if response_format["type"] == "json_object" and not isinstance(value, dict):
        raise _invalid(f"the answer is JSON but not an object: {doc[:200]!r}")
    if response_format["type"] == "json_schema":
        errors = validate_schema(value, response_format["schema"])
        if errors:
            raise _invalid(f"the answer does not follow the schema: {'; '.join(errors[:5])}")
    return doc


def _invalid(why: str, param: str = "response_format") -> APIError:
    return APIError(500, "The model produced invalid content: " + why + f". The engine constrains the answer "
                    f"to the {param} while generating, so it was most likely cut short (max_tokens or "
                    "the context length): retry with a larger max_tokens, or adjust the prompt.", "model_error",
                    param, "invalid_model_output")


def no_tool_call(text: str) -> APIError:
    """tool_choice forced calls, yet the answer holds no complete one (cut short)."""
    return _invalid(f"no complete tool call in the answer: {text[:200]!r}", "tool_choice")


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def validate_schema(value: Any, schema: dict, path: str = "$") -> list[str]:
    """A JSON Schema subset: type, enum, const, properties, required, additionalProperties, items, minItems,
    maxItems, minimum, maximum, minLength, maxLength, anyOf/oneOf, $ref to #/$defs|definitions. Returns errors."""
    root = schema

    def check(v, s, p) -> list[str]:
        if not isinstance(s, dict):
            return []
        if "$ref" in s:
            ref = s["$ref"]
            target = root
            for part in ref.lstrip("#/").split("/") if ref.startswith("#") else []:
                target = target.get(part, {}) if isinstance(target, dict) else {}
            return check(v, target, p)
        for key in ("anyOf", "oneOf"):
            if key in s:
                if not any(not check(v, sub, p) for sub in s[key]):
                    return [f"{p}: matches none of {key}"]
        if "allOf" in s:
            errs = [e for sub in s["allOf"] for e in check(v, sub, p)]
            if errs:
                return errs
        t = s.get("type")
        if t is not None:
            types = t if isinstance(t, list) else [t]
            ok = any((isinstance(v, _TYPES[x]) and not (x != "boolean" and isinstance(v, bool))) if x in _TYPES
                     else x == "integer" and _int(v) or x == "number" and _num(v) for x in types)
            if not ok:
                return [f"{p}: expected {t}, got {type(v).__name__}"]
        if "enum" in s and v not in s["enum"]:
            return [f"{p}: {v!r} not in {s['enum']}"]
        if "const" in s and v != s["const"]:
            return [f"{p}: must be {s['const']!r}"]
        errs: list[str] = []
        if isinstance(v, dict):
            props = s.get("properties", {})
            errs += [f"{p}: missing {k!r}" for k in s.get("required", []) if k not in v]
            for k, sub in v.items():
                if k in props:
                    errs += check(sub, props[k], f"{p}.{k}")
                elif s.get("additionalProperties") is False:
                    errs.append(f"{p}: unexpected key {k!r}")
                elif isinstance(s.get("additionalProperties"), dict):
                    errs += check(sub, s["additionalProperties"], f"{p}.{k}")
        if isinstance(v, list):
            if len(v) < s.get("minItems", 0) or len(v) > s.get("maxItems", float("inf")):
                errs.append(f"{p}: {len(v)} items, outside [{s.get('minItems', 0)}, {s.get('maxItems', 'inf')}]")
            for i, item in enumerate(v):
                errs += check(item, s.get("items"), f"{p}[{i}]")
        if _num(v):
            if v < s.get("minimum", float("-inf")) or v > s.get("maximum", float("inf")):
                lo, hi = s.get("minimum", "-inf"), s.get("maximum", "inf")
                errs.append(f"{p}: {v} outside [{lo}, {hi}]")
        if isinstance(v, str) and not s.get("minLength", 0) <= len(v) <= s.get("maxLength", float("inf")):
            errs.append(f"{p}: string length {len(v)} out of range")
        return errs

    return check(value, schema, path)


def logprobs_content(token_ids: list[int], logprobs: list[dict[int, float]], top_n: int, tokenizer) -> list[dict]:
    """OpenAI `logprobs.content` entries for generated tokens."""
    def entry(tid: int, lp: float) -> dict:
        raw = tokenizer.token_bytes(tid) if tokenizer is not None else b""
        return {"token": raw.decode("utf-8", "replace") if tokenizer is not None else str(tid),
                "logprob": max(lp, -9999.0), "bytes": list(raw)}

    out = []
    for tid, d in zip(token_ids, logprobs):
        top = sorted(d.items(), key=lambda kv: -kv[1])[:top_n]
        out.append({**entry(tid, d.get(tid, float("-inf"))), "top_logprobs": [entry(t, lp) for t, lp in top]})
    return out


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())
