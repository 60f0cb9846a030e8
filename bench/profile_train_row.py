"""Where one packed training row's time goes, measured on the CPU (docs/NANO.md §7: the nano model trains at ~1 %
of what the GPU could do).

    python -m qwenvl.synth --out D --tasks all --n 40          # (QWENVL_SYNTH_VIDEO=frames without PyAV)
    python bench/profile_train_row.py --data D [--pack 32768] [--rows 1] [--profile] [--mix-only]

Rows are built exactly as the trainer builds them (its ChatEncoder options for the nano recipe, PackedLoader with
best-fit-decreasing packing over one chunk of all the task files, shuffled). For each row it prints
  * the row's make-up (samples, tasks, images, videos, vision tokens, patches, pixel bytes: the uint8 frames the
    row carries and the float pixel values made from them),
  * host milliseconds of the per-row steps that do not shrink on a fast GPU (positions, segment tables, the vision
    plan, loss bookkeeping), timed around the functions themselves,
  * with --profile: the aten ops one forward + backward issues, counted by name and grouped by the qwenvl function
    that issued them (backward ops by their autograd node), and the ops that synchronise with the GPU on CUDA.
--mix-only: just the packing statistics over every chunk (fill ratio, tasks per row), no model.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from qwenvl.config import preset  # noqa: E402
from qwenvl.train.config import TrainConfig  # noqa: E402
from qwenvl.train.data import ChatEncoder, JsonlStream  # noqa: E402
from qwenvl.train.packing import PackedLoader, attention_weight, pack_lengths  # noqa: E402

# ops that wait for the GPU on CUDA (data-dependent output size or a value read back to the host)
SYNCING = {"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::masked_select", "aten::repeat_interleave",
           "aten::unique", "aten::_unique2", "aten::equal", "aten::is_nonzero"}


def keep_heap() -> None:
    """glibc hands freed blocks over its mmap threshold back to the OS and page-faults them in again on the next
    allocation: in this VM that (not the work) dominated host timings of ~1 MB tensors. Keep them in the heap, as a
    long-running trainer's warm heap mostly does."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except OSError:
        return
    torch.ones(256 * 2**20, dtype=torch.uint8)  # touched once, then reused from the heap


def merged_file(data: str, seed: int = 0) -> str:
    """Every task JSONL of a qwenvl.synth folder in one shuffled file (as bench/nano_recipe.py merges them)."""
    out = os.path.join(data, "_all.jsonl")
    lines = []
    for path in sorted(glob.glob(os.path.join(data, "*.jsonl"))):
        if os.path.basename(path).startswith("_"):
            continue
        with open(path, encoding="utf-8") as f:
            lines += [ln for ln in f if ln.strip()]
    random.Random(seed).shuffle(lines)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return out


def build(data: str, pack: int, chunk: int, seed: int = 0):
    from qwenvl.train.trainer import load_tokenizer

    cfg = TrainConfig(model="nano", pack_length=pack, min_pixels=3136, max_pixels=200704, chunk_size=chunk, seed=seed,
                      train_files=[merged_file(data, seed)])
    config = preset("nano")
    enc = ChatEncoder(load_tokenizer(cfg, config), min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                      video_min_pixels=cfg.video_min_pixels, video_max_pixels=cfg.video_max_pixels,
                      video_total_pixels=cfg.video_total_pixels, fps=cfg.video_fps, max_frames=cfg.video_max_frames,
                      loss_on=cfg.effective_loss_on, max_length=cfg.effective_max_length)
    loader = PackedLoader(JsonlStream(cfg.train_files), enc, capacity=pack, chunk_size=chunk, seed=seed,
                          attn_weight=attention_weight(config))
    return cfg, config, enc, loader


def mix_stats(loader: PackedLoader, pack: int) -> dict:
    """Fill ratio and task mix of every row of one epoch (lengths only: no pixels decoded)."""
    rows = []
    while True:
        loader._load_chunk()
        for step in loader._steps:
            for b in step[0]:
                rows.append([(loader._chunk[i][1].get("task", "?"), loader._chunk[i][3]) for i in b])
        if loader._next_pos.epoch > 0:
            break
        loader.pos = loader._next_pos
    full = [r for r in rows if sum(n for _, n in r) > 0]
    fill = sum(n for r in full for _, n in r) / (pack * len(full))
    share = []  # share of the row's tokens that its largest task holds
    for r in full:
        c = collections.Counter()
        for t, n in r:
            c[t] += n
        share.append(max(c.values()) / sum(c.values()))
    return {"rows": len(full), "fill": round(fill, 4),
            "rows_lower_bound": -(-sum(n for r in full for _, n in r) // pack),
            "tasks_per_row_mean": round(sum(len({t for t, _ in r}) for r in full) / len(full), 2),
            "rows_one_task_over_90pct": sum(s > 0.9 for s in share),
            "top_task_share_mean": round(sum(share) / len(share), 3),
            "samples_per_row_mean": round(sum(len(r) for r in full) / len(full), 1)}


class Timer:
    """Wall milliseconds spent in named functions (patched in place; nested calls counted in each)."""

    def __init__(self):
        self.ms = collections.defaultdict(float)
        self.calls = collections.Counter()
        self._undo = []

    def wrap(self, owner, attr: str, name: str):
        fn = getattr(owner, attr)
        is_static = isinstance(owner.__dict__.get(attr), staticmethod) if isinstance(owner, type) else False

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.ms[name] += 1e3 * (time.perf_counter() - t0)
                self.calls[name] += 1

        setattr(owner, attr, staticmethod(timed) if is_static else timed)
        self._undo.append((owner, attr, owner.__dict__[attr] if isinstance(owner, type) else fn))

    def undo(self):
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)


def host_parts(timer: Timer) -> None:
    import qwenvl.layers
    import qwenvl.model
    import qwenvl.rope
    import qwenvl.train.loss
    import qwenvl.vision
    from qwenvl.model import Qwen25VL
    from qwenvl.vision import VisionTransformer

    timer.wrap(Qwen25VL, "_packed_positions", "model._packed_positions (MRoPE ids of the packed row)")
    timer.wrap(qwenvl.model, "segments", "layers.segments (decoder, per row)")
    timer.wrap(qwenvl.vision, "segments", "layers.segments (ViT windows + frames)")
    timer.wrap(VisionTransformer, "_plan", "vision._plan (window order, rotary, segments)")
    timer.wrap(Qwen25VL, "_cos_sin", "model._cos_sin (decoder rotary tables)")
    timer.wrap(Qwen25VL, "embed", "model.embed (embedding + ViT forward + scatter)")
    timer.wrap(qwenvl.train.loss, "linear_nll_sum",
               "loss.linear_nll_sum (LM head forward + its gradients, targets only)")
    timer.wrap(qwenvl.train.loss, "device_pixels",
               "packing.device_pixels (uint8 frames -> pixel values; on the CPU here, device kernels in training)")


# ops that launch no kernel on CUDA (views, metadata, allocation): left out of the counts
NO_KERNEL = {"aten::as_strided", "aten::view", "aten::_unsafe_view", "aten::_reshape_alias", "aten::resolve_conj",
             "aten::resolve_neg", "aten::detach", "aten::detach_", "aten::empty", "aten::empty_strided", "aten::resize_",
             "aten::lift_fresh", "aten::result_type", "aten::as_strided_", "aten::alias", "aten::expand", "aten::t",
             "aten::transpose", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice",
             "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::real", "aten::reshape",
             "aten::view_as", "aten::expand_as", "aten::empty_like", "aten::contiguous", "aten::to", "aten::_to_copy",
             "aten::numpy_T", "aten::flatten", "aten::unflatten", "aten::narrow", "aten::set_", "aten::scalar_tensor",
             "aten::is_nonzero", "aten::unsafe_split", "aten::_has_compatible_shallow_copy_type"}


def frame_of(ev) -> str:
    """The innermost qwenvl function above an op in the profiler's event tree ('file:function'), else the autograd
    node that ran it in backward."""
    p = ev.cpu_parent
    while p is not None:
        name = p.name
        if "qwenvl/" in name and "profile_train_row" not in name and "(" in name:
            path, _, fn = name.partition(": ")
            return f"{path.rsplit('qwenvl/', 1)[1].split('(')[0]}:{fn}"
        if name.startswith("autograd::engine::evaluate_function: "):
            return "backward: " + name.split(": ", 1)[1]
        p = p.cpu_parent
    return "?"


def op_table(prof) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
    """(leaf aten ops by name, leaf ops by issuing function, syncing ops by issuing function)."""
    by_name, by_fn, syncs = collections.Counter(), collections.Counter(), collections.Counter()
    for ev in prof.events():
        if not ev.name.startswith("aten::") or ev.name in NO_KERNEL:
            continue
        if ev.name not in SYNCING and any(c.name.startswith("aten::") and c.name not in NO_KERNEL
                                          for c in ev.cpu_children):
            continue  # composite: its children are counted (a leaf op ~ a kernel launch on CUDA)
        where = frame_of(ev)
        by_name[ev.name] += 1
        by_fn[where] += 1
        if ev.name in SYNCING:
            syncs[f"{where} [{ev.name}]"] += 1
    return by_name, by_fn, syncs


def narrow(config):
    """Widths / 8 (head dims 8), everything else as is: the same code paths and op counts."""
    import dataclasses

    v = dataclasses.replace(config.vision, hidden_size=24, intermediate_size=64, out_hidden_size=32)
    t = dataclasses.replace(config.text, hidden_size=32, intermediate_size=80, mrope_section=[1, 1, 2])
    return dataclasses.replace(config, vision=v, text=t)


def host_only(model, batch: dict, repeat: int = 3) -> dict:
    """Best-of-`repeat` wall milliseconds of the host steps of one row (the ViT plan cache emptied each time; the
    per-grid caches under it stay warm, as in training after the first rows)."""
    from qwenvl.layers import segments
    from qwenvl.train.loss import model_inputs

    kw = model_inputs(batch)
    ids, lens = batch["input_ids"], batch["seq_lens"]
    grids = [g for g in (kw.get("image_grid_thw"), kw.get("video_grid_thw")) if g is not None]
    steps = {
        "positions (model._packed_positions)": lambda: model._packed_positions(
            ids, lens, kw.get("image_grid_thw"), kw.get("video_grid_thw"), kw.get("second_per_grid_ts")),
        "decoder segments (layers.segments)": lambda: segments(torch.tensor([0] + list(lens)).cumsum(0), "cpu"),
        "vision plans (VisionTransformer._plan, images + videos)": lambda: [
            (model.visual._plans.clear(), model.visual._plan([tuple(x) for x in g.tolist()], "cpu")) for g in grids],
    }
    if hasattr(model, "_packed_positions_per_sample"):
        steps["positions, per-sample loop (before)"] = lambda: model._packed_positions_per_sample(
            ids, lens, kw.get("image_grid_thw"), kw.get("video_grid_thw"), kw.get("second_per_grid_ts"))
    out = {}
    for name, fn in steps.items():
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = round(1e3 * best, 2)
    return out


def describe(batch: dict, chunk_tasks: dict) -> dict:
    """The row's make-up and its vision bytes: as it travels (uint8 frames) and as float pixel values."""
    from qwenvl.train.packing import pixel_bytes

    ids = batch["input_ids"]
    patches = {k: sum(t * h * w for t, h, w in batch[k].tolist()) if k in batch else 0
               for k in ("image_grid_thw", "video_grid_thw")}
    n = sum(patches.values())
    return {"tokens": int(ids.shape[1]), "samples": len(batch["seq_lens"]),
            "targets": int((batch["targets"] != -100).sum()),
            "images": int(batch["image_grid_thw"].shape[0]) if "image_grid_thw" in batch else 0,
            "videos": int(batch["video_grid_thw"].shape[0]) if "video_grid_thw" in batch else 0,
            "patches": n, "image_patches": patches["image_grid_thw"], "video_patches": patches["video_grid_thw"],
            "pixel_MB_uint8": round(pixel_bytes(batch) / 2**20, 1),  # what the row carries
            "pixel_MB_fp32": round(n * 1176 * 4 / 2**20, 1), "pixel_MB_bf16": round(n * 1176 * 2 / 2**20, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pack", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--min-fill", type=float, default=0.8, help="profile rows at least this full")
    ap.add_argument("--profile", action="store_true", help="count aten ops of forward + backward (torch.profiler)")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--mix-only", action="store_true")
    ap.add_argument("--narrow", action="store_true",
                    help="nano's depth, heads and vocabulary at 1/8 of its widths: the same ops (counts, host work) "
                         "in a fraction of the CPU time")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the blocks as the trainer's compile=true does (a warm-up row compiles them "
                         "first): what is left outside the compiled blocks")
    ap.add_argument("--host-only", action="store_true",
                    help="time only the per-row host steps (positions, vision plan), best of 3, no forward")
    ap.add_argument("--tight", action="store_true", help="pack with plain best-fit decreasing (pack_lengths mix=False)")
    a = ap.parse_args(argv)
    keep_heap()
    torch.manual_seed(0)
    if a.tight:
        import functools

        import qwenvl.train.packing as packing
        packing.pack_lengths = functools.partial(packing.pack_lengths, mix=False)
    cfg, config, enc, loader = build(a.data, a.pack, a.chunk)
    result: dict = {}
    if a.mix_only:
        result["mix"] = mix_stats(loader, a.pack)
        print(json.dumps(result["mix"]))
        if a.json:
            json.dump(result, open(a.json, "w"), indent=1)
        return 0

    from qwenvl.model import Qwen25VL
    from qwenvl.train.loss import sft_loss_sum

    if a.narrow:
        config = narrow(config)
    model = Qwen25VL.random(config, torch.float32, "cpu", seed=0).train()
    rows = []
    while len(rows) < a.rows:
        rows += [b for b in loader.next_step() if b is not None and b["input_ids"].shape[1] > a.pack * a.min_fill]
    result["rows"] = []
    if a.compile:
        from qwenvl.train.trainer import compile_blocks

        compile_blocks(model)
        for batch in rows[:a.rows]:  # compiles (and recompiles for a new shape) outside the profiled run
            loss, n = sft_loss_sum(model, batch)
            (loss / max(n, 1)).backward()
            model.zero_grad(set_to_none=True)
    if a.host_only:
        for batch in rows[:a.rows]:
            info = describe(batch, {})
            info["host_ms"] = host_only(model, batch)
            result["rows"].append(info)
            print(json.dumps(info, indent=1))
        if a.json:
            json.dump(result, open(a.json, "w"), indent=1)
        return 0
    for r, batch in enumerate(rows[:a.rows]):
        info = describe(batch, {})
        timer = Timer()
        host_parts(timer)
        t0 = time.perf_counter()
        if a.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
                loss, n = sft_loss_sum(model, batch)
                if not a.no_backward:
                    (loss / max(n, 1)).backward()
        else:
            loss, n = sft_loss_sum(model, batch)
            t_fwd = time.perf_counter() - t0
            if not a.no_backward:
                (loss / max(n, 1)).backward()
            info["forward_s"] = round(t_fwd, 2)
        info["forward_backward_s"] = round(time.perf_counter() - t0, 2)
        timer.undo()
        model.zero_grad(set_to_none=True)
        info["host_ms"] = {k: round(v, 1) for k, v in sorted(timer.ms.items(), key=lambda kv: -kv[1])}
        if a.profile:
            by_name, by_fn, syncs = op_table(prof)
            info["leaf_ops"] = sum(by_name.values())
            info["ops_by_name"] = dict(by_name.most_common(40))
            info["ops_by_function"] = dict(by_fn.most_common(60))
            info["syncing_ops"] = dict(syncs.most_common())
        result["rows"].append(info)
        print(json.dumps(info, indent=1))
    if a.json:
        json.dump(result, open(a.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
