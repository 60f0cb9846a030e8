"""Sampling: the batched sampler against hand computations, seeded reproducibility, stop conditions,
logprobs, SamplingParams validation (tiny model, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

import qwenvl
from qwenvl.engine import LLM, SamplingParams
from qwenvl.engine.sampling import SamplerRow, apply_penalties, sample
from qwenvl.errors import InputError
from qwenvl.model import Qwen25VL


def chat(*parts):
    return [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198] + \
        [x for p in parts for x in p] + [151645, 198, 151644, 77091, 198]


@pytest.fixture(scope="module")
def model():
    return Qwen25VL.random(qwenvl.preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model, num_blocks=256, block_size=8)


# ------------------------------------------------------------------------------------------ the sampler itself
def test_penalties_follow_the_formulas():
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.5, 2.0],
                           [1.0, -2.0, 0.5, 3.0, -0.5, 2.0]])
    prompt = [[0, 1], [5]]
    output = [[3, 3, 1], []]
    rep = torch.tensor([2.0, 1.5])
    pres = torch.tensor([0.5, 0.0])
    freq = torch.tensor([0.25, 1.0])
    got = apply_penalties(logits, prompt, output, rep, pres, freq)
    # row 0: seen = {0, 1, 3}; counts: 3 -> 2, 1 -> 1
    r0 = [1.0 / 2, -2.0 * 2 - 0.25 * 1 - 0.5, 0.5, 3.0 / 2 - 0.25 * 2 - 0.5, -0.5, 2.0]
    # row 1: seen = {5} (prompt only); no output, so presence/frequency change nothing
    r1 = [1.0, -2.0, 0.5, 3.0, -0.5, 2.0 / 1.5]
    assert torch.allclose(got, torch.tensor([r0, r1]))


def test_greedy_top_k_1_tiny_top_p_and_min_p_1_all_pick_the_argmax():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(-1)
    for p in (SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_k=1),
              SamplingParams(temperature=1.0, top_p=1e-6), SamplingParams(temperature=1.0, min_p=1.0)):
        out = sample(logits, [SamplerRow(p) for _ in range(6)], torch.Generator().manual_seed(1))
        assert torch.equal(out.token_ids, argmax), p


def test_sampled_frequencies_match_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])  # probs .563 .207 .076 .028 .126
    gen = torch.Generator().manual_seed(0)
    n = 20000
    for params, scale, keep in [
        (SamplingParams(temperature=1.0), 1.0, [0, 1, 2, 3, 4]),
        (SamplingParams(temperature=2.0), 0.5, [0, 1, 2, 3, 4]),
        (SamplingParams(temperature=1.0, top_k=2), 1.0, [0, 1]),
        (SamplingParams(temperature=1.0, top_p=0.8), 1.0, [0, 1, 4]),  # mass before token 2 is .896 > .8
        (SamplingParams(temperature=1.0, min_p=0.2), 1.0, [0, 1, 4]),  # p >= .2 * .563
    ]:
        toks = sample(logits.expand(n, -1).contiguous(), [SamplerRow(params)] * n, gen).token_ids
        freq = torch.bincount(toks, minlength=5).float() / n
        expect = torch.zeros(5)
        expect[keep] = torch.softmax(logits[keep] * scale, -1)
        assert (freq - expect).abs().max() < 0.015, (params, freq, expect)


def test_seeded_row_same_alone_or_batched_in_the_sampler():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(2))
    seeded = SamplingParams(temperature=1.0, seed=42)

    def row(p):
        return SamplerRow(p, generator=torch.Generator().manual_seed(p.seed) if p.seed is not None else None)

    alone = [sample(logits[3:4], [row(seeded)]).token_ids.item() for _ in range(1)]
    batch = sample(logits, [row(SamplingParams(temperature=0.7)), row(SamplingParams(temperature=0)),
                            row(SamplingParams(temperature=1.0, seed=7)), row(seeded),
                            row(SamplingParams(temperature=1.0, top_p=0.5))]).token_ids
    assert batch[3].item() == alone[0]


def test_logprobs_in_the_sampler_are_raw_log_softmax():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    out = sample(logits, [SamplerRow(SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0,
                                                    presence_penalty=1.0), output_token_ids=[1, 2]),
                          SamplerRow(SamplingParams(temperature=0))])
    lp = torch.log_softmax(logits[0], -1)
    d = out.logprobs[0]
    assert out.logprobs[1] is None
    top = lp.topk(3)
    for tok, v in zip(top.indices.tolist(), top.values.tolist()):
        assert d[tok] == pytest.approx(v, abs=1e-6)
    tok = out.token_ids[0].item()
    assert d[tok] == pytest.approx(lp[tok].item(), abs=1e-6)


# ------------------------------------------------------------------------------------------ params validation
@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("seed", "x"), ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-1]),
    ("logprobs", 21), ("logprobs", -1), ("n", 0), ("ignore_eos", "yes"), ("skip_special_tokens", None),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(InputError, match=field):
        SamplingParams(**{field: value})


def test_stop_string_given_as_str_becomes_a_list():
    assert SamplingParams(stop="abc").stop == ["abc"]


# ------------------------------------------------------------------------------------------ through the engine
def test_seeded_requests_same_alone_or_in_a_batch(llm):
    prompts = [chat([100 + i, 200 + i, 300]) for i in range(6)]
    seeded = [SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=s, ignore_eos=True) for s in (1, 2)]
    alone = [llm.generate(prompts[i], seeded[i])[0].token_ids for i in range(2)]
    others = [SamplingParams(max_tokens=5, temperature=0.8, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=3, temperature=1.2, top_k=50, seed=9, ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=1.0, repetition_penalty=1.3, ignore_eos=True)]
    batch = llm.generate(prompts, seeded + others)
    assert [batch[0].token_ids, batch[1].token_ids] == alone
    assert alone[0] != llm.generate(prompts[0], SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=3,
                                                               ignore_eos=True))[0].token_ids


def test_top_k_1_equals_greedy_in_the_engine(llm):
    p = chat([11, 22, 33])
    greedy = llm.generate(p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    topk1 = llm.generate(p, SamplingParams(max_tokens=10, temperature=1.3, top_k=1, ignore_eos=True))[0]
    assert greedy.token_ids == topk1.token_ids


def test_finish_reasons_stop_token_stop_string_length_and_eos(llm):
    p = chat([5, 6, 7, 8])
    base = llm.generate(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 12

    stop_tok = base.token_ids[4]
    first = base.token_ids.index(stop_tok)
    out = llm.generate(p, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_tok]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == base.token_ids[:first + 1]  # the stop token is kept in token_ids ...
    assert out.text == llm.tokenizer.decode(base.token_ids[:first], skip_special_tokens=True)  # ... not in text

    text = base.text
    assert len(text) > 12
    stop = text[len(text) // 2: len(text) // 2 + 3]
    out = llm.generate(p, SamplingParams(max_tokens=12, temperature=0, stop=["@@never@@", stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.index(stop)]

    eos_before = llm.eos_token_ids
    llm.eos_token_ids = {base.token_ids[2]}  # pretend the model's EOS is the third token
    try:
        out = llm.generate(p, SamplingParams(max_tokens=12, temperature=0))[0]
        assert out.finish_reason == "stop" and out.token_ids == base.token_ids[:base.token_ids.index(base.token_ids[2]) + 1]
        out = llm.generate(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
        assert out.finish_reason == "length" and out.token_ids == base.token_ids
    finally:
        llm.eos_token_ids = eos_before


def test_streamed_deltas_hold_back_a_possible_stop_string(llm):
    p = chat([5, 6, 7, 8])
    base = llm.generate(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop = base.text[-4:]
    llm.add_request("s", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))
    deltas, final = [], None
    while llm.has_unfinished():
        for out in llm.step():
            deltas.append(out.text_delta)
            assert stop not in "".join(deltas)
            final = out.output or final
    assert "".join(deltas) == final.text == base.text[:base.text.index(stop)]


def test_logprobs_equal_log_softmax_of_reference_logits(model, llm):
    p = chat([42, 43, 44, 45])
    out = llm.generate(p, SamplingParams(max_tokens=6, temperature=0.9, seed=5, logprobs=4, ignore_eos=True))[0]
    assert len(out.logprobs) == 6
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p + out.token_ids]))[0].float(), -1)
    for i, (tok, d) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(p) - 1 + i]
        assert d[tok] == pytest.approx(row[tok].item(), abs=1e-4)
        top = row.topk(4)
        assert set(top.indices.tolist()) <= set(d)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert d[t] == pytest.approx(v, abs=1e-4)
        assert all(math.isfinite(v) for v in d.values())


def test_n_completions_use_distinct_seeds(llm):
    p = chat([1, 2, 3])
    out = llm.generate(p, SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=11, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    assert out.text == out.outputs[0].text
    # completion i equals a single request with seed + i
    one = llm.generate(p, SamplingParams(max_tokens=6, temperature=1.0, seed=12, ignore_eos=True))[0]
    assert one.token_ids == out.outputs[1].token_ids
    assert llm.num_used_blocks == 0
