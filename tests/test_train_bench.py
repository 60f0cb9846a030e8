"""The training benchmark's transformers baseline loop (the peer of issue 5), run small on the CPU."""

from __future__ import annotations

import json
import math

import qwenvl
from qwenvl.train import bench


def test_transformers_baseline_batches_real_tokens_in_file_order(tmp_path):
    cfg = qwenvl.preset("tiny")
    data = str(tmp_path / "b.jsonl")
    bench.synthetic_data(data, 40, 512, cfg.text.vocab_size, images=False)
    lens = [len(json.loads(line)["input_ids"]) for line in open(data)]
    log = bench.transformers_baseline(data, cfg, pack_length=1024, steps=3, checkpointing=True, device="cpu")
    assert len(log) == 3
    i = 0
    for e in log:  # each batch: the next samples in file order, as many as fit 1024 padded tokens
        batch = []
        while i < len(lens) and (len(batch) + 1) * max(batch + [lens[i]]) <= 1024:
            batch.append(lens[i])
            i += 1
        assert e["tokens"] == sum(batch) and e["sq"] == sum(x * x for x in batch)
        assert e["padded"] == len(batch) * max(batch) <= 1024
        assert math.isfinite(e["loss"]) and e["loss"] > 0
