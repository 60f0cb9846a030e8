"""Answer generation for evaluation and rejection sampling: the engine (qwenvl.LLM) when it loads and runs,
else Qwen25VL.generate over left-padded batches from the Processor.

A generator is any callable `fn(conversations, max_tokens) -> list[str]`; `ModelGenerator` also has
`sample(conversations, k, temperature, max_tokens, seed) -> list[list[str]]` for rejection sampling.
"""
from __future__ import annotations

import sys

import torch


class ModelGenerator:
    def __init__(self, model: str | None = None, backend: str = "auto", device: str | None = None,
                 dtype: str | None = None, batch_size: int = 8, quiet: bool = False, kv_cache_mb: int | None = None):
        from ..hub import resolve_model

        if backend not in ("auto", "engine", "generate"):
            raise ValueError(f"backend must be auto, engine or generate, got {backend!r}")
        self.path = resolve_model(model, quiet=quiet)
        self.batch_size = batch_size
        self.kv_cache_mb = kv_cache_mb  # engine KV cache size; None: the engine's default (CUDA: from free memory)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.backend, self.llm, self.model, self.proc = None, None, None, None
        if backend in ("auto", "engine"):
            try:
                self._load_engine()
            except Exception as e:  # noqa: BLE001 - any failure means: use the plain path
                if backend == "engine":
                    raise
                print(f"qwenvl eval: engine unavailable ({type(e).__name__}: {e}); using Qwen25VL.generate",
                      file=sys.stderr)
        if self.backend is None:
            self._load_plain()

    def _load_engine(self) -> None:
        from ..engine import LLM, SamplingParams

        llm = LLM(self.path, device=self.device, dtype=self.dtype,
                  kv_cache_bytes=self.kv_cache_mb << 20 if self.kv_cache_mb else None)
        llm.chat([[{"role": "user", "content": "hi"}]], SamplingParams(max_tokens=1, temperature=0.0))  # it runs
        self.llm, self.backend = llm, "engine"

    def _load_plain(self) -> None:
        from ..model import Qwen25VL
        from ..processor import Processor

        self.model = Qwen25VL.from_pretrained(self.path, dtype=self.dtype, device=self.device).eval()
        self.proc = Processor.from_pretrained(self.path)
        self.backend = "generate"

    # ------------------------------------------------------------------
    def __call__(self, conversations: list, max_tokens: int = 256) -> list[str]:
        return [outs[0] for outs in self.sample(conversations, 1, 0.0, max_tokens)]

    def sample(self, conversations: list, k: int = 1, temperature: float = 0.0, max_tokens: int = 256,
               seed: int | None = 0) -> list[list[str]]:
        """k answers per conversation (greedy when temperature == 0)."""
        if not conversations:
            return []
        if self.backend == "engine":
            from ..engine import SamplingParams

            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, n=k,
                                    seed=None if temperature == 0 else seed)
            outs = []
            for i in range(0, len(conversations), self.batch_size * 8):  # bounded host memory for media
                outs += self.llm.chat(conversations[i:i + self.batch_size * 8], params)
            return [[c.text for c in o.outputs] for o in outs]
        flat = [c for c in conversations for _ in range(k)]
        texts = []
        for i in range(0, len(flat), self.batch_size):
            batch = self.proc(flat[i:i + self.batch_size])
            out = self.model.generate(**batch, max_new_tokens=max_tokens, temperature=temperature,
                                      seed=None if temperature == 0 else seed + i)
            texts += [self._decode(row.tolist()) for row in out]
        return [texts[j * k:(j + 1) * k] for j in range(len(conversations))]

    def _decode(self, ids: list[int]) -> str:
        tok = self.proc.tokenizer
        stops = {tok.eos_token_id, tok.endoftext_id, tok.im_end_id}
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.proc.decode(ids[:cut])
