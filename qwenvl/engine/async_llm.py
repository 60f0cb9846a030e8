"""AsyncLLM: the engine driven by a background thread, for servers.

    engine = AsyncLLM(path_or_model, **llm_kwargs)          # or AsyncLLM(existing_llm)
    async for delta in engine.stream(request_id, messages, params):
        delta.text_delta, delta.new_token_ids, delta.finished, delta.index, delta.finish_reason
    # the last delta of the request carries delta.output (the full RequestOutput)

Only the engine thread touches the LLM after construction: requests and aborts go through a thread-safe
inbox that the thread drains at each step boundary; deltas come back through the caller's event loop
(call_soon_threadsafe). Prompt encoding (image loading, preprocessing) runs in the loop's default executor,
off both the event loop and the engine thread. A consumer that stops iterating (break, exception,
task cancellation) aborts its request, which frees its blocks at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from typing import AsyncIterator

from ..errors import InputError
from .engine import LLM
from .outputs import RequestOutput, StepOutput
from .sampling import SamplingParams

log = logging.getLogger(__name__)


class AsyncLLM:
    def __init__(self, model, **llm_kwargs):
        self.llm = model if isinstance(model, LLM) else LLM(model, **llm_kwargs)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", rid, prompt, params) | ("abort", rid)
        self._consumers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _consumers
        self._wake = threading.Event()
        self._stopped = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="qwenvl-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ public
    async def stream(self, request_id: str | None, prompt, params: SamplingParams | None = None
                     ) -> AsyncIterator[StepOutput]:
        """Deltas of one request until all its completions finish. prompt: messages or any LLM prompt form."""
        if self._stopped:
            raise RuntimeError("AsyncLLM is shut down")
        loop = asyncio.get_running_loop()
        rid = str(request_id) if request_id is not None else f"async-{next(self._ids)}"
        params = params or SamplingParams()
        params.validate()
        encoded = await loop.run_in_executor(None, self.llm.encode_prompt, prompt)  # raises InputError
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._consumers:
                raise InputError(f"request id {rid!r} is already in use")
            self._consumers[rid] = (loop, q)
        self._inbox.put(("add", rid, encoded, params))
        self._wake.set()
        done = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
                if item.output is not None:
                    done = True
                    return
        finally:
            with self._lock:
                self._consumers.pop(rid, None)
            if not done:  # the consumer went away: cancel the request
                self.abort(rid)

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None
                       ) -> RequestOutput:
        async for delta in self.stream(request_id, prompt, params):
            if delta.output is not None:
                return delta.output
        raise RuntimeError("request ended without an output")

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", str(request_id)))
        self._wake.set()

    def stats(self) -> dict:
        return self.llm.stats()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.llm.shutdown()  # tensor parallel: stops the other ranks (only this thread drove the engine)

    # ------------------------------------------------------------------------------------------ engine thread
    def _deliver(self, rid: str, item) -> None:
        with self._lock:
            target = self._consumers.get(rid)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, rid, encoded, params = msg
                with self._lock:
                    alive = rid in self._consumers
                if not alive:  # cancelled before it was queued
                    continue
                try:
                    self.llm._add_encoded(rid, encoded, params)
                except Exception as e:
                    self._deliver(rid, e)
            else:
                self.llm.abort(msg[1])

    def _loop(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.llm.has_unfinished():
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            try:
                outputs = self.llm.step()
            except Exception as e:  # fail every in-flight request, keep serving new ones
                log.exception("engine step failed")
                with self._lock:
                    rids = set(self._consumers) | set(self.llm._requests)
                for rid in rids:
                    self._deliver(rid, e)
                    self.llm.abort(rid)
                try:
                    self.llm._process_aborts()
                except Exception:
                    log.exception("could not clean up after a failed step")
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
