"""bench/train_nano.sh (the one-call nano recipe, docs/NANO.md §6) as a CPU dry run: NANO_SMOKE=1 runs the same
steps (data, train on a wall budget, eval, package) with tiny budgets; the outputs fit the device's return limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_nano_script_smoke(tmp_path):
    pytest.importorskip("qwenvl.nano")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "NANO_SMOKE": "1", "OUT": str(out), "NANO_WORK": str(work), "PYTHON": sys.executable,
           "QWENVL_SYNTH_VIDEO": "frames"}  # as on the device (no PyAV)
    r = subprocess.run(["bash", "bench/train_nano.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("data", "train", "eval", "package"):
        assert f"{name}: rc=0" in r.stdout, r.stdout + (out / "steps.log").read_text()
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 8 and all(os.path.getsize(f) <= 15_000_000 for f in files)
    assert all(os.path.relpath(f, out).count(os.sep) <= 1 for f in files)  # $OUT/a/file at most
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_from"] == "final" and summary["train"]["steps"] >= 1
    assert summary["data"]["unique"]["video_grounding"] >= 1 and summary["eval"]["tasks"]
    assert json.loads((out / "eval_report.json").read_text())["n"] >= 1
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in (out / "model").glob("*.safetensors"):
        (model_dir / f.name).write_bytes(f.read_bytes())
    with tarfile.open(out / "model" / "model_files.tar") as tar:
        tar.extractall(model_dir)
    assert {"config.json", "tokenizer.json", "vocab_map.json", "preprocessor_config.json"} <= set(os.listdir(model_dir))
    from qwenvl.model import Qwen25VL
    from qwenvl.processor import Processor

    m = Qwen25VL.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert m.config.text.vocab_size == 8192 and json.loads((model_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert Processor.from_pretrained(model_dir).max_pixels == 448 * 448
    import qwenvl

    out = qwenvl.LLM(str(model_dir), device="cpu").chat([[{"role": "user", "content": "hi"}]],
                                                        qwenvl.SamplingParams(max_tokens=2, temperature=0.0))
    assert len(out[0].token_ids) <= 2 and all(0 <= t < 8192 for t in out[0].token_ids)


@pytest.mark.slow
def test_package_falls_back_to_the_newest_checkpoint(tmp_path):
    """Training killed before its export: the package step exports the newest checkpoint instead."""
    from qwenvl.train import TrainConfig, train

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    run = tmp_path / "run"
    train(TrainConfig(model="tiny", train_files=[str(data)], output_dir=str(run), max_steps=2, save_every=1,
                      export=False, pack_length=64))
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import nano_recipe

    assert nano_recipe.main(["package", "--run", str(run), "--eval", str(tmp_path / "none"), "--data",
                             str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model_from"] == "step_00000002" and summary["train"]["steps"] == 2
    assert (tmp_path / "out" / "model" / "model_files.tar").exists()
