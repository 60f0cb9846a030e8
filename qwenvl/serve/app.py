"""The OpenAI-compatible HTTP app (Starlette): /v1/chat/completions, /v1/models, /health, and the web page at /.

Every refusal is an OpenAI error body {"error": {"message", "type", "param", "code"}} with a 4xx status; a
request that fails never takes the server down. A client that disconnects (mid-stream or while waiting for a
non-streamed answer) cancels its generation, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import InputError, MediaError
from .media import MediaLimits, prepare_messages
from .protocol import (APIError, ChatRequest, bad, check_json, completion_id, logprobs_content, no_tool_call,
                       now, parse_request, split_tool_calls)

log = logging.getLogger("qwenvl.serve")
STATIC = os.path.join(os.path.dirname(__file__), "static")


@dataclass
class ServerConfig:
    model_names: list[str] = field(default_factory=lambda: ["qwenvl"])
    api_key: str | None = None
    max_request_bytes: int = 64 << 20
    max_concurrent: int = 256
    request_timeout: float = 600.0
    default_max_tokens: int = 2048
    limits: MediaLimits = field(default_factory=MediaLimits)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _media_error(e: Exception) -> APIError:
    msg = str(e)
    if isinstance(e, InputError) and "max_model_len" in msg:
        return bad(msg, "messages", "context_length_exceeded")
    return bad(msg, "messages", "invalid_media" if isinstance(e, MediaError) else None)


class Server:
    def __init__(self, backend, config: ServerConfig | None = None):
        self.backend = backend
        self.config = config or ServerConfig()
        self.active = 0

    # ------------------------------------------------------------------------------------------ helpers
    def _auth(self, request: Request) -> None:
        key = self.config.api_key
        given = request.headers.get("authorization", "").encode("utf-8", "replace")
        if key and not hmac.compare_digest(given, f"Bearer {key}".encode()):  # no timing hint about the key
            raise APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>')",
                           "invalid_request_error", None, "invalid_api_key")

    async def _body(self, request: Request) -> dict:
        cap = self.config.max_request_bytes
        too_big = APIError(413, f"the request body is larger than {cap} bytes", "invalid_request_error", None,
                           "request_too_large")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cap:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise too_big
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON ({e})", None, "invalid_json") from None

    # ------------------------------------------------------------------------------------------ routes
    async def models(self, request: Request) -> JSONResponse:
        try:
            self._auth(request)
        except APIError as e:
            return error_response(e)
        data = [{"id": n, "object": "model", "created": now(), "owned_by": "qwenvl",
                 "max_model_len": self.backend.max_model_len} for n in self.config.model_names]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "active_requests": self.active, "engine": self.backend.stats()})

    async def index(self, request: Request) -> HTMLResponse:
        with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
            page = f.read()
        cfg = {"model": self.config.model_names[0], "min_pixels": self.backend.min_pixels,
               "max_pixels": self.backend.max_pixels, "needs_key": bool(self.config.api_key)}
        return HTMLResponse(page.replace("/*CONFIG*/", "window.QWENVL = " + json.dumps(cfg) + ";"))

    async def chat(self, request: Request):
        if self.active >= self.config.max_concurrent:
            return error_response(APIError(429, f"the server is at its limit of {self.config.max_concurrent} "
                                                "concurrent requests; retry later", "rate_limit_error", None,
                                           "too_many_requests"))
        self.active += 1
        released = False
        try:
            self._auth(request)
            body = await self._body(request)
            req = parse_request(body, self.config.model_names, self.backend.max_model_len,
                                self.config.default_max_tokens)
            try:
                await run_in_threadpool(prepare_messages, req.messages, self.config.limits)
            except (MediaError, InputError) as e:
                raise _media_error(e) from None
            if hasattr(self.backend, "constrain"):
                if req.tool_schema is not None:
                    await run_in_threadpool(self.backend.constrain, req.params,
                                            {"type": "tool_calls", "schema": req.tool_schema})
                elif req.response_format is not None:
                    await run_in_threadpool(self.backend.constrain, req.params, req.response_format)
            rid = completion_id()
            model = body["model"]
            deadline = asyncio.get_running_loop().time() + self.config.request_timeout
            if req.stream:
                gen = self._sse(rid, model, req, deadline)
                released = True  # once started, the stream releases the slot when it ends
                first = await gen.__anext__()  # prompt encoded, first token out: errors are still 4xx here

                async def body_iter():
                    try:
                        yield first
                        async for chunk in gen:
                            yield chunk
                    finally:
                        await gen.aclose()

                return StreamingResponse(body_iter(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await self._complete(request, rid, model, req, deadline)
        except APIError as e:
            return error_response(e)
        finally:
            if not released:
                self.active -= 1

    # ------------------------------------------------------------------------------------------ generation
    async def _complete(self, request: Request, rid: str, model: str, req: ChatRequest, deadline: float):
        async def run():
            async for delta in self.backend.stream(rid, req.messages, req.params):
                if delta.output is not None:
                    return delta.output
            raise APIError(500, "the request ended without an output", "server_error")

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        task = asyncio.ensure_future(asyncio.wait_for(run(), remaining))  # a timeout cancels the request
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():  # the client went away: cancelling the task aborts the request
                task.cancel()
        if not task.done() or task.cancelled():
            return JSONResponse({}, status_code=499)
        try:
            out = task.result()
        except asyncio.TimeoutError:
            raise APIError(504, f"generation took longer than the server's timeout of "
                                f"{self.config.request_timeout:g} s", "timeout_error", None, "timeout") from None
        except (InputError, MediaError) as e:
            raise _media_error(e) from None
        choices = []
        for o in out.outputs:
            message, finish = self._message(o.text, o.finish_reason, req)
            choice = {"index": o.index, "message": message, "finish_reason": finish, "logprobs": None}
            if req.top_logprobs is not None and o.logprobs is not None:
                choice["logprobs"] = {"content": logprobs_content(o.token_ids, o.logprobs, req.top_logprobs,
                                                                  self.backend.tokenizer), "refusal": None}
            choices.append(choice)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": now(), "model": model,
                             "choices": choices, "usage": _usage(out), "system_fingerprint": None})

    def _message(self, text: str, finish: str | None, req: ChatRequest) -> tuple[dict, str | None]:
        message = {"role": "assistant", "content": text}
        if req.parse_tools:
            content, calls = split_tool_calls(text)
            if calls:
                return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
            if req.tool_schema is not None:
                raise no_tool_call(text)
        if req.response_format is not None:
            message["content"] = check_json(text, req.response_format)
        return message, finish

    async def _sse(self, rid: str, model: str, req: ChatRequest, deadline: float):
        """SSE chunks of one streamed request. Its first item comes after the first engine delta, so an error
        while the prompt is encoded propagates (as an exception) before any byte is sent."""
        created = now()
        tag = "<tool_call>"

        def chunk(choices: list, usage=None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, "system_fingerprint": None}
            if usage is not None:
                body["usage"] = usage
            return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"

        texts: dict[int, str] = {}
        sent: dict[int, int] = {}
        started = False
        loop = asyncio.get_running_loop()
        stream = self.backend.stream(rid, req.messages, req.params)
        try:
            while True:
                # a per-step timeout: this generator is resumed from different tasks (the handler's, then
                # the response's), so no timeout scope may span a yield
                try:
                    d = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - loop.time()))
                except StopAsyncIteration:
                    break
                out = []
                if not started:
                    started = True
                    out += [chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]) for i in range(req.params.n)]
                i = d.index
                texts[i] = text = texts.get(i, "") + d.text_delta
                # with tools: hold back what may be the start of a <tool_call> tag, stop at the tag
                end = len(text)
                if req.parse_tools:
                    k = text.find(tag)
                    end = k if k >= 0 else len(text) - next(
                        (n for n in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-n:])), 0)
                choice = {"index": i, "delta": {}, "logprobs": None, "finish_reason": None}
                if end > sent.get(i, 0):
                    choice["delta"]["content"] = text[sent.get(i, 0):end]
                    sent[i] = end
                if req.top_logprobs is not None and d.logprobs:
                    choice["logprobs"] = {"content": logprobs_content(d.new_token_ids, d.logprobs,
                                                                      req.top_logprobs, self.backend.tokenizer)}
                if d.finished:
                    message, finish = self._message(text, d.finish_reason, req)
                    if message.get("tool_calls"):
                        choice["delta"]["tool_calls"] = [{"index": j, **c}
                                                         for j, c in enumerate(message["tool_calls"])]
                    elif len(text) > sent.get(i, 0):
                        choice["delta"]["content"] = choice["delta"].get("content", "") + text[sent.get(i, 0):]
                        sent[i] = len(text)
                    choice["finish_reason"] = finish
                if choice["delta"] or choice["finish_reason"] or choice["logprobs"]:
                    out.append(chunk([choice]))
                if out:
                    yield "".join(out)
                if d.output is not None:
                    if req.include_usage:
                        yield chunk([], _usage(d.output))
                    break
            yield "data: [DONE]\n\n"
        except Exception as e:
            if isinstance(e, asyncio.TimeoutError):
                e = APIError(504, f"generation took longer than the server's timeout of "
                                  f"{self.config.request_timeout:g} s", "timeout_error", None, "timeout")
            elif isinstance(e, (InputError, MediaError)):
                e = _media_error(e)
            elif not isinstance(e, APIError):
                log.exception("generation failed")
                e = APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
            if not started:
                raise e from None
            yield "data: " + json.dumps(e.body()) + "\n\n"
        finally:
            await stream.aclose()  # cancels the request if it is still running
            self.active -= 1


def _usage(out) -> dict:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(o.token_ids) for o in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(backend, config: ServerConfig | None = None) -> Starlette:
    server = Server(backend, config)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       "invalid_request_error", None, code))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    app = Starlette(routes=[
        Route("/", server.index, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
    ], exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.server = server
    return app
