"""The pruned vocabulary (qwenvl.vocab, docs/NANO.md §2): kept set, id map, transformers parity, a tiny model on it."""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import unicodedata

import pytest
import torch
from PIL import Image

import qwenvl
from qwenvl.chat import render_chat
from qwenvl.model import Qwen25VL
from qwenvl.nano import NANO_DIR
from qwenvl.processor import Processor
from qwenvl.tokenizer import ADDED_TOKENS, NUM_BPE_RANKS, Tokenizer
from qwenvl.train.data import IGNORE, ChatEncoder
from qwenvl.vocab import _merge_parts, build_pruned_tokenizer, load_vocab_map, package_prompts

SIZE = 1024
CORPUS = package_prompts() + [
    "The red circle is left of the blue square.", '```json\n[{"bbox_2d": [12, 40, 88, 120], "label": "red circle"}]\n```',
    "The given query happens in 4.5 - 8.0 seconds.", "Total: 42.50 USD", "There are 3 green stars.",
]
SPECIALS = {tok: SIZE - len(ADDED_TOKENS) + i for i, (tok, _) in enumerate(ADDED_TOKENS)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("pruned")
    info = build_pruned_tokenizer(CORPUS, SIZE, d)
    return d, info, Tokenizer.from_pretrained(d)


def random_text(rng: random.Random, n: int) -> str:
    pools = ["abcdefghijklmnopqrstuvwxyz ABCXYZ", "0123456789.,:;!?-_()[]{}\"'\n\t ", "的一是在不了有和人这中大为上个国我以要他",
             "日本語のテキストですカタカナ", "éèêëàâäôöûüçñß", "😀🎉🚀👍🏽🇯🇵❤️", "Ωλπσ∑∫√≤≥", "한국어텍스트"]
    return unicodedata.normalize("NFC", "".join(rng.choice(rng.choice(pools)) for _ in range(n)))


def test_kept_set_sizes_specials_and_closure(built):
    d, info, tok = built
    kept = info["kept_old_ids"]
    assert len(kept) == len(set(kept)) == SIZE == len(tok) and kept == sorted(kept)
    assert kept[-len(ADDED_TOKENS):] == list(range(NUM_BPE_RANKS, NUM_BPE_RANKS + len(ADDED_TOKENS)))
    for content, new in SPECIALS.items():
        assert tok.token_to_id(content) == new and tok.encode(content) == [new]
    assert (tok.eos_token_id, tok.pad_token_id, tok.im_start_id) == (SPECIALS["<|im_end|>"],
                                                                     SPECIALS["<|endoftext|>"], SPECIALS["<|im_start|>"])
    parts, kept_set = _merge_parts(), set(kept)
    singles = [tok.token_bytes(i) for i in range(SIZE - len(ADDED_TOKENS)) if len(tok.token_bytes(i)) == 1]
    assert len(set(singles)) == 256
    for old in kept:
        if old in parts:  # a multi-byte token: both merge parts kept
            assert set(parts[old]) <= kept_set, old
    # The corpus (499 ids, 1,132 with their merge parts) does not fit in SIZE: the most frequent ones are kept.
    full = Tokenizer.from_pretrained(None)
    counts = collections.Counter(i for t in CORPUS for i in full.encode(t))
    assert {i for i, _ in counts.most_common(100)} <= kept_set and not set(counts) <= kept_set
    assert info["corpus_distinct_ids"] == len(counts) and info["corpus_tokens"] == sum(counts.values())
    assert json.loads((d / "vocab_map.json").read_text()) == {"kept_old_ids": kept}


def test_roundtrip_ids_in_range_and_same_ids_as_full_vocab(built):
    d, info, tok = built
    full = Tokenizer.from_pretrained(None)
    old_to_new = load_vocab_map(d)
    rng = random.Random(0)
    texts = [random_text(rng, rng.randint(1, 80)) for _ in range(150)]
    n_same = 0
    for s in texts + CORPUS + ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"]:
        ids = tok.encode(s)
        assert all(0 <= i < SIZE for i in ids)
        assert tok.decode(ids) == s
        full_ids = full.encode(s)
        if all(i in old_to_new for i in full_ids):  # fully covered by the kept tokens: the same tokens
            assert ids == [old_to_new[i] for i in full_ids], s
            n_same += 1
        else:
            assert len(ids) > len(full_ids)  # a dropped token is spelled with its kept pieces
    assert 0 < n_same < len(texts) + len(CORPUS)  # both cases seen


def test_transformers_autotokenizer_same_ids_and_chat_template(built):
    transformers = pytest.importorskip("transformers")
    d, _, tok = built
    auto = transformers.AutoTokenizer.from_pretrained(d)
    assert len(auto) == SIZE and auto.eos_token_id == SPECIALS["<|im_end|>"]
    assert auto.pad_token_id == SPECIALS["<|endoftext|>"]
    rng = random.Random(1)
    for s in [random_text(rng, 60) for _ in range(30)] + CORPUS:
        assert auto.encode(s, add_special_tokens=False) == tok.encode(s)
        assert auto.decode(tok.encode(s)) == s
    messages = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Locate 猫 🐱"}]},
                {"role": "assistant", "content": "None here."}, {"role": "user", "content": "Sure?"}]
    text = render_chat(messages)
    assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert auto.apply_chat_template(messages, tokenize=True, add_generation_prompt=True) == tok.encode(text)


def test_tiny_model_on_pruned_ids_processor_forward_and_train_labels(built, tmp_path):
    _, _, tok = built
    base = qwenvl.preset("tiny")
    cfg = dataclasses.replace(
        base, text=dataclasses.replace(base.text, vocab_size=SIZE), image_token_id=SPECIALS["<|image_pad|>"],
        video_token_id=SPECIALS["<|video_pad|>"], vision_start_token_id=SPECIALS["<|vision_start|>"],
        vision_end_token_id=SPECIALS["<|vision_end|>"], vision_token_id=SPECIALS["<|vision_pad|>"],
        bos_token_id=SPECIALS["<|endoftext|>"], eos_token_id=SPECIALS["<|im_end|>"])
    model = Qwen25VL.random(cfg, seed=0).eval()
    proc = Processor(tok, max_pixels=64 * 28 * 28)
    assert (proc.image_pad_id, proc.video_pad_id) == (SPECIALS["<|image_pad|>"], SPECIALS["<|video_pad|>"])
    img = Image.new("RGB", (90, 60), (200, 30, 30))
    batch = proc([[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Locate it."}]}]])
    n_pad = int(batch["image_grid_thw"].prod()) // 4
    assert int((batch["input_ids"] == SPECIALS["<|image_pad|>"]).sum()) == n_pad and batch["input_ids"].max() < SIZE
    with torch.no_grad():
        logits = model(**batch)
        out = model.generate(**batch, max_new_tokens=3)
    assert logits.shape == (1, batch["input_ids"].shape[1], SIZE) and torch.isfinite(logits).all()
    assert out.shape[0] == 1 and out.max() < SIZE

    img.save(tmp_path / "a.png")
    enc = ChatEncoder(tok, max_pixels=64 * 28 * 28)
    assert (enc.image_pad, enc.vision_start, enc.vision_end, enc.endoftext, enc.im_end) == (
        SPECIALS["<|image_pad|>"], SPECIALS["<|vision_start|>"], SPECIALS["<|vision_end|>"],
        SPECIALS["<|endoftext|>"], SPECIALS["<|im_end|>"])
    answer = '[{"bbox_2d": [1, 2, 30, 40], "label": "red"}]'
    s = enc.encode({"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                              {"type": "text", "text": "Locate it."}]},
                                 {"role": "assistant", "content": answer}]}, base_dir=str(tmp_path))
    assert s.input_ids.count(SPECIALS["<|image_pad|>"]) == n_pad and max(s.input_ids) < SIZE
    assert [t for t in s.labels if t != IGNORE] == tok.encode(answer + "<|im_end|>")
    text = enc.encode({"text": "plain words"})
    assert text.input_ids[-1] == SPECIALS["<|endoftext|>"] and text.labels == text.input_ids
    with torch.no_grad():  # the training sample runs through the model too
        model(torch.tensor([s.input_ids]), pixel_values=s.pixel_values, image_grid_thw=torch.tensor(s.image_grid_thw))


def test_shipped_nano_tokenizer():
    tok = Tokenizer.from_pretrained(NANO_DIR)
    assert len(tok) == 8192
    assert [tok.token_to_id(t) for t, _ in ADDED_TOKENS] == list(range(8170, 8192))
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id, tok.eos_token_id) == (8170, 8171, 8172, 8172)
    assert (tok.token_to_id("<|vision_start|>"), tok.token_to_id("<|vision_end|>"), tok.token_to_id("<|image_pad|>"),
            tok.token_to_id("<|video_pad|>")) == (8179, 8180, 8182, 8183)
    kept = json.load(open(f"{NANO_DIR}/vocab_map.json"))["kept_old_ids"]
    assert len(kept) == 8192 and kept == sorted(kept) and kept[-22:] == list(range(151643, 151665))
    s = "Locate the large red circle, output its bbox coordinates using JSON format. 你好 🎉"
    assert tok.decode(tok.encode(s)) == s and max(tok.encode(s)) < 8192


def test_cli_default_corpus_is_the_synthetic_data_plus_the_package_prompts(tmp_path, capsys):
    from qwenvl.vocab import main

    assert main(["--out", str(tmp_path), "--size", "1024", "--n-per-task", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["corpus_texts"] == 12 + len(package_prompts()) and info["size"] == 1024
    assert sorted(info["files"]) == ["tokenizer.json", "tokenizer_config.json", "vocab_map.json"]
    tok = Tokenizer.from_pretrained(tmp_path)
    assert len(tok) == 1024 and tok.token_to_id("<|image_pad|>") == SPECIALS["<|image_pad|>"]
