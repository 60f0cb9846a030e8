"""The inference engine: paged KV cache, continuous batching, chunked prefill, prefix caching, sampling."""
from .async_llm import AsyncLLM
from .engine import LLM
from .outputs import CompletionOutput, RequestOutput, StepOutput
from .sampling import SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "StepOutput"]
