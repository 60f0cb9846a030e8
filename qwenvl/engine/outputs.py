"""What the engine returns: RequestOutput / CompletionOutput (final), StepOutput (one step's delta), and
TextStream, the per-sequence detokenizer that applies stop strings (vLLM semantics: the stop string and what
follows are not in the text; while stop strings are set, the last len(longest)-1 characters are held back
from the stream until they cannot begin a stop string)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..tokenizer import IncrementalDecoder, Tokenizer
from .sampling import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort"
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob}, sampled + top-n


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    # the first completion, for convenience
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs


@dataclass
class StepOutput:
    """One completion's progress in one step. Unpacks as (request_id, new_token_ids, text_delta, finished)."""
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool  # this completion (index) is done
    index: int = 0
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None  # for new_token_ids, when requested
    output: RequestOutput | None = field(default=None, repr=False)  # set once the whole request is done

    def __iter__(self):
        return iter((self.request_id, self.new_token_ids, self.text_delta, self.finished))

    @property
    def request_finished(self) -> bool:
        return self.output is not None


class TextStream:
    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams):
        self.decoder = IncrementalDecoder(tokenizer, params.skip_special_tokens) if tokenizer is not None else None
        self.stop = list(params.stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> bool:
        """Decode one token; True if the text now contains a stop string (the text is cut before it)."""
        return self.decoder is not None and self._add(self.decoder.push(token_id))

    def _add(self, piece: str) -> bool:
        if not piece or self.stopped:
            return False
        start = max(0, len(self.text) - self.hold)  # a stop string may begin in the held-back tail
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def close(self) -> None:
        """The sequence finished: decode any held partial character."""
        if self.decoder is not None and not self.stopped:
            self._add(self.decoder.flush())

    def take_delta(self, finished: bool) -> str:
        end = len(self.text) if finished else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta
