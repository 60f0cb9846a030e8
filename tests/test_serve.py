"""The OpenAI-compatible server, driven by the real `openai` client over HTTP on 127.0.0.1.

The real engine (tiny random model, CPU) answers the plain, streaming, multimodal, sampling, error and
concurrency tests, and the constrained formats (response_format json_schema, forced tool_choice: only the
constraint can make the random model write them); a ScriptedBackend (fixed answers) stands in for free-form tool
calls and JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import json
import os
import random
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

from qwenvl.serve.protocol import validate_schema
from qwenvl.serve import EngineBackend, MediaLimits, ScriptedBackend, ServerConfig, create_app
from qwenvl.serve.media import fetch_url
from qwenvl.errors import MediaError

MODEL = "tiny"


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def live(app):
    """Serve `app` on a free 127.0.0.1 port in a thread; yields the base URL."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def png(w=56, h=56, color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def mp4(seconds: float, fps: int = 4, w: int = 56, h: int = 56) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.full((h, w, 3), (i * 20) % 255, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def user(*content) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


def text(t):
    return {"type": "text", "text": t}


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "ok.png").write_bytes(png())
    return d


@pytest.fixture(scope="module")
def backend():
    from qwenvl.engine import AsyncLLM
    from qwenvl.hub import tiny_random_checkpoint

    b = EngineBackend(AsyncLLM(tiny_random_checkpoint(), kv_cache_bytes=32 << 20, max_num_seqs=64))
    yield b
    b.shutdown()


def limits(media_dir, **kw) -> MediaLimits:
    return MediaLimits(allowed_dirs=[str(media_dir)], max_images=2, max_video_seconds=5.0,
                       max_image_pixels=1_000_000, **kw)


@pytest.fixture(scope="module")
def base(backend, media_dir):
    config = ServerConfig(model_names=[MODEL], max_request_bytes=2 << 20, default_max_tokens=16,
                          limits=limits(media_dir))
    with live(create_app(backend, config)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def used_blocks(base) -> int:
    return httpx.get(base + "/health").json()["engine"]["num_used_blocks"]


# ---------------------------------------------------------------------------------------------- basics
def test_models_health_and_page(base, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = httpx.get(base + "/health").json()
    assert h["status"] == "ok" and h["engine"]["num_used_blocks"] == 0
    page = httpx.get(base + "/")
    assert page.status_code == 200 and "window.QWENVL = " in page.text and "<canvas" in page.text


def test_plain_and_streaming_agree(client):
    msgs = user(text("Describe a cat."))
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens == 8 or c.finish_reason == "stop"
    assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == c.message.content  # greedy: the same text either way
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_image_data_url_counts_vision_tokens(client, media_dir):
    base_tokens = client.chat.completions.create(model=MODEL, messages=user(text("What is this?")),
                                                 max_tokens=1).usage.prompt_tokens
    r = client.chat.completions.create(model=MODEL, messages=user(image(data_url(png(112, 56))), text("What is this?")),
                                       max_tokens=4, temperature=0)
    # 112x56 -> 8x4 patches -> 8 merged tokens, plus <|vision_start|> and <|vision_end|>
    assert r.usage.prompt_tokens == base_tokens + 8 + 2
    # a JPEG, a local file under --allowed-media-dir, and a file:// URL are fine too
    for src in (data_url(png(fmt="JPEG"), "image/jpeg"), str(media_dir / "ok.png"), f"file://{media_dir}/ok.png"):
        assert client.chat.completions.create(model=MODEL, messages=user(image(src), text("?")), max_tokens=2).choices


def test_video_url(client):
    base_tokens = client.chat.completions.create(model=MODEL, messages=user(text("What happens?")),
                                                 max_tokens=1).usage.prompt_tokens
    r = client.chat.completions.create(
        model=MODEL, max_tokens=2,
        messages=user({"type": "video_url", "video_url": {"url": data_url(mp4(2.0), "video/mp4")}},
                      text("What happens?")))
    # 2 s at 2 fps = 4 frames = 2 temporal patches; a 56x56 frame is below the video minimum of 128*28*28 pixels,
    # so it is scaled up: beta = sqrt(100352 / 3136) = 5.657, side = ceil(56 * 5.657 / 28) * 28 = 12 * 28 = 336,
    # i.e. 12 x 12 merged tokens a patch: 2 * 144 = 288, plus <|vision_start|> and <|vision_end|>
    assert r.usage.prompt_tokens == base_tokens + 288 + 2
    r = client.chat.completions.create(  # Qwen style with options: 1 fps would be 2 frames, raised to the minimum 4
        model=MODEL, max_tokens=2,
        messages=user({"type": "video", "video": data_url(mp4(2.0), "video/mp4"), "fps": 1.0}, text("What happens?")))
    assert r.choices[0].message.content is not None and r.usage.prompt_tokens == base_tokens + 288 + 2
    r = client.chat.completions.create(  # and a small max_pixels: 56x56 frames kept at 56x56 -> 2 * 4 tokens
        model=MODEL, max_tokens=1, messages=user({"type": "video", "video": data_url(mp4(2.0), "video/mp4"),
                                                  "min_pixels": 3136, "max_pixels": 3136}, text("What happens?")))
    assert r.usage.prompt_tokens == base_tokens + 8 + 2


def test_sampling_n_seed_stop_logprobs(client):
    msgs = user(text("Tell me a story."))
    kw = dict(model=MODEL, messages=msgs, max_tokens=6, temperature=1.0, seed=1234)
    a = client.chat.completions.create(n=3, **kw)
    b = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert len({c.message.content for c in a.choices}) > 1  # n completions differ
    assert a.usage.completion_tokens == 18

    greedy = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    full = greedy.choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.index(stop)]

    lp = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                        top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content) == lp.choices[0].message.content
    for t in content:  # greedy: the chosen token is the most likely one
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0


def test_streaming_n_stop_and_logprobs_match_the_plain_answer(client):
    """Streamed n=2 (seeded sampling), a stop string and logprobs give what the non-streamed request gives."""
    msgs = user(text("Tell me a story."))
    kw = dict(model=MODEL, messages=msgs, max_tokens=6, temperature=1.0, seed=77, n=2)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = {0: "", 1: ""}
    finish = {}
    for ch in chunks:
        for c in ch.choices:
            streamed[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert [streamed[i] for i in (0, 1)] == [c.message.content for c in plain.choices]
    assert [finish[i] for i in (0, 1)] == [c.finish_reason for c in plain.choices]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 12

    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0).choices[0]
    stop = full.message.content[len(full.message.content) // 2:][:3]
    cut = full.message.content[:full.message.content.index(stop)]
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stop=stop,
                                                 stream=True, logprobs=True, top_logprobs=2))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == cut  # no stop text leaks
    assert chunks[-1].choices[0].finish_reason == "stop"
    entries = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert entries and all(len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
                           for t in entries)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
          "required": ["name", "count"], "additionalProperties": False}


CLOSED = {"type": "object", "properties": {"animal": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"},
                                          "size": {"$ref": "#/$defs/size"}},
          "required": ["animal", "ok", "size"], "additionalProperties": False,
          "$defs": {"size": {"enum": ["small", "big"]}}}


def test_json_schema_is_enforced_while_generating(client, base):
    """The tiny random model knows no JSON: constrained decoding alone makes its answer follow the schema
    (every value here is an enum or a boolean, so it must also end). Cut short, the answer is refused clearly."""
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": CLOSED}}
    for seed in range(2):
        r = client.chat.completions.create(model=MODEL, messages=user(text("Describe the pet.")), max_tokens=200,
                                           temperature=1.0, seed=seed, response_format=rf)
        value = json.loads(r.choices[0].message.content)
        assert validate_schema(value, CLOSED) == [] and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=user(text("Any JSON.")), max_tokens=200,
                                       temperature=0, response_format={"type": "json_object"})
    # (greedy, the tiny model closes the object at once: '{}'; a cut-short object would be a 500, as below)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=user(text("Count the cats.")), max_tokens=3,
                                       temperature=0, response_format=rf)
    err = e.value.body
    assert err["type"] == "model_error" and err["code"] == "invalid_model_output" and "max_tokens" in err["message"]
    assert client.chat.completions.create(model=MODEL, messages=user(text("hi")), max_tokens=2).choices
    assert used_blocks(base) == 0


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]}, "metric": {"type": "boolean"}},
                   "required": ["city", "metric"], "additionalProperties": False}}}
TIMER = {"type": "function", "function": {
    "name": "set_timer", "description": "Start a timer.",
    "parameters": {"type": "object", "properties": {"minutes": {"type": "integer", "enum": [1, 5, 10]}},
                   "required": ["minutes"], "additionalProperties": False}}}


def checked_call(call) -> tuple[str, dict]:
    """(name, arguments) of an OpenAI tool call, checked by hand against WEATHER's or TIMER's schema."""
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert sorted(args) == ["city", "metric"] and args["city"] in ("Paris", "Tokyo")
        assert isinstance(args["metric"], bool)
    else:
        assert call.function.name == "set_timer" and sorted(args) == ["minutes"]
        assert type(args["minutes"]) is int and args["minutes"] in (1, 5, 10)
    return call.function.name, args


def test_tool_choice_is_enforced_while_generating(client, base):
    """The tiny random model writes no tool call by itself (tool_choice auto: plain text); with a named function
    or "required" constrained decoding alone makes its answer <tool_call> blocks following the tools' schemas,
    the tags written as their single tokens; streamed alike. Cut short, the answer is refused clearly."""
    kw = dict(model=MODEL, messages=user(text("Set a timer for five minutes.")), tools=[WEATHER, TIMER],
              max_tokens=300, temperature=1.0, seed=0)
    auto = client.chat.completions.create(**{**kw, "max_tokens": 40}, tool_choice="auto")
    assert not auto.choices[0].message.tool_calls and auto.choices[0].finish_reason != "tool_calls"
    assert "<tool_call>" not in auto.choices[0].message.content

    named = client.chat.completions.create(**kw, n=2, tool_choice={"type": "function", "function": {"name": "set_timer"}})
    for c in named.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None and c.message.tool_calls
        assert {checked_call(t)[0] for t in c.message.tool_calls} == {"set_timer"}

    required = client.chat.completions.create(**kw, tool_choice="required", logprobs=True)
    c = required.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and c.message.tool_calls
    calls = [checked_call(t) for t in c.message.tool_calls]
    tokens = [t.token for t in c.logprobs.content]
    assert tokens[0] == "<tool_call>" and tokens.count("<tool_call>") == tokens.count("</tool_call>") == len(calls)

    chunks = list(client.chat.completions.create(**kw, tool_choice="required", stream=True))
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)
    streamed = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [checked_call(t) for t in streamed] == calls  # the same seed: the same calls
    assert [t.index for t in streamed] == list(range(len(calls))) and chunks[-1].choices[0].finish_reason == "tool_calls"

    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(**{**kw, "max_tokens": 3}, tool_choice="required")
    err = e.value.body
    assert err["code"] == "invalid_model_output" and err["param"] == "tool_choice" and "max_tokens" in err["message"]
    assert used_blocks(base) == 0



def test_json_schema_and_tool_calls_with_scripted_answers(media_dir):
    seen = []
    answers = {
        "json": 'Here you go:\n```json\n{"name": "cat", "count": 3}\n```',
        "badjson": '{"name": "cat"}',
        "tool": 'Let me click.\n<tool_call>\n{"name": "mobile_use", "arguments": {"action": "click", '
                '"coordinate": [935, 406]}}\n</tool_call>',
    }

    def answer(messages):
        seen.append(messages)
        return answers[messages[-1]["content"][-1]["text"]]

    config = ServerConfig(model_names=[MODEL], limits=limits(media_dir))
    with live(create_app(ScriptedBackend(answer), config)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        rf = {"type": "json_schema", "json_schema": {"name": "count", "schema": SCHEMA}}
        r = client.chat.completions.create(model=MODEL, messages=user(text("json")), response_format=rf)
        assert json.loads(r.choices[0].message.content) == {"name": "cat", "count": 3}
        assert "follows this JSON schema" in seen[-1][0]["content"][0]["text"]
        r = client.chat.completions.create(model=MODEL, messages=user(text("json")),
                                           response_format={"type": "json_object"})
        assert json.loads(r.choices[0].message.content)["count"] == 3
        with pytest.raises(openai.InternalServerError, match="missing 'count'"):
            client.chat.completions.create(model=MODEL, messages=user(text("badjson")), response_format=rf)

        tools = [{"type": "function", "function": {"name": "mobile_use", "description": "Use a phone.",
                                                    "parameters": {"type": "object", "properties": {}}}}]
        r = client.chat.completions.create(model=MODEL, messages=user(text("tool")), tools=tools)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content == "Let me click."
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "mobile_use"
        assert json.loads(call.function.arguments) == {"action": "click", "coordinate": [935, 406]}
        system = seen[-1][0]["content"][0]["text"]
        assert system.startswith("You are a helpful assistant.\n\n# Tools") and '"name": "mobile_use"' in system

        chunks = list(client.chat.completions.create(model=MODEL, messages=user(text("tool")), tools=tools,
                                                     stream=True))
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
        assert "<tool_call" not in content and content.strip() == "Let me click."
        assert calls[0].function.name == "mobile_use" and chunks[-1].choices[0].finish_reason == "tool_calls"

        # the conversation continues with the tool result (OpenAI style assistant tool_calls + tool message)
        r = client.chat.completions.create(model=MODEL, tools=tools, messages=[
            {"role": "user", "content": "tool"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "clicked"},
            {"role": "user", "content": "tool"}])
        assert r.choices[0].message.tool_calls
        # tool_choice none: no tools block, the tags stay in the text
        r = client.chat.completions.create(model=MODEL, messages=user(text("tool")), tools=tools, tool_choice="none")
        assert "<tool_call>" in r.choices[0].message.content and not r.choices[0].message.tool_calls
        # forced calls (this backend does not constrain): an answer without one is refused, not passed as text
        forced = {"type": "function", "function": {"name": "mobile_use"}}
        assert client.chat.completions.create(model=MODEL, messages=user(text("tool")), tools=tools,
                                              tool_choice=forced).choices[0].message.tool_calls
        with pytest.raises(openai.InternalServerError, match="no complete tool call"):
            client.chat.completions.create(model=MODEL, messages=user(text("json")), tools=tools, tool_choice="required")


# ---------------------------------------------------------------------------------------------- bad requests
def _bad_cases(media_dir):
    ok = user(text("hi"))
    big = png(1200, 1000)  # 1.2 Mpx > the 1 Mpx test limit
    buf = io.BytesIO()
    Image.effect_noise((200, 200), 50).convert("RGB").save(buf, "PNG")
    noisy = buf.getvalue()  # its header reads fine, its pixel data is cut in half
    return {  # name: (kwargs for the openai client | raw (body bytes, headers)), expected status, param/code
        "unknown model": (dict(model="gpt-5", messages=ok), 404, "model_not_found"),
        "no messages": (dict(model=MODEL, messages=[]), 400, "messages"),
        "bad role": (dict(model=MODEL, messages=[{"role": "wizard", "content": "hi"}]), 400, "messages"),
        "bad base64": (dict(model=MODEL, messages=user(image("data:image/png;base64,@@notbase64@@"))), 400, "messages"),
        "corrupt image": (dict(model=MODEL, messages=user(image(data_url(b"\x89PNG\r\n\x1a\nnot really")))), 400,
                          "invalid_media"),
        "truncated image": (dict(model=MODEL, messages=user(image(data_url(noisy[:len(noisy) // 2])))), 400,
                            "invalid_media"),
        "oversize image": (dict(model=MODEL, messages=user(image(data_url(big)))), 400, "invalid_media"),
        "too many images": (dict(model=MODEL, messages=user(*[image(data_url(png()))] * 3)), 400, "invalid_media"),
        "video too long": (dict(model=MODEL, messages=user({"type": "video_url", "video_url": {
            "url": data_url(mp4(6.0, fps=2), "video/mp4")}})), 400, "invalid_media"),
        "path outside allowed dir": (dict(model=MODEL, messages=user(image("/etc/hostname"))), 400, "invalid_media"),
        "remote media disabled": (dict(model=MODEL, messages=user(image("http://127.0.0.1:9/x.png"))), 400,
                                  "invalid_media"),
        "too-long prompt": (dict(model=MODEL, messages=user(text("hello " * 140000))), 400, "context_length_exceeded"),
        "temperature out of range": (dict(model=MODEL, messages=ok, temperature=7), 400, "temperature"),
        "n out of range": (dict(model=MODEL, messages=ok, n=0), 400, "n"),
        "top_logprobs without logprobs": (dict(model=MODEL, messages=ok, top_logprobs=3), 400, "top_logprobs"),
        "five stop strings": (dict(model=MODEL, messages=ok, stop=list("abcde")), 400, "stop"),
        "bad max_tokens": (dict(model=MODEL, messages=ok, max_tokens=-1), 400, "max_tokens"),
        "bad image option": (dict(model=MODEL, messages=user({"type": "image", "image": data_url(png()),
                                                              "resized_height": 99999, "resized_width": 99999})),
                             400, "messages"),
        "tool_choice names no tool": (dict(model=MODEL, messages=ok, tools=[WEATHER], tool_choice={
            "type": "function", "function": {"name": "set_timer"}}), 400, "tool_choice"),
        "tool_choice required without tools": (dict(model=MODEL, messages=ok, tool_choice="required"), 400,
                                               "tool_choice"),
        "malformed tool_choice": (dict(model=MODEL, messages=ok, tools=[WEATHER], tool_choice={"type": "function"}),
                                  400, "tool_choice"),
        "malformed JSON": ((b'{"model": "tiny", "messages": [', {}), 400, "invalid_json"),
        "body not an object": ((b'[1, 2]', {}), 400, None),
        "body too large": ((b'{"model": "tiny", "pad": "' + b"x" * (3 << 20) + b'"}', {}), 413, "request_too_large"),
    }


def test_bad_requests_get_openai_errors(base, client, media_dir):
    cases = _bad_cases(media_dir)
    assert len(cases) >= 12
    for name, (req, status, what) in cases.items():
        if isinstance(req, dict):
            with pytest.raises(openai.APIStatusError) as e:
                client.chat.completions.create(**req)
            got, err = e.value.status_code, e.value.body
        else:
            r = httpx.post(base + "/v1/chat/completions", content=req[0],
                           headers={"Content-Type": "application/json", **req[1]})
            got, err = r.status_code, r.json()["error"]
        assert got == status, (name, got, err)
        assert set(err) == {"message", "type", "param", "code"} and err["message"], name
        assert what is None or what in (err["param"], err["code"]), (name, err)
    # not found / wrong method are OpenAI-shaped too, and the server still answers
    r = httpx.get(base + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(base + "/v1/chat/completions").status_code == 405
    assert client.chat.completions.create(model=MODEL, messages=user(text("still there?")), max_tokens=2).choices
    assert used_blocks(base) == 0


def test_api_key(backend, media_dir, monkeypatch):
    config = ServerConfig(model_names=[MODEL], api_key="sekrit", limits=limits(media_dir))
    with live(create_app(backend, config)) as url:
        bad_key = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad_key.models.list()
        assert e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad_key.chat.completions.create(model=MODEL, messages=user(text("hi")), max_tokens=1)
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=user(text("hi")), max_tokens=1).choices
        assert httpx.get(url + "/health").status_code == 200  # health and the page need no key
    # the CLI reads QWENVL_API_KEY
    import argparse

    from qwenvl.serve.cli import add_parser

    monkeypatch.setenv("QWENVL_API_KEY", "from-env")
    sub = argparse.ArgumentParser().add_subparsers()
    assert add_parser(sub).parse_args([]).api_key == "from-env"


def test_remote_media(backend, media_dir):
    """With --allow-remote-media: loopback/private addresses are refused (checked on the address connected
    to); the fetcher itself obeys its size limit (exercised against a local server, private allowed)."""
    config = ServerConfig(model_names=[MODEL], limits=limits(media_dir, allow_remote=True))
    with live(create_app(backend, config)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for src in ("http://127.0.0.1:9/x.png", "http://localhost/x.png", "http://10.0.0.1/x.png",
                    "http://[::1]/x.png", "http://169.254.169.254/latest"):
            with pytest.raises(openai.BadRequestError, match="private, loopback or reserved|cannot resolve"):
                client.chat.completions.create(model=MODEL, messages=user(image(src)), max_tokens=1)

    body = png()

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
                return
            if self.path == "/x.txt":
                self.send_error(404)
                return
            self.send_response(200)
            if self.path != "/no-length":  # else the body simply runs to the end of the connection
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        u = f"http://127.0.0.1:{srv.server_port}"
        assert fetch_url(u + "/img.png", 1 << 20, 5, allow_private=True) == body
        assert fetch_url(u + "/redirect", 1 << 20, 5, allow_private=True) == body
        assert fetch_url(u + "/no-length", 1 << 20, 5, allow_private=True) == body
        with pytest.raises(MediaError, match="over the limit"):  # announced by Content-Length
            fetch_url(u + "/img.png", 10, 5, allow_private=True)
        with pytest.raises(MediaError, match="more than 10 bytes"):  # counted while reading
            fetch_url(u + "/no-length", 10, 5, allow_private=True)
        with pytest.raises(MediaError, match="private"):
            fetch_url(u + "/img.png", 1 << 20, 5)
        # through the server: the fetched image reaches the model (56x56 -> 2x2 merged tokens + start/end)
        config = ServerConfig(model_names=[MODEL], limits=limits(media_dir, allow_remote=True,
                                                                 allow_private_remote=True, remote_max_bytes=1 << 20))
        with live(create_app(backend, config)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            plain = client.chat.completions.create(model=MODEL, messages=user(text("?")), max_tokens=1)
            r = client.chat.completions.create(model=MODEL, messages=user(image(u + "/redirect"), text("?")),
                                               max_tokens=1)
            assert r.usage.prompt_tokens == plain.usage.prompt_tokens + 4 + 2
            with pytest.raises(openai.BadRequestError, match="HTTP 404|not a readable image"):
                client.chat.completions.create(model=MODEL, messages=user(image(u + "/x.txt"), text("?")),
                                               max_tokens=1)
    finally:
        srv.shutdown()


# ---------------------------------------------------------------------------------------------- cancellation
def test_50_concurrent_streams_with_disconnects(base):
    """50 streaming clients at once; 15 of them hang up after a few chunks. The others all finish, and the
    engine holds no KV blocks afterwards."""
    rng = random.Random(0)
    quitters = set(rng.sample(range(50), 15))

    async def one(i, client):
        stream = await client.chat.completions.create(
            model=MODEL, messages=user(text(f"Request {i}: " + "word " * rng.randrange(1, 30))),
            max_tokens=24, temperature=0.8, seed=i, stream=True, extra_body={"ignore_eos": True})
        n, finish = 0, None
        async for chunk in stream:
            n += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if i in quitters and n >= 1 + i % 4:
                await stream.close()  # disconnect mid-stream
                return "quit"
        return finish

    async def main():
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(i, client) for i in range(50)))

    results = asyncio.run(main())
    assert all(r == "quit" for i, r in enumerate(results) if i in quitters)
    assert all(r == "length" for i, r in enumerate(results) if i not in quitters), results
    deadline = time.time() + 20
    while time.time() < deadline:
        h = httpx.get(base + "/health").json()
        if h["engine"]["num_used_blocks"] == 0 and h["active_requests"] == 0 and not h["engine"]["num_running"]:
            break
        time.sleep(0.1)
    assert h["engine"]["num_used_blocks"] == 0 and h["active_requests"] == 0, h


def test_non_streaming_disconnect_cancels(base):
    """A client that gives up on a long non-streamed answer frees the engine at once."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/chat/completions", timeout=1.0, json={
            "model": MODEL, "messages": user(text("go on forever")), "max_tokens": 100000, "ignore_eos": True})
    deadline = time.time() + 15
    while time.time() < deadline and (used_blocks(base) or httpx.get(base + "/health").json()["active_requests"]):
        time.sleep(0.1)
    assert used_blocks(base) == 0


def test_streaming_disconnect_cancels_a_long_generation(base, client):
    """The 50-client test ends with short requests, which free their blocks on their own by finishing. Here the
    request would run to the context length (ignore_eos, max_tokens far beyond what the test waits for): its
    blocks are held while it streams, and only cancelling it on the disconnect gives them back within seconds."""
    stream = client.chat.completions.create(model=MODEL, messages=user(text("count forever")), max_tokens=100000,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    seen = 0
    for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 3:
            break
    h = httpx.get(base + "/health").json()
    assert h["engine"]["num_used_blocks"] > 0 and h["active_requests"] == 1, h  # generating, holding its KV
    stream.close()  # hang up mid-stream
    deadline = time.time() + 15
    while time.time() < deadline:
        h = httpx.get(base + "/health").json()
        if h["engine"]["num_used_blocks"] == 0 and not h["engine"]["num_running"] and h["active_requests"] == 0:
            break
        time.sleep(0.1)
    assert h["engine"]["num_used_blocks"] == 0 and not h["engine"]["num_running"] and h["active_requests"] == 0, h


def test_serve_flags_reach_the_server(monkeypatch, tmp_path):
    """Every limit flag of `qwenvl serve` lands in the server's config (the engine is not started here)."""
    import argparse

    from qwenvl.serve import backend as backend_mod
    from qwenvl.serve.cli import add_parser, build

    made = {}
    monkeypatch.setattr(backend_mod.EngineBackend, "from_path",
                        classmethod(lambda cls, path, **kw: made.update(path=path, **kw) or ScriptedBackend("x")))
    sub = argparse.ArgumentParser().add_subparsers()
    args = add_parser(sub).parse_args([
        "--model", str(tmp_path), "--served-model-name", "a", "--served-model-name", "b", "--api-key", "k",
        "--max-request-bytes", "1000", "--max-concurrent", "3", "--request-timeout", "7.5", "--default-max-tokens", "9",
        "--max-images", "5", "--max-videos", "2", "--max-video-seconds", "60", "--max-image-pixels", "1234",
        "--max-request-pixels", "5678", "--allowed-media-dir", str(tmp_path), "--allow-remote-media",
        "--remote-max-bytes", "4096", "--remote-timeout", "2.5", "--max-num-seqs", "4", "--kv-cache-mb", "8"])
    app, _ = build(args)
    c = app.state.server.config
    assert (c.model_names, c.api_key, c.max_request_bytes, c.max_concurrent, c.request_timeout,
            c.default_max_tokens) == (["a", "b"], "k", 1000, 3, 7.5, 9)
    lim = c.limits
    assert (lim.max_images, lim.max_videos, lim.max_video_seconds, lim.max_image_pixels, lim.max_request_pixels,
            lim.allowed_dirs, lim.allow_remote, lim.remote_max_bytes, lim.remote_timeout) == (
        5, 2, 60.0, 1234, 5678, [str(tmp_path)], True, 4096, 2.5)
    assert made["max_num_seqs"] == 4 and made["kv_cache_bytes"] == 8 << 20
    # the defaults: no local files, no remote fetching, no key
    d = add_parser(argparse.ArgumentParser().add_subparsers()).parse_args([])
    assert d.allowed_media_dir == [] and not d.allow_remote_media and d.max_request_bytes == 64 << 20


def test_request_timeout(media_dir):
    config = ServerConfig(model_names=[MODEL], request_timeout=0.5, limits=limits(media_dir))
    with live(create_app(ScriptedBackend("slow " * 100, delay=0.05), config)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, messages=user(text("hi")))
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
        with pytest.raises(openai.APIError, match="timeout"):
            for _ in client.chat.completions.create(model=MODEL, messages=user(text("hi")), stream=True):
                pass
        assert httpx.get(url + "/health").json()["active_requests"] == 0


def test_concurrency_limit(media_dir):
    config = ServerConfig(model_names=[MODEL], max_concurrent=2, limits=limits(media_dir))
    with live(create_app(ScriptedBackend("x " * 50, delay=0.02), config)) as url:
        async def main():
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
                async def one():
                    try:
                        await client.chat.completions.create(model=MODEL, messages=user(text("hi")))
                        return 200
                    except openai.RateLimitError as e:
                        assert e.body["code"] == "too_many_requests"
                        return 429
                return await asyncio.gather(*(one() for _ in range(6)))

        codes = asyncio.run(main())
        assert codes.count(200) >= 2 and 429 in codes


# ---------------------------------------------------------------------------------------------- the web page
COOKBOOK_ANSWER = ('```json\n[\n\t{"bbox_2d": [60, 80, 220, 240], "label": "red square"},\n'
                   '\t{"bbox_2d": [300, 120, 420, 240], "label": "blue circle"}\n]\n```')


DOC_ANSWER = ('```html\n<html><body>\n<h2 data-bbox="310 94 600 132">Qwen2.5 Technical Report</h2>\n'
              ' <p data-bbox="50 154 542 182">Qwen Team</p>\n</body></html>\n```')


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3/4, NUL-separated JSON): open a
    page, wait for a JS condition, read values, take a screenshot. No virtual-time guessing."""

    def __init__(self, binary: str, profile):
        import subprocess

        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--remote-debugging-pipe",
                 f"--user-data-dir={profile}", "about:blank"]
        # fd 3 <- our commands, fd 4 -> its answers (set up by the shell: no preexec_fn in a threaded process)
        self.proc = subprocess.Popen(["bash", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null', binary,
                                      *flags], stdin=cmd_r, stdout=out_w, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf, self._id = b"", 0

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._out_r, 1 << 20)
                assert chunk, "chromium closed the pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]

    def open(self, url: str, width=1280, height=900) -> str:
        target = self.send("Target.createTarget", url=url, width=width, height=height, newWindow=True)["targetId"]
        return self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def eval(self, session: str, expr: str):
        return self.send("Runtime.evaluate", session, expression=expr, returnByValue=True)["result"].get("value")

    def wait(self, session: str, expr: str, timeout: float = 60):
        deadline = time.time() + timeout
        while not self.eval(session, expr):
            assert time.time() < deadline, f"timed out waiting for {expr}"
            time.sleep(0.1)

    def close(self):
        try:
            self.send("Browser.close")
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
        os.close(self._cmd_w)
        os.close(self._out_r)


def test_web_page_draws_boxes(media_dir, tmp_path):
    """Headless Chromium loads /, sends the image and prompt from the URL, streams the cookbook-format answer
    and draws the boxes, mapped to the original image's pixels as qwenvl.tasks.grounding maps them; a QwenVL
    HTML answer is rendered beside the image. The screenshot is saved in the test's tmp dir."""
    import shutil
    import urllib.parse

    from qwenvl.tasks import grounding

    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    img = Image.new("RGB", (640, 448), (235, 235, 235))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    config = ServerConfig(model_names=[MODEL], limits=limits(media_dir))
    answer = lambda m: DOC_ANSWER if "QwenVL HTML" in m[-1]["content"][-1]["text"] else COOKBOOK_ANSWER  # noqa
    browser = Chromium(binary, tmp_path / "profile")
    try:
        with live(create_app(ScriptedBackend(answer, delay=0.005), config)) as url:
            def page(prompt):
                return url + "/?" + urllib.parse.urlencode({"image": data_url(buf.getvalue()), "prompt": prompt,
                                                            "run": "1"})
            done = "document.body && document.body.dataset.state === 'done'"
            tab = browser.open(page("find shapes"))
            browser.wait(tab, done)
            drawn = json.loads(browser.eval(tab, "document.getElementById('result').textContent"))
            status = browser.eval(tab, "document.getElementById('status').textContent")
            shot = tmp_path / "page.png"
            shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", tab, format="png")["data"]))
            doc = browser.open(page("QwenVL HTML"))
            browser.wait(doc, done)
            frame = browser.eval(doc, "[getComputedStyle(document.getElementById('doc')).display, "
                                      "document.getElementById('doc').srcdoc]")
            doc_boxes = json.loads(browser.eval(doc, "document.getElementById('result').textContent"))["boxes"]
    finally:
        browser.close()
    assert status == "done"
    expected = grounding.to_original_image(grounding.parse_boxes(COOKBOOK_ANSWER), img)
    assert [b["label"] for b in drawn["boxes"]] == ["red square", "blue circle"]
    for b, e in zip(drawn["boxes"], expected):
        assert [b["x1"], b["y1"], b["x2"], b["y2"]] == pytest.approx(list(e.xyxy), abs=1e-6)
    # the screenshot shows the two outlines: pure red and pure lime pixels on a grey image
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (px[..., 0] > 220) & (px[..., 1] < 40) & (px[..., 2] < 40)
    lime = (px[..., 1] > 220) & (px[..., 0] < 40) & (px[..., 2] < 40)
    assert red.sum() > 300 and lime.sum() > 300, (red.sum(), lime.sum())
    ys, xs = np.nonzero(red)  # an outline, not a filled blob
    assert red.sum() < 0.2 * (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    print("screenshot:", shot)
    # the QwenVL HTML answer: rendered in the frame beside the image, its data-bbox boxes drawn
    assert frame[0] == "block" and "Qwen2.5 Technical Report" in frame[1]
    assert len(doc_boxes) == 2 and doc_boxes[0]["x1"] == pytest.approx(310 * 640 / 644)


def test_web_page_upload_paste_points_and_video(media_dir, tmp_path):
    """The page's own inputs, not the URL shortcut: an image chosen in the file input gets a points answer drawn
    on it (XML and JSON points, mapped to the image's pixels), and a video pasted from the clipboard goes to
    the server as a video item."""
    import shutil

    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    seen = []
    points = '<points x1="322" y1="224" alt="centre">centre</points> and {"point_2d": [0, 0], "label": "corner"}'

    def answer(messages):
        seen.append(messages)
        kinds = [it["type"] for it in messages[-1]["content"]]
        return "A grey video." if "video" in kinds else points

    img = tmp_path / "upload.png"
    Image.new("RGB", (640, 448), (235, 235, 235)).save(img)
    clip = mp4(2.0)
    config = ServerConfig(model_names=[MODEL], limits=limits(media_dir))
    browser = Chromium(binary, tmp_path / "profile")
    try:
        with live(create_app(ScriptedBackend(answer, delay=0.002), config)) as url:
            tab = browser.open(url + "/")
            done = "document.body.dataset.state === 'done'"
            # the new tab starts on about:blank: wait for our page itself to have loaded
            browser.wait(tab, "!!window.QWENVL && document.readyState === 'complete'")
            root = browser.send("DOM.getDocument", tab)["root"]["nodeId"]
            node = browser.send("DOM.querySelector", tab, nodeId=root, selector="#file")["nodeId"]
            browser.send("DOM.setFileInputFiles", tab, nodeId=node, files=[str(img)])
            browser.wait(tab, "document.getElementById('canvas').width === 640")
            browser.eval(tab, "document.getElementById('prompt').value = 'find points'; "
                              "document.getElementById('send').click()")
            browser.wait(tab, done)
            drawn = json.loads(browser.eval(tab, "document.getElementById('result').textContent"))
            # the first point's colour (red) at its mapped centre, read from the canvas itself
            centre = browser.eval(tab, "Array.from(document.getElementById('canvas').getContext('2d')"
                                       ".getImageData(320, 224, 1, 1).data)")
            (tmp_path / "points.png").write_bytes(base64.b64decode(
                browser.send("Page.captureScreenshot", tab, format="png")["data"]))
            browser.eval(tab, "delete document.body.dataset.state")
            browser.eval(tab, f"""fetch("{data_url(clip, 'video/mp4')}").then(r => r.blob()).then(b => {{
                const dt = new DataTransfer(); dt.items.add(new File([b], "clip.mp4", {{type: "video/mp4"}}));
                document.dispatchEvent(new ClipboardEvent("paste", {{clipboardData: dt}})); }})""")
            browser.wait(tab, "!document.getElementById('video').hidden && document.getElementById('canvas').hidden")
            browser.eval(tab, "document.getElementById('prompt').value = 'what happens?'; "
                              "document.getElementById('send').click()")
            browser.wait(tab, done)
            video_status = browser.eval(tab, "document.getElementById('status').textContent")
            video_answer = browser.eval(tab, "document.getElementById('answer').textContent")
    finally:
        browser.close()
    # 640x448 is seen as 644x448 (23 x 16 patches of 28): x 322 -> 322 * 640 / 644 = 320, y 224 -> 224
    assert drawn["points"] == [{"x": 320, "y": 224, "label": "centre"}, {"x": 0, "y": 0, "label": "corner"}]
    assert drawn["boxes"] == [] and centre[:3] == [255, 0, 0]
    image_item = seen[0][-1]["content"][0]
    assert image_item["type"] == "image" and Image.open(io.BytesIO(image_item["image"])).size == (640, 448)
    video_item = seen[1][-1]["content"][0]
    assert video_item["type"] == "video" and video_item["video"] == clip  # the pasted file, byte for byte
    assert video_status == "done" and video_answer == "A grey video."
    print("screenshot:", tmp_path / "points.png")


def test_qwenvl_serve_command(tmp_path):
    """`python -m qwenvl.serve` (the same parser as `qwenvl serve`) starts, answers, and stops on SIGTERM."""
    import signal
    import subprocess
    import sys

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl.serve", "--port", str(port), "--kv-cache-mb", "16",
                             "--served-model-name", "nano", "--api-key", "k", "--default-max-tokens", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        r = client.chat.completions.create(model="nano", messages=user(text("hi")))
        assert r.usage.completion_tokens <= 3 and r.model == "nano"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert proc.returncode in (0, -signal.SIGTERM) and "Finished server process" in proc.stdout.read()
