"""Packing: bins respect capacity, ranks get balanced compute, and a packed row trains exactly like separate rows."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import qwenvl
from qwenvl.model import Qwen25VL
from qwenvl.train.data import IGNORE, ChatEncoder, JsonlStream
from qwenvl.train.loss import linear_nll, linear_nll_sum, sft_loss_sum
from qwenvl.train.packing import PackedLoader, attention_weight, balance, bin_cost, collate, pack_lengths, plan_steps


def test_pack_lengths_fills_bins_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(20, 3000) for _ in range(500)]
    bins = pack_lengths(lengths, 8192)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 8192 for b in bins)
    lower = -(-sum(lengths) // 8192)
    assert len(bins) <= lower * 1.03 + 1  # best-fit decreasing is near the bound
    with pytest.raises(ValueError):
        pack_lengths([9000], 8192)


def test_rows_mix_the_tasks_of_a_chunk_with_no_more_rows_than_best_fit(tmp_path):
    # Two tasks of different lengths: best-fit decreasing fills whole rows with the long task, then with the short.
    rng = random.Random(0)
    recs = [{"messages": [{"role": "user", "content": "Describe."},
                          {"role": "assistant", "content": " ".join(["word"] * (rng.randint(150, 250) if i % 2 else
                                                                                rng.randint(5, 20)))}]}
            for i in range(60)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    enc = ChatEncoder()
    lengths = [len(enc.encode(r)) for r in recs]
    long = {n for i, n in enumerate(lengths) if i % 2}
    assert not long & {n for i, n in enumerate(lengths) if not i % 2}
    cap = 1024
    tight = pack_lengths(lengths, cap, mix=False)
    assert any(all(i % 2 for i in b) for b in tight)  # what this fixes: rows of one task
    loader = PackedLoader(JsonlStream([str(path)]), enc, capacity=cap, chunk_size=64)
    rows = []
    while True:
        step = loader.next_step()
        if loader.epoch > 0:  # that step already came from the second pass
            break
        rows += [r for r in step if r is not None]
    assert len(rows) == len(tight) and sum(sum(r["seq_lens"]) for r in rows) == sum(lengths)
    for r in rows:
        assert {n in long for n in r["seq_lens"]} == {True, False}, r["seq_lens"]
    # random lengths: never more rows (lower fill) than best-fit decreasing, still within capacity
    for cap, hi in ((8192, 3000), (4096, 3000), (32768, 2500), (2048, 1500)):
        lengths = [rng.randint(20, hi) for _ in range(800)]
        bins = pack_lengths(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(800))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
        assert len(bins) <= len(pack_lengths(lengths, cap, mix=False))


def test_ranks_balanced_by_tokens_and_squared_lengths():
    rng = random.Random(1)
    lengths = [rng.choice([100, 200, 4000, 8000]) for _ in range(400)]
    bins = pack_lengths(lengths, 8192)
    w = attention_weight(qwenvl.preset("7b"))
    assert 1e-6 < w < 1e-4
    costs = [bin_cost([lengths[i] for i in b], w) for b in bins]
    world, accum = 4, 2
    for step in plan_steps(costs, world, accum):
        assert len(step) == world and all(len(g) <= accum for g in step)
    # Within a full step the LPT assignment keeps every rank within one bin's cost of the mean.
    groups = balance(costs[:32], 8, 4)
    loads = [sum(costs[i] for i in g) for g in groups]
    assert max(loads) - min(loads) <= max(costs[:32])
    naive = [sum(costs[i] for i in range(r * 4, r * 4 + 4)) for r in range(8)]
    assert max(loads) - min(loads) <= max(naive) - min(naive)


def test_loader_steps_cover_every_sample_once_per_epoch(tmp_path):
    recs = [{"messages": [{"role": "user", "content": "q" * (1 + i % 7) * 10}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    enc = ChatEncoder()
    seen = []
    loaders = [PackedLoader(JsonlStream([str(path)]), enc, capacity=256, world=2, rank=r, accum=2, chunk_size=16)
               for r in range(2)]
    while True:
        steps = [ld.next_step() for ld in loaders]
        if loaders[0].epoch > 0:  # that step already came from the second pass
            break
        for step in steps:
            for row in step:
                if row is not None:
                    seen += [tuple(x.tolist()) for x in row["input_ids"][0].split(row["seq_lens"])]
                    assert row["input_ids"].shape[1] <= 256
    want = sorted(tuple(enc.encode(r).input_ids) for r in recs)
    assert sorted(seen) == want
    assert loaders[0].epoch == loaders[1].epoch == 1


def test_loader_workers_give_the_same_rows_skips_and_resume_state(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(84, 56), (56, 112), (112, 84)]):
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(tmp_path / f"{i}.png")
    for i in range(3):
        Image.fromarray(torch.randint(0, 256, (56, 84, 3), generator=g, dtype=torch.uint8).numpy()).save(tmp_path / f"v{i}.png")
    (tmp_path / "bad.png").write_bytes(open(tmp_path / "0.png", "rb").read()[:60])  # header fine, pixels cut
    recs = [{"images": [f"{i % 3}.png"], "messages": [{"role": "user", "content": "<image>" + "q" * (i % 5)},
                                                    {"role": "assistant", "content": f"a{i}"}]} for i in range(30)]
    recs[7] = {"images": ["missing.png"], "messages": recs[7]["messages"]}
    recs[11] = {"images": ["bad.png"], "messages": recs[11]["messages"]}
    for i in (4, 17):  # and videos (frame lists, 3 frames: padded to 4)
        recs[i] = {"video": ["v0.png", "v1.png", "v2.png"], "messages": [{"role": "user", "content": "<video>?"},
                                                                      {"role": "assistant", "content": f"v{i}"}]}
    lines = [json.dumps(r) for r in recs]
    lines[3] = "{not json"
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    enc = ChatEncoder(max_pixels=32 * 28 * 28, video_min_pixels=3136, video_max_pixels=64 * 28 * 28)
    loaders = {}

    def run(workers, steps=7, state=None, transport="auto"):
        ld = PackedLoader(JsonlStream([str(path)]), enc, capacity=200, accum=2, chunk_size=16, workers=workers,
                          stats=qwenvl.train.data.SkipStats(max_bad_fraction=1.0), transport=transport)
        if state:
            ld.load_state_dict(state)
        rows = [ld.next_step() for _ in range(steps)]
        st = ld.state_dict()
        ld.spool_used = ld._spool
        ld.close()
        loaders[(workers, transport, steps)] = ld
        return [[None if r is None else {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in r.items()}
                 for r in step] for step in rows], st

    plain, st_plain = run(0)
    pooled, st_pooled = run(2)
    assert pooled == plain
    assert {k: v for k, v in st_pooled.items() if k != "stats"} == {k: v for k, v in st_plain.items() if k != "stats"}
    # skip counts: the same reasons (with workers they may include records measured ahead)
    assert set(st_pooled["stats"]["reasons"]) == set(st_plain["stats"]["reasons"]) == \
        {"bad json", "missing media", "MediaError"}
    first3, state = run(2, 3)
    resumed, _ = run(2, 4, state)
    assert first3 + resumed == plain
    # rows carry uint8 frames (images and videos), no float pixels
    rows = [r for step in plain for r in step if r is not None]
    assert any("image_grid_thw" in r for r in rows) and any("video_grid_thw" in r for r in rows)
    assert all("pixel_values" not in r and "pixel_values_videos" not in r for r in rows)
    n_rows = len(rows)
    assert loaders[(0, "auto", 7)].rows_via == {"main": n_rows}
    auto = loaders[(2, "auto", 7)].rows_via  # shared memory where /dev/shm has room for the rows in flight
    assert sum(auto.values()) == n_rows and set(auto) <= {"shm", "pipe"}
    # rows pickled through the pipe (numpy) and rows forced into shared memory: the same batches
    assert run(2, transport="pipe")[0] == plain and loaders[(2, "pipe", 7)].rows_via == {"pipe": n_rows}
    assert run(2, transport="shm")[0] == plain and loaders[(2, "shm", 7)].rows_via == {"shm": n_rows}
    frame_bytes = sum(len(r["frames"]) for r in rows if "frames" in r)
    assert loaders[(2, "pipe", 7)].pixel_bytes == loaders[(0, "auto", 7)].pixel_bytes == frame_bytes > 0
    summary = loaders[(2, "pipe", 7)].transport_summary()
    assert summary["rows_via"] == {"pipe": n_rows} and summary["pixel_mb_per_row"] * 2**20 * n_rows == frame_bytes
    # auto: too little room in /dev/shm for the rows in flight, or moving a row there fails -> the pipe
    monkeypatch.setattr("qwenvl.train.packing._shm_free", lambda: 64 * 1024)
    assert run(2, 3)[0] == plain[:3] and set(loaders[(2, "auto", 3)].rows_via) == {"pipe"}
    monkeypatch.undo()

    def no_room(self):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_0>: No space left on device (28)")

    monkeypatch.setattr(torch.Tensor, "share_memory_", no_room)
    assert run(2, 3)[0] == plain[:3] and set(loaders[(2, "auto", 3)].rows_via) == {"pipe"}
    # the file transport (these rows' frames are small: every tensor goes to a file here), forced (with shared
    # memory working) and as auto's second choice; a failing write falls back to the pipe; no file is left behind
    monkeypatch.undo()
    monkeypatch.setattr("qwenvl.train.packing.FILE_MIN_BYTES", 0)
    assert run(2, transport="file")[0] == plain and loaders[(2, "file", 7)].rows_via == {"file": n_rows}
    monkeypatch.setattr("qwenvl.train.packing._shm_free", lambda: 64 * 1024)
    assert run(2, 3)[0] == plain[:3] and set(loaders[(2, "auto", 3)].rows_via) == {"file"}
    spool = loaders[(2, "auto", 3)].spool_used
    assert spool and not os.path.exists(spool)  # removed by close(), with the files of rows never taken

    def disk_full(a, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("qwenvl.train.packing._write_raw", disk_full)
    assert run(2, 3)[0] == plain[:3] and set(loaders[(2, "auto", 3)].rows_via) == {"pipe"}


def _row_with_images_and_videos(tmp_path):
    """A packed row (list of Samples) of images of three sizes and two frame-list videos (odd and even counts)."""
    g = torch.Generator().manual_seed(1)
    for name, (w, h) in [("0", (84, 56)), ("1", (56, 112)), ("2", (140, 84)), ("v0", (84, 112)), ("v1", (84, 112)),
                         ("v2", (84, 112))]:
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(tmp_path / f"{name}.png")
    recs = [
        {"images": ["0.png", "1.png"], "messages": [{"role": "user", "content": "<image><image>Same?"},
                                                    {"role": "assistant", "content": "No."}]},
        {"video": ["v0.png", "v1.png", "v2.png"], "messages": [{"role": "user", "content": "<video>What moves?"},
                                                            {"role": "assistant", "content": "Noise."}]},
        {"messages": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}]},
        {"images": ["2.png"], "video": ["v2.png", "v0.png"],
         "messages": [{"role": "user", "content": "<image><video>Both?"}, {"role": "assistant", "content": "Yes."}]},
    ]
    enc = ChatEncoder(max_pixels=32 * 28 * 28, video_min_pixels=3136, video_max_pixels=48 * 28 * 28)
    return [enc.encode(r, str(tmp_path)) for r in recs]


def test_uint8_frames_give_the_float_path_bit_for_bit(tmp_path):
    """A row carries uint8 frames; its pixel values made from them (device_pixels) equal the slow processor's
    (patchify(normalize())) bit for bit, and the loss and every gradient equal the float path's exactly."""
    from qwenvl import preprocess
    from qwenvl.train.packing import device_pixels, pixel_bytes

    samples = _row_with_images_and_videos(tmp_path)
    batch = collate(samples)
    assert "pixel_values" not in batch and batch["frames"].dtype == torch.uint8
    assert batch["frames_hwc"] == [True, True, True, False, False]  # PIL images as they are; videos T x 3 x H x W
    ref = {}
    for key, kind in (("pixel_values", "images"), ("pixel_values_videos", "videos")):
        ref[key] = torch.cat([preprocess.patchify(preprocess.normalize(v.frames))[0]
                              for s in samples for v in getattr(s, kind)])
    n_patches = sum(x.shape[0] for x in ref.values())
    # bytes: an image patch is one frame's 588 (1/8 of its float32 values' bytes), a video patch two frames' 1176 (1/4)
    assert pixel_bytes(batch) == ref["pixel_values"].numel() // 2 + ref["pixel_values_videos"].numel()
    assert n_patches == sum(t * h * w for t, h, w in batch["image_grid_thw"].tolist() + batch["video_grid_thw"].tolist())
    made = device_pixels(batch, "cpu")
    assert "frames" not in made and "frames_hwc" not in made
    for key in ref:
        assert made[key].dtype == torch.float32 and torch.equal(made[key], ref[key]), key
    assert torch.equal(samples[0].pixel_values, ref["pixel_values"][:samples[0].pixel_values.shape[0]])
    half = device_pixels(batch, "cpu", torch.bfloat16)
    assert all(torch.equal(half[k], ref[k].to(torch.bfloat16)) for k in ref)
    assert device_pixels(made, "cpu") is made  # nothing left to make

    model = Qwen25VL.random(qwenvl.preset("tiny"), seed=0)
    floats = {k: v for k, v in batch.items() if k not in ("frames", "frames_hwc")} | ref
    grads = []
    for b in (batch, floats):
        loss, n = sft_loss_sum(model, b)
        (loss / n).backward()
        grads.append((loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}))
        model.zero_grad()
    (l8, n8, g8), (lf, nf, gf) = grads
    assert n8 == nf and torch.equal(l8, lf)
    assert all(torch.equal(g8[k], gf[k]) for k in gf) and g8["visual.patch_embed.proj.weight"].abs().sum() > 0


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    g = torch.Generator().manual_seed(0)
    for name, (w, h) in {"a.png": (84, 56), "b.png": (56, 112)}.items():
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(d / name)
    enc = ChatEncoder(max_pixels=32 * 28 * 28)
    recs = [
        {"images": ["a.png"], "messages": [{"role": "user", "content": "<image>Describe."},
                                           {"role": "assistant", "content": "Colourful noise everywhere."}]},
        {"messages": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."},
                      {"role": "user", "content": "And three?"}, {"role": "assistant", "content": "Five, no, six."}]},
        {"images": ["b.png", "a.png"], "conversations": [{"from": "human", "value": "<image><image>Same?"},
                                                         {"from": "gpt", "value": "No."}]},
    ]
    return [enc.encode(r, str(d)) for r in recs]


def test_packed_row_gives_the_same_loss_and_gradients_as_separate_rows(samples):
    model = Qwen25VL.random(qwenvl.preset("tiny"), seed=0)
    n_total = sum(s.n_labels for s in samples)

    loss_sum, n = sft_loss_sum(model, collate(samples))
    assert n == n_total
    (loss_sum / n).backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    # Reference: each sample alone through the plain forward (full logits, standard cross entropy).
    ref = 0.0
    for s in samples:
        kw = {}
        if s.pixel_values is not None:
            kw = dict(pixel_values=s.pixel_values, image_grid_thw=torch.tensor(s.image_grid_thw))
        logits = model(torch.tensor([s.input_ids]), **kw)[0]
        ref = ref + F.cross_entropy(logits[:-1].float(), torch.tensor(s.labels[1:]), ignore_index=IGNORE, reduction="sum")
    (ref / n_total).backward()
    assert abs(loss_sum.item() / n - ref.item() / n_total) < 1e-5
    for k, p in model.named_parameters():
        assert (packed[k] - p.grad).abs().max().item() < 1e-5, k


def test_chunked_linear_nll_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    w = torch.rand(37, generator=g)
    (linear_nll(h, head, t, chunk=8) * w).sum().backward()
    gh, gw = h.grad.clone(), head.weight.grad.clone()
    h.grad = head.weight.grad = None
    (F.cross_entropy(head(h), t, reduction="none") * w).sum().backward()
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, head.weight.grad, atol=1e-6)


def test_linear_nll_sum_makes_the_cross_entropy_gradients_in_its_forward():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    loss = linear_nll_sum(h, head, t, chunk=8)
    (loss * 0.3).backward()  # the backward scales the forward's gradients by the incoming scalar
    gh, gw = h.grad.clone(), head.weight.grad.clone()
    h.grad = head.weight.grad = None
    ref = F.cross_entropy(head(h), t, reduction="sum")
    (ref * 0.3).backward()
    assert abs(loss.item() - ref.item()) < 1e-4
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, head.weight.grad, atol=1e-6)
    with torch.no_grad():  # evaluation: no gradients made
        assert abs(linear_nll_sum(h, head, t, chunk=8).item() - ref.item()) < 1e-4
    head.weight.requires_grad_(False)  # a frozen head (stage 1, LoRA): the hidden states' gradient only
    h.grad = head.weight.grad = None
    linear_nll_sum(h, head, t, chunk=8).backward()
    assert head.weight.grad is None and torch.allclose(h.grad, gh / 0.3, atol=1e-6)


def test_packed_positions_vectorised_equal_the_per_sample_loop():
    from qwenvl.rope import packed_mrope_positions

    model = Qwen25VL.random(qwenvl.preset("tiny"), seed=0)
    c = model.config
    VS, IMG, VID = c.vision_start_token_id, c.image_token_id, c.video_token_id
    rng = random.Random(0)
    for trial in range(30):
        ids, lens, grids, vgrids, spgs = [], [], [], [], []
        for _ in range(rng.randint(1, 8)):
            sample = [rng.randint(0, 1000) for _ in range(rng.randint(1, 6))]
            for _ in range(rng.randint(0, 3)):
                t, h, w = rng.choice([1, 2, 3, 5]), 2 * rng.randint(1, 4), 2 * rng.randint(1, 4)
                if rng.random() < 0.5:
                    grids.append([1, h, w])
                    sample += [VS] + [IMG] * (h * w // 4) + [c.vision_end_token_id]
                else:
                    vgrids.append([t, h, w])
                    spgs.append(rng.choice([0.5, 1.0, 2 / 3, 1.5]))
                    sample += [VS] + [VID] * (t * h * w // 4) + [c.vision_end_token_id]
                sample += [rng.randint(0, 1000) for _ in range(rng.randint(0, 4))]
            if trial % 3 == 0 and rng.random() < 0.3:
                sample += [IMG]  # a stray pad token (not after vision_start) is text
            ids += sample
            lens.append(len(sample))
        row = torch.tensor([ids])
        kw = dict(image_grid_thw=torch.tensor(grids) if grids else None,
                  video_grid_thw=torch.tensor(vgrids) if vgrids else None,
                  second_per_grid_ts=torch.tensor(spgs) if spgs else None)
        fast = packed_mrope_positions(row, lens, kw["image_grid_thw"], kw["video_grid_thw"], kw["second_per_grid_ts"],
                                      image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
                                      spatial_merge_size=2, tokens_per_second=c.vision.tokens_per_second)
        slow = model._packed_positions_per_sample(row, lens, kw["image_grid_thw"], kw["video_grid_thw"],
                                                  kw["second_per_grid_ts"])
        assert fast is not None and torch.equal(fast.unsqueeze(1), slow), trial
        assert torch.equal(model._packed_positions(row, lens, **kw), slow)
    # a tokens_per_second that is not a power of two: k * spg * tps rounds differently from k * (spg * tps)
    # (k = 10, spg = 0.7, tps = 3 floors to 20 one way, 21 the other); both paths multiply as the reference does
    from qwenvl.rope import mrope_positions
    row = torch.tensor([[5, VS] + [VID] * 31 + [6]])
    kw = dict(video_grid_thw=torch.tensor([[31, 2, 2]]), second_per_grid_ts=torch.tensor([0.7], dtype=torch.float64),
              image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, tokens_per_second=3)
    slow, _ = mrope_positions(row, **kw)
    assert slow[0, 0, 2 + 10].item() == 2 + int(10 * 0.7 * 3)
    assert torch.equal(packed_mrope_positions(row, [row.shape[1]], **kw), slow[:, 0])
    # malformed (a block cut by the sample's end; a grid too many): no fast answer, the per-sample path raises
    row = torch.tensor([[1, VS, IMG, IMG, 2]])
    assert packed_mrope_positions(row, [3, 2], torch.tensor([[1, 2, 4]]), image_token_id=IMG, video_token_id=VID,
                                  vision_start_token_id=VS) is None
    with pytest.raises(qwenvl.errors.InputError):
        model._packed_positions(row, [3, 2], torch.tensor([[1, 2, 4]]), None, None)
    assert packed_mrope_positions(row, [5], torch.tensor([[1, 2, 4], [1, 2, 2]]), image_token_id=IMG,
                                  video_token_id=VID, vision_start_token_id=VS) is None
