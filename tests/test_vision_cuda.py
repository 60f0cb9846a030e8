"""The vision tower's CUDA path (FlashAttention varlen over window/frame segments) against the padded-SDPA path
and the fp32 result; run on a GPU through the device tool: `pytest -m gpu tests/test_vision_cuda.py`."""

from __future__ import annotations

import pytest
import torch

import qwenvl
from qwenvl import layers
from qwenvl.model import Qwen25VL

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(x, y):
    return ((x.float() - y.float()).norm() / y.float().norm()).item()


def test_flash_varlen_equals_padded_sdpa_and_is_as_close_to_fp32():
    model = Qwen25VL.random(qwenvl.preset("tiny"), torch.float32, seed=0)
    grids = torch.tensor([[1, 16, 24], [2, 8, 12], [1, 10, 6]])  # an image, a 2-frame video, a small image
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(int(grids.prod(-1).sum()), model.config.vision.patch_dim, generator=g)
    with torch.no_grad():
        ref = model.visual.cuda()(pix.cuda(), grids)
        vis = model.visual.to(torch.bfloat16)
        assert layers.flash_varlen_usable(torch.empty(1, 1, model.config.vision.head_dim, device="cuda",
                                                      dtype=torch.bfloat16))
        flash = vis(pix.cuda(), grids)
        saved, layers._flash_varlen = layers._flash_varlen, None
        try:
            padded = vis(pix.cuda(), grids)
        finally:
            layers._flash_varlen = saved
    assert rel(flash, padded) < 2e-2
    assert rel(flash, ref) < 1.5 * rel(padded, ref) + 1e-3
    # each item alone gives the same rows as the packed call: segments never leak
    with torch.no_grad():
        parts, off = [], 0
        for t, h, w in grids.tolist():
            n = t * h * w
            parts.append(vis(pix[off:off + n].cuda(), torch.tensor([[t, h, w]])))
            off += n
    assert rel(flash, torch.cat(parts)) < 1e-2


def test_vision_graphs_replay_equals_eager():
    """engine.vision_graphs: a grid list is captured on its second use and replayed with new pixels; with one graph
    kept, alternating grid lists evict and recapture (shared pool); plans dropped by the ViT's own cache stay alive
    for the graphs. Every output equals the eager ViT's."""
    from qwenvl.engine.vision_graphs import VisionGraphs

    model = Qwen25VL.random(qwenvl.preset("tiny"), torch.bfloat16, device="cuda", seed=0)
    vis = model.visual
    vis.PLAN_CACHE_ROWS = 1  # the ViT keeps only its newest plan
    graphs = VisionGraphs(vis, max_graphs=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        for grids in ([(1, 16, 24)], [(1, 8, 12), (2, 8, 12)]):
            n = sum(t * h * w for t, h, w in grids)
            pix = torch.randn(n, model.config.vision.patch_dim, generator=g).cuda()
            with torch.no_grad():
                ref = vis(pix, grids)
            assert rel(graphs(pix, grids), ref) < 1e-3
    assert graphs.enabled and graphs.replays == 6 and len(graphs.graphs) == 1
    fp32 = VisionGraphs(Qwen25VL.random(qwenvl.preset("tiny"), torch.float32, device="cuda", seed=0).visual)
    pix = torch.randn(16 * 24, model.config.vision.patch_dim, generator=g).cuda()
    for _ in range(2):  # fp32 has no varlen kernel: never captured, eager
        fp32(pix, [(1, 16, 24)])
    assert not fp32.enabled and fp32.replays == 0


def test_engine_pads_the_vit_mlp_under_graphs_with_the_same_features():
    """The engine zero-pads a ViT MLP whose width is not a multiple of 16 (the 7B/72B ViT's 3420) when it replays
    the ViT from graphs, and compiles its blocks (QWENVL_COMPILE_VIT, default on CUDA): the features it computes
    (first use without a graph, then the graph) stay within bf16 noise of the unpadded eager ViT's."""
    import copy
    import dataclasses

    from qwenvl.engine import LLM

    cfg = qwenvl.preset("tiny")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, intermediate_size=50))
    model = Qwen25VL.random(cfg, torch.bfloat16, device="cuda", seed=0)
    plain = copy.deepcopy(model.visual)
    llm = LLM(model, num_blocks=256, block_size=16)
    assert all(b.mlp._padded is not None and b.mlp._padded[3] == 64 for b in model.visual.blocks)
    assert model.visual._engine_compiled and all(b._compiled_call_impl is not None for b in model.visual.blocks)
    grids = [(1, 16, 24)]
    pix = torch.randn(16 * 24, cfg.vision.patch_dim, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        ref = plain(pix, grids)
        outs = [llm.runner.vision_graphs(pix, grids) for _ in range(3)]
    assert llm.runner.vision_graphs.replays >= 1
    for out in outs:
        assert rel(out, ref) < 1e-2
    llm.shutdown()
