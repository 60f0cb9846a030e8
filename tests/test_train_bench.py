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


def test_train_arms_script_runs_each_arm_and_tabulates(tmp_path):
    """bench/train_arms.sh (issue 5's one device call) on the CPU with the tiny preset: each arm runs the training
    bench with its flags, the profiled arm prints the profiler's table and that step is left out of its timing, and
    the table has one row per arm (a failing arm says so instead of stopping the rest)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OUT=str(tmp_path), PRESET="tiny", PYTHONPATH=root, PY=sys.executable, PROFILE_ARM="b",
               PROFILE_STEP="4",
               TRAIN_ARMS="a:--steps 5 --pack-length 256 --samples 60;b:--no-checkpointing --steps 5 --pack-length 256"
                          " --samples 60;c:--no-such-flag")
    p = subprocess.run(["bash", os.path.join(root, "bench", "train_arms.sh")], env=env, capture_output=True,
                       text=True, timeout=600, cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "profiled step" in p.stdout
    rows = {line.split("|")[1].strip(): line for line in p.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"a", "b", "c"} and "failed" in rows["c"], p.stdout[-2000:]
    for name in ("a", "b"):
        r = json.load(open(tmp_path / "train" / f"{name}.json"))
        assert r["preset"] == "tiny" and r["tokens_per_s"] > 0 and len(r["step_s_all"]) == 5
    b = json.load(open(tmp_path / "train" / "b.json"))
    assert b["steps_timed"] == 2  # steps 3-5 timed, the profiled step 4 left out
