"""AsyncLLM: concurrent streams from a background engine thread, cancellation when the consumer stops."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

import qwenvl
from qwenvl.engine import LLM, AsyncLLM, SamplingParams
from qwenvl.errors import InputError
from qwenvl.model import Qwen25VL

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return Qwen25VL.random(qwenvl.preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def engine(model):
    eng = AsyncLLM(LLM(model, num_blocks=128, block_size=4))
    yield eng
    eng.shutdown()


def test_concurrent_streams_equal_offline_outputs(model, engine):
    prompts = [[151644, 872, 198, 100 + i, 200 + i, 151645, 198, 151644, 77091, 198] for i in range(5)]
    # only the engine thread may drive engine.llm: the expectation comes from a separate LLM
    offline = LLM(model, num_blocks=128, block_size=4)
    expected = [o.token_ids for o in offline.generate(prompts, SamplingParams(max_tokens=8, **GREEDY))]

    async def consume(i):
        toks, text, final = [], "", None
        async for d in engine.stream(f"s{i}", prompts[i], SamplingParams(max_tokens=8, **GREEDY)):
            toks += d.new_token_ids
            text += d.text_delta
            final = d.output or final
        return toks, text, final

    async def main():
        return await asyncio.gather(*(consume(i) for i in range(5)))

    for (toks, text, final), exp in zip(asyncio.run(main()), expected):
        assert toks == exp == final.token_ids
        assert text == final.text and final.finish_reason == "length"


def test_consumer_that_stops_iterating_cancels_the_request(engine):
    async def main():
        got = 0
        async for d in engine.stream("long", [1, 2, 3, 4], SamplingParams(max_tokens=500, **GREEDY)):
            got += len(d.new_token_ids)
            if got >= 3:
                break
        return got

    assert asyncio.run(main()) == 3
    deadline = time.time() + 10
    while (engine.llm.has_unfinished() or engine.llm.num_used_blocks) and time.time() < deadline:
        time.sleep(0.01)
    assert engine.llm.num_used_blocks == 0 and not engine.llm.has_unfinished()


def test_invalid_request_raises_in_the_caller(engine):
    async def main():
        async for _ in engine.stream("bad", torch.tensor([]).long(), SamplingParams()):
            pass

    with pytest.raises(InputError):
        asyncio.run(main())
    assert asyncio.run(engine.generate([5, 6, 7], SamplingParams(max_tokens=2, **GREEDY))).finish_reason == "length"
