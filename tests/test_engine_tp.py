"""The engine under tensor parallelism and FP8 on the CPU (gloo, 2 processes, tiny model, fp32).

TP=2 (every rank the same random weights, sharded) must give the TP=1 engine's outputs token for token:
greedy and seeded sampling, images, chunked prefill, preemption, n > 1, aborts. Both entry points: the
torchrun-style one (every rank constructs LLM and calls generate; here started by qwenvl.parallel.spawn) and
the one-process one (LLM(factory, tensor_parallel_size=2) starts rank 1 itself).
"""

from __future__ import annotations

import asyncio
import copy
import random

import pytest
import torch

from qwenvl import preset
from qwenvl.engine import LLM, AsyncLLM, SamplingParams
from qwenvl.errors import InputError
from qwenvl.parallel import RandomWeights, spawn
from qwenvl.quant import FP8Linear, quantize_model_fp8

VS, VE, IMG = 151652, 151653, 151655
GREEDY = dict(temperature=0.0, ignore_eos=True)
TINY = RandomWeights("tiny", torch.float32, seed=0)
CONFIGS = {"batch": dict(num_blocks=256, block_size=16),
           "chunked-preempt": dict(num_blocks=40, block_size=4, max_num_batched_tokens=48, max_num_seqs=8)}


def chat(*parts):
    return [151644, 872, 198] + [x for p in parts for x in p] + [151645, 198, 151644, 77091, 198]


def workload(n=8, seed=0):
    """Mixed prompts (text; one or two images of different sizes) and their SamplingParams: mostly greedy,
    one seeded sample with n=2, one with a stop token."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = [rng.randrange(100, 150000) for _ in range(rng.randrange(3, 40))]
        images, parts = [], []
        for j in range(i % 3):
            grid = rng.choice([(1, 4, 4), (1, 8, 12), (1, 6, 10)])
            pix = torch.randn(grid[0] * grid[1] * grid[2], 1176, generator=torch.Generator().manual_seed(10 * i + j))
            images.append((pix, torch.tensor(grid)))
            parts.append([VS] + [IMG] * (grid[1] * grid[2] // 4) + [VE])
        prompt = {"prompt_token_ids": chat(*parts, text), "images": images}
        if i == 3:
            params = SamplingParams(max_tokens=10, temperature=0.8, top_k=50, seed=1234, n=2)
        elif i == 5:
            params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[0])  # rarely hit: a length
        else:
            params = SamplingParams(max_tokens=rng.randrange(1, 14), **GREEDY)
        out.append((prompt, params))
    return out


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def references():
    """TP=1 engine outputs of the workload, per engine config."""
    model = TINY(0, 1, "cpu")
    work = workload()
    return {name: tokens(LLM(model, **cfg).generate([p for p, _ in work], [s for _, s in work]))
            for name, cfg in CONFIGS.items()}


@torch.no_grad()
def _torchrun_style(rank, world):
    """Every rank: the same LLM(...) and the same generate(...) call; rank 0 returns the outputs."""
    res = {}
    work = workload()
    for name, cfg in CONFIGS.items():
        llm = LLM(TINY, tensor_parallel_size=world, **cfg)
        outs = llm.generate([p for p, _ in work], [s for _, s in work])
        st = llm.stats()
        res[name] = {"tokens": tokens(outs) if rank == 0 else outs, "used": st["num_used_blocks"],
                     "preemptions": st["num_preemptions"], "kv_heads": llm.runner.kv_heads,
                     "heads": llm.runner.heads, "num_blocks": st["num_blocks"]}
        # a second call on the same engines (prefix cache warm): followers return again
        again = llm.generate(work[0][0], work[0][1])
        res[name]["again"] = tokens(again) if rank == 0 else again
    return res


def test_tp2_engine_equals_tp1_torchrun_style(references):
    r0, r1 = spawn(_torchrun_style, 2, backend="gloo", timeout=900)
    for name in CONFIGS:
        assert r0[name]["tokens"] == references[name], name
        assert r0[name]["again"] == references[name][:1]
        assert r1[name]["tokens"] == [] and r1[name]["again"] == []  # the followers' calls return nothing
        for r in (r0, r1):  # every rank's scheduler ended in the same state; the KV cache is sharded by heads
            assert r[name]["used"] == 0 and (r[name]["heads"], r[name]["kv_heads"]) == (2, 1)
            assert r[name]["num_blocks"] == CONFIGS[name]["num_blocks"]
    assert r0["chunked-preempt"]["preemptions"] == r1["chunked-preempt"]["preemptions"] > 0


def test_tp2_one_process_with_async_streaming_and_aborts(references):
    work = workload()
    llm = LLM(TINY, tensor_parallel_size=2, device="cpu", **CONFIGS["batch"])  # rank 1 started here
    try:
        assert tokens(llm.generate([p for p, _ in work], [s for _, s in work])) == references["batch"]

        async def drive(engine):
            async def full(i):
                return await engine.generate(work[i][0], work[i][1], request_id=f"full-{i}")

            async def cancelled(i):
                got = 0
                async for delta in engine.stream(f"cut-{i}", work[i][0], SamplingParams(max_tokens=50, **GREEDY)):
                    got += len(delta.new_token_ids)
                    if got >= 2:
                        break  # the consumer goes away: the request is aborted on every rank
                return got

            return await asyncio.gather(*[full(i) for i in range(4)], *[cancelled(i) for i in (4, 6)])

        engine = AsyncLLM(llm)
        res = asyncio.run(drive(engine))
        assert tokens(res[:4]) == references["batch"][:4]
        assert res[4:] == [2, 2]
        assert llm.num_used_blocks == 0
        engine.shutdown()  # stops rank 1 too
        assert llm._shut and llm._tp_workers is None
    finally:
        llm.shutdown()
    assert not torch.distributed.is_initialized()


def _channel(rank, world):
    from qwenvl.engine import spmd

    spmd.STAGING_BYTES = 1000  # raw transfers in many chunks
    ch = spmd.TPChannel(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 200, generator=g)
    msgs = [("step", [], [], []), ("step", [("r", 0, i, None) for i in range(5000)], [], []),  # > INLINE_BYTES
            {"pix": big, "cols": big.t(), "small": torch.arange(5), "ids": list(range(10))}]
    got = [ch.broadcast(m if rank == 0 else None) for m in msgs]
    return got[:2] == msgs[:2] and all(torch.equal(got[2][k], msgs[2][k]) for k in ("pix", "cols", "small")) \
        and got[2]["ids"] == msgs[2]["ids"]


def test_control_channel_carries_long_messages_and_raw_tensors():
    assert spawn(_channel, 2, backend="gloo") == [True, True]


def _random_shards(rank, world):
    from qwenvl.parallel import param_bytes, random_shard

    m = random_shard(preset("tiny"), rank, world, torch.float32, "cpu", seed=3, fp8=True)
    down = m.model.layers[0].mlp.down_proj
    return {"visual": sum(p.double().sum().item() for p in m.visual.parameters()),
            "embed": m.model.embed_tokens.weight.double().sum().item(), "layers": param_bytes(m, "model.layers"),
            "down": (type(down).__name__, tuple(down.weight.shape), down.weight.dtype, down.reduce_output),
            "logits_finite": bool(torch.isfinite(m(torch.tensor([[1, 2, 3]]))).all())}


def test_random_shards_replicate_the_vit_and_split_the_decoder():
    r0, r1 = spawn(_random_shards, 2, backend="gloo")
    assert r0["visual"] == r1["visual"] and r0["embed"] != r1["embed"]  # ViT identical on every rank
    assert r0["down"] == r1["down"] == ("FP8Linear", (64, 48), torch.float8_e4m3fn, True)  # row-parallel FP8
    assert r0["layers"] == r1["layers"] and r0["logits_finite"] and r1["logits_finite"]


def assert_greedy_equals_the_model(llm, model, work, max_tokens=6):
    """The engine's greedy tokens for each (prompt, params) of work equal model.generate's, request by request."""
    for (prompt, params), out in zip(work, llm.generate([p for p, _ in work], [s for _, s in work])):
        kw = {}
        if prompt["images"]:
            kw = dict(pixel_values=torch.cat([p for p, _ in prompt["images"]]),
                      image_grid_thw=torch.stack([g for _, g in prompt["images"]]))
        ref = model.generate(torch.tensor([prompt["prompt_token_ids"]]), max_new_tokens=max_tokens, eos_token_id=[],
                             **kw)
        assert out.outputs[0].token_ids == ref[0].tolist()


def test_fp8_engine_on_cpu_equals_the_fp8_model():
    model = TINY(0, 1, "cpu")
    work = [(p, SamplingParams(max_tokens=6, **GREEDY)) for p, _ in workload(4, seed=2)]
    llm = LLM(copy.deepcopy(model), quantization="fp8", num_blocks=256)
    assert sum(isinstance(m, FP8Linear) for m in llm.model.modules()) >= 7 * 2  # + the runner's fused ones
    q = quantize_model_fp8(copy.deepcopy(model))
    assert_greedy_equals_the_model(llm, q, work)


def test_fp8_lm_head_engine_on_cpu_equals_the_model_with_an_fp8_head(monkeypatch):
    """QWENVL_FP8_LM_HEAD=1: the engine's head is an FP8 copy of the model's (which stays as it is); its greedy
    tokens equal the FP8 model's whose lm_head is quantised the same way, and unset the head stays unquantised."""
    model = TINY(0, 1, "cpu")
    work = [(p, SamplingParams(max_tokens=6, **GREEDY)) for p, _ in workload(3, seed=4)]
    monkeypatch.setenv("QWENVL_FP8_LM_HEAD", "1")
    llm = LLM(copy.deepcopy(model), quantization="fp8", num_blocks=256)
    assert isinstance(llm.runner.lm_head, FP8Linear) and type(llm.model.lm_head) is torch.nn.Linear
    q = quantize_model_fp8(copy.deepcopy(model))
    q.lm_head = FP8Linear.from_linear(q.lm_head)
    assert_greedy_equals_the_model(llm, q, work)
    # without quantization="fp8" the switch does nothing (the head of a bf16/fp32 decoder stays as it is)
    assert type(LLM(copy.deepcopy(model), num_blocks=16).runner.lm_head) is torch.nn.Linear
    monkeypatch.delenv("QWENVL_FP8_LM_HEAD")
    assert not isinstance(LLM(copy.deepcopy(model), quantization="fp8", num_blocks=16).runner.lm_head, FP8Linear)


def test_fp8_checkpoint_loads_in_the_engine(tmp_path):
    from qwenvl.quant import save_fp8

    save_fp8(quantize_model_fp8(TINY(0, 1, "cpu")), tmp_path)
    llm = LLM(str(tmp_path), device="cpu", num_blocks=64)
    assert isinstance(llm.model.model.layers[0].mlp.down_proj, FP8Linear)
    assert len(llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=3, **GREEDY))[0]
               .outputs[0].token_ids) == 3


def test_option_validation():
    model = TINY(0, 1, "cpu")
    with pytest.raises(InputError, match="quantization"):
        LLM(model, quantization="int4", num_blocks=8)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="tensor_parallel_size"):
            LLM(model, tensor_parallel_size=bad, num_blocks=8)
    with pytest.raises(InputError, match="checkpoint path or a picklable"):
        LLM(model, tensor_parallel_size=2, device="cpu", num_blocks=8)  # a built model can't reach other ranks


def test_serve_flags_reach_the_engine():
    import argparse

    from qwenvl.serve import cli

    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers())
    args = p.parse_args(["serve", "--tensor-parallel-size", "2", "--quantization", "fp8", "--kv-cache-mb", "64",
                         "--dtype", "bfloat16"])
    kw = cli.engine_kwargs(args)
    assert kw["tensor_parallel_size"] == 2 and kw["quantization"] == "fp8" and kw["kv_cache_bytes"] == 64 << 20
    assert kw["dtype"] == torch.bfloat16
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--quantization", "int8"])


def _serve_answer(*flags) -> tuple[str, dict]:
    import argparse

    from starlette.testclient import TestClient

    from qwenvl.hub import tiny_random_checkpoint
    from qwenvl.serve import cli

    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers())
    args = p.parse_args(["serve", "--model", tiny_random_checkpoint(), "--device", "cpu", "--kv-cache-mb", "16",
                         "--served-model-name", "tiny", *flags])
    app, backend = cli.build(args)
    try:
        with TestClient(app) as c:
            r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 8, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "Hello there"}]})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"], backend.stats()
    finally:
        backend.shutdown()


def test_serve_tensor_parallel_and_fp8():
    text1, _ = _serve_answer()
    text2, st = _serve_answer("--tensor-parallel-size", "2")  # rank 1 started by the server process
    assert text2 == text1 and st["num_used_blocks"] == 0
    assert not torch.distributed.is_initialized()  # shut down with the backend
    text8, _ = _serve_answer("--quantization", "fp8")
    assert isinstance(text8, str)


# ---------------------------------------------------------------------------------------------- GPU (device tool)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_cuda_tp2_graphs_equal_eager(fp8):
    """`pytest -m gpu tests/test_engine_tp.py` on 2 GPUs: TP=2 over NCCL with decode CUDA graphs (collectives
    captured) gives the eager TP=2 tokens; the graphs were actually captured."""
    work = [(p, SamplingParams(max_tokens=12, **GREEDY)) for p, _ in workload(12, seed=4)]
    factory = RandomWeights("tiny", torch.bfloat16, seed=0)
    got = []
    for graphs in (True, False):
        llm = LLM(factory, tensor_parallel_size=2, num_blocks=1024, max_num_seqs=16, enable_cuda_graphs=graphs,
                  quantization="fp8" if fp8 else None)
        try:
            if graphs:
                st = llm.stats()
                assert st["cuda_graph_batch_sizes"] and st["triton_decode"], st
            got.append(tokens(llm.generate([p for p, _ in work], [s for _, s in work])))
        finally:
            llm.shutdown()
    if not fp8:
        assert got[0] == got[1]
    else:  # scaled_mm may pick another kernel for the padded graph batch: the prefill's first tokens are equal
        assert [[c[0] for c in o] for o in got[0]] == [[c[0] for c in o] for o in got[1]]
        assert all(len(c) == 12 for o in got[0] + got[1] for c in o)
