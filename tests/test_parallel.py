"""Tensor parallelism on CPU: gloo process groups started by qwenvl.parallel.spawn, tiny model, fp32.

Every worker builds the same full random model (same seed) as its TP=1 reference, so only scalars and
token ids travel back to the test process.
"""

from __future__ import annotations

import pytest
import torch

import qwenvl
from qwenvl.errors import ConfigError
from qwenvl.model import Qwen25VL
from qwenvl.parallel import TPLayout, load_tp, param_bytes, shard_model, spawn
from qwenvl.quant import load_fp8, quantize_model_fp8, save_fp8

VS, VE, IMG, PAD = 151652, 151653, 151655, 151643
GEN = 6


def text_image_batch():
    """Two left-padded rows, each with one image (2 images: the data-parallel ViT gives one to each rank)."""
    g = torch.Generator().manual_seed(3)
    grids = [(1, 8, 8), (1, 4, 8)]
    rows = []
    for (t, h, w), (a, b) in zip(grids, [(6, 6), (3, 10)]):
        txt = torch.randint(100, 150000, (a + b,), generator=g).tolist()
        rows.append(txt[:a] + [VS] + [IMG] * (t * h * w // 4) + [VE] + txt[a:])
    L = max(map(len, rows))
    ids = torch.full((2, L), PAD)
    mask = torch.zeros(2, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    pix = torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix, "image_grid_thw": torch.tensor(grids)}


def full_model():
    return Qwen25VL.random(qwenvl.preset("tiny"), torch.float32, seed=0)


def maxdiff(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def _tp_worker(rank, world, ckpt, fp8_ckpt):
    b = text_image_batch()
    out = {}
    ref_model = full_model()
    ref = ref_model(**b)
    ref_gen = ref_model.generate(**b, max_new_tokens=GEN)
    full_layers = param_bytes(ref_model, "model.layers")
    full_total = param_bytes(ref_model)

    m = shard_model(full_model(), rank, world)
    out["shard_logits"] = maxdiff(m(**b), ref)
    out["shard_gen_equal"] = torch.equal(m.generate(**b, max_new_tokens=GEN), ref_gen)
    t = m.config.text
    out["local"] = (t.num_attention_heads, t.num_key_value_heads, t.intermediate_size, t.head_dim, t.vocab_size)

    tied_cfg = qwenvl.preset("tiny")
    tied_cfg.text.tie_word_embeddings = True  # as the 3B: lm_head shares the vocab-parallel embedding shard
    tied = Qwen25VL.random(tied_cfg, torch.float32, seed=1)
    tied_ref = tied(**b)
    shard_model(tied, rank, world)
    out["tied_logits"] = maxdiff(tied(**b), tied_ref)
    out["tied_shared"] = tied.lm_head.weight is tied.model.embed_tokens.weight

    stats = {}
    m = load_tp(ckpt, rank, world, dtype=torch.float32, stats=stats)
    out["load_logits"] = maxdiff(m(**b), ref)
    out["load_gen_equal"] = torch.equal(m.generate(**b, max_new_tokens=GEN), ref_gen)
    out["bytes"] = {"layers": param_bytes(m, "model.layers"), "full_layers": full_layers,
                    "embed": param_bytes(m, "model.embed_tokens"), "lm_head": param_bytes(m, "lm_head"),
                    "visual": param_bytes(m, "visual"), "total": param_bytes(m), "full_total": full_total,
                    "read": stats["bytes_read"]}
    m = load_tp(ckpt, rank, world, dtype=torch.float32, vit="data")
    out["dp_vit_logits"] = maxdiff(m(**b), ref)

    fp8_ref = load_fp8(fp8_ckpt, dtype=torch.float32)
    m = load_tp(fp8_ckpt, rank, world, dtype=torch.float32)
    out["fp8_logits"] = maxdiff(m(**b), fp8_ref(**b))
    out["fp8_gen_equal"] = torch.equal(m.generate(**b, max_new_tokens=GEN), fp8_ref.generate(**b, max_new_tokens=GEN))
    m = shard_model(quantize_model_fp8(full_model()), rank, world)  # quantise, then shard in memory
    out["fp8_then_shard_logits"] = maxdiff(m(**b), fp8_ref(**b))
    # shard, then quantise: row-parallel layers keep their all-reduce; their scales are per rank (over their
    # input slice), so the result is a (slightly different) FP8 model: compare with fp32 at FP8 accuracy
    m = quantize_model_fp8(shard_model(full_model(), rank, world))
    out["shard_then_fp8_rel"] = ((m(**b) - ref).norm() / ref.norm()).item()
    return out


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("tp_ckpt")
    full_model().save_pretrained(ckpt, max_shard_bytes=20 * 2**20)  # several shards
    fp8_ckpt = tmp_path_factory.mktemp("tp_fp8")
    save_fp8(quantize_model_fp8(full_model()), fp8_ckpt, num_shards=3)
    return spawn(_tp_worker, 2, str(ckpt), str(fp8_ckpt), backend="gloo")


def test_tp2_logits_equal_tp1_text_and_image(tp2):
    for r in tp2:
        assert r["shard_logits"] < 1e-5
        assert r["load_logits"] < 1e-5


def test_tied_embeddings_stay_tied(tp2):
    for r in tp2:
        assert r["tied_logits"] < 1e-5 and r["tied_shared"]


def test_tp2_greedy_generation_equals_tp1(tp2):
    for r in tp2:
        assert r["shard_gen_equal"] and r["load_gen_equal"]


def test_rank_config_describes_the_local_shard(tp2):
    # tiny: 4 heads, 2 kv heads, MLP 96, head_dim 16 -> per rank 2 heads, 1 kv head (KV cache sharded), MLP 48
    for r in tp2:
        assert r["local"] == (2, 1, 48, 16, 151936)


def test_load_tp_reads_and_holds_only_this_ranks_slices(tp2):
    for r in tp2:
        b = r["bytes"]
        assert 0.49 < b["layers"] / b["full_layers"] < 0.51  # norms are replicated, tiny
        assert b["embed"] == b["lm_head"] == 151936 // 2 * 64 * 4
        assert b["read"] == b["total"]  # what was read is what is resident: no full tensor was loaded
        assert 0.49 < (b["total"] - b["visual"]) / (b["full_total"] - b["visual"]) < 0.51  # ViT replicated


def test_data_parallel_vit_equals_replicated(tp2):
    for r in tp2:
        assert r["dp_vit_logits"] < 1e-5


def test_fp8_checkpoint_shards_the_same_way(tp2):
    for r in tp2:
        assert r["fp8_logits"] < 1e-5
        assert r["fp8_gen_equal"]
        assert r["fp8_then_shard_logits"] < 1e-5
        assert r["shard_then_fp8_rel"] < 0.1


@torch.no_grad()
def _tp4_worker(rank, world):
    ids = torch.randint(0, 151936, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = full_model()(ids)
    m = shard_model(full_model(), rank, world)
    return maxdiff(m(ids), ref), m.config.text.num_key_value_heads, m.model.layers[0].self_attn.k_proj.weight.shape


def test_tp4_replicates_kv_heads():
    # 2 kv heads over 4 ranks: each rank holds the one kv head its query head uses
    res = spawn(_tp4_worker, 4, backend="gloo")
    for diff, kv, kshape in res:
        assert diff < 1e-5 and kv == 1 and tuple(kshape) == (16, 64)


def test_layouts_of_the_released_shapes():
    lay = TPLayout.of(qwenvl.preset("7b").text, 1, 2)  # 28 heads / 4 kv heads / 18944
    assert (lay.local_heads, lay.local_kv, lay.local_inter) == (14, 2, 9472)
    assert lay.rows("q") == (14 * 128, 28 * 128) and lay.rows("kv") == (2 * 128, 4 * 128)
    assert lay.spec("model.layers.3.self_attn.o_proj.weight") == (1, 14 * 128, 28 * 128, 14 * 128)
    assert lay.spec("model.layers.3.self_attn.o_proj.weight_scale") is None
    assert lay.spec("model.layers.3.mlp.up_proj.weight_scale") == (0, 9472, 18944, 9472)
    assert lay.spec("model.layers.3.input_layernorm.weight") is None
    assert lay.spec("visual.blocks.0.attn.qkv.weight") is None
    t3 = qwenvl.preset("3b").text  # 16 heads, 2 kv heads: at TP=4 every kv head lives on 2 ranks
    assert [TPLayout.of(t3, r, 4).rows("kv") for r in range(4)] == [(0, 128), (0, 128), (128, 256), (128, 256)]
    lay72 = TPLayout.of(qwenvl.preset("72b").text, 7, 8)
    assert (lay72.local_heads, lay72.local_kv, lay72.local_inter) == (8, 1, 3696)
    assert lay72.rows("vocab") == (7 * 19008, 152064)
    with pytest.raises(ConfigError):
        TPLayout.of(qwenvl.preset("7b").text, 0, 8)  # 28 heads
    with pytest.raises(ConfigError):
        TPLayout.of(qwenvl.preset("tiny").text, 0, 3)


def _fails_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    torch.distributed.barrier()  # would hang forever without the failure handling
    return rank


def test_spawn_reports_a_failing_rank():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        spawn(_fails_on_rank_1, 2, backend="gloo", timeout=120)


def test_world_one_is_a_no_op():
    m = full_model()
    assert shard_model(m, 0, 1) is m
    with pytest.raises(RuntimeError, match="process group"):
        shard_model(full_model(), 0, 2)


def test_bench_tp_section_cpu_dry_run(tmp_path):
    """bench/bench_tp_fp8.py (b) on the tiny model with 2 gloo processes (--tp 2 instead of torchrun)."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_tp_fp8

    assert bench_tp_fp8.main(["--shape", "tiny", "--device", "cpu", "--tp", "2", "--out", str(tmp_path)]) == 0
    r = json.load(open(tmp_path / "tp.json"))
    assert r["complete"] and all(r["checks"].values()) and all(i["equal"] for i in r["fp32_requests"])
