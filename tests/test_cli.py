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
    assert out["prompt"].startswith("Outline the position of each coloured shape")
    drawn = Image.open(out["drawn"])
    assert drawn.size == Image.open(out["image"]).size == (640, 448)


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
