"""ModelConfig.mrope_temporal: "absolute" (the released models: a video's temporal ids follow its sampling rate) vs
"frame" (the ablation of docs/NANO.md §4: the temporal patch index, whatever the fps). Hand-derived ids; the config
round trip (real config.json files unchanged); the training row and the engine agree with the model path."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import qwenvl
from qwenvl.config import ModelConfig
from qwenvl.errors import ConfigError, InputError
from qwenvl.model import Qwen25VL
from qwenvl.rope import mrope_positions, packed_mrope_positions

VS, VE, VID = 151652, 151653, 151656


def _video_row(t=4, h=4, w=4):
    return [11, 12] + [VS] + [VID] * (t * h * w // 4) + [VE, 13]


# sample fps -> second_per_grid = 2 / fps; absolute: id of temporal patch k = floor(k * spg * tokens_per_second (2))
@pytest.mark.parametrize("fps,absolute", [(2, [0, 2, 4, 6]), (1, [0, 4, 8, 12]), (4, [0, 1, 2, 3]),
                                          (3, [0, 1, 2, 4])])  # 3 fps: k * 4/3 -> 0, 1.33, 2.67, 4
@pytest.mark.parametrize("mode", ["absolute", "frame"])
def test_hand_derived_video_ids(fps, absolute, mode):
    ids = _video_row()
    spg = 2 / fps
    want_t = absolute if mode == "absolute" else [0, 1, 2, 3]  # frame: the patch index at every fps
    pos, delta = mrope_positions(torch.tensor([ids]), None, None, [[4, 4, 4]], [spg], video_token_id=VID,
                                 vision_start_token_id=VS, tokens_per_second=2, temporal=mode)
    p = pos[:, 0]
    start = 3  # two text tokens + vision_start
    assert p[:, :3].tolist() == [[0, 1, 2]] * 3
    vt = p[0, 3:19].view(4, 4)  # 4 temporal patches x (2 x 2) merged tokens
    assert (vt[:, 0] - start).tolist() == want_t and (vt == vt[:, :1]).all()
    assert (p[1, 3:19] - start).tolist() == [0, 0, 1, 1] * 4 and (p[2, 3:19] - start).tolist() == [0, 1, 0, 1] * 4
    after = start + max(want_t[-1], 1) + 1  # text after the block continues at the block's largest id + 1
    assert p[:, 19:].tolist() == [[after, after + 1]] * 3
    assert delta.item() == after + 2 - len(ids)
    packed = packed_mrope_positions(torch.tensor([ids + ids]), [len(ids)] * 2, None, [[4, 4, 4]] * 2, [spg, spg],
                                    video_token_id=VID, vision_start_token_id=VS, tokens_per_second=2, temporal=mode)
    assert torch.equal(packed, torch.cat([p, p], dim=1))


def test_unknown_mode_is_an_error():
    with pytest.raises(InputError, match="temporal"):
        mrope_positions(torch.tensor([_video_row()]), None, None, [[4, 4, 4]], [1.0], temporal="index")
    with pytest.raises(InputError, match="temporal"):
        packed_mrope_positions(torch.tensor(_video_row()), [21], None, [[4, 4, 4]], [1.0], temporal="index")


def test_config_default_round_trip_and_hf_files_unchanged(tmp_path):
    from test_config import HUB_7B

    cfg = ModelConfig.from_hf_dict(HUB_7B)
    assert cfg.mrope_temporal == "absolute" and "mrope_temporal" not in cfg.to_hf_dict() and not cfg.extra
    assert qwenvl.preset("nano").mrope_temporal == "absolute"
    cfg.mrope_temporal = "frame"
    d = cfg.to_hf_dict()
    assert d["mrope_temporal"] == "frame"
    cfg.save(tmp_path)
    back = ModelConfig.from_pretrained(tmp_path)
    assert back.mrope_temporal == "frame" and back.extra == {} and back.to_hf_dict() == d
    with pytest.raises(ConfigError, match="mrope_temporal"):
        ModelConfig.from_hf_dict(dict(HUB_7B, mrope_temporal="index"))
    with pytest.raises(ConfigError, match="mrope_temporal"):
        ModelConfig.from_hf_dict(dict(HUB_7B, mrope_temporal=1))
    from transformers import Qwen2_5_VLConfig  # transformers still reads the file (the key is just kept)

    assert Qwen2_5_VLConfig.from_pretrained(tmp_path).model_type == "qwen2_5_vl"


def test_train_config_sets_the_mode():
    from qwenvl.train import TrainConfig
    from qwenvl.train.trainer import load_base_model

    assert load_base_model(TrainConfig(model="tiny"), "cpu").config.mrope_temporal == "absolute"
    assert load_base_model(TrainConfig(model="tiny", mrope_temporal="frame"), "cpu").config.mrope_temporal == "frame"
    with pytest.raises(ConfigError, match="mrope_temporal"):
        TrainConfig(mrope_temporal="index")


def _frames(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (56, 56, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(n)]


def _messages(fps, seed):
    item = {"type": "video", "video": _frames(8, seed), "sample_fps": fps, "min_pixels": 3136, "max_pixels": 3136}
    return [{"role": "user", "content": [item, {"type": "text", "text": "When does it happen?"}]}]


@pytest.fixture(scope="module")
def models():
    base = Qwen25VL.random(qwenvl.preset("tiny"), seed=0)
    frame = Qwen25VL.random(qwenvl.preset("tiny"), seed=0)
    frame.config.mrope_temporal = "frame"
    return {"absolute": base, "frame": frame}


@pytest.mark.parametrize("mode", ["absolute", "frame"])
def test_training_row_and_engine_agree_with_the_model(models, mode):
    from qwenvl.engine import LLM, SamplingParams
    from qwenvl.processor import Processor
    from qwenvl.train.data import ChatEncoder
    from qwenvl.train.packing import collate

    model = models[mode]
    proc = Processor(min_pixels=3136, max_pixels=3136)
    enc = ChatEncoder.from_processor(proc)
    llm = LLM(model, processor=proc, num_blocks=64, block_size=16, enable_cuda_graphs=False)
    samples, prompts = [], []
    for fps, seed in ((1, 0), (2, 1)):
        msgs = _messages(fps, seed)
        samples.append(enc.encode({"messages": msgs + [{"role": "assistant", "content": "At 2 s."}]}))
        prompts.append(llm.encode_prompt(msgs))
    assert [s.second_per_grid_ts for s in samples] == [[2.0], [1.0]] and samples[0].video_grid_thw == [[4, 4, 4]]
    batch = collate(samples)
    row = model._packed_positions(batch["input_ids"], batch["seq_lens"], batch.get("image_grid_thw"),
                                  batch["video_grid_thw"], batch["second_per_grid_ts"])[:, 0]
    off = 0
    for s, p in zip(samples, prompts):
        alone, _ = model.positions(torch.tensor([s.input_ids]), None, None, torch.tensor(s.video_grid_thw),
                                   s.second_per_grid_ts)
        assert torch.equal(row[:, off:off + len(s)], alone[:, 0])  # the training row = the model on the sample alone
        off += len(s)
        n = len(p.token_ids)
        assert s.input_ids[:n] == p.token_ids  # the engine's prompt is the training sample's prefix ...
        assert torch.equal(p.positions, alone[:, 0, :n])  # ... with the same MRoPE ids
        first = s.input_ids.index(VID)
        t_ids = (alone[0, 0, first:first + 16:4] - alone[0, 0, first]).tolist()
        spg = s.second_per_grid_ts[0]
        assert t_ids == ([0, 1, 2, 3] if mode == "frame" else [round(k * spg * 2) for k in range(4)])
    # and generation through the engine equals the model's own generate (decode positions from the rope delta)
    proc_out = proc([_messages(1, 0)], add_generation_prompt=True)
    assert proc_out["input_ids"][0].tolist() == prompts[0].token_ids
    ref = model.generate(proc_out["input_ids"], proc_out["attention_mask"],
                         pixel_values_videos=proc_out["pixel_values_videos"], video_grid_thw=proc_out["video_grid_thw"],
                         second_per_grid_ts=proc_out["second_per_grid_ts"], max_new_tokens=6, eos_token_id=[])
    out = llm.generate({"messages": _messages(1, 0)}, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert out[0].token_ids == ref[0].tolist()


def test_modes_differ_only_on_videos_off_the_frame_rate(models):
    """Text/images are untouched by the mode; a video at 4 fps (spg 0.5) has the same ids in both modes."""
    ids = torch.tensor([_video_row()])
    a, _ = models["absolute"].positions(ids, None, None, [[4, 4, 4]], [0.5])
    f, _ = models["frame"].positions(ids, None, None, [[4, 4, 4]], [0.5])
    assert torch.equal(a, f)
    a, _ = models["absolute"].positions(ids, None, None, [[4, 4, 4]], [1.0])
    f, _ = models["frame"].positions(ids, None, None, [[4, 4, 4]], [1.0])
    assert not torch.equal(a, f)
    text = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(models["absolute"].positions(text)[0], models["frame"].positions(text)[0])
