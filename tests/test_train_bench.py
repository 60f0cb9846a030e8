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


def test_transformers_baseline_freezes_the_vit_like_ours(tmp_path, monkeypatch):
    import torch

    cfg = qwenvl.preset("tiny")
    data = str(tmp_path / "b.jsonl")
    bench.synthetic_data(data, 8, 256, cfg.text.vocab_size, images=False)
    optimised = {}
    real_adamw = torch.optim.AdamW

    def recording_adamw(params, **kw):
        params = list(params)
        optimised[kw.get("fused")] = params
        return real_adamw(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    sizes = {}
    for freeze in (False, True):
        bench.transformers_baseline(data, cfg, pack_length=512, steps=1, checkpointing=False, device="cpu",
                                    freeze_vit=freeze)
        sizes[freeze] = sum(p.numel() for p in optimised[False])
    vit = sum(v.numel() for k, v in qwenvl.Qwen25VL(cfg).state_dict().items() if k.startswith("visual."))
    assert sizes[False] - sizes[True] == vit > 0
