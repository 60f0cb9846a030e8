"""End to end: Processor(conversations) equals the reference pipeline for a left-padded multimodal batch.

Reference: the official chat template (jinja), qwen-vl-utils fetch_image/fetch_video + transformers 4.57.6's slow
Qwen2VLImageProcessor for pixels, the pad-expansion rule of transformers' Qwen2_5_VLProcessor (string
replacement, in order of appearance across the batch), and a transformers fast tokenizer built independently
from the same vocabulary, padding on the left.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl import Processor
from qwenvl.errors import InputError
from reference import hf_tokenizer
from test_chat import OFFICIAL_TEMPLATE, jinja_render
from test_preprocess import encode_video, photo_like, qvu_video, reference_image, reference_video  # noqa: F401


def reference_batch(conversations, images_items, video_items):
    texts = [jinja_render(OFFICIAL_TEMPLATE, c, add_generation_prompt=True) for c in conversations]
    imgs = [reference_image(it) for it in images_items]
    vids = [reference_video(it) for it in video_items]
    # transformers' Qwen2_5_VLProcessor.__call__: replace each pad with prod(grid)//4 placeholders, in order
    for token, grids in (("<|image_pad|>", [g for _, g in imgs]), ("<|video_pad|>", [g for _, g, _ in vids])):
        index = 0
        for i in range(len(texts)):
            while token in texts[i]:
                texts[i] = texts[i].replace(token, "<|placeholder|>" * (int(np.prod(grids[index])) // 4), 1)
                index += 1
            texts[i] = texts[i].replace("<|placeholder|>", token)
    tok = hf_tokenizer()
    tok.padding_side = "left"
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc, imgs, vids


def test_processor_matches_reference_batch(tmp_path, qvu_video):  # noqa: F811
    big = tmp_path / "big.png"
    Image.fromarray(photo_like(900, 1300, 1)).save(big)
    small = tmp_path / "small.jpg"
    Image.fromarray(photo_like(120, 333, 2)).save(small, quality=90)
    third = tmp_path / "third.png"
    Image.fromarray(photo_like(500, 280, 3)).save(third)
    video = encode_video(tmp_path / "clip.mp4", n_frames=120, rate=30, height=96, width=128)
    big_item = {"type": "image", "image": str(big), "max_pixels": 200704}
    small_item = {"type": "image", "image": str(small)}
    third_item = {"type": "image", "image": str(third), "min_pixels": 50000, "max_pixels": 100000}
    video_item = {"type": "video", "video": str(video), "fps": 1.5}
    conversations = [
        [{"role": "user", "content": "Hello, how are you?"}],
        [{"role": "user", "content": [big_item, small_item, {"type": "text", "text": "What differs?"}]}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [video_item, third_item, {"type": "text", "text": "Describe the video."}]}],
    ]
    out = Processor()(conversations)
    enc, imgs, vids = reference_batch(conversations, [big_item, small_item, third_item], [video_item])
    assert torch.equal(out["input_ids"], enc["input_ids"])
    assert torch.equal(out["attention_mask"], enc["attention_mask"])
    ref_pix = np.concatenate([p for p, _ in imgs])
    assert out["pixel_values"].shape == ref_pix.shape
    assert np.abs(out["pixel_values"].numpy() - ref_pix).max() <= 1e-6
    assert out["image_grid_thw"].tolist() == [[int(x) for x in g] for _, g in imgs]
    ref_vpix, ref_vgrid, ref_spg = vids[0]
    assert np.abs(out["pixel_values_videos"].numpy() - ref_vpix).max() <= 1e-6
    assert out["video_grid_thw"].tolist() == [[int(x) for x in ref_vgrid]]
    assert out["second_per_grid_ts"].tolist() == pytest.approx([ref_spg], rel=1e-6)
    assert abs(out["second_per_grid_ts"].item() - 2 / 1.5) < 1e-6  # 120 frames at 30 fps = 4 s; at 1.5 fps: 6 frames


def test_processor_limits_and_errors(tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(photo_like(64, 64, 0)).save(img)
    conv = [{"role": "user", "content": [{"type": "image", "image": str(img)}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(InputError, match="over the limit of 10"):
        Processor(max_length=10)(conv)
    with pytest.raises(InputError):
        Processor()([])
    # a single conversation (not wrapped in a list) is one batch row
    single = Processor()(conv)
    assert single["input_ids"].shape[0] == 1 and single["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_processor_roundtrip_files(tmp_path):
    p = Processor(min_pixels=1000, max_pixels=50000)
    p.save_pretrained(tmp_path)
    q = Processor.from_pretrained(tmp_path)
    assert (q.min_pixels, q.max_pixels) == (1000, 50000)
    conv = [{"role": "user", "content": "你好"}]
    assert torch.equal(p(conv)["input_ids"], q(conv)["input_ids"])


def test_processor_batch_through_both_models(tmp_path, qvu_video):  # noqa: F811
    """The processor's batch (text only; two images; a 1.5 fps video + image) gives the same logits and greedy
    tokens in our model and in transformers 4.57.6 (given the original-rule positions, see test_model)."""
    import qwenvl
    from qwenvl.model import Qwen25VL
    from reference import hf_model
    from test_model import reference_positions

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(photo_like(300, 420, 4)).save(a)
    Image.fromarray(photo_like(200, 150, 5)).save(b)
    video = encode_video(tmp_path / "v.mp4", n_frames=120, rate=30, height=64, width=96)
    convs = [[{"role": "user", "content": "Tell me a story."}],
             [{"role": "user", "content": [{"type": "image", "image": str(a)}, {"type": "image", "image": str(b)},
                                           {"type": "text", "text": "Compare."}]}],
             [{"role": "user", "content": [{"type": "video", "video": str(video), "fps": 1.5},
                                           {"type": "image", "image": str(b)}, {"type": "text", "text": "Why?"}]}]]
    batch = Processor()(convs)
    hf = hf_model(qwenvl.preset("tiny"), seed=7)
    hf.save_pretrained(tmp_path / "ckpt")
    ours = Qwen25VL.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    pos, delta = reference_positions(batch)
    with torch.no_grad():
        ref = hf(**batch, position_ids=pos).logits
        out = ours(**batch)
        keep = batch["attention_mask"].bool()
        assert (out[keep] - ref[keep]).abs().max().item() < 1e-4
        hf.model.get_rope_index = lambda *x, **k: (pos.clone(), delta.clone())
        ref_gen = hf.generate(**batch, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=151643,
                              eos_token_id=None)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours.generate(**batch, max_new_tokens=24, eos_token_id=[]), ref_gen)
