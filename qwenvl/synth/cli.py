"""`python -m qwenvl.synth` (and `qwenvl synth` once wired): write synthetic JSONL + media."""
from __future__ import annotations

import argparse
import json

from . import SPLITS, TASKS, generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwenvl synth", description="Deterministic synthetic training/eval data.")
    p.add_argument("--out", required=True, help="output folder (JSONL per task + media/)")
    p.add_argument("--tasks", default="all", help=f"comma-separated, or all: {', '.join(TASKS)}")
    p.add_argument("--n", type=int, default=1000, help="samples per task")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first sample index (to extend or shard a set)")
    a = p.parse_args(argv)
    manifest = generate(a.out, a.tasks, a.n, a.split, a.seed, a.start, progress=True)
    print(json.dumps(manifest))
    return 0
