"""Parity of the model with transformers 4.57.6 on random weights (tiny config, float32, CPU)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import qwenvl
from qwenvl.checkpoint import save_model
from qwenvl.errors import CheckpointError, ConfigError, InputError
from qwenvl.model import Qwen25VL
from qwenvl.rope import mrope_positions

from reference import hf_model

VS, VE, IMG, VID, PAD = 151652, 151653, 151655, 151656, 151643


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = qwenvl.preset("tiny")
    hf = hf_model(cfg)
    d = tmp_path_factory.mktemp("hf_ckpt")
    hf.save_pretrained(d)
    ours = Qwen25VL.from_pretrained(d, dtype=torch.float32)
    return hf, ours, d


def block(tok, grid):
    t, h, w = grid
    return [VS] + [tok] * (t * h * w // 4) + [VE]


def test_vision_tower_parity_images_and_video_in_one_call(pair):
    hf, ours, _ = pair
    # Three images of different sizes/aspects (an odd llm grid needing window padding, one divisible by the
    # window, a wide one) and one 4-frame video, packed into one call.
    grids = torch.tensor([[1, 20, 22], [1, 8, 8], [1, 6, 40], [2, 12, 16]])
    pix = torch.randn(int(grids.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.model.visual(pix, grid_thw=grids)
        out = ours.visual(pix, grids)
    assert out.shape == ref.shape == (int(grids.prod(-1).sum()) // 4, 64)
    assert (out - ref).abs().max().item() < 1e-5


def test_vision_mlp_padding_keeps_outputs_and_state_dict(pair):
    """The inference-only padding of the ViT MLP width (for cuBLAS's fast kernels on CUDA) changes nothing a
    user sees: same outputs as transformers, same state_dict; training still reaches the parameters."""
    hf, _, d = pair
    ours = Qwen25VL.from_pretrained(d, dtype=torch.float32)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    grids = torch.tensor([[1, 20, 22], [2, 12, 16]])
    pix = torch.randn(int(grids.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(1))
    assert ours.visual.pad_mlp_hidden(multiple=40)  # tiny's 48 -> 80: the padded path really runs
    assert ours.visual.blocks[0].mlp._padded[0].shape[0] == 160
    with torch.no_grad():
        ref = hf.model.visual(pix, grid_thw=grids)
        out = ours.visual(pix, grids)
    assert (out - ref).abs().max().item() < 1e-5
    after = ours.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ours.visual.requires_grad_(True)
    loss = ours.visual(pix, grids).square().mean()
    loss.backward()
    assert ours.visual.blocks[0].mlp.gate_proj.weight.grad is not None


def hand_positions(tokens, grids, spgs, tps=2.0):
    """Positions by the Qwen team's rule, token by token: text p,p,p; vision block from s = next free id with
    T = s + floor(k*spg*tps), H = s + row, W = s + col; the next free id after a block is its max + 1."""
    t_, h_, w_ = [], [], []
    nxt, i, gi = 0, 0, 0
    while i < len(tokens):
        if tokens[i] in (IMG, VID):
            t, h, w = grids[gi]
            spg = spgs[gi]
            gi += 1
            hi = 0
            for k in range(t):
                for r in range(h // 2):
                    for c in range(w // 2):
                        tid = math.floor(k * spg * tps) if tokens[i] == VID else 0
                        t_.append(nxt + tid), h_.append(nxt + r), w_.append(nxt + c)
                        hi = max(hi, tid, r, c)
            i += t * h * w // 4
            nxt += hi + 1
        else:
            t_.append(nxt), h_.append(nxt), w_.append(nxt)
            nxt += 1
            i += 1
    return torch.tensor([t_, h_, w_])


def test_mrope_positions_worked_example():
    # REFERENCE.md 6.2: [t t t VS img(1x4x6) VE t t VS video(3x4x4, spg 1) VE t t]
    ids = [1, 2, 3] + block(IMG, (1, 4, 6)) + [4, 5] + block(VID, (3, 4, 4)) + [6, 7]
    pos, delta = mrope_positions(torch.tensor([ids]), None, [[1, 4, 6]], [[3, 4, 4]], [1.0])
    expect_t = [0, 1, 2, 3] + [4] * 6 + [7, 8, 9, 10] + [11] * 4 + [13] * 4 + [15] * 4 + [16, 17, 18]
    assert pos[0, 0].tolist() == expect_t
    assert pos[1, 0, 4:10].tolist() == [4, 4, 4, 5, 5, 5]
    assert pos[2, 0, 4:10].tolist() == [4, 5, 6, 4, 5, 6]
    assert delta.item() == 19 - len(ids)


@pytest.mark.parametrize("spg,expect", [(0.75, [0, 1, 3, 4, 6, 7]), (1.1086, [0, 2, 4, 6, 8, 11]),
                                        (0.5, [0, 1, 2, 3, 4, 5]), (4 / 3, [0, 2, 5, 8, 10, 13])])
def test_mrope_non_integer_second_per_grid(spg, expect):
    # Temporal ids floor(k*spg*2) worked out by hand; text after the video continues at its max + 1,
    # which here is the temporal span (larger than the 2x2 llm grid).
    ids = [1, 2] + block(VID, (6, 4, 4)) + [3, 4]
    pos, delta = mrope_positions(torch.tensor([ids]), None, None, [[6, 4, 4]], [spg])
    start = 3
    vid_t = pos[0, 0, 3:3 + 24].view(6, 4)
    assert (vid_t[:, 0] - start).tolist() == expect
    assert (vid_t == vid_t[:, :1]).all()
    assert pos[0, 0, -3].item() == start + expect[-1] + 1  # vision_end token
    assert torch.equal(pos[:, 0], hand_positions(ids, [(6, 4, 4)], [spg]))
    assert delta.item() == pos.max().item() + 1 - len(ids)


def left_pad(rows):
    L = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def chat(*parts):
    """A ChatML-shaped id sequence: system, user turn with the given parts, assistant prompt."""
    return [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198] + \
        [x for p in parts for x in p] + [151645, 198, 151644, 77091, 198]


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    img_grids = [[1, 20, 22], [1, 12, 8], [1, 8, 14]]
    vid_grids = [[3, 12, 16]]
    rows = [
        chat([9707, 11, 1246, 525, 498, 30]),  # text only
        chat(block(IMG, img_grids[0]), block(IMG, img_grids[1]), [3838, 374, 304, 1493, 5335, 30]),
        chat(block(VID, vid_grids[0]), block(IMG, img_grids[2]), [74785, 279, 2766, 13]),
    ]
    ids, mask = left_pad(rows)
    n_img = sum(t * h * w for t, h, w in img_grids)
    n_vid = sum(t * h * w for t, h, w in vid_grids)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(n_img, 1176, generator=g),
                image_grid_thw=torch.tensor(img_grids), pixel_values_videos=torch.randn(n_vid, 1176, generator=g),
                video_grid_thw=torch.tensor(vid_grids), second_per_grid_ts=torch.tensor([2 / 1.5]))


def reference_positions(batch):
    """Original-rule positions for the left-padded batch, from the token-by-token derivation above."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = torch.ones(3, *ids.shape, dtype=torch.long)
    grids = [tuple(g) for g in batch["image_grid_thw"].tolist()]
    vgrids = [tuple(g) for g in batch["video_grid_thw"].tolist()]
    spg = batch["second_per_grid_ts"].tolist()
    ii = vi = 0
    deltas = []
    for b in range(ids.shape[0]):
        toks = ids[b][mask[b].bool()].tolist()
        order, sp = [], []
        j = 0
        while j < len(toks):  # the grids this row uses, in order
            if toks[j] == IMG:
                order.append(grids[ii]), sp.append(0.0)
                j += math.prod(grids[ii]) // 4
                ii += 1
            elif toks[j] == VID:
                order.append(vgrids[vi]), sp.append(spg[vi])
                j += math.prod(vgrids[vi]) // 4
                vi += 1
            else:
                j += 1
        p = hand_positions(toks, order, sp)
        pos[:, b, mask[b].bool()] = p
        deltas.append(p.max().item() + 1 - ids.shape[1])
    return pos, torch.tensor(deltas).view(-1, 1)


def test_positions_equal_transformers_where_rules_agree(pair, batch):
    hf, _, _ = pair
    b = dict(batch, second_per_grid_ts=torch.tensor([1.0]))  # fps 2: every release agrees
    ref_pos, ref_delta = hf.model.get_rope_index(b["input_ids"], b["image_grid_thw"], b["video_grid_thw"],
                                                 b["second_per_grid_ts"], b["attention_mask"])
    pos, delta = mrope_positions(b["input_ids"], b["attention_mask"], b["image_grid_thw"], b["video_grid_thw"],
                                 b["second_per_grid_ts"])
    assert torch.equal(pos, ref_pos) and torch.equal(delta, ref_delta)
    pos2, delta2 = mrope_positions(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                                   batch["video_grid_thw"], batch["second_per_grid_ts"])
    hp, hd = reference_positions(batch)
    assert torch.equal(pos2, hp) and torch.equal(delta2, hd)


def _hf_with_original_rule(hf, batch):
    """transformers 4.57 casts second_per_grid_t to int; give it the original-rule positions instead."""
    pos, delta = reference_positions(batch)
    hf.model.get_rope_index = lambda *a, **k: (pos.clone(), delta.clone())
    hf.model.rope_deltas = None
    return pos


def test_logits_left_padded_batch(pair, batch):
    hf, ours, _ = pair
    pos = _hf_with_original_rule(hf, batch)
    with torch.no_grad():
        ref = hf(**batch, position_ids=pos).logits
        out = ours(**batch)
    keep = batch["attention_mask"].bool()
    assert (out[keep] - ref[keep]).abs().max().item() < 1e-4
    del hf.model.get_rope_index


def test_greedy_generation_matches(pair, batch):
    hf, ours, _ = pair
    _hf_with_original_rule(hf, batch)
    with torch.no_grad():
        ref = hf.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=PAD, eos_token_id=None,
                          min_new_tokens=24)[:, batch["input_ids"].shape[1]:]
    del hf.model.get_rope_index
    out = ours.generate(**batch, max_new_tokens=24, eos_token_id=[])
    assert out.shape == (3, 24)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("layout", ["hub", "v5"])
def test_checkpoint_layouts_sharded(pair, batch, tmp_path, layout):
    hf, ours, _ = pair
    save_model(ours, tmp_path, layout=layout, num_shards=3)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == 3
    names = set(index["weight_map"])
    if layout == "v5":
        assert any(n.startswith("model.visual.") for n in names) and any(n.startswith("model.language_model.")
                                                                        for n in names)
    else:
        assert any(n.startswith("visual.") for n in names) and "model.embed_tokens.weight" in names
    again = Qwen25VL.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        a, b = ours(**batch), again(**batch)
    assert torch.equal(a, b)
    # transformers loads what we wrote and computes the same logits
    from transformers import Qwen2_5_VLForConditionalGeneration

    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        r = ref(**batch, position_ids=reference_positions(batch)[0]).logits
    keep = batch["attention_mask"].bool()
    assert (a[keep] - r[keep]).abs().max().item() < 1e-4


def test_tied_embeddings_roundtrip(tmp_path):
    cfg = qwenvl.preset("tiny")
    cfg.text.tie_word_embeddings = True
    m = Qwen25VL.random(cfg, seed=1)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    m.save_pretrained(tmp_path)
    again = Qwen25VL.from_pretrained(tmp_path, dtype=torch.float32)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(m(ids), again(ids))


def test_average_checkpoints_is_the_mean_of_the_weights_across_layouts(tmp_path):
    from qwenvl.checkpoint import average_checkpoints
    from qwenvl.cli import main as cli_main
    cfg = qwenvl.preset("tiny")
    a, b = Qwen25VL.random(cfg, seed=1).to(torch.bfloat16), Qwen25VL.random(cfg, seed=2).to(torch.bfloat16)
    save_model(a, tmp_path / "a", num_shards=2)
    save_model(b, tmp_path / "b", layout="v5")  # another layout and shard count: matched by name
    (tmp_path / "a" / "chat_template.json").write_text('{"chat_template": "x"}')
    assert cli_main(["average", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    from safetensors import safe_open
    for f in (tmp_path / "m").glob("*.safetensors"):  # stored in the inputs' dtype
        with safe_open(str(f), "pt") as st:
            assert all(st.get_tensor(k).dtype == torch.bfloat16 for k in st.keys())
    m = Qwen25VL.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in m.state_dict().items():  # the fp32 mean of the two bf16 tensors, rounded once to bf16
        assert torch.equal(v, ((sa[k].float() + sb[k].float()) / 2).to(torch.bfloat16)), k
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(p.name for p in (tmp_path / "a").iterdir())
    cfg_c = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg_c["intermediate_size"] = 80
    os.makedirs(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg_c))
    with pytest.raises(CheckpointError, match="config differs.*intermediate_size"):
        average_checkpoints([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "n"))
    with pytest.raises(CheckpointError, match="at least two"):
        average_checkpoints([str(tmp_path / "a")], str(tmp_path / "n"))
    before = (tmp_path / "a" / "model-00001-of-00002.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="one of the checkpoints"):  # never over an input
        average_checkpoints([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="not empty"):  # nor over another model
        average_checkpoints([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert (tmp_path / "a" / "model-00001-of-00002.safetensors").read_bytes() == before


def test_bad_checkpoints(pair, tmp_path):
    _, ours, _ = pair
    save_model(ours, tmp_path / "a", num_shards=3)
    shard = sorted((tmp_path / "a").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing.*" + shard.name):
        Qwen25VL.from_pretrained(tmp_path / "a")
    # wrong shape: a config that disagrees with the tensors
    save_model(ours, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.\d+\.mlp\.\w+_proj\.weight.*has shape"):
        Qwen25VL.from_pretrained(tmp_path / "b")
    cfg["model_type"] = "llava"
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type 'llava'"):
        Qwen25VL.from_pretrained(tmp_path / "b")
    # pickle-only checkpoints are refused, never unpickled
    os.makedirs(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "c" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        Qwen25VL.from_pretrained(tmp_path / "c")
    # truncated shard
    save_model(ours, tmp_path / "d")
    f = tmp_path / "d" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        Qwen25VL.from_pretrained(tmp_path / "d")


def test_bad_inputs(pair):
    _, ours, _ = pair
    ids = torch.tensor([block(IMG, (1, 4, 4))])
    with pytest.raises(InputError, match="no image pixels"):
        ours(ids)
    with pytest.raises(InputError, match="pixel_values has shape"):
        ours(ids, pixel_values=torch.randn(15, 1176), image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(InputError, match="do not match"):
        ours(ids, pixel_values=torch.randn(32, 1176), image_grid_thw=torch.tensor([[2, 4, 4]]))
    with pytest.raises(InputError, match="invalid"):
        ours(ids, pixel_values=torch.randn(15, 1176), image_grid_thw=torch.tensor([[1, 3, 5]]))


def test_packed_samples_equal_separate_runs(pair, batch):
    """Packed rows (training): each sample sees only itself, positions restart; equals unpacked logits."""
    _, ours, _ = pair
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = [ids[b][mask[b].bool()] for b in range(3)]
    packed = torch.cat(rows)[None]
    with torch.no_grad():
        out = ours(packed, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                   pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"],
                   second_per_grid_ts=batch["second_per_grid_ts"], seq_lens=[len(r) for r in rows])
        ref = ours(**batch)
    assert (out[0] - ref[mask.bool()]).abs().max().item() < 1e-4
