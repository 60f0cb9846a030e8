"""CUDA paths of the engine (run on a GPU through the device tool: `pytest -m gpu tests/test_engine_cuda.py`):
the Triton paged-decode kernel against the gather path, CUDA-graph decoding against eager decoding, and the
CUDA prefill path against the reference generate."""

from __future__ import annotations

import random

import pytest
import torch

import qwenvl
from qwenvl.engine import LLM, SamplingParams
from qwenvl.engine import attention as A
from qwenvl.model import Qwen25VL

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VS, VE, IMG = 151652, 151653, 151655
GREEDY = dict(temperature=0.0, ignore_eos=True)


def chat(*parts):
    return [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198] + \
        [x for p in parts for x in p] + [151645, 198, 151644, 77091, 198]


def workload(n=24, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = [rng.randrange(100, 150000) for _ in range(rng.randrange(1, 80))]
        if i % 3 == 0:
            grid = rng.choice([(1, 8, 12), (1, 16, 16), (1, 6, 10)])
            pix = torch.randn(grid[0] * grid[1] * grid[2], 1176, generator=torch.Generator().manual_seed(i))
            p = {"prompt_token_ids": chat([VS] + [IMG] * (grid[0] * grid[1] * grid[2] // 4) + [VE], text),
                 "images": [(pix, torch.tensor(grid))]}
        else:
            p = {"prompt_token_ids": chat(text)}
        out.append((p, rng.randrange(1, 24)))
    return out


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(28, 4, 128, 16), (16, 2, 128, 16), (4, 2, 16, 4),
                                                                (8, 8, 64, 32), (64, 8, 128, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_paged_decode_matches_gather(heads, kv_heads, head_dim, block_size, dtype):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    nb, B, max_blocks = 700, 9, 70
    kp = torch.randn(nb + 1, block_size, kv_heads, head_dim, generator=g, device=dev).to(dtype)
    vp = torch.randn(nb + 1, block_size, kv_heads, head_dim, generator=g, device=dev).to(dtype)
    q = torch.randn(B, heads, head_dim, generator=g, device=dev).to(dtype)
    bt = torch.randperm(nb, generator=g, device=dev)[:B * max_blocks].view(B, max_blocks).int()
    ctx = torch.tensor([1, 2, block_size, block_size + 1, 100, 333, 1000, max_blocks * block_size - 1,
                        max_blocks * block_size], dtype=torch.int32, device=dev).clamp(max=max_blocks * block_size)
    ref = A.decode_attention_gather(q.float(), kp.float(), vp.float(), bt.long(), ctx)
    for splits in (0, 1, 4, 16, 32):
        for fused_merge in (False, True, True):  # twice: the in-kernel merge leaves its counters at zero
            out = A.decode_attention_triton(q, kp, vp, bt, ctx, num_splits=splits, fused_merge=fused_merge)
            assert (out.float() - ref).abs().max().item() < 2e-2, (splits, fused_merge)
    assert A._COUNTERS[q.device].abs().sum().item() == 0  # (keyed by the tensors' device, cuda:0)


@pytest.fixture(scope="module")
def bf16_model():
    return Qwen25VL.random(qwenvl.preset("tiny"), dtype=torch.bfloat16, device="cuda", seed=0)


def test_cuda_graph_decode_equals_eager(bf16_model):
    work = workload()
    prompts, params = [p for p, _ in work], [SamplingParams(max_tokens=n, **GREEDY) for _, n in work]
    graphs = LLM(bf16_model, num_blocks=2048, block_size=16, max_num_seqs=32)
    st = graphs.stats()
    assert st["triton_decode"] and st["cuda_graph_batch_sizes"], st
    eager = LLM(bf16_model, num_blocks=2048, block_size=16, max_num_seqs=32, enable_cuda_graphs=False)
    a = graphs.generate(prompts, params)
    b = eager.generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert graphs.num_used_blocks == eager.num_used_blocks == 0
    # new images of one size, one request after another: the ViT is captured on the size's second use and replayed
    for i in range(3):
        pix = torch.randn(16 * 16, 1176, generator=torch.Generator().manual_seed(100 + i))
        p = {"prompt_token_ids": chat([VS] + [IMG] * 64 + [VE], [1000 + i]), "images": [(pix, torch.tensor((1, 16, 16)))]}
        a, b = (llm.generate([p], SamplingParams(max_tokens=8, **GREEDY))[0] for llm in (graphs, eager))
        assert a.token_ids == b.token_ids
    assert graphs.stats()["vision_graph_replays"] >= 2 and eager.stats()["vision_graph_replays"] == 0


def test_decode_ahead_equals_step_by_step_under_cuda_graphs(bf16_model, monkeypatch):
    """Decode steps launched one ahead from the device's sampled tokens (the default with CUDA graphs) against the
    step-by-step engine, through a batch that shrinks as requests finish (the ahead step's rows then serve a
    subset): the same tokens and logprobs up to a near-tie parting (a smaller batch may replay another bucket's
    graph, whose kernels round differently). Stop tokens and seeded sampling: tests/test_engine.py (CPU, exact)."""
    from test_fp8_gemv import assert_equal_up_to_near_ties

    work = workload(16, seed=3)
    prompts = [p for p, _ in work]
    params = [SamplingParams(max_tokens=1 + i % 16, logprobs=2, **GREEDY) for i in range(len(work))]
    outs = {}
    for ahead in (True, False):
        monkeypatch.setenv("QWENVL_DECODE_AHEAD", "1" if ahead else "0")
        llm = LLM(bf16_model, num_blocks=2048, block_size=16, max_num_seqs=32)
        assert llm.decode_ahead == ahead and llm.stats()["cuda_graph_batch_sizes"]
        outs[ahead] = [o.outputs[0] for o in llm.generate(prompts, params)]
        assert (llm.stats()["decode_ahead_steps"] > 0) == ahead and llm.num_used_blocks == 0
    assert_equal_up_to_near_ties(outs[True], outs[False], None)


def assert_logprobs_close(model, work, outs, tol=0.15):
    """Each generated token's logprob within tol of the model's own forward over prompt + output."""
    for (p, _), out in zip(work, outs):
        kw = {}
        if "images" in p:
            kw = dict(pixel_values=p["images"][0][0].cuda(), image_grid_thw=p["images"][0][1][None])
        ids = torch.tensor([p["prompt_token_ids"] + out.token_ids], device="cuda")
        with torch.no_grad():
            ref = torch.log_softmax(model(ids, **kw)[0].float(), -1)
        L = len(p["prompt_token_ids"])
        for i, (tok, d) in enumerate(zip(out.token_ids, out.logprobs)):
            assert abs(d[tok] - ref[L - 1 + i, tok].item()) < tol


def test_cuda_logprobs_close_to_reference_logits(bf16_model):
    # chunked prefill in one batch: steps mix Triton decode rows with prefill chunks
    llm = LLM(bf16_model, num_blocks=2048, block_size=16, max_num_seqs=32, max_num_batched_tokens=64)
    work = workload(6, seed=1)
    outs = llm.generate([p for p, _ in work], SamplingParams(max_tokens=8, logprobs=1, **GREEDY))
    assert_logprobs_close(bf16_model, work, outs)


def test_compiled_decoder_ops_close_to_reference_logits(bf16_model, monkeypatch):
    # QWENVL_COMPILE_OPS=1: the fused (inductor) norms/rotary/SwiGLU/split merge, inside the decode CUDA graphs
    # and in mixed prefill + decode steps; logprobs as close to the model's as the eager engine's are
    monkeypatch.setenv("QWENVL_COMPILE_OPS", "1")
    llm = LLM(bf16_model, num_blocks=2048, block_size=16, max_num_seqs=32, max_num_batched_tokens=64)
    st = llm.stats()
    assert st["compiled_ops"] and st["cuda_graph_batch_sizes"], st
    work = workload(6, seed=2)
    outs = llm.generate([p for p, _ in work], SamplingParams(max_tokens=8, logprobs=1, **GREEDY))
    assert_logprobs_close(bf16_model, work, outs)


def test_cuda_fp32_greedy_equals_reference():
    model = Qwen25VL.random(qwenvl.preset("tiny"), dtype=torch.float32, device="cuda", seed=0)
    llm = LLM(model, num_blocks=1024, block_size=4, max_num_batched_tokens=32)  # chunked prefill, gather decode
    work = workload(12, seed=2)
    outs = llm.generate([p for p, _ in work], [SamplingParams(max_tokens=n, **GREEDY) for _, n in work])
    for out, (p, n) in zip(outs, work):
        kw = {}
        if "images" in p:
            kw = dict(pixel_values=p["images"][0][0].cuda(), image_grid_thw=p["images"][0][1][None])
        ref = model.generate(torch.tensor([p["prompt_token_ids"]], device="cuda"), max_new_tokens=n,
                             eos_token_id=[], **kw)
        assert out.token_ids == ref[0].tolist()


def test_processor_frames_normalised_on_the_device_equal_the_host_path():
    """uint8 frames -> pixel_values on the GPU equal the host path bit for bit, and the engine fed the processor's
    image (pinned uint8 copy, device normalise/patchify) decodes as the reference fed the host pixel_values."""
    import numpy as np
    from PIL import Image

    from qwenvl import preprocess
    from qwenvl.processor import Processor

    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 56, 84), dtype=torch.uint8, generator=g)
    video = torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8, generator=g)
    for f in (image, image.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), video):
        host = preprocess.pixel_values_from_frames(f)
        assert torch.equal(preprocess.pixel_values_from_frames(f.cuda()).cpu(), host)
    model = Qwen25VL.random(qwenvl.preset("tiny"), dtype=torch.float32, device="cuda", seed=0)
    proc = Processor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    array = (np.random.default_rng(0).random((60, 90, 3)) * 255).astype("uint8")
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(array)},
                                         {"type": "text", "text": "Describe."}]}]
    out = LLM(model, num_blocks=256, block_size=16, processor=proc).chat(msgs, SamplingParams(max_tokens=6, **GREEDY))
    enc = proc.encode_conversation(msgs)
    pix, grid = enc["images"][0]
    ref = model.generate(torch.tensor([enc["input_ids"]], device="cuda"), pixel_values=pix.cuda(),
                         image_grid_thw=grid[None].cuda(), max_new_tokens=6, eos_token_id=[])
    assert out[0].token_ids == ref[0].tolist()


def test_varlen_prefill_agrees_with_the_per_chunk_path_and_is_used(bf16_model):
    """All prefill chunks of a mixed step in one FlashAttention varlen call: its causal mask must align each
    chunk's queries with the end of its keys (cached prefix + chunk); the start-up check compares it with the
    per-chunk SDPA path at the 7B's heads (28 / 4 kv, dim 128) and the tiny model's, and the engine then uses it
    (the logprob tests above run through it)."""
    from qwenvl.engine.attention import varlen_prefill_ok

    assert varlen_prefill_ok(torch.bfloat16, "cuda", 16, 4, 28, 128)
    llm = LLM(bf16_model, num_blocks=256, block_size=16)
    assert llm.runner.varlen_prefill


def test_gqa_flash_prefill_equals_expanded_heads_at_the_7b_shape():
    """W2's prefill attention: SDPA's FlashAttention over the 4 grouped k/v heads as they are (enable_gqa), against
    the heads expanded to 28 (1,281 causal tokens, head_dim 128); the runner's probe passes here."""
    from qwenvl.engine.attention import gqa_prefill_ok, prefill_attention

    assert gqa_prefill_ok(torch.bfloat16, "cuda", 4, 28, 128)
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1281, 28, 128, generator=g, device="cuda").bfloat16()
    k, v = (torch.randn(1281, 4, 128, generator=g, device="cuda").bfloat16() for _ in range(2))
    pool = torch.zeros(1, 16, 4, 128, device="cuda", dtype=torch.bfloat16)
    want = prefill_attention(q, k, v, pool, pool, None, 0).float()
    got = prefill_attention(q, k, v, pool, pool, None, 0, gqa_flash=True).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_staged_frames_upload_equals_pinning_at_upload(bf16_model, monkeypatch):
    """A VisionInput prompt on CUDA with QWENVL_STAGE_FRAMES=1: encode_prompt's hashing threads make the pinned copy
    of the frames (VisionInput.content_hash(stage=True)), and the ViT's pixel values made from it equal those made by
    pinning the frames at upload; the staged copy is used once."""
    from qwenvl.preprocess import VisionInput

    g = torch.Generator().manual_seed(4)
    frames = torch.randint(0, 256, (1, 3, 112, 168), generator=g, dtype=torch.uint8)
    cfg = bf16_model.config
    n = (112 // 28) * (168 // 28)
    ids = [1, 2, cfg.vision_start_token_id] + [cfg.image_token_id] * n + [3]
    monkeypatch.setenv("QWENVL_STAGE_FRAMES", "1")
    llm = LLM(bf16_model, num_blocks=256, block_size=16, max_num_seqs=4)
    item = llm.encode_prompt({"prompt_token_ids": ids, "images": [VisionInput("image", frames)]}).items[0]
    assert item.staged is not None and item.staged.is_pinned()
    staged = llm.runner._pixel_values(item)
    assert item.staged is None
    plain = llm.runner._pixel_values(item)  # no staged copy left: pinned at upload
    assert torch.equal(staged, plain)


def test_fp32_logits_on_cuda(bf16_model, monkeypatch):
    """QWENVL_FP32_LOGITS=1 on CUDA: torch.mm's fp32 output is available (fp32_matmul_ok), the logits of the steps
    run outside the CUDA graphs (prefill, mixed) are fp32 (decode's graphs are captured with the same _logits: batch 1
    through the GEMV with out_dtype float32, batches through mm), the logprobs are as close to the model's as the
    default's, and the greedy tokens equal the default's up to a near-tie parting (which fp32 logits order by value)."""
    from test_fp8_gemv import assert_equal_up_to_near_ties

    from qwenvl.engine.runner import fp32_matmul_ok

    assert fp32_matmul_ok("cuda", torch.bfloat16)
    work = workload(12, seed=5)
    prompts = [p for p, _ in work]
    params = [SamplingParams(max_tokens=n, logprobs=2, **GREEDY) for _, n in work]
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("QWENVL_FP32_LOGITS", flag)
        llm = LLM(bf16_model, num_blocks=2048, block_size=16, max_num_seqs=32)
        assert llm.stats()["fp32_logits"] == (flag == "1") and llm.stats()["cuda_graph_batch_sizes"]
        dtypes = set()
        real = llm.runner._logits
        llm.runner._logits = lambda h: dtypes.add((y := real(h)).dtype) or y
        outs[flag] = [o.outputs[0] for o in llm.generate(prompts, params)]
        one = llm.generate([prompts[0]], SamplingParams(max_tokens=4, **GREEDY))  # batch 1: the GEMV head
        assert len(one[0].token_ids) == 4
        assert dtypes == ({torch.float32} if flag == "1" else {torch.bfloat16}), dtypes
    assert_logprobs_close(bf16_model, work, [type("O", (), {"token_ids": o.token_ids, "logprobs": o.logprobs})
                                             for o in outs["1"]])
    assert_equal_up_to_near_ties(outs["1"], outs["0"], None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_triton_split_merge_equals_merge_splits(dtype):
    """QWENVL_TRITON_MERGE's kernel: its start-up probe passes, and at the 7B shape (28 heads, head dim 128, batch 1's
    16 splits with empty ones; batch 64's 2) it equals merge_splits within one rounding of dtype."""
    assert A.triton_merge_ok(torch.device("cuda", torch.cuda.current_device()), dtype, 128)
    g = torch.Generator(device="cuda").manual_seed(1)
    for B, S in ((1, 16), (64, 2)):
        acc = torch.randn(B, 28, S, 128, generator=g, device="cuda")
        m = torch.randn(B, 28, S, generator=g, device="cuda") * 4
        lse = torch.rand(B, 28, S, generator=g, device="cuda") + 0.5
        m[:, :, S // 2 + 1:], lse[:, :, S // 2 + 1:] = float("-inf"), 0.0
        want, got = A.merge_splits(acc, m, lse, dtype), A.merge_splits_triton(acc, m, lse, dtype)
        assert ((got.float() - want.float()).abs() <= torch.finfo(dtype).eps * want.float().abs() + 1e-6).all()
