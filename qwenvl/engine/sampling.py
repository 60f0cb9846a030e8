"""SamplingParams and the batched sampler.

The sampler works on a [B, V] float32 logits tensor with one row per sequence and applies every row's own
parameters with tensor ops (no Python loop over the vocabulary, no host round trip). Order (as vLLM):
penalties -> greedy rows take the argmax -> temperature -> min_p -> top_k -> top_p -> sample.
Sampling is an exponential race (argmax(p / q), q ~ Exp(1)), which is exactly categorical sampling and lets a
seeded row draw its noise from its own torch.Generator: a seeded request gives the same tokens alone or in a
batch. Logprobs are those of the raw model distribution (log_softmax of the unprocessed logits), as vLLM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..layers import to_device

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: until a stop condition or max_model_len
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/vLLM rule over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI rule over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (the sampled token is always included)
    n: int = 1
    skip_special_tokens: bool = True
    # vLLM's hook: each f(output_token_ids, logits [V]) -> logits, applied in order before sampling (e.g. the
    # server's JSON-schema constraint). Runs on the host per step: only the sequences that have them pay.
    logits_processors: list | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SamplingParams":
        def bad(name, why):
            raise InputError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1 (or None)")
        if not is_num(self.temperature) or not self.temperature >= 0:
            bad("temperature", "must be a number >= 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "must be an integer: -1 or 0 (off) or >= 1")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not is_num(self.repetition_penalty) or not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2]")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of non-empty strings")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of non-negative integers")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be a bool")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        if not is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not isinstance(self.skip_special_tokens, bool):
            bad("skip_special_tokens", "must be a bool")
        self.logits_processors = list(self.logits_processors or [])
        if not all(callable(f) for f in self.logits_processors):
            bad("logits_processors", "must be a list of callables f(output_token_ids, logits) -> logits")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def child(self, index: int) -> "SamplingParams":
        """Params of the index-th of n completions: n=1, and a distinct seed (seed + index) when seeded."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)


@dataclass
class SamplerRow:
    """What the sampler needs to know about one sequence."""
    params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] long, on the logits' device
    logprobs: list[dict[int, float] | None]  # per row: {token: logprob} of the sampled token + top-n, or None


def apply_penalties(logits: torch.Tensor, prompt_ids: list[list[int]], output_ids: list[list[int]],
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Penalised copy of logits [B, V].

    repetition (> 1 discourages): a token seen in the prompt or the output gets logit / r if positive, else * r.
    presence / frequency: logit -= presence * [count > 0] + frequency * count, counts over the output only.
    """
    B, V = logits.shape
    dev = logits.device
    counts = torch.zeros(B, V + 1, dtype=logits.dtype, device=dev)  # column V absorbs the padding
    seen_prompt = torch.zeros(B, V + 1, dtype=torch.bool, device=dev)
    if any(output_ids):
        out = _pad(output_ids, V, dev)
        counts.scatter_add_(1, out, torch.ones_like(out, dtype=logits.dtype))
    if any(prompt_ids):
        seen_prompt.scatter_(1, _pad(prompt_ids, V, dev), True)
    counts, seen_prompt = counts[:, :V], seen_prompt[:, :V]
    seen = seen_prompt | (counts > 0)
    r = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def _on(vals: list, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list on the device through pinned memory (layers.to_device): a pageable copy would wait for the
    GPU to drain, and the engine launches the next decode step before it reads this step's tokens."""
    return to_device(torch.tensor(vals, dtype=dtype), device)


def _pad(rows: list[list[int]], fill: int, device) -> torch.Tensor:
    L = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), L), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return to_device(out, device)


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
            need_k: bool, need_p: bool, need_min_p: bool) -> torch.Tensor:
    """Mask (to -inf) what min_p, top_k (0 = off) and top_p (1 = off) exclude, per row."""
    V = logits.shape[-1]
    if need_min_p:
        probs = logits.softmax(-1)
        thresh = probs.max(-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    if need_k or need_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if need_k:
            k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).clamp(max=V)
            drop |= torch.arange(V, device=logits.device)[None, :] >= k[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        if need_p:
            probs = sorted_logits.softmax(-1)
            # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
            drop |= (probs.cumsum(-1) - probs) > top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, rows: list[SamplerRow], generator: torch.Generator | None = None) -> SamplerOutput:
    """One token per row of logits [B, V] (float32), each row with its own parameters."""
    B, V = logits.shape
    dev = logits.device
    ps = [r.params for r in rows]
    raw = logits

    if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in ps):
        f = lambda vals: _on(vals, dev, logits.dtype)  # noqa: E731
        logits = apply_penalties(logits, [r.prompt_token_ids if r.params.repetition_penalty != 1 else []
                                          for r in rows],  # prompt tokens count for repetition only
                                 [r.output_token_ids for r in rows],
                                 f([p.repetition_penalty for p in ps]), f([p.presence_penalty for p in ps]),
                                 f([p.frequency_penalty for p in ps]))

    greedy_ids = logits.argmax(-1)
    if all(p.greedy for p in ps):
        token_ids = greedy_ids
    else:
        temp = _on([p.temperature if p.temperature > 0 else 1.0 for p in ps], dev, logits.dtype)
        x = logits / temp[:, None]
        need_k = any(p.top_k > 0 for p in ps)
        need_p = any(p.top_p < 1 for p in ps)
        need_min_p = any(p.min_p > 0 for p in ps)
        if need_k or need_p or need_min_p:
            x = _filter(x, _on([max(p.top_k, 0) for p in ps], dev), _on([p.top_p for p in ps], dev, x.dtype),
                        _on([p.min_p for p in ps], dev, x.dtype), need_k, need_p, need_min_p)
        probs = x.softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        for i, r in enumerate(rows):  # seeded rows draw from their own stream: batch-independent
            if r.generator is not None and not r.params.greedy:
                noise[i].exponential_(generator=r.generator)
        noise.clamp_(min=1e-20)  # an exact 0 would give 0/0
        sampled = probs.div_(noise).argmax(-1)
        is_greedy = _on([p.greedy for p in ps], dev)
        token_ids = torch.where(is_greedy, greedy_ids, sampled)

    logprobs: list[dict[int, float] | None] = [None] * B
    want = [i for i, p in enumerate(ps) if p.logprobs is not None]
    if want:
        idx = _on(want, dev)
        lp = torch.log_softmax(raw[idx].float(), dim=-1)
        chosen = lp.gather(1, token_ids[idx][:, None])[:, 0]
        n_top = max(ps[i].logprobs for i in want)
        top_v, top_i = lp.topk(max(n_top, 1), dim=-1)
        chosen_l, tv, ti, tok = chosen.tolist(), top_v.tolist(), top_i.tolist(), token_ids[idx].tolist()
        for j, i in enumerate(want):
            d = {ti[j][k]: tv[j][k] for k in range(ps[i].logprobs)}
            d[tok[j]] = chosen_l[j]
            logprobs[i] = d
    return SamplerOutput(token_ids, logprobs)
