"""The engine's decoder elementwise functions (engine/fused.py): eagerly the same arithmetic as the modules they
stand in for, bit for bit; traced by torch.compile as one graph each (fullgraph, dynamic shapes); a compiled
function that disagrees is caught by the self-test and the eager ones come back; the engine's outputs are unchanged
with them compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qwenvl
from qwenvl.engine import LLM, SamplingParams
from qwenvl.engine.attention import merge_splits
from qwenvl.engine.fused import DecoderOps
from qwenvl.layers import RMSNorm
from qwenvl.model import Qwen25VL
from qwenvl.rope import rotate_half

H, KV, D, HIDDEN = 4, 2, 16, 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_ops_equal_the_modules_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    ops = DecoderOps(H, KV, D, eps=1e-6)
    norm = RMSNorm(HIDDEN, eps=1e-6)
    norm.weight.data = torch.rand(HIDDEN, generator=g)
    norm = norm.to(dtype)
    h, d = torch.randn(5, HIDDEN, generator=g).to(dtype), torch.randn(5, HIDDEN, generator=g).to(dtype)
    s, x = ops.add_rms_norm(h, d, norm.weight)
    assert torch.equal(s, h + d) and torch.equal(x, norm(h + d))
    s, x = ops.add_rms_norm(h, None, norm.weight)
    assert s is h and torch.equal(x, norm(h))

    qkv = torch.randn(5, (H + 2 * KV) * D, generator=g).to(dtype)
    cos, sin = torch.randn(5, 1, D, generator=g).to(dtype), torch.randn(5, 1, D, generator=g).to(dtype)
    q, k, v = ops.rope_qkv(qkv, cos, sin)
    qk = qkv[:, :(H + KV) * D].view(5, H + KV, D)
    qk = qk * cos + rotate_half(qk) * sin  # the runner's formula before fused.py
    assert q.is_contiguous() and torch.equal(q, qk[:, :H]) and torch.equal(k, qk[:, H:])
    assert torch.equal(v, qkv[:, (H + KV) * D:].view(5, KV, D))

    gu = torch.randn(5, 2 * HIDDEN, generator=g).to(dtype)
    assert torch.equal(ops.silu_mul(gu), F.silu(gu[:, :HIDDEN]) * gu[:, HIDDEN:])


def test_merge_splits_is_softmax_over_all_splits():
    # Three splits of one softmax: merging their partial (max, sum of exp, weighted sum) gives the whole.
    g = torch.Generator().manual_seed(1)
    scores, values = torch.randn(2, 3, 12, generator=g), torch.randn(2, 3, 12, 8, generator=g)
    want = (scores.softmax(-1)[..., None] * values).sum(2)
    parts = [(scores[..., i:i + 4], values[..., i:i + 4, :]) for i in (0, 4, 8)]
    m = torch.stack([s.max(-1).values for s, _ in parts], -1)
    lse = torch.stack([(s - s.max(-1, keepdim=True).values).exp().sum(-1) for s, _ in parts], -1)
    acc = torch.stack([((s - s.max(-1, keepdim=True).values).exp()[..., None] * v).sum(2) for s, v in parts], 2)
    torch.testing.assert_close(merge_splits(acc, m, lse, torch.float32), want)
    # an empty split (m = -inf, nothing accumulated) changes nothing
    acc4 = torch.cat([acc, torch.zeros(2, 3, 1, 8)], 2)
    m4, lse4 = torch.cat([m, torch.full((2, 3, 1), float("-inf"))], -1), torch.cat([lse, torch.zeros(2, 3, 1)], -1)
    torch.testing.assert_close(merge_splits(acc4, m4, lse4, torch.float32), want)


def test_compiled_ops_trace_as_one_graph_and_pass_the_self_test():
    ops = DecoderOps(H, KV, D, eps=1e-6, compiled=True, backend="aot_eager")
    assert ops.check("cpu", torch.float32, HIDDEN) and ops.compiled
    assert ops.add_rms_norm is not ops.eager["add_rms_norm"]


def test_a_compiled_op_that_disagrees_is_replaced_by_the_eager_one():
    ops = DecoderOps(H, KV, D, eps=1e-6, compiled=True, backend="aot_eager")
    ops.silu_mul = lambda gu: gu[:, :HIDDEN]  # wrong
    assert not ops.check("cpu", torch.float32, HIDDEN)
    assert not ops.compiled and ops.silu_mul is ops.eager["silu_mul"]


def test_engine_outputs_unchanged_with_compiled_ops():
    model = Qwen25VL.random(qwenvl.preset("tiny"), seed=0)
    prompts = [{"prompt_token_ids": list(range(100 + i, 140 + 3 * i))} for i in range(4)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    eager = [o.token_ids for o in LLM(model, num_blocks=64, block_size=16).generate(prompts, params)]
    llm = LLM(model, num_blocks=64, block_size=16)
    t = model.config.text
    llm.runner.ops = DecoderOps(t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.rms_norm_eps,
                                compiled=True, backend="aot_eager")
    assert [o.token_ids for o in llm.generate(prompts, params)] == eager


def test_compiled_vision_blocks_give_the_eager_features_on_new_sizes():
    from qwenvl.engine.vision_graphs import compile_vision_blocks

    model = Qwen25VL.random(qwenvl.preset("tiny"), seed=0)
    visual, c = model.visual, model.config.vision
    grids = [(1, 6, 10), (2, 4, 4)]  # not the sizes it compiled on: the dynamic graph serves them
    x = torch.randn(sum(t * h * w for t, h, w in grids), c.patch_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = visual(x, grids)
    assert compile_vision_blocks(visual, "cpu", backend="aot_eager")
    assert all(b._compiled_call_impl is not None for b in visual.blocks)
    with torch.inference_mode():
        torch.testing.assert_close(visual(x, grids), want, rtol=1e-4, atol=1e-5)


def test_compiled_vision_blocks_that_fail_are_put_back_eager():
    from qwenvl.engine.vision_graphs import compile_vision_blocks

    model = Qwen25VL.random(qwenvl.preset("tiny"), seed=0)

    def broken_backend(gm, example_inputs):
        return lambda *args: [torch.zeros_like(a) if isinstance(a, torch.Tensor) else a for a in gm(*args)]  # wrong

    assert not compile_vision_blocks(model.visual, "cpu", backend=broken_backend)
    assert all(b._compiled_call_impl is None for b in model.visual.blocks)


def test_an_engine_without_vit_compile_undoes_an_earlier_engines_compile(monkeypatch):
    from qwenvl.engine.vision_graphs import compile_vision_blocks

    model = Qwen25VL.random(qwenvl.preset("tiny"), seed=0)
    assert compile_vision_blocks(model.visual, "cpu", backend="aot_eager") and model.visual._engine_compiled
    assert compile_vision_blocks(model.visual, "cpu", backend="aot_eager")  # already done: nothing compiles again
    monkeypatch.setenv("QWENVL_COMPILE_VIT", "0")
    LLM(model, num_blocks=16, block_size=16)
    assert not model.visual._engine_compiled and all(b._compiled_call_impl is None for b in model.visual.blocks)
    model.visual.blocks[0].compile(backend="aot_eager")  # a user's own compile: engines leave it alone
    LLM(model, num_blocks=16, block_size=16)
    assert model.visual.blocks[0]._compiled_call_impl is not None


def test_compiled_ops_keep_feature_sizes_static_and_compile_twice():
    """dynamic 'rows' (the default): one graph for 1 row and one for every other row count, each with fewer
    runtime sizes than the all-dynamic compile of the same function (whose feature sizes stay symbolic: the
    weights come in as arguments); same values as eager."""
    symbols = {}
    for mode in ("rows", "all"):
        graphs = []

        def backend(gm, example_inputs, graphs=graphs):
            graphs.append(sum(isinstance(x, torch.SymInt) for x in example_inputs))
            return gm.forward

        torch._dynamo.reset()
        ops = DecoderOps(H, KV, D, eps=1e-6, compiled=True, backend=backend, dynamic=mode)
        g = torch.Generator().manual_seed(0)
        for n in (1, 2, 3, 37):
            args = (torch.randn(n, (H + 2 * KV) * D, generator=g), torch.randn(n, 1, D, generator=g),
                    torch.randn(n, 1, D, generator=g))
            for got, want in zip(ops.rope_qkv(*args), ops.eager["rope_qkv"](*args)):
                torch.testing.assert_close(got, want)
            h, w = torch.randn(n, HIDDEN, generator=g), torch.randn(HIDDEN, generator=g)
            for got, want in zip(ops.add_rms_norm(h, h, w), ops.eager["add_rms_norm"](h, h, w)):
                torch.testing.assert_close(got, want)
        symbols[mode] = graphs
    assert len(symbols["rows"]) == 4, symbols  # two functions x (1 row, the rest)
    assert sum(symbols["rows"]) < sum(symbols["all"]), symbols
    torch._dynamo.reset()


def test_padded_vit_mlp_compiles_without_a_graph_break():
    """The engine pads the 7B ViT's 3420-wide MLP and compiles its blocks: the padded MLP must stay inside the
    compiled graph (a data-pointer check in SwiGLU.forward broke it there, so the MLP ran eagerly: silu and mul
    as separate kernels in the H100's W4 profile). Breaks are only the eager varlen attention's; the outputs
    equal the unpadded module's; .float() (new storage) drops the padded copies."""
    import dataclasses

    from torch._dynamo.utils import counters

    cfg = qwenvl.preset("tiny")
    c = dataclasses.replace(cfg.vision, intermediate_size=100)  # not a multiple of 16
    visual = Qwen25VL.random(dataclasses.replace(cfg, vision=c), seed=0).visual  # every parameter set
    x = torch.randn(64, c.patch_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = visual(x, [(1, 8, 8)])
    assert visual.pad_mlp_hidden(16)
    torch._dynamo.reset()
    counters.clear()
    for blk in visual.blocks:
        blk.compile(dynamic=True, backend="aot_eager")
    with torch.inference_mode():
        got = visual(x, [(1, 8, 8)])
    breaks = dict(counters["graph_break"])
    assert breaks and all("varlen_attention" in reason for reason in breaks), breaks
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mlp = visual.blocks[0].mlp
    assert mlp._padded is not None
    mlp.float()
    assert mlp._padded is None
    torch._dynamo.reset()


def test_many_engines_in_one_process_each_get_their_own_recompile_budget():
    """dynamo keeps compiled variants, and its limit of 8 recompiles, per code object: every DecoderOps shared
    add_rms_norm's code, so a process that builds several engines (tests, bench runs, a server reloading models) hit
    the limit and, with fullgraph=True, failed hard (H100 2026-12-06: two GPU tests). Each DecoderOps now compiles
    its own copy of the code, and its self-test runs in inference mode as the runner does (grad mode is a guard)."""
    torch._dynamo.reset()
    for hidden in (16, 24, 32, 40, 48):  # five engines' shapes, each: self-test, then 1 and 5 rows, +- delta
        ops = DecoderOps(4, 2, 8, eps=1e-6, compiled=True, backend="eager")
        assert ops.check("cpu", torch.float32, hidden) and ops.compiled
        with torch.inference_mode():
            for n, with_delta in ((1, True), (1, False), (5, True), (5, False)):
                h, d, w = torch.randn(n, hidden), torch.randn(n, hidden), torch.randn(hidden)
                got = ops.add_rms_norm(h, d if with_delta else None, w)
                torch.testing.assert_close(got, ops.eager["add_rms_norm"](h, d if with_delta else None, w))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_inductor_compiled_ops_round_like_the_eager_ops_bit_for_bit(device):
    """bf16 through inductor (C++ on the CPU, Triton on CUDA): with EXACT_CASTS the compiled RMSNorm, rotary and
    silu * up round where the eager ops round; without it about a quarter of the outputs were one bf16 step off
    (fast/slow greedy tokens parted at near ties on a GPU)."""
    torch._dynamo.reset()
    ops = DecoderOps(4, 2, 16, eps=1e-6, compiled=True)
    g = torch.Generator().manual_seed(0)
    n, hidden = 24, 64

    def rand(*shape):
        return torch.randn(*shape, generator=g).bfloat16().to(device)

    h, d, w = rand(n, hidden), rand(n, hidden), rand(hidden)
    qkv, cos, sin = rand(n, 8 * 16), rand(n, 1, 16), rand(n, 1, 16)
    gu = rand(n, 2 * hidden)
    with torch.inference_mode():
        for name, args in (("add_rms_norm", (h, d, w)), ("add_rms_norm", (h, None, w)),
                           ("rope_qkv", (qkv, cos, sin)), ("silu_mul", (gu,))):
            got, want = getattr(ops, name)(*args), ops.eager[name](*args)
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert torch.equal(a, b), name
