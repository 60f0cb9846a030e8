"""The command line on the tiny random checkpoint: demo and chat run end to end and say what they used."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image


def run(args, tmp_path):
    env = {"QWENVL_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "qwenvl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)


def test_demo_runs_and_says_the_weights_are_random(tmp_path):
    r = run(["demo", "--out", str(tmp_path / "out"), "--max-tokens", "8"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr
    out = json.loads(r.stdout)
    assert out["prompt"].startswith("Please first output bbox coordinates and names of every red squares")
    drawn = Image.open(out["drawn"])
    w, h = Image.open(out["image"]).size
    assert drawn.size == (w, h) and w * h <= 448 * 448  # the nano model's training domain
    # the generated scene's two red squares, inside the image and red there
    assert len(out["expected_boxes"]) == 2
    img = Image.open(out["image"]).convert("RGB")
    for x1, y1, x2, y2 in out["expected_boxes"]:
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert img.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == (220, 40, 40)


def test_chat_with_image_and_bad_input(tmp_path):
    img = tmp_path / "x.png"
    Image.new("RGB", (100, 60), (10, 200, 30)).save(img)
    r = run(["chat", "--image", str(img), "--max-tokens", "4", "What colour?"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() != ""
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    r = run(["chat", "--image", str(bad), "--max-tokens", "4", "What?"], tmp_path)
    assert r.returncode == 2 and "error:" in r.stderr and "bad.jpg" in r.stderr and "Traceback" not in r.stderr


def test_the_default_model_is_the_shipped_nano_once_its_weights_are_in_the_package(tmp_path, monkeypatch, capsys):
    """resolve_model: a given path as is; no path: qwenvl/nano when it holds a model (config.json + safetensors),
    else the tiny random checkpoint with its notice. Today the package holds only the nano tokenizer."""
    import torch

    import qwenvl
    from qwenvl import hub, nano
    from qwenvl.model import Qwen25VL

    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path / "cache"))
    assert hub.resolve_model("/some/dir") == "/some/dir"
    assert hub.shipped_nano() is None  # the repository's qwenvl/nano: tokenizer files only
    path = hub.resolve_model(None)
    assert path == hub.tiny_random_checkpoint() and "RANDOM weights" in capsys.readouterr().err
    shipped = tmp_path / "nano"
    Qwen25VL.random(qwenvl.preset("tiny"), dtype=torch.float32, seed=0).save_pretrained(str(shipped))
    monkeypatch.setattr(nano, "NANO_DIR", str(shipped))
    assert hub.shipped_nano() == str(shipped) and hub.resolve_model(None) == str(shipped)
    assert "RANDOM" not in capsys.readouterr().err
    (shipped / "config.json").unlink()  # weights without a config are not a model
    assert hub.shipped_nano() is None
