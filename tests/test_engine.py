"""Engine correctness on the tiny model (CPU, float32): greedy outputs equal Qwen25VL.generate run alone,
whatever the batching, chunking, preemption, prefix caching or cancellations around them."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

import qwenvl
from qwenvl.engine import LLM, SamplingParams
from qwenvl.errors import InputError
from qwenvl.model import Qwen25VL
from qwenvl.processor import Processor

VS, VE, IMG, VID = 151652, 151653, 151655, 151656
GREEDY = dict(temperature=0.0, ignore_eos=True)


def chat(*parts):
    """A ChatML-shaped id sequence: system, user turn with the given parts, assistant prompt."""
    return [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198] + \
        [x for p in parts for x in p] + [151645, 198, 151644, 77091, 198]


def vision_block(tok, grid):
    t, h, w = grid
    return [VS] + [tok] * (t * h * w // 4) + [VE]


def pixels(grid, seed):
    t, h, w = grid
    return torch.randn(t * h * w, 1176, generator=torch.Generator().manual_seed(seed))


def make_request(rng: random.Random, seed: int, kinds=("text", "image", "images", "video")):
    """A prompt dict (token ids + vision items) and its max_tokens."""
    kind = rng.choice(kinds)
    text = [rng.randrange(100, 150000) for _ in range(rng.randrange(1, 60))]
    images, videos, parts = [], [], []
    if kind in ("image", "images"):
        for j in range(1 if kind == "image" else 2):
            grid = rng.choice([(1, 4, 4), (1, 8, 12), (1, 12, 8), (1, 6, 10), (1, 16, 16)])
            images.append((pixels(grid, seed * 10 + j), torch.tensor(grid)))
            parts.append(vision_block(IMG, grid))
    elif kind == "video":
        grid = rng.choice([(2, 8, 8), (3, 4, 8)])
        videos.append((pixels(grid, seed * 10 + 7), torch.tensor(grid), rng.choice([1.0, 0.5, 4 / 3])))
        parts.append(vision_block(VID, grid))
    ids = chat(*parts[:1], text[: len(text) // 2], *parts[1:], text[len(text) // 2:])
    return {"prompt_token_ids": ids, "images": images, "videos": videos}, rng.randrange(1, 17)


def reference(model, prompt, max_tokens):
    """Greedy tokens of the reference path (contiguous cache, whole prompt at once), no EOS stop."""
    kw = {}
    if prompt.get("images"):
        kw["pixel_values"] = torch.cat([p for p, _ in prompt["images"]])
        kw["image_grid_thw"] = torch.stack([g for _, g in prompt["images"]])
    if prompt.get("videos"):
        kw["pixel_values_videos"] = torch.cat([p for p, _, _ in prompt["videos"]])
        kw["video_grid_thw"] = torch.stack([g for _, g, _ in prompt["videos"]])
        kw["second_per_grid_ts"] = torch.tensor([s for _, _, s in prompt["videos"]])
    out = model.generate(torch.tensor([prompt["prompt_token_ids"]]), max_new_tokens=max_tokens, eos_token_id=[], **kw)
    return out[0].tolist()


@pytest.fixture(scope="module")
def model():
    return Qwen25VL.random(qwenvl.preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def workload(model):
    """64 mixed requests (text, one or two images of different sizes, videos; prompt lengths ~20..200,
    max_tokens 1..16) with their reference outputs."""
    rng = random.Random(0)
    reqs = [make_request(rng, i) for i in range(64)]
    return [(p, n, reference(model, p, n)) for p, n in reqs]


def test_greedy_equals_reference_alone(model, workload):
    # Each request alone through the engine (the batch tests below compare all 64, inside batches, against
    # the same solo references; 16 here keep the suite fast on 2 cores and still cover every kind).
    llm = LLM(model, num_blocks=512, block_size=16)
    for prompt, n, ref in workload[:16]:
        out = llm.generate(prompt, SamplingParams(max_tokens=n, **GREEDY))[0]
        assert out.token_ids == ref
        assert out.finish_reason == "length"
    assert llm.num_used_blocks == 0


@pytest.mark.parametrize("cfg", [
    dict(num_blocks=1024, block_size=16),  # everything fits: one big batch
    dict(num_blocks=1024, block_size=4, max_num_batched_tokens=32),  # chunked prefill, images split over steps
    dict(num_blocks=100, block_size=4, max_num_batched_tokens=128),  # preemption by recompute
    dict(num_blocks=80, block_size=4, max_num_batched_tokens=32, enable_prefix_caching=False, max_num_seqs=16),
    dict(num_blocks=100, block_size=4, max_num_batched_tokens=128, decode_ahead=True),
], ids=["batch", "chunked", "preempt", "preempt-chunked-nocache", "preempt-decode-ahead"])
def test_batch_of_64_equals_reference(model, workload, cfg):
    cfg = dict(cfg)
    ahead = cfg.pop("decode_ahead", False)
    llm = LLM(model, **cfg)
    llm.decode_ahead = ahead  # on by default with CUDA graphs only; its eager form runs here
    outs = llm.generate([p for p, _, _ in workload], [SamplingParams(max_tokens=n, **GREEDY) for _, n, _ in workload])
    for out, (_, n, ref) in zip(outs, workload):
        assert out.token_ids == ref and out.finish_reason == "length"
    assert llm.num_used_blocks == 0
    if cfg["num_blocks"] < 1024:
        assert llm.stats()["num_preemptions"] > 0
    assert (llm.stats()["decode_ahead_steps"] > 0) == ahead


def test_decode_ahead_with_stop_tokens_and_seeded_sampling(model):
    """Steps launched ahead (runner.decode_ahead) are dropped when a sequence stops on a token the host sees only
    afterwards, or the batch changes: outputs equal those without, for greedy with stop tokens and for seeded
    sampling with n > 1."""
    rng = random.Random(3)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 150000) for _ in range(rng.randrange(3, 30))]}
               for _ in range(12)]
    base = LLM(model, num_blocks=256, block_size=4)
    greedy = base.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))
    # stop on each request's 4th greedy token: a sequence finishes while its next step is already queued
    params = [SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[g.outputs[0].token_ids[3]])
              for g in greedy]
    sampled = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, n=2, seed=5)
    outs = {}
    for ahead in (False, True):
        llm = LLM(model, num_blocks=256, block_size=4)
        llm.decode_ahead = ahead
        outs[ahead] = ([o.outputs[0].token_ids for o in llm.generate(prompts, params)],
                       [[c.token_ids for c in o.outputs] for o in llm.generate(prompts[:4], sampled)])
        assert (llm.stats()["decode_ahead_steps"] > 0) == ahead and llm.num_used_blocks == 0
    assert outs[True] == outs[False]
    assert all(len(t) <= 4 for t in outs[True][0])


def test_sampled_ids_leave_the_device_before_the_next_step_is_launched(model, monkeypatch):
    """A step's host copy of its sampled ids is started before the step launched ahead: a device->host copy queued
    after that launch would wait for the whole next step, and decode-ahead would overlap nothing (found on an H100,
    2026-12-05: 5.78 ms per W1 token against a 5.43 ms graph)."""
    import qwenvl.engine.engine as E

    events = []
    real_copy = E.host_copy_async

    def copy(t):
        events.append("copy")
        return real_copy(t)

    llm = LLM(model, num_blocks=256, block_size=4)
    llm.decode_ahead = True
    real_ahead = llm.runner.decode_ahead

    def ahead(chunks, token_ids):
        events.append("ahead")
        return real_ahead(chunks, token_ids)

    monkeypatch.setattr(E, "host_copy_async", copy)
    monkeypatch.setattr(llm.runner, "decode_ahead", ahead)
    llm.generate([{"prompt_token_ids": [1000 + i for i in range(9)]}], SamplingParams(max_tokens=6, **GREEDY))
    assert "ahead" in events and llm.stats()["decode_ahead_steps"] > 0
    assert all(events[i - 1] == "copy" for i, e in enumerate(events) if e == "ahead"), events


def test_varlen_prefill_plan_equals_reference(model, workload, monkeypatch):
    """The one-call prefill of mixed steps (engine.attention.varlen_prefill_attention; on CUDA FlashAttention's
    varlen kernel, checked against the per-chunk path at start) gets its query rows, key slots and boundaries
    right: with a reference varlen function standing in for the kernel on the CPU, 64 mixed requests in chunked
    steps (chunks with a cached prefix next to fresh ones and decode rows) give the reference tokens."""
    import torch.nn.functional as F

    from qwenvl import layers
    from qwenvl.engine import runner

    calls = []

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):  # causal aligned to each chunk's last key
        assert is_causal and q.shape[1] == k.shape[1]
        out = torch.empty_like(q)
        for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
            n, L = b - a, d - c
            calls.append((n, L))
            mask = torch.ones(n, L, dtype=torch.bool).tril(diagonal=L - n)
            out[a:b] = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1),
                                                      v[c:d].transpose(0, 1), attn_mask=mask).transpose(0, 1)
        assert max(n for n, _ in calls[-len(cu_q) + 1:]) == max_q and max(L for _, L in calls[-len(cu_q) + 1:]) == max_k
        return out

    monkeypatch.setattr(layers, "_flash_varlen", varlen)
    monkeypatch.setattr(runner, "varlen_prefill_ok", lambda *a: True)
    llm = LLM(model, num_blocks=1024, block_size=4, max_num_batched_tokens=48, enable_prefix_caching=False)
    assert llm.runner.varlen_prefill
    outs = llm.generate([p for p, _, _ in workload], [SamplingParams(max_tokens=n, **GREEDY) for _, n, _ in workload])
    for out, (_, n, ref) in zip(outs, workload):
        assert out.token_ids == ref
    assert any(L > n for n, L in calls) and any(L == n for n, L in calls)  # chunks with and without a prefix


def test_chunked_prefill_runs_vit_once_per_image(model):
    # A 64-token image prefilled in 8-token chunks: features are computed once and sliced per chunk.
    grid = (1, 16, 16)
    prompt = {"prompt_token_ids": chat([1, 2, 3], vision_block(IMG, grid), [4, 5]),
              "images": [(pixels(grid, 3), torch.tensor(grid))]}
    llm = LLM(model, num_blocks=128, block_size=4, max_num_batched_tokens=8)
    out = llm.generate(prompt, SamplingParams(max_tokens=6, **GREEDY))[0]
    assert out.token_ids == reference(model, prompt, 6)
    assert llm.stats()["encoded_items"] == 1


@pytest.mark.parametrize("ahead", [False, True], ids=["", "decode-ahead"])
def test_200_requests_with_random_cancellations(model, ahead):
    rng = random.Random(1)
    reqs = {}
    for i in range(200):
        ids = [rng.randrange(100, 150000) for _ in range(rng.randrange(3, 40))]
        reqs[f"r{i}"] = ({"prompt_token_ids": ids, "images": [], "videos": []}, rng.randrange(1, 9))
    llm = LLM(model, num_blocks=48, block_size=4, max_num_batched_tokens=64, max_num_seqs=32)
    llm.decode_ahead = ahead
    pending = list(reqs)
    finals, aborted = {}, set()
    while pending or llm.has_unfinished():
        for _ in range(rng.randrange(0, 6)):  # requests arrive between steps
            if pending:
                rid = pending.pop(0)
                llm.add_request(rid, reqs[rid][0], SamplingParams(max_tokens=reqs[rid][1], **GREEDY))
        live = [r for r in reqs if r not in pending and r not in finals and r not in aborted]
        for rid in live:
            if rng.random() < 0.02:
                llm.abort(rid)
                aborted.add(rid)
        for out in llm.step():
            if out.output is not None:
                assert out.request_id not in finals, "duplicate final output"
                finals[out.request_id] = out.output
    assert set(finals) == set(reqs)  # none lost
    assert llm.num_used_blocks == 0
    n_aborted = 0
    for rid, out in finals.items():
        if out.finish_reason == "abort":
            assert rid in aborted
            n_aborted += 1
            continue
        prompt, n = reqs[rid]
        assert out.token_ids == reference(model, prompt, n), rid
        assert out.finish_reason == "length"
    assert 10 < n_aborted < 150
    assert llm.stats()["num_preemptions"] > 0
    assert (llm.stats()["decode_ahead_steps"] > 0) == ahead


def test_prefix_cache_reuses_blocks_and_keeps_output(model, workload):
    llm = LLM(model, num_blocks=512, block_size=4)
    prompt, n, ref = next(w for w in workload if w[0]["images"])
    first = llm.generate(prompt, SamplingParams(max_tokens=n, **GREEDY))[0]
    again = llm.generate(prompt, SamplingParams(max_tokens=n, **GREEDY))[0]
    L = len(prompt["prompt_token_ids"])
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == (L - 1) // 4 * 4  # every full block but the one holding the last token
    assert first.token_ids == again.token_ids == ref
    assert llm.stats()["encoded_items"] == len(prompt["images"])  # the repeat needed no ViT run at all


def test_prefix_cache_never_shares_blocks_of_different_images(model):
    grid = (1, 8, 8)
    ids = chat(list(range(1000, 1013)), vision_block(IMG, grid), [7, 8, 9])
    first_pad = ids.index(IMG)
    a = {"prompt_token_ids": ids, "images": [(pixels(grid, 1), torch.tensor(grid))]}
    b = {"prompt_token_ids": ids, "images": [(pixels(grid, 2), torch.tensor(grid))]}
    llm = LLM(model, num_blocks=256, block_size=4)
    sp = SamplingParams(max_tokens=8, **GREEDY)
    out_a = llm.generate(a, sp)[0]
    out_b = llm.generate(b, sp)[0]
    assert out_b.num_cached_tokens == first_pad // 4 * 4  # only the text blocks before the image
    assert out_a.token_ids == reference(model, a, 8)
    assert out_b.token_ids == reference(model, b, 8)
    assert out_a.token_ids != out_b.token_ids
    # and the same image again shares everything
    assert llm.generate(a, sp)[0].num_cached_tokens == (len(ids) - 1) // 4 * 4


def test_identical_images_encoded_once_in_a_batch(model):
    grid = (1, 8, 8)
    pix = pixels(grid, 5)
    p1 = {"prompt_token_ids": chat(vision_block(IMG, grid), [11, 12]), "images": [(pix, torch.tensor(grid))]}
    p2 = {"prompt_token_ids": chat([13], vision_block(IMG, grid), [14]), "images": [(pix.clone(), torch.tensor(grid))]}
    llm = LLM(model, num_blocks=256, block_size=4, enable_prefix_caching=False)
    outs = llm.generate([p1, p2], SamplingParams(max_tokens=4, **GREEDY))
    assert llm.stats()["encoded_items"] == 1
    assert outs[0].token_ids == reference(model, p1, 4) and outs[1].token_ids == reference(model, p2, 4)


def test_chat_with_messages_matches_processor_and_reference(model):
    proc = Processor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    img = Image.fromarray((np.random.default_rng(0).random((60, 90, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe."}]}]
    llm = LLM(model, num_blocks=128, block_size=16, processor=proc)
    out = llm.chat(messages, SamplingParams(max_tokens=5, **GREEDY))[0]
    enc = proc.encode_conversation(messages)
    assert out.prompt_token_ids == enc["input_ids"]
    assert out.token_ids == reference(model, {"prompt_token_ids": enc["input_ids"], "images": enc["images"],
                                              "videos": []}, 5)
    assert out.text == proc.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_processor_images_share_caches_by_their_uint8_key(model):
    """The processor's items (VisionInput: uint8 frames, normalised and patchified by the engine, keyed by a hash of
    the frames): equal images share the encoder and prefix caches, a one-pixel change shares neither, and the
    float pixels of the same image given as a tuple are encoded again under their own key, never confused."""
    proc = Processor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    array = (np.random.default_rng(1).random((56, 84, 3)) * 255).astype("uint8")
    changed = array.copy()
    changed[20, 30, 0] ^= 1

    def encoded(a):
        msgs = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(a)},
                                             {"type": "text", "text": "What is it?"}]}]
        return proc.encode_conversation(msgs)

    a, a2, b = encoded(array), encoded(array.copy()), encoded(changed)
    assert isinstance(a["images"][0], qwenvl.preprocess.VisionInput) and a["input_ids"] == b["input_ids"]
    ids = a["input_ids"]
    llm = LLM(model, num_blocks=256, block_size=4, processor=proc)
    sp = SamplingParams(max_tokens=4, **GREEDY)
    outs = [llm.generate({"prompt_token_ids": ids, "images": e["images"]}, sp)[0] for e in (a, a2, b)]
    assert [o.num_cached_tokens for o in outs] == [0, (len(ids) - 1) // 4 * 4, ids.index(IMG) // 4 * 4]
    assert llm.stats()["encoded_items"] == 2
    floats = {"prompt_token_ids": ids, "images": [tuple(a["images"][0])]}  # (pixel_values, grid) of the same image
    ref_a, ref_b = reference(model, floats, 4), reference(model, {"prompt_token_ids": ids, "images": b["images"]}, 4)
    assert outs[0].token_ids == outs[1].token_ids == ref_a and outs[2].token_ids == ref_b
    assert llm.generate(floats, sp)[0].token_ids == ref_a
    assert llm.stats()["encoded_items"] == 3


def test_step_api_streams_deltas_that_add_up(model):
    llm = LLM(model, num_blocks=128, block_size=4)
    llm.add_request("a", chat([1, 2, 3]), SamplingParams(max_tokens=12, **GREEDY))
    llm.add_request("b", chat([4, 5]), SamplingParams(max_tokens=5, n=2, temperature=1.0, seed=3))
    text, tokens, final = {}, {}, {}
    while llm.has_unfinished():
        for out in llm.step():
            rid, new, delta, finished = out  # unpacks as a 4-tuple
            key = (rid, out.index)
            text[key] = text.get(key, "") + delta
            tokens[key] = tokens.get(key, []) + new
            if out.output is not None:
                final[rid] = out.output
    assert len(final["b"].outputs) == 2 and final["b"].outputs[0].token_ids != final["b"].outputs[1].token_ids
    for (rid, i), t in text.items():
        assert t == final[rid].outputs[i].text
        assert tokens[(rid, i)] == final[rid].outputs[i].token_ids


def test_abort_frees_blocks_at_next_step(model):
    llm = LLM(model, num_blocks=64, block_size=4)
    llm.add_request("x", chat(list(range(500, 540))), SamplingParams(max_tokens=50, **GREEDY))
    llm.step()
    assert llm.num_used_blocks > 0
    llm.abort("x")
    outs = llm.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [("x", True, "abort")]
    assert outs[0].output.finish_reason == "abort"
    assert llm.num_used_blocks == 0 and not llm.has_unfinished()


def test_too_long_prompt_and_bad_arguments_rejected(model):
    llm = LLM(model, num_blocks=8, block_size=4)  # 32 tokens of KV: max_model_len 32
    assert llm.max_model_len == 32
    with pytest.raises(InputError, match="max_model_len"):
        llm.generate(list(range(100, 140)), SamplingParams(max_tokens=2))
    with pytest.raises(InputError, match="max_model_len"):
        LLM(model, num_blocks=8, block_size=4, max_model_len=64)
    with pytest.raises(InputError, match="image"):
        llm.generate({"prompt_token_ids": [1, VS, IMG, IMG, VE], "images": []})
    with pytest.raises(InputError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    # a batch is encoded on several threads: the first bad prompt's error, and nothing of the batch queued
    good = {"prompt_token_ids": list(range(100, 110))}
    with pytest.raises(InputError, match="empty"):
        llm.generate([good, {"prompt_token_ids": []}, good, {"prompt_token_ids": [1, VS, IMG, IMG, VE]}])
    assert not llm.has_unfinished() and llm.num_used_blocks == 0
    # generation stops at max_model_len
    out = llm.generate(list(range(100, 120)), SamplingParams(max_tokens=100, **GREEDY))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 12


def test_prompt_positions_equal_mrope_positions(model):
    """encode_prompt builds MRoPE positions from the blocks it found (rope.positions_from_blocks), not by scanning
    the prompt again: the same ids and rope delta as rope.mrope_positions (itself checked against transformers in
    test_model.py) for text, one or two images and videos at several fps, with absolute and frame temporal ids;
    pads that do not follow <|vision_start|> are refused."""
    import dataclasses

    from qwenvl.rope import mrope_positions

    rng = random.Random(11)
    for temporal in ("absolute", "frame"):
        m = model if temporal == "absolute" else type(model).__new__(type(model))
        if temporal == "frame":
            m.__dict__.update(model.__dict__)
            m.config = dataclasses.replace(model.config, mrope_temporal="frame")
        llm = LLM(m, num_blocks=64, block_size=16)
        for seed in range(12):
            prompt, _ = make_request(rng, seed)
            got = llm.encode_prompt(prompt)
            c = m.config
            want, delta = mrope_positions(
                torch.tensor([prompt["prompt_token_ids"]]), None, [g for _, g in prompt["images"]] or None,
                [g for _, g, _ in prompt["videos"]] or None, [s for _, _, s in prompt["videos"]] or None,
                image_token_id=c.image_token_id, video_token_id=c.video_token_id,
                vision_start_token_id=c.vision_start_token_id, spatial_merge_size=c.vision.spatial_merge_size,
                tokens_per_second=c.vision.tokens_per_second, temporal=temporal)
            if got.items:
                assert torch.equal(got.positions, want[:, 0]) and got.rope_delta == int(delta), (temporal, seed)
        llm.shutdown()
    llm = LLM(model, num_blocks=64, block_size=16)
    grid = (1, 4, 4)
    with pytest.raises(InputError, match="vision start"):
        llm.encode_prompt({"prompt_token_ids": [1, 2] + [IMG] * 4 + [VE], "images": [(pixels(grid, 0), grid)]})


def test_bench_divergence_margin_reads_the_slow_runs_top_two():
    """bench.py's fast-paths check, where a W4 request's tokens part: the slow run's gap between its two best
    logprobs at that position, and whether the fast run took the second (a near tie bf16 rounding can flip)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench

    slow_lps = [{5: -0.1, 7: -2.5}, {9: -0.69, 4: -0.70, 1: -3.0}, {2: -0.2, 3: -1.9}]
    got = bench.divergence_margin([5, 4, 2], [5, 9, 2], slow_lps, 1)
    assert got == {"top2_margin": 0.01, "fast_token_is_second_choice": True}
    got = bench.divergence_margin([5, 9, 8], [5, 9, 2], slow_lps, 2)
    assert got == {"top2_margin": 1.7, "fast_token_is_second_choice": False}
    assert bench.divergence_margin([5, 9, 2], [5, 9, 2], slow_lps, None) == {}  # no divergence
    assert bench.divergence_margin([5], [5, 9], [{5: -0.1}], 0) == {}  # one logprob: no margin


def test_fp32_logits_keep_the_lm_head_accumulator(monkeypatch):
    """QWENVL_FP32_LOGITS=1 on a bf16 model: the logits are lm_head's product in fp32 (not rounded to bf16), close
    to the float64 product; off, they are the bf16 head's; greedy decoding runs on them."""
    import torch.nn.functional as F

    m = Qwen25VL.random(qwenvl.preset("tiny"), dtype=torch.bfloat16, seed=0).eval()
    h = (torch.randn(3, m.config.text.hidden_size, generator=torch.Generator().manual_seed(1)) * 2).to(torch.bfloat16)
    x = m.model.norm(h)
    ref = x.double() @ m.lm_head.weight.double().T
    got = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("QWENVL_FP32_LOGITS", flag)
        llm = LLM(m, num_blocks=64, block_size=16)
        assert llm.stats()["fp32_logits"] == (flag == "1")
        with torch.no_grad():
            got[flag] = llm.runner._logits(h)
        if flag == "1":
            out = llm.generate({"prompt_token_ids": chat([500, 600, 700])}, SamplingParams(max_tokens=4, **GREEDY))
            assert len(out[0].token_ids) == 4
    assert got["1"].dtype == torch.float32 and got["0"].dtype == torch.bfloat16
    assert torch.equal(got["1"], F.linear(x.float(), m.lm_head.weight.float()))
    assert ((got["1"].double() - ref).abs() <= 1e-5 * ref.abs().max()).all()
    assert torch.equal(got["0"], m.lm_head(x))  # off: the model's own bf16 head
    # the rounding is what makes ties: fp32 logits have fewer equal values than their bf16 rounding
    assert got["1"].unique().numel() > got["0"].unique().numel()
