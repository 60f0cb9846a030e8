"""Reading JSONL sets (files or folders) with their folders, and writing them elsewhere with relative media
paths rewritten so they still point at the same files."""
from __future__ import annotations

import glob
import json
import os

_URL = ("/", "http://", "https://", "data:", "file://")


def read(paths) -> list[tuple[dict, str]]:
    """(record, folder of its JSONL) for every valid record; folders contribute their *.jsonl, sorted."""
    from ..train.data import iter_records

    files = []
    for p in [paths] if isinstance(paths, str) else paths:
        files += sorted(glob.glob(os.path.join(p, "*.jsonl"))) if os.path.isdir(p) else [p]
    if not files:
        raise FileNotFoundError(f"no JSONL files in {paths}")
    return [(rec, os.path.dirname(os.path.abspath(f))) for f in files for rec in iter_records([f])]


def _move(src, src_dir: str, dst_dir: str):
    if isinstance(src, list):
        return [_move(s, src_dir, dst_dir) for s in src]
    if isinstance(src, str) and src and not src.startswith(_URL):
        return os.path.relpath(os.path.join(src_dir, src), dst_dir)
    return src


def relocate(record: dict, src_dir: str, dst_dir: str) -> dict:
    """A copy of `record` whose relative media paths (message items, LLaVA "image(s)"/"video(s)") are relative
    to dst_dir instead of src_dir."""
    if os.path.abspath(src_dir) == os.path.abspath(dst_dir):
        return record
    rec = dict(record)
    for key in ("image", "images", "video", "videos"):
        if key in rec:
            rec[key] = _move(rec[key], src_dir, dst_dir)
    for mkey in ("messages", "chosen", "rejected"):
        msgs = rec.get(mkey)
        if not isinstance(msgs, list):
            continue
        new = []
        for m in msgs:
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                m = {**m, "content": [{**it, **{k: _move(it[k], src_dir, dst_dir) for k in ("image", "video")
                                                if k in it}} if isinstance(it, dict) else it for it in m["content"]]}
            new.append(m)
        rec[mkey] = new
    return rec


def write(path: str, samples: list[tuple[dict, str]]) -> int:
    """Write (record, its folder) pairs to `path`, media paths made relative to path's folder."""
    dst = os.path.dirname(os.path.abspath(path))
    os.makedirs(dst, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec, base in samples:
            f.write(json.dumps(relocate(rec, base, dst), ensure_ascii=False) + "\n")
    return len(samples)
