"""A pruned Qwen vocabulary for small models (docs/NANO.md §2).

    python -m qwenvl.vocab --out DIR [--size 8192] [--n-per-task 150]

Kept: the 22 added tokens, the 256 single-byte tokens, then the tokens of a corpus by frequency, then the
remaining tokens of lowest BPE rank until exactly `size`; the kept set is closed under merges (a kept token's two
merge parts are kept), so the Qwen BPE restricted to the merges whose result is kept writes only kept tokens, and
a text whose full tokenization uses kept tokens only gets the same tokens. new id = position of the old id in the
sorted kept ids (the added tokens, the largest old ids, become the last 22). DIR gets an ordinary byte-level BPE
tokenizer.json + tokenizer_config.json (what Tokenizer.save_pretrained writes; transformers loads it) and
vocab_map.json {"kept_old_ids": [...]} (old -> new is its inverse).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import tempfile
from typing import Iterable

from .tokenizer import (ADDED_TOKENS, NUM_BPE_RANKS, Tokenizer, _build_hf_tokenizer, _bytes_to_token_str, _qwen_bpe,
                        _qwen_merges, _token_str_to_bytes)

SPECIAL_OLD_IDS = range(NUM_BPE_RANKS, NUM_BPE_RANKS + len(ADDED_TOKENS))


@functools.lru_cache(maxsize=1)
def _merge_parts() -> dict[int, tuple[int, int]]:
    """Old id of each multi-byte token -> old ids of the two tokens its BPE merge combines (both of lower rank)."""
    ranks, _ = _qwen_bpe()
    parts = {}
    for a, b in _qwen_merges():
        left, right = _token_str_to_bytes(a), _token_str_to_bytes(b)
        parts[ranks[left + right]] = (ranks[left], ranks[right])
    return parts


def select_kept(counts: dict[int, int], size: int) -> tuple[list[int], int]:
    """(sorted old ids of the kept set, how many were kept before the fill by rank): specials, bytes, the ids of
    `counts` by frequency (ties: lower id) with their merge parts, then the lowest ranks."""
    ranks, _ = _qwen_bpe()
    parts = _merge_parts()
    kept = set(SPECIAL_OLD_IDS) | {r for token, r in ranks.items() if len(token) == 1}
    if not len(kept) <= size <= NUM_BPE_RANKS + len(ADDED_TOKENS):
        raise ValueError(f"size must be in {len(kept)}..{NUM_BPE_RANKS + len(ADDED_TOKENS)}, got {size}")

    def missing(token: int) -> set[int]:  # the token and the ancestors it needs that are not kept yet
        out, stack = set(), [token]
        while stack:
            t = stack.pop()
            if t not in kept and t not in out:
                out.add(t)
                stack.extend(parts.get(t, ()))
        return out

    for token, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        add = missing(token)
        if len(kept) + len(add) <= size:  # else skip it: a later token may still fit
            kept |= add
    before_fill = len(kept)
    for token in range(NUM_BPE_RANKS):  # parts rank below their token, so each adds exactly one id
        if len(kept) == size:
            break
        if token not in kept:
            assert missing(token) == {token}
            kept.add(token)
    return sorted(kept), before_fill


def pruned_hf_tokenizer(kept_old_ids: list[int]):
    """`tokenizers.Tokenizer` over the kept ids (sorted): vocab renumbered, the merges whose result is kept."""
    ranks, _ = _qwen_bpe()
    token_of = {r: token for token, r in ranks.items()}
    bpe_ids = [old for old in kept_old_ids if old < NUM_BPE_RANKS]
    if list(kept_old_ids[len(bpe_ids):]) != list(SPECIAL_OLD_IDS):
        raise ValueError("the kept ids must be sorted and include all added tokens")
    vocab = {_bytes_to_token_str(token_of[old]): new for new, old in enumerate(bpe_ids)}
    merges = [(a, b) for a, b in _qwen_merges() if a + b in vocab]
    if len(merges) != len(vocab) - 256 or any(a not in vocab or b not in vocab for a, b in merges):
        raise ValueError("the kept set is not closed under merges")
    return _build_hf_tokenizer(vocab, merges)


def build_pruned_tokenizer(texts: Iterable[str], size: int = 8192, out_dir: str | os.PathLike | None = None) -> dict:
    """Prune the Qwen vocabulary to `size` ids by the token frequencies of `texts`; write it to out_dir if given.

    Returns {"size", "kept_old_ids", "corpus_texts", "corpus_tokens", "corpus_distinct_ids", "kept_before_fill"
    (specials + bytes + the corpus ids that fit, with their merge parts), "files" (name -> bytes written)}.
    """
    full = Tokenizer.from_pretrained(None)
    counts: collections.Counter[int] = collections.Counter()
    n_texts = 0
    for text in texts:
        counts.update(full.encode(text))
        n_texts += 1
    kept, before_fill = select_kept(counts, size)
    info = {"size": size, "kept_old_ids": kept, "corpus_texts": n_texts, "corpus_tokens": sum(counts.values()),
            "corpus_distinct_ids": len(counts), "kept_before_fill": before_fill, "files": {}}
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        Tokenizer(pruned_hf_tokenizer(kept)).save_pretrained(out_dir)
        with open(os.path.join(out_dir, "vocab_map.json"), "w", encoding="utf-8") as f:
            json.dump({"kept_old_ids": kept}, f, separators=(",", ":"))
            f.write("\n")
        info["files"] = {name: os.path.getsize(os.path.join(out_dir, name))
                         for name in ("tokenizer.json", "tokenizer_config.json", "vocab_map.json")}
    return info


def load_vocab_map(directory: str | os.PathLike) -> dict[int, int]:
    """old id -> new id from DIR/vocab_map.json."""
    with open(os.path.join(os.fspath(directory), "vocab_map.json"), encoding="utf-8") as f:
        return {old: new for new, old in enumerate(json.load(f)["kept_old_ids"])}


# ------------------------------------------------------------------------------------------------ corpus
def package_prompts() -> list[str]:
    """The fixed prompts the package writes: default system, agent tool systems, grounding/document/video prompts."""
    from .chat import DEFAULT_SYSTEM_PROMPT
    from .tasks import agent, document, grounding, video
    from .tasks.cli import ground_prompt

    tools = [agent.computer_use_tool(1280, 720), agent.mobile_use_tool(1080, 2400)]
    return [DEFAULT_SYSTEM_PROMPT, agent.tools_system_prompt(tools[:1]), agent.tools_system_prompt(tools[1:]),
            agent.user_query("open the settings", ["click", {"name": "computer_use", "arguments": {"action": "key"}}]),
            document.DOC_PARSE_SYSTEM, document.DOC_PARSE_PROMPT, document.OCR_PROMPT, document.SPOTTING_PROMPT,
            document.kie_prompt(["name", "date", "total"]),
            grounding.detect_prompt("object"), grounding.describe_prompt("object"), grounding.locate_prompt("object"),
            grounding.point_prompt("object"), grounding.point_json_prompt("object"), grounding.count_prompt(),
            grounding.count_prompt("objects"), ground_prompt("the object"), ground_prompt("the object", points=True),
            video.grounding_prompt("the event"), video.charades_prompt("the event"),
            video.dense_caption_prompt("mm:ss.ff"), video.dense_caption_prompt("seconds")]


def synth_texts(n_per_task: int = 150, seed: int = 0) -> list[str]:
    """Every record of the synthetic train data (all tasks) rendered with the chat template, no generation prompt."""
    from . import synth
    from .chat import render_chat

    texts = []
    with tempfile.TemporaryDirectory(prefix="qwenvl-vocab-") as tmp:
        synth.generate(tmp, "all", n=n_per_task, split="train", seed=seed)
        for task in synth.TASKS:
            with open(os.path.join(tmp, f"{task}.jsonl"), encoding="utf-8") as f:
                texts += [render_chat(json.loads(line)["messages"], add_generation_prompt=False) for line in f]
    return texts


def default_corpus(n_per_task: int = 150, seed: int = 0) -> list[str]:
    return synth_texts(n_per_task, seed) + package_prompts()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl.vocab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for tokenizer.json, tokenizer_config.json, vocab_map.json")
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--n-per-task", type=int, default=150, help="synthetic samples per task in the corpus")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    info = build_pruned_tokenizer(default_corpus(args.n_per_task, args.seed), args.size, args.out)
    info.pop("kept_old_ids")
    json.dump(info, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
