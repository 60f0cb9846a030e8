"""The command line with the default model (the shipped nano model): demo and chat run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image


def run(args, tmp_path):
    env = {"QWENVL_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "qwenvl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)


def test_demo_runs_the_shipped_nano_model_and_finds_the_red_squares(tmp_path):
    """`qwenvl demo` with no --model: the trained nano model shipped in qwenvl/nano (no random-weights notice) on the
    generated scene; its two red squares found, each box within IoU 0.5 of the truth."""
    r = run(["demo", "--out", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" not in r.stderr
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

    def iou(a, b):
        ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    found = [b[:4] for b in out["boxes"]]
    assert len(found) == 2 and all(b[4] == "red square" for b in out["boxes"]), out
    assert all(max(iou(e, f) for f in found) >= 0.5 for e in out["expected_boxes"]), out


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


def test_the_default_model_is_the_shipped_nano(tmp_path, monkeypatch, capsys):
    """resolve_model: a given path as is; no path: qwenvl/nano when it holds a model (config.json + safetensors;
    the package ships one), else the tiny random checkpoint with its notice."""
    import torch

    import qwenvl
    from qwenvl import hub, nano
    from qwenvl.model import Qwen25VL

    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path / "cache"))
    assert hub.resolve_model("/some/dir") == "/some/dir"
    assert hub.shipped_nano() == nano.NANO_DIR and hub.resolve_model(None) == nano.NANO_DIR
    assert "RANDOM" not in capsys.readouterr().err
    shipped = tmp_path / "nano"
    shipped.mkdir()
    monkeypatch.setattr(nano, "NANO_DIR", str(shipped))  # a package without the weights
    assert hub.shipped_nano() is None
    path = hub.resolve_model(None)
    assert path == hub.tiny_random_checkpoint() and "RANDOM weights" in capsys.readouterr().err
    Qwen25VL.random(qwenvl.preset("tiny"), dtype=torch.float32, seed=0).save_pretrained(str(shipped))
    assert hub.shipped_nano() == str(shipped) and hub.resolve_model(None) == str(shipped)
    assert "RANDOM" not in capsys.readouterr().err
    (shipped / "config.json").unlink()  # weights without a config are not a model
    assert hub.shipped_nano() is None
