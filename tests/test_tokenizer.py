"""Tokenizer parity: our tiktoken path, our saved tokenizer.json, and an independently built HF tokenizer."""
import random
import re
import unicodedata

import pytest

from qwenvl.tokenizer import IncrementalDecoder, Tokenizer

from reference import ADDED, QWEN_PATTERN, hf_tokenizer

CORPUS = [
    "You are a helpful assistant.",
    "Hello world! I'm here, you're there; WE'LL see. She'S DON'T it's O'Neil's.",
    "The quick brown fox jumps over the lazy dog.   Trailing spaces   ",
    "你好，世界！今天天气怎么样？我们去公园散步吧。图片中有一只金毛寻回犬。",
    "吾輩は猫である。名前はまだ無い。カタカナとひらがな、漢字まじり文。ｶﾀｶﾅ（半角）",
    "مرحبا بالعالم! كيف حالك اليوم؟ هذه جملة باللغة العربية.",
    "Привет, мир! Ελληνικά. 한국어 텍스트입니다. हिन्दी पाठ। ภาษาไทย",
    "def f(x):\n    if x > 0:\n        return x ** 2\n\treturn -x  # tab\n\nclass A:\n    pass\n",
    "for (int i = 0; i < n; ++i) {\n    sum += a[i];\n}\r\n",
    "emoji 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🇯🇵🇫🇷 😀😃😄 🧑🏿‍🚀",
    "a    b\t\t c   \n\n   d     \n \n\t\n",
    "line1\r\nline2\r\n\r\nline3\rline4\n\n\n",
    "1234567890 3.14159 1,000,000 2024-01-01 0x1F 1e-6 ١٢٣ 一二三 ½",
    '[{"bbox_2d": [135, 114, 1016, 672], "label": "dog"}] {"point_2d": [512, 300]}',
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n",
    '<tool_call>\n{"name": "computer_use", "arguments": {"action": "click"}}\n</tool_call><|endoftext|>',
    "almost special: <|im_start <|imstart|> < tool_call> <|IMAGE_PAD|> <|fim_prefix|>x<|file_sep|>",
    "Cafe\u0301 re\u0301sume\u0301 na\u0131\u0308ve",  # NFD: must tokenize as its NFC form
    unicodedata.normalize("NFD", "한국어 조합형 Ångström"),
    "<|im_end|>\u0338x a>\u0338b",  # NFC would fuse ">" + U+0338; the added token must survive
    "∑_{i=1}^{n} x_i² ≤ ∞ — “quotes” ‘single’ … €100 ¥200",
    "https://example.com/path?q=1&r=%20x#frag user@example.org",
    "",
    " ",
    "\n",
]


def _nfc_outside_added_tokens(text):
    """What a round trip gives: NFC applied to the text between added tokens (HF normalises only those)."""
    pieces = re.split("(" + "|".join(map(re.escape, ADDED)) + ")", text)
    return "".join(p if p in ADDED else unicodedata.normalize("NFC", p) for p in pieces)


def _random_texts(n=150, seed=0):
    """Seeded fuzz strings mixing scripts, marks, ZWJ, digits and whitespace."""
    pool = (list("abcXYZ '.,;:!?-_()[]{}<>|/\\\"#0123456789") + list(" \t\n\r\u00a0\u3000\u2028\u200b\u200d\ufeff")
            + list("你好世界日本語カタ한국مرحباदेवนา") + ["\u0301", "\u0308", "\u0338", "\u093f", "\ufe0f"]
            + ["👍", "🏽", "👨", "🇯", "🇵", "😀", "𝔘", "𠀀"] + ["<|im_end|>", "<|image_pad|>", "<tool_call>", "'s", "'LL"])
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def ours():
    return Tokenizer.from_pretrained(None)


@pytest.fixture(scope="module")
def reference():
    return hf_tokenizer()


@pytest.fixture(scope="module")
def saved_dir(ours, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    ours.save_pretrained(d)
    return d


def test_known_ids(ours):
    assert ours.encode("You are a helpful assistant.") == [2610, 525, 264, 10950, 17847, 13]
    assert [ours.encode(s) for s in ("\n", "system", "user", "assistant")] == [[198], [8948], [872], [77091]]
    assert ours.vocab_size == len(ours) == 151665
    assert (ours.eos_token_id, ours.pad_token_id, ours.endoftext_id) == (151645, 151643, 151643)
    assert ours.special_ids == set(range(151643, 151665))
    for i, tok in enumerate(ADDED):
        assert ours.token_to_id(tok) == 151643 + i and ours.id_to_token(151643 + i) == tok
        assert ours.encode(tok) == [151643 + i]
    assert ours.token_to_id("Ġthe") == ours.encode(" the")[0] and ours.id_to_token(198) == "Ċ"
    assert ours.token_to_id("no-such-token-xyz") is None and ours.id_to_token(10**6) is None
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
    assert ours.encode(prompt) == [151644, 872, 198, 151652, 151655, 151655, 151653]


def test_matches_reference_tokenizer(ours, reference):
    for text in CORPUS + _random_texts():
        expected = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text) == expected, repr(text)


def test_nfc(ours):
    assert ours.encode("Cafe\u0301") == ours.encode("Caf\u00e9")
    assert ours.decode(ours.encode("Cafe\u0301")) == "Caf\u00e9"


def test_decode_round_trip(ours, reference):
    for text in CORPUS + _random_texts(seed=1):
        ids = ours.encode(text)
        assert ours.decode(ids) == _nfc_outside_added_tokens(text), repr(text)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False)
    ids = ours.encode("<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|im_end|><|endoftext|>")
    assert ours.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>\n{}\n</tool_call>"  # not special
    assert ours.decode([40, 151936, 10**7, 2948]) == ours.decode([40, 2948])  # unknown ids dropped, like HF
    assert ours.decode(ours.encode("x")[0]) == "x"
    assert ours.decode(bytes_split_ids(ours)[:1]) == "\ufffd"  # a lone partial UTF-8 byte


def bytes_split_ids(tok):
    """Ids of a text whose first token is an incomplete UTF-8 sequence (a rare CJK char splits into bytes)."""
    for text in ("𠀀", "𝔘", "🧑🏿‍🚀", "龘"):
        ids = tok.encode(text)
        try:
            tok.token_bytes(ids[0]).decode("utf-8")
        except UnicodeDecodeError:
            return ids
    raise AssertionError("no test text splits a character across tokens")


def test_saved_tokenizer_loads_everywhere(ours, saved_dir):
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(saved_dir)
    raw = HFTokenizer.from_file(str(saved_dir / "tokenizer.json"))
    from_json = Tokenizer.from_pretrained(saved_dir)
    assert type(auto).__name__ == "Qwen2TokenizerFast"
    assert (auto.eos_token_id, auto.pad_token_id, auto.bos_token, auto.model_max_length) == (151645, 151643, None, 131072)
    assert len(auto) == from_json.vocab_size == 151665
    assert (from_json.eos_token_id, from_json.pad_token_id, from_json.special_ids) == (151645, 151643, ours.special_ids)
    for text in CORPUS + _random_texts(seed=2):
        ids = ours.encode(text)
        assert auto.encode(text, add_special_tokens=False) == ids, repr(text)
        assert raw.encode(text, add_special_tokens=False).ids == ids, repr(text)
        assert from_json.encode(text) == ids, repr(text)
        for skip in (False, True):
            assert from_json.decode(ids, skip) == ours.decode(ids, skip) == auto.decode(ids, skip_special_tokens=skip)
    for i in (0, 198, 77091, 151642, 151645, 151657, 151664):
        assert from_json.id_to_token(i) == ours.id_to_token(i) == auto.convert_ids_to_tokens(i)
        assert from_json.token_bytes(i) == ours.token_bytes(i)
    # the official layout: special flags, NFC, split regex, classic merges (one per multi-byte token)
    saved = json.loads((saved_dir / "tokenizer.json").read_text(encoding="utf-8"))
    flags = {t["content"]: t["special"] for t in saved["added_tokens"]}
    assert flags["<|im_end|>"] and flags["<|image_pad|>"] and not flags["<tool_call>"] and not flags["</tool_call>"]
    assert saved["normalizer"]["type"] == "NFC" and saved["model"]["ignore_merges"] is False
    assert saved["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == QWEN_PATTERN
    assert len(saved["model"]["merges"]) == 151643 - 256
    config = json.loads((saved_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["add_bos_token"] is False


def test_saved_chat_template_matches_render_chat(saved_dir):
    from transformers import AutoTokenizer

    from qwenvl.chat import render_chat

    auto = AutoTokenizer.from_pretrained(saved_dir)
    messages = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A dog."}, {"role": "user", "content": "Sure?"}]
    assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == render_chat(messages)


@pytest.mark.parametrize("backend", ["tiktoken", "tokenizer.json"])
def test_incremental_decoder(ours, saved_dir, backend):
    tok = ours if backend == "tiktoken" else Tokenizer.from_pretrained(saved_dir)
    text = ("Streaming 流式输出 🧑🏿‍🚀 👨‍👩‍👧‍👦 𠀀𝔘 龘 العربية 日本語テキスト <|im_end|> café\n" * 3)
    ids = tok.encode(text)
    assert len(bytes_split_ids(tok)) > 1  # the text really splits characters across tokens
    for skip in (False, True):
        dec = IncrementalDecoder(tok, skip_special_tokens=skip)
        chunks = [dec.push(i) for i in ids]
        tail = dec.flush()
        assert all("\ufffd" not in c for c in chunks)
        assert "".join(chunks) + tail == tok.decode(ids, skip_special_tokens=skip)
    assert "".join(chunks) == text.replace("<|im_end|>", "")
    # a stream cut inside a character: held back, then replaced on flush (like a full decode)
    dec = IncrementalDecoder(tok)
    partial = bytes_split_ids(tok)[:1]
    assert dec.push(partial[0]) == "" and dec.flush() == tok.decode(partial) == "\ufffd"


def test_loading_is_cached():
    import time

    start = time.perf_counter()
    for _ in range(10):
        Tokenizer.from_pretrained(None)
    assert time.perf_counter() - start < 1.0
