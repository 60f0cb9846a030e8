"""Where models come from: a checkpoint directory, or the default model when none is given.

The default is the trained nano model shipped inside the package (`qwenvl/nano/`: config.json and safetensors
beside its tokenizer; docs/NANO.md is its model card). A package without those weights (a trimmed install) falls
back to a tiny checkpoint with RANDOM weights, built once into the user cache: it runs the whole pipeline but its
answers are meaningless.
"""

from __future__ import annotations

import os
import sys

DEFAULT_NOTICE = ("NOTE: no --model given and this install has no nano model weights (qwenvl/nano): using a tiny "
                  "checkpoint with RANDOM weights ({path}). The pipeline runs end to end; the answers are meaningless.")


def cache_dir() -> str:
    base = os.environ.get("QWENVL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwenvl")
    os.makedirs(base, exist_ok=True)
    return base


def tiny_random_checkpoint(path: str | None = None, seed: int = 0) -> str:
    """Build (once) a tiny random-weight checkpoint with tokenizer and processor files; return its dir."""
    import torch

    from .config import preset
    from .model import Qwen25VL
    from .processor import Processor

    path = path or os.path.join(cache_dir(), "tiny-random")
    if os.path.exists(os.path.join(path, ".complete")):
        return path
    tmp = path + f".tmp{os.getpid()}"
    model = Qwen25VL.random(preset("tiny"), dtype=torch.float32, seed=seed)
    model.save_pretrained(tmp)
    Processor().save_pretrained(tmp)
    open(os.path.join(tmp, ".complete"), "w").close()
    if os.path.exists(path):  # a stale, incomplete build
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a checkpoint
    return path


def shipped_nano() -> str | None:
    """qwenvl/nano when it holds a model (config.json and safetensors weights), else None."""
    from . import nano

    d = nano.NANO_DIR
    has_weights = os.path.isdir(d) and any(f.endswith(".safetensors") for f in os.listdir(d))
    return d if has_weights and os.path.exists(os.path.join(d, "config.json")) else None


def resolve_model(path: str | None, quiet: bool = False) -> str:
    """path itself, else the shipped nano model, else the tiny random checkpoint (with a notice on stderr)."""
    if path:
        return path
    nano = shipped_nano()
    if nano:
        return nano
    p = tiny_random_checkpoint()
    if not quiet:
        print(DEFAULT_NOTICE.format(path=p), file=sys.stderr)
    return p
