"""The qwenvl-nano pruned vocabulary (docs/NANO.md §2): 8,192 ids, built by `python -m qwenvl.vocab --out qwenvl/nano`.

NANO_DIR holds tokenizer.json, tokenizer_config.json and vocab_map.json ({"kept_old_ids": [...]}, new id = index);
load it with `qwenvl.tokenizer.Tokenizer.from_pretrained(NANO_DIR)` or `transformers.AutoTokenizer`.
"""
import os

NANO_DIR = os.path.dirname(os.path.abspath(__file__))
