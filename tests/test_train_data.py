"""Training data: record formats, assistant-only labels, media grids, grounding rescale, bad-sample skipping."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from qwenvl import preprocess
from qwenvl.chat import render_chat
from qwenvl.train.data import (IGNORE, IMAGE_PAD, VIDEO_PAD, BadSample, ChatEncoder, DataError, JsonlStream, Position,
                               SkipStats, rescale_boxes)
from qwenvl.train.packing import PackedLoader


def write_image(path, w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
    return str(path)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def enc():
    return ChatEncoder(max_pixels=64 * 28 * 28)


def collapse(ids, pads=(IMAGE_PAD, VIDEO_PAD)):
    out = []
    for t in ids:
        if not (t in pads and out and out[-1] == t):
            out.append(t)
    return out


def test_llava_record_tokens_labels_and_pixels(tmp_path, enc):
    img = write_image(tmp_path / "a.png", 100, 60)
    frames = [write_image(tmp_path / f"f{i}.png", 90, 50, seed=i) for i in range(3)]
    rec = {"image": "a.png", "video": ["f0.png", "f1.png", "f2.png"],
           "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Noise."},
                             {"from": "human", "value": "<video>And this?"}, {"from": "gpt", "value": "More noise."}]}
    s = enc.encode(rec, base_dir=str(tmp_path))
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "\nWhat is this?"}]},
                {"role": "assistant", "content": "Noise."},
                {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "And this?"}]},
                {"role": "assistant", "content": "More noise."}]
    # Same tokens as the chat template (pads collapsed), and the same as the DESIGN message format.
    assert collapse(s.input_ids) == enc.tokenizer.encode(render_chat(messages, add_generation_prompt=False))
    s2 = enc.encode({"messages": messages})
    assert s2.input_ids == s.input_ids and s2.labels == s.labels
    # Loss only on assistant content + <|im_end|>.
    learned = [t for t in s.labels if t != IGNORE]
    assert enc.tokenizer.decode(learned) == "Noise.<|im_end|>More noise.<|im_end|>"
    # Vision: grids and pixels exactly as preprocess gives them; pad counts = t*h*w/4; measure() == len.
    pix, grid = preprocess.process_image({"image": img, "min_pixels": 3136, "max_pixels": 64 * 28 * 28},
                                         max_pixels=64 * 28 * 28)
    assert s.image_grid_thw == [grid.tolist()] and torch.equal(s.pixel_values, pix)
    assert s.input_ids.count(IMAGE_PAD) == int(grid.prod()) // 4
    assert s.video_grid_thw[0][0] == 2 and s.input_ids.count(VIDEO_PAD) == 2 * s.video_grid_thw[0][1] * s.video_grid_thw[0][2] // 4
    assert s.pixel_values_videos.shape[0] == 2 * s.video_grid_thw[0][1] * s.video_grid_thw[0][2]
    assert enc.measure(rec, str(tmp_path)) == len(s)


def test_text_and_pretokenized_records(enc):
    s = enc.encode({"text": "Hello world"})
    assert s.input_ids[-1] == 151643 and s.labels == s.input_ids
    s = enc.encode({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]})
    assert s.n_labels == 2
    pre = ChatEncoder(loss_on="all").encode({"messages": [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"}]})
    assert all(x != IGNORE for x in pre.labels)


def test_grounding_boxes_rescaled_to_the_resized_image(tmp_path):
    max_pixels = 256 * 28 * 28
    enc = ChatEncoder(max_pixels=max_pixels)
    write_image(tmp_path / "big.png", 1000, 500)  # W x H
    rh, rw = preprocess.smart_resize(500, 1000, min_pixels=3136, max_pixels=max_pixels)
    answer = '[{"bbox_2d": [100, 50, 900, 450], "label": "cat"}, {"point_2d": [999, 499]}]'
    rec = {"images": ["big.png"], "coords": "original",
           "messages": [{"role": "user", "content": "<image>Find the cat."}, {"role": "assistant", "content": answer}]}
    s = enc.encode(rec, str(tmp_path))
    assert [rh // 14, rw // 14] == s.image_grid_thw[0][1:]
    want = [round(100 * rw / 1000), round(50 * rh / 500), round(900 * rw / 1000), round(450 * rh / 500)]
    text = enc.tokenizer.decode([t for t in s.labels if t != IGNORE])
    assert f'"bbox_2d": [{", ".join(map(str, want))}]' in text
    assert f'"point_2d": [{min(round(999 * rw / 1000), rw - 1)}, {min(round(499 * rh / 500), rh - 1)}]' in text
    # other notations and the 0..1000 convention
    assert rescale_boxes('<|box_start|>(0,500),(1000,1000)<|box_end|>', "norm1000", (500, 1000), (rh, rw)) == \
        f'<|box_start|>(0,{round(rh / 2)}),({rw - 1},{rh - 1})<|box_end|>'
    assert rescale_boxes('data-bbox="10 10 20 20"', "original", (500, 1000), (rh, rw)) == \
        f'data-bbox="{round(10 * rw / 1000)} {round(10 * rh / 500)} {round(20 * rw / 1000)} {round(20 * rh / 500)}"'


def test_bad_samples_are_skipped_and_counted(tmp_path):
    write_image(tmp_path / "ok.png", 56, 56)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = [
        {"images": ["missing.png"], "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}]},
        {"images": ["corrupt.png"], "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}]},
        "{not json",
        {"messages": [{"role": "user", "content": "long " * 300}, {"role": "assistant", "content": "x"}]},
        {"conversations": [{"from": "alien", "value": "?"}]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [good] * 15 + bad)
    enc = ChatEncoder(max_length=128)
    stats = SkipStats(max_bad_fraction=0.5, min_seen=1)
    loader = PackedLoader(JsonlStream([path]), enc, capacity=128, stats=stats, chunk_size=64)
    rows = [b for _ in range(3) for b in loader.next_step() if b is not None]
    assert rows and stats.seen == 20 and stats.skipped == 5
    assert stats.reasons == {"missing media": 1, "corrupt media": 1, "bad json": 1, "too long": 1, "malformed record": 1}
    # Above the threshold: a DataError with the report, not a crash deep inside.
    with pytest.raises(DataError, match=r"records skipped \(.*limit 10.0%\)"):
        PackedLoader(JsonlStream([path]), enc, capacity=128, stats=SkipStats(0.1, min_seen=1), chunk_size=64).next_step()


def test_corrupt_pixels_after_a_good_header_are_skipped_at_encode(tmp_path):
    good = write_image(tmp_path / "t.png", 280, 280)
    data = open(good, "rb").read()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])  # header intact, pixel data truncated
    rec = {"images": ["t.png"], "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}]}
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [rec, ok])
    stats = SkipStats(max_bad_fraction=1.0)
    loader = PackedLoader(JsonlStream([path]), ChatEncoder(), capacity=512, stats=stats, shuffle=False)
    (row,) = loader.next_step()
    assert row["seq_lens"] == [len(ChatEncoder().encode(ok))] and stats.skipped == 1


def test_stream_resumes_from_a_position(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"i": i} for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"i": i} for i in range(5, 8)])
    s = JsonlStream([a, b])
    got, pos = s.read(Position(), 4)
    assert [r["i"] for _, r, _ in got] == [0, 1, 2, 3]
    rest, pos2 = s.read(pos, 100)
    assert [r["i"] for _, r, _ in rest] == [4, 5, 6, 7] and pos2 == Position(1, 0, 0)
    again, _ = s.read(Position(0, 1, 0), 2)
    assert [r["i"] for _, r, _ in again] == [5, 6]


def test_marker_mismatch_is_a_bad_sample(enc):
    with pytest.raises(BadSample, match="marker"):
        enc.encode({"images": [], "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]})
