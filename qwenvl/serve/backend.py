"""What the server generates with: the `Backend` protocol, its engine adapter, and a scripted stand-in.

A backend streams `StepOutput`s (qwenvl.engine.outputs) for one request: one per new token of each of the
n completions, the last one carrying `.output` (the whole RequestOutput). A consumer that stops iterating
cancels the request (the engine frees its KV blocks at its next step).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Protocol

from ..engine.outputs import CompletionOutput, RequestOutput, StepOutput


class Backend(Protocol):
    max_model_len: int
    tokenizer: object  # qwenvl.tokenizer.Tokenizer or None (token strings for logprobs)
    min_pixels: int  # the processor's image limits (the web page maps boxes back with them)
    max_pixels: int

    def stream(self, request_id: str, messages: list[dict], params) -> AsyncIterator[StepOutput]: ...

    def stats(self) -> dict: ...

    def shutdown(self) -> None: ...


class EngineBackend:
    """qwenvl.engine.AsyncLLM behind the Backend protocol."""

    def __init__(self, engine):
        self.engine = engine
        llm = engine.llm
        self.max_model_len = llm.max_model_len
        self.tokenizer = llm.tokenizer
        proc = llm.processor
        self.min_pixels = getattr(proc, "min_pixels", 3136)
        self.max_pixels = getattr(proc, "max_pixels", 12845056)
        self.eos_token_ids = sorted(llm.eos_token_ids)

    def constrain(self, params, response_format: dict) -> None:
        """Constrained decoding (serve.constrained): response_format json_object / json_schema, or
        {"type": "tool_calls", "schema": one call's schema} for tool_choice "required" / a named function."""
        from .constrained import JsonConstraint, ToolCallConstraint

        if response_format["type"] == "tool_calls":
            proc = ToolCallConstraint(response_format["schema"], self.tokenizer, self.eos_token_ids)
            if any(t is not None and self.tokenizer.is_skipped_special(t) for t in proc.tag_ids):
                params.skip_special_tokens = False  # the tags must reach the text (nothing else special can)
        else:
            schema = response_format.get("schema") if response_format["type"] == "json_schema" else None
            proc = JsonConstraint(schema, self.tokenizer, self.eos_token_ids)
        params.logits_processors = list(params.logits_processors or []) + [proc]

    @classmethod
    def from_path(cls, path: str, **llm_kwargs) -> "EngineBackend":
        from ..engine import AsyncLLM

        return cls(AsyncLLM(path, **llm_kwargs))

    def stream(self, request_id, messages, params):
        return self.engine.stream(request_id, messages, params)

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()


class ScriptedBackend:
    """Answers every request with `answer(messages) -> str`, one token at a time (no model): for the web page's
    and the protocol's tests, and for trying a client without weights. Token ids come from the Qwen tokenizer."""

    def __init__(self, answer: Callable[[list[dict]], str] | str, delay: float = 0.0, max_model_len: int = 32768):
        from ..tokenizer import Tokenizer

        self.answer = answer if callable(answer) else (lambda messages, _a=answer: _a)
        self.delay = delay
        self.max_model_len = max_model_len
        self.tokenizer = Tokenizer.from_pretrained(None)
        self.min_pixels, self.max_pixels = 3136, 12845056
        self.active = 0

    async def stream(self, request_id, messages, params) -> AsyncIterator[StepOutput]:
        from ..chat import render_chat
        from ..tokenizer import IncrementalDecoder

        prompt_ids = self.tokenizer.encode(render_chat(messages))
        ids = self.tokenizer.encode(self.answer(messages))[: params.max_tokens or None]
        reason = "length" if params.max_tokens is not None and len(ids) >= params.max_tokens else "stop"
        outs = [CompletionOutput(i, "", [], None) for i in range(params.n)]
        self.active += 1
        try:
            for i, out in enumerate(outs):
                dec = IncrementalDecoder(self.tokenizer)
                if not ids:  # an empty answer still finishes
                    out.finish_reason = reason
                    step = StepOutput(request_id, [], "", True, i, reason)
                    step.output = RequestOutput(request_id, prompt_ids, outs) if i == len(outs) - 1 else None
                    yield step
                for k, tok in enumerate(ids):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    piece = dec.push(tok) + (dec.flush() if k == len(ids) - 1 else "")
                    out.text += piece
                    out.token_ids.append(tok)
                    last = k == len(ids) - 1
                    if last:
                        out.finish_reason = reason
                    step = StepOutput(request_id, [tok], piece, last, i, out.finish_reason if last else None)
                    if last and i == len(outs) - 1:
                        step.output = RequestOutput(request_id, prompt_ids, outs)
                    yield step
                    await asyncio.sleep(0)
        finally:
            self.active -= 1

    def stats(self) -> dict:
        return {"num_used_blocks": 0, "active": self.active}

    def shutdown(self) -> None:
        pass
