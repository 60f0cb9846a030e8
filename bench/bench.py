"""One GPU call that builds, checks and times everything: ours vs transformers on the same random weights.

    PYTHONPATH=. python bench/bench.py --shape 7b --out $OUT [--sections parity,vision,prefill,decode,engine]

Writes $OUT/results.json and prints a short table. Random bf16 weights at the real shapes: speed does not
depend on the values. The transformers model is loaded from the checkpoint our save_pretrained writes (the
Hub layout), so this also proves that transformers reads what we write.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import random
import shutil
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qwenvl  # noqa: E402
from qwenvl.model import Qwen25VL  # noqa: E402
from qwenvl.preprocess import VisionInput  # noqa: E402

IMG, VS, VE = 151655, 151652, 151653


def mm_kwargs(ids):
    """transformers 5 computes 3D positions only when told which tokens are image tokens."""
    import transformers

    return {"mm_token_type_ids": (ids == IMG).long()} if int(transformers.__version__.split(".")[0]) >= 5 else {}
RESULTS: dict = {}
REF_TOKENS: dict = {}
W4_REQUESTS = 256
TOKENIZER_DIR = None
OUT_DIR = "."  # greedy tokens of our reference path (Qwen25VL.generate), for the engine's check


def log(*a):
    print(*a, flush=True)


DEV = "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn, warmup=2, iters=5) -> float:
    """Median seconds of fn() (CUDA events on the GPU, wall clock on the CPU dry run)."""
    for _ in range(warmup):
        fn()
    sync()
    if DEV != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    return sorted(times)[len(times) // 2]


def image_request(cfg, n_text=64, h=720, w=1280, seed=0, frames=False):
    """Chat-shaped ids around one image of h x w px (smart-resized as the processor would) + a random image: its
    float32 pixel values, or with frames=True the resized uint8 image as the processor hands it to the engine (a
    VisionInput: H x W x 3 bytes; the engine hashes those and normalises/patchifies on the GPU). Same seed, same
    image either way."""
    rh, rw = round(h / 28) * 28, round(w / 28) * 28  # smart_resize for sizes inside the pixel limits
    grid = torch.tensor([[1, rh // 14, rw // 14]])
    n_img = int(grid.prod()) // 4
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(100, 150000, (n_text,), generator=g).tolist()
    ids = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, VS] + [IMG] * n_img + \
        [VE] + text + [151645, 198, 151644, 77091, 198]
    hwc = torch.randint(0, 256, (1, rh, rw, 3), dtype=torch.uint8, generator=g)  # as PIL's bytes
    image = VisionInput("image", hwc.permute(0, 3, 1, 2))
    return torch.tensor([ids]), image if frames else image.pixel_values, grid


def section(name):
    def wrap(fn):
        def run(*a, **k):
            log(f"--- {name}")
            t0 = time.time()
            try:
                fn(*a, **k)
            except Exception as e:  # one failing section must not lose the others
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            log(f"--- {name} done in {time.time() - t0:.1f}s")
        return run
    return wrap


@section("parity")
def parity(ours, hf, cfg):
    ids, pix, grid = image_request(cfg)
    ids, pix, grid = ids.to(DEV), pix.to(DEV), grid.to(DEV)
    with torch.no_grad():
        a = ours(ids, pixel_values=pix, image_grid_thw=grid).float()
        mm = mm_kwargs(ids)
        b = hf(input_ids=ids, pixel_values=pix, image_grid_thw=grid, **mm).logits.float()
        va = ours.visual(pix, grid).float()
        vb = hf.model.get_image_features(pix, grid)
        vb = (vb[0] if isinstance(vb, (list, tuple)) else getattr(vb, "pooler_output", vb))
        vb = torch.cat(list(vb)) if isinstance(vb, (list, tuple)) else vb
        vb = vb.float()
    # bf16 noise yardstick: the same weights in fp32 (ours matches transformers to 1e-6 in fp32 on the CPU).
    # Both bf16 models are compared against it; agreeing "to bf16 noise" means similar errors.
    ours.float()
    with torch.no_grad():
        ref = ours(ids, pixel_values=pix, image_grid_thw=grid).float()
        vref = ours.visual(pix, grid).float()
    ours.bfloat16()

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()

    RESULTS["parity"] = {
        "logits_rel_err_ours_vs_hf": rel(a, b), "logits_max_abs": (a - b).abs().max().item(),
        "logits_rel_err_ours_vs_fp32": rel(a, ref), "logits_rel_err_hf_vs_fp32": rel(b, ref),
        "top1_agree_ours_hf": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "top1_agree_ours_fp32": (a.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "top1_agree_hf_fp32": (b.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "vision_rel_err_ours_vs_hf": rel(va, vb), "vision_rel_err_ours_vs_fp32": rel(va, vref),
        "vision_rel_err_hf_vs_fp32": rel(vb, vref), "tokens": ids.shape[1],
    }
    log(json.dumps(RESULTS["parity"]))


@section("vision")
def vision(ours, hf, cfg):
    from qwenvl import layers

    _, pix, grid = image_request(cfg)
    pix, grid = pix.to(DEV), grid.to(DEV)
    res = {"flash_varlen": layers.flash_varlen_usable(torch.empty(1, 1, 80, device=DEV, dtype=ours.dtype))}
    with torch.no_grad():
        res["ours_model"] = cuda_time(lambda: ours.visual(pix, grid)) * 1e3
        fast = ours.visual(pix, grid).float()
        saved, layers._flash_varlen = layers._flash_varlen, None  # the padded-SDPA path, for the record
        try:
            res["ours_padded_sdpa"] = cuda_time(lambda: ours.visual(pix, grid)) * 1e3
            padded = ours.visual(pix, grid).float()
        finally:
            layers._flash_varlen = saved
        res["flash_vs_padded_rel_err"] = ((fast - padded).norm() / padded.norm()).item()
        if DEV == "cuda":  # the engine's path: the ViT replayed from a CUDA graph of this grid (vision_graphs.py)
            from qwenvl.engine.vision_graphs import VisionGraphs
            glist = [tuple(g) for g in grid.tolist()]  # host grids, as the engine passes them
            graphs = VisionGraphs(ours.visual)
            graphed = [graphs(pix, glist) for _ in range(2)][-1].float()  # eager, then captured
            res["ours_cuda_graph"] = cuda_time(lambda: graphs(pix, glist)) * 1e3
            res["cuda_graph_captured"] = graphs.replays > 0
            res["cuda_graph_vs_eager_rel_err"] = ((graphed - fast).norm() / fast.norm()).item()
            visual = copy.deepcopy(ours.visual)  # + the MLP padded onto Hopper's kernels (eager: no gain, 43 -> 49 ms)
            if visual.pad_mlp_hidden():
                padded_graphs = VisionGraphs(visual)
                [padded_graphs(pix, glist) for _ in range(2)]
                res["ours_cuda_graph_padded_mlp"] = cuda_time(lambda: padded_graphs(pix, glist)) * 1e3
            del visual
        if hf is not None:
            res["transformers"] = cuda_time(lambda: hf.model.get_image_features(pix, grid)) * 1e3
    RESULTS["vision_1280x720_ms"] = res
    log(res)


@section("prefill")
def prefill(ours, hf, cfg):
    ids, pix, grid = image_request(cfg)
    ids, pix, grid = ids.to(DEV), pix.to(DEV), grid.to(DEV)
    mm = mm_kwargs(ids)
    with torch.no_grad():
        t_ours = cuda_time(lambda: ours.lm_head(ours.hidden_states(ids, pixel_values=pix, image_grid_thw=grid)[:, -1]))
        t_hf = cuda_time(lambda: hf(input_ids=ids, pixel_values=pix, image_grid_thw=grid, **mm,
                                    logits_to_keep=1)) if hf is not None else None
    RESULTS["ttft_ms"] = {"ours_model": t_ours * 1e3, "transformers": t_hf and t_hf * 1e3}
    log(RESULTS["ttft_ms"])


@section("decode")
def decode(ours, hf, cfg, new_tokens=128):
    ids, pix, grid = image_request(cfg)
    ids, pix, grid = ids.to(DEV), pix.to(DEV), grid.to(DEV)
    mm = mm_kwargs(ids)
    res = {}
    with torch.no_grad():
        sync()
        t0 = time.time()
        out = ours.generate(ids, pixel_values=pix, image_grid_thw=grid, max_new_tokens=new_tokens, eos_token_id=[])
        sync()
        res["ours_model_tok_s"] = out.shape[1] / (time.time() - t0)
        REF_TOKENS["w1"] = out[0].tolist()
        if hf is not None:
            if DEV == "cuda":  # W5 baseline: transformers' own weights + what its W1 generate adds at the peak
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t0 = time.time()
            ref = hf.generate(input_ids=ids, pixel_values=pix, image_grid_thw=grid, **mm,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            sync()
            res["transformers_tok_s"] = (ref.shape[1] - ids.shape[1]) / (time.time() - t0)
            if DEV == "cuda":
                res["transformers_w1_peak_gib"] = (param_bytes(hf) + torch.cuda.max_memory_allocated() - before) / GIB
            ref = ref[:, ids.shape[1]:]
            n = min(ref.shape[1], out.shape[1])
            same = (ref[0, :n] == out[0, :n]).long()
            res["greedy_same_prefix"] = int(same.cumprod(0).sum())
    RESULTS["decode_b1"] = res
    log(res)


def w4_requests(cfg, n=256, seed=1, frames=False, image_seed=1000):
    """W4: each request one image between 448x448 and 1280x720, 32-128 text tokens, 128-256 output tokens.
    image_seed: another value gives the same request shapes with other pixels (nothing cached from a first run)."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        h, w = rng.randint(448, 720), rng.randint(448, 1280)
        ids, pix, grid = image_request(cfg, n_text=rng.randint(32, 128), h=h, w=w, seed=image_seed + i, frames=frames)
        reqs.append((ids, pix, grid, rng.randint(128, 256)))
    return reqs


@section("batch_hf")
def batch_hf(ours, hf, cfg, n=32, new_tokens=192):
    """The issue's transformers baseline for W4: one left-padded generate over 32 of the W4 requests."""
    reqs = w4_requests(cfg, n=n)
    L = max(r[0].shape[1] for r in reqs)
    ids = torch.full((n, L), 151643, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.long)
    for i, r in enumerate(reqs):
        ids[i, L - r[0].shape[1]:] = r[0][0]
        mask[i, L - r[0].shape[1]:] = 1
    pix = torch.cat([r[1] for r in reqs]).to(DEV, torch.bfloat16 if DEV == "cuda" else torch.float32)
    grid = torch.cat([r[2] for r in reqs]).to(DEV)
    ids, mask = ids.to(DEV), mask.to(DEV)
    with torch.no_grad():
        sync()
        t0 = time.time()
        out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, image_grid_thw=grid, **mm_kwargs(ids),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync()
        dt = time.time() - t0
    RESULTS["w4_transformers"] = {"requests": n, "new_tokens_each": new_tokens,
                                  "output_tok_s": n * (out.shape[1] - L) / dt, "seconds": dt}
    log(RESULTS["w4_transformers"])


def profile_table(prof, rows: int = 25, device: bool = True) -> str:
    """The profiler's top ops by self device time (by self CPU time on the CPU dry run, or device=False)."""
    key = "self_cuda_time_total" if device and DEV == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def device_timeline(prof, top: int = 12) -> dict:
    """From a profile of one request: the span from the first to the last device activity, the time the device
    was busy (union of kernels and copies), and the largest idle gaps with the activity before and after each
    (what the GPU waited for: the host, a copy, a sync)."""
    from torch.autograd import DeviceType

    ev = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start), key=lambda t: t[0])
    if not ev:
        return {}
    busy, gaps, cur_s, cur_e, prev = 0.0, [], ev[0][0], ev[0][1], ev[0][2]
    for s_, e_, name in ev[1:]:
        if s_ > cur_e:
            busy += cur_e - cur_s
            gaps.append((s_ - cur_e, prev[:60], name[:60]))
            cur_s = s_
        if e_ >= cur_e:
            cur_e, prev = e_, name
    busy += cur_e - cur_s
    gaps.sort(reverse=True)
    return {"span_ms": (ev[-1][1] - ev[0][0]) / 1e3, "busy_ms": busy / 1e3, "activities": len(ev),
            "idle_ms": sum(g[0] for g in gaps) / 1e3,
            "largest_gaps": [{"us": round(g[0], 1), "after": g[1], "before": g[2]} for g in gaps[:top]]}


def profile_request(llm, rid, prompt, params, name) -> dict:
    """One request alone under the profiler: its kernel table (by device time) to OUT/{name}.txt, and the device
    timeline summary (device_timeline) with the request's wall time."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        ttft, dec, toks = drive(llm, rid, prompt, params)
        sync()
    res = {"ttft_ms": ttft * 1e3, "decode_ms": dec * 1e3, "tokens": len(toks), **device_timeline(p)}
    with open(os.path.join(OUT_DIR, name + ".txt"), "w") as f:
        f.write(json.dumps(res, indent=1) + "\n" + profile_table(p, rows=40) + "\n" + profile_table(p, rows=25, device=False))
    return res


def decode_gaps(llm, rid, prompt, params) -> dict:
    """One request alone with CUDA events around each decode graph replay (no profiler: its host overhead would
    make the loop host-bound): per step the replay's device time and the device time from the end of one replay
    to the start of the next (sampling, input copies, and any wait for the host), medians in ms."""
    r = llm.runner
    if not r.graphs:
        return {}
    marks = []
    real = r._replay_decode

    def replay(*a, **k):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        out = real(*a, **k)
        e.record()
        marks.append((s, e))
        return out

    r._replay_decode = replay
    try:
        ttft, dec, toks = drive(llm, rid, prompt, params)
        sync()
    finally:
        r._replay_decode = real
    step = [s.elapsed_time(e) for s, e in marks]
    between = [marks[i][1].elapsed_time(marks[i + 1][0]) for i in range(len(marks) - 1)]
    med = lambda v: sorted(v)[len(v) // 2] if v else None  # noqa: E731
    return {"steps": len(marks), "tok_s": (len(toks) - 1) / dec, "ms_per_token": 1e3 * dec / (len(toks) - 1),
            "replay_ms_median": med(step), "between_ms_median": med(between),
            "between_ms_p90": sorted(between)[int(0.9 * len(between))] if between else None}


def instrument(llm) -> dict:
    """Split an engine run into host prompt encoding, ViT, prefill/mixed steps and decode-only steps. The syncs
    around every step stop the host preparing the next step while the GPU runs this one, so a hooked run is slower
    than an unhooked one (W4 3,489 against 4,592 tok/s on an H100, 2026-12-06): time with it off."""
    prof = {"encode_prompt_s": 0.0, "vision_s": 0.0, "decode_steps": 0, "decode_s": 0.0, "mixed_steps": 0,
            "mixed_s": 0.0}
    r = llm.runner
    ev, ex, enc = r._encode_vision, r.execute, llm._encode_all  # the batch's prompts (on several threads): wall time

    def timed(key, fn):
        def run(*a):
            sync()
            t = time.perf_counter()
            out = fn(*a)
            sync()
            prof[key] += time.perf_counter() - t
            return out
        return run

    def execute(chunks):
        kind = "decode" if all(c.is_decode for c in chunks) else "mixed"
        prof[kind + "_steps"] += 1
        if kind == "mixed" and prof["mixed_steps"] == 4 and DEV == "cuda":  # one steady mixed step, profiled
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                out = timed(kind + "_s", ex)(chunks)
            prof["profiled_step"] = {"tokens": sum(c.num_tokens for c in chunks), "chunks": len(chunks),
                                     "decode_rows": sum(c.is_decode for c in chunks)}
            with open(os.path.join(OUT_DIR, "mixed_step_profile.txt"), "w") as f:
                f.write(profile_table(p, rows=30) + "\n" + profile_table(p, rows=30, device=False) + "\n")
            return out
        return timed(kind + "_s", ex)(chunks)

    r._encode_vision, r.execute, llm._encode_all = timed("vision_s", ev), execute, timed("encode_prompt_s", enc)
    return prof


def time_options(options: dict) -> dict:
    """Milliseconds of each fn() in options, and its output's relative error against the first one that ran;
    an option that fails is noted with its error."""
    out, ref = {}, None
    for name, fn in options.items():
        try:
            y = fn()
            y = (y[0] if isinstance(y, tuple) else y).float()
            ref = y if ref is None else ref
            out[name] = round(cuda_time(fn, warmup=3, iters=20) * 1e3, 4)
            out[name + "_rel_err"] = round(((y - ref).norm() / ref.norm()).item(), 5)
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e)[:120]}"
    return out


def sdpa_backends(n: int, vcfg) -> dict:
    """Milliseconds of one ViT full-attention SDPA over n patches ([1, heads, n, head_dim], as
    layers.varlen_attention calls it for one segment) under each SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(n, vcfg.num_heads, vcfg.head_dim, generator=g, device=DEV, dtype=torch.bfloat16)
               for _ in range(3))
    args = [x.transpose(0, 1)[None] for x in (q, k, v)]

    def run(backend):
        def fn():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(*args)
        return fn

    return time_options({name: run(getattr(SDPBackend, name))
                         for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")})


def prefill_attention_options(n: int, tcfg) -> dict:
    """Milliseconds of one decoder layer's causal prefill attention over n new tokens (W2: start 0) per way of
    running it: heads expanded for GQA then SDPA under each backend, SDPA's enable_gqa, and FlashAttention varlen
    with the grouped k/v as they are; each checked against the first."""
    import qwenvl.layers as layers
    from qwenvl.engine import attention as A
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, KV, D = tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.head_dim
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(n, H, D, generator=g, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(n, KV, D, generator=g, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))
    rep = H // KV

    def expanded(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qh, kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1),
                                                      is_causal=True)[0].transpose(0, 1)
        return run

    def gqa(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        return run

    cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    options = {"expanded_flash": expanded(SDPBackend.FLASH_ATTENTION),
               "expanded_cudnn": expanded(SDPBackend.CUDNN_ATTENTION),
               "gqa_flash": gqa(SDPBackend.FLASH_ATTENTION), "gqa_cudnn": gqa(SDPBackend.CUDNN_ATTENTION),
               "gqa_efficient": gqa(SDPBackend.EFFICIENT_ATTENTION),
               "varlen_gqa": lambda: layers._flash_varlen(q, k, v, cu, cu, n, n, **layers._causal_kwargs()),
               "engine_lone_prefill": lambda: A.prefill_attention(q, k, v, None, None, None, 0, gqa_flash=True)}
    out = time_options(options)
    # host time of cuDNN's first call at a new length (it builds an execution plan per shape), then a repeat
    for m in (n + 300, n + 300):
        qm, km, vm = (x[:1].expand(m, -1, -1).transpose(0, 1)[None] for x in (q, k, v))
        sync()
        t0 = time.perf_counter()
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(qm, km, vm, is_causal=True, enable_gqa=True)
        sync()
        out.setdefault(f"cudnn_first_and_repeat_call_at_{m}_rows_wall_ms", []).append(
            round((time.perf_counter() - t0) * 1e3, 3))
    return out


def decode_attention_options(batch: int, ctx: int, tcfg, block_size: int = 16) -> dict:
    """Microseconds per layer of the paged decode attention (batch sequences of ctx tokens each), each option
    28 calls in one CUDA graph as a decode step runs them (a lone launch would time Triton's host launch cost):
    the kernel + the compiled merge of its splits, the in-kernel merge, and the in-kernel merge at other split
    counts; each output checked against the first option."""
    from qwenvl.engine import attention as A
    from qwenvl.engine.fused import DecoderOps

    H, KV, D = tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.head_dim
    g = torch.Generator(device=DEV).manual_seed(0)
    nblk = -(-ctx // block_size)
    kp, vp = (torch.randn(batch * nblk + 1, block_size, KV, D, generator=g, device=DEV, dtype=torch.bfloat16)
              for _ in range(2))
    q = torch.randn(batch, H, D, generator=g, device=DEV, dtype=torch.bfloat16)
    bt = torch.randperm(batch * nblk, generator=g, device=DEV).view(batch, nblk).int()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    ops = DecoderOps(H, KV, D, 1e-6, compiled=True)
    default = A.num_splits_for(batch, KV, DEV)

    def graphed(**kw):
        fn = lambda: A.decode_attention_triton(q, kp, vp, bt, lens, merge=ops.merge_splits, **kw)  # noqa: E731
        for _ in range(3):
            fn()
        sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [fn() for _ in range(28)]

        def run():
            graph.replay()
            return outs[-1]
        return run

    options = {f"merge_apart_s{default}": graphed(num_splits=default),
               f"merge_in_kernel_s{default}": graphed(num_splits=default, fused_merge=True)}
    for s in sorted({8, 16, 24, 32, 48} - {default}):
        options[f"merge_in_kernel_s{s}"] = graphed(num_splits=s, fused_merge=True)
    options["merge_in_kernel_s32_n32"] = graphed(num_splits=32, fused_merge=True, block_n=32)
    ms = time_options(options)
    return {k: (round(v * 1e3 / 28, 2) if isinstance(v, float) and not k.endswith("_rel_err") else v)
            for k, v in ms.items()}


@section("vision_profile")
def vision_profile(ours, hf, cfg):
    """Where the ViT's time goes (top kernels), and what torch.compile of the blocks would give."""
    from torch.profiler import ProfilerActivity, profile

    _, pix, grid = image_request(cfg)
    pix, grid = pix.to(DEV), grid.to(DEV)
    RESULTS["vision_profile"] = res = {}  # what was measured survives a failure further on
    with torch.no_grad():
        eager = ours.visual(pix, grid).float()
        sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
        with profile(activities=acts) as prof:
            ours.visual(pix, grid)
            sync()
        table = profile_table(prof)
        with open(os.path.join(OUT_DIR, "vision_profile.txt"), "w") as f:
            f.write(table)
        log(table[:6000])
        res["eager_unpadded_ms"] = cuda_time(lambda: ours.visual(pix, grid)) * 1e3
        visual = copy.deepcopy(ours.visual)  # padded and compiled here only: later sections get ours as it is
        res["padded"] = visual.pad_mlp_hidden()
        res["padded_ms"] = cuda_time(lambda: visual(pix, grid)) * 1e3
        padded = visual(pix, grid).float()
        res["padded_vs_unpadded_rel_err"] = ((padded - eager).norm() / eager.norm()).item()
        with profile(activities=acts) as prof:
            visual(pix, grid)
            sync()
        with open(os.path.join(OUT_DIR, "vision_profile_padded.txt"), "w") as f:
            f.write(profile_table(prof))
        for b in visual.blocks:
            b.compile()
        t0 = time.time()
        compiled = visual(pix, grid).float()
        res["compile_s"] = time.time() - t0
        res["compiled_blocks_ms"] = cuda_time(lambda: visual(pix, grid)) * 1e3
        res["compiled_vs_eager_rel_err"] = ((compiled - eager).norm() / eager.norm()).item()
        with profile(activities=acts) as prof:  # the engine's ViT kernels (compiled, padded), launched eagerly
            visual(pix, grid)
            sync()
        with open(os.path.join(OUT_DIR, "vision_profile_compiled.txt"), "w") as f:
            f.write(profile_table(prof, rows=40))
        if DEV == "cuda":  # the full-attention blocks' one-segment SDPA (4 of 32 blocks) under each backend
            res["full_attention_backends_ms"] = sdpa_backends(pix.shape[0], ours.visual.config)
            log(res["full_attention_backends_ms"])
        if DEV == "cuda":  # compiled + padded blocks replayed from a CUDA graph: fused elementwise work, no launches
            from qwenvl.engine.vision_graphs import VisionGraphs
            glist = [tuple(g) for g in grid.tolist()]
            graphs = VisionGraphs(visual)
            [graphs(pix, glist) for _ in range(2)]  # eager, then captured
            res["compiled_blocks_cuda_graph_ms"] = cuda_time(lambda: graphs(pix, glist)) * 1e3
            res["compiled_blocks_cuda_graph_captured"] = graphs.replays > 0
        del visual
    log(res)


def drive(llm, rid, prompt, params):
    """One request alone through add_request/step: (time to first token, decode seconds after it, tokens)."""
    t0 = time.perf_counter()
    llm.add_request(rid, prompt, params)
    first, toks = None, []
    while llm.has_unfinished():
        for o in llm.step():
            if o.new_token_ids and first is None:
                first = time.perf_counter()
            toks += o.new_token_ids
    return first - t0, time.perf_counter() - first, toks


def frames_prompt(ids, image) -> dict:
    """The engine's prompt for image_request(..., frames=True): the uint8 image on the host, as the processor gives
    it (a fresh VisionInput per call, so its content hash is computed in every encode_prompt, as for a new request)."""
    return {"prompt_token_ids": ids[0].tolist(), "images": [VisionInput("image", image.frames)]}


def timed_generate(llm, prompts, params):
    """(outputs, seconds, output tokens) of one llm.generate over all prompts at once, synchronised around it."""
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    return outs, time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


@section("engine")
def engine(ours, hf, cfg, w1_tokens=256):
    from qwenvl.engine import LLM, SamplingParams

    processor = None
    if TOKENIZER_DIR:  # outputs are detokenized (streamed text) as a server would, not just token ids
        import types

        from qwenvl.tokenizer import Tokenizer

        processor = types.SimpleNamespace(tokenizer=Tokenizer.from_pretrained(TOKENIZER_DIR))
    # the ViT as it is before the engine compiles its blocks (QWENVL_COMPILE_VIT), for W3's comparison
    eager_visual = copy.deepcopy(ours.visual) if DEV == "cuda" else None
    t0 = time.time()
    llm = LLM(ours, max_model_len=8192, max_num_seqs=256, gpu_memory_utilization=0.9, processor=processor)
    res = {"init_s": time.time() - t0, "detokenize": processor is not None, "stats": llm.stats(),
           "compile_ops_dynamic": llm.runner.ops.dynamic,
           "vit_blocks_compiled": bool(getattr(ours.visual, "_engine_compiled", False))}
    ids, pix, grid = image_request(cfg, frames=True)
    with torch.no_grad():  # W3: the ViT as the engine runs it, one 1280x720 image (a graph replay once the size repeats)
        pv, glist = pix.pixel_values.to(DEV), [tuple(g) for g in grid.tolist()]
        vg = llm.runner.vision_graphs
        res["w3_vision_ms"] = cuda_time(lambda: vg(pv, glist) if vg is not None else ours.visual(pv, grid)) * 1e3
        res["w3_vision_eager_module_ms"] = cuda_time(lambda: ours.visual(pv, grid)) * 1e3
        if vg is not None and eager_visual is not None:  # the same graphs over eager blocks, for comparison
            from qwenvl.engine.vision_graphs import VisionGraphs
            eager_visual.pad_mlp_hidden()  # as the engine pads its model
            eg = VisionGraphs(eager_visual)
            want = vg(pv, glist).float()
            got = [eg(pv, glist) for _ in range(2)][-1].float()  # eager, then captured
            res["w3_vision_graph_eager_blocks_ms"] = cuda_time(lambda: eg(pv, glist)) * 1e3
            res["w3_eager_vs_compiled_blocks_rel_err"] = ((got - want).norm() / want.norm()).item()
        del eager_visual
    log(res)
    greedy = dict(temperature=0.0, ignore_eos=True)

    # Greedy check against the reference path (same request as the decode section), also the warm-up.
    ref = REF_TOKENS.get("w1")
    _, _, toks = drive(llm, "check", frames_prompt(ids, pix), SamplingParams(max_tokens=len(ref or [0] * 128), **greedy))
    if ref:
        same = 0
        for a_, b_ in zip(toks, ref):
            if a_ != b_:
                break
            same += 1
        res["greedy_same_prefix_vs_reference_path"] = f"{same}/{len(ref)}"
    # One more warm-up request with a new image of this size: on the H200 (2026-12-05) the first new image after the
    # check took 141.5 ms to its first token and the next one 80.7 ms; kept to see whether that was a one-off.
    wids, wpix, _ = image_request(cfg, seed=6, frames=True)
    ttft, _, _ = drive(llm, "warm", frames_prompt(wids, wpix), SamplingParams(max_tokens=1, **greedy))
    res["w2_ttft_warmup_new_image_ms"] = ttft * 1e3
    # W1 + W2: a fresh image (new content hash: ViT runs, nothing cached), then the same request again.
    ids, pix, grid = image_request(cfg, seed=7, frames=True)
    ttft, dec, toks = drive(llm, "w1", frames_prompt(ids, pix), SamplingParams(max_tokens=w1_tokens, **greedy))
    res["w1_decode_tok_s"] = (len(toks) - 1) / dec
    res["w2_ttft_new_image_ms"] = ttft * 1e3
    t0 = time.perf_counter()
    p = llm.encode_prompt(frames_prompt(ids, pix))
    res["w2_of_which_host_encode_prompt_ms"] = (time.perf_counter() - t0) * 1e3
    ttft, _, _ = drive(llm, "w2", frames_prompt(ids, pix), SamplingParams(max_tokens=1, **greedy))
    res["w2_ttft_cached_image_ms"] = ttft * 1e3
    ids, pix, grid = image_request(cfg, n_text=64, seed=8, frames=True)
    ttft, _, _ = drive(llm, "w2b", frames_prompt(ids, pix), SamplingParams(max_tokens=1, **greedy))
    res["w2_ttft_new_image_2_ms"] = ttft * 1e3
    if DEV == "cuda" and hasattr(llm, "_stage_frames"):
        # the pinned staging of new frames in the hashing threads (QWENVL_STAGE_FRAMES) on, then off: two more new
        # images each, alternated, in the same engine; the default put back after
        default = llm._stage_frames
        for stage, seed in ((True, 12), (False, 13), (True, 14), (False, 15)):
            llm._stage_frames = stage
            ids, pix, grid = image_request(cfg, n_text=64, seed=seed, frames=True)
            ttft, _, _ = drive(llm, f"w2s{seed}", frames_prompt(ids, pix), SamplingParams(max_tokens=1, **greedy))
            res.setdefault(f"w2_ttft_new_image_staging_{'on' if stage else 'off'}_ms", []).append(ttft * 1e3)
        llm._stage_frames = default
    log(res)
    # where W2's and W1's time goes: a new image to its first token; 32 decode steps
    ids, pix, grid = image_request(cfg, n_text=64, seed=10, frames=True)
    res["w2_profile"] = profile_request(llm, "w2p", frames_prompt(ids, pix), SamplingParams(max_tokens=1, **greedy),
                                        "w2_profile")
    res["w1_profile_32_tokens"] = profile_request(llm, "w1p", frames_prompt(ids, pix),
                                                  SamplingParams(max_tokens=33, **greedy), "w1_profile")
    log({k: res[k] for k in ("w2_profile", "w1_profile_32_tokens")})
    if DEV == "cuda":
        res["prefill_attention_1281_ms"] = prefill_attention_options(1281, cfg.text)
        log(res["prefill_attention_1281_ms"])
        for b, n in ((1, 1400), (64, 600)):
            try:
                res[f"decode_attention_b{b}_ctx{n}_us"] = decode_attention_options(b, n, cfg.text)
            except Exception as e:  # an option that cannot be captured must not cost the rest of the section
                res[f"decode_attention_b{b}_ctx{n}_us"] = f"{type(e).__name__}: {str(e)[:200]}"
            log(res[f"decode_attention_b{b}_ctx{n}_us"])
        ids, pix, grid = image_request(cfg, n_text=64, seed=11, frames=True)
        res["w1_decode_gaps"] = decode_gaps(llm, "w1g", frames_prompt(ids, pix),
                                            SamplingParams(max_tokens=w1_tokens, **greedy))
        log(res["w1_decode_gaps"])
    # W4: 256 requests at once, timed with nothing hooked in (the time split below syncs around every step, which
    # stops the host running ahead of the GPU: on the H100 on 2026-12-06 the hooked run gave 3,489 tok/s where an
    # unhooked one gave 4,592).
    reqs = w4_requests(cfg, n=W4_REQUESTS, frames=True)
    prompts = [frames_prompt(*r[:2]) for r in reqs]
    params = [SamplingParams(max_tokens=r[3], **greedy) for r in reqs]
    outs, dt, n_out = timed_generate(llm, prompts, params)
    res["w4_output_tok_s"] = n_out / dt
    res["w4"] = {"requests": len(reqs), "output_tokens": n_out, "seconds": dt,
                 "prompt_tokens": sum(r[0].shape[1] for r in reqs)}

    def w4_again(image_seed):  # the same request shapes, other pixels (nothing cached)
        reqs2 = w4_requests(cfg, n=W4_REQUESTS, frames=True, image_seed=image_seed)
        _, dt2, n_out2 = timed_generate(llm, [frames_prompt(*r[:2]) for r in reqs2],
                                        [SamplingParams(max_tokens=r[3], **greedy) for r in reqs2])
        return n_out2 / dt2

    if DEV == "cuda" and hasattr(llm, "_stage_frames") and os.environ.get("BENCH_W4_STAGING") == "1":
        # the pinned staging of new frames switched the other way, back, and the other way again (alternated, so
        # neither setting gets all the warm runs). Opt-in since 2026-12-06: over three calls the faster setting was
        # whichever ran 2nd and 4th (docs/BENCHMARKS.md, eleventh session): no effect to measure, ~30 s per call
        default = llm._stage_frames
        key = lambda on: f"w4_output_tok_s_staging_{'on' if on else 'off'}"
        res[key(default)] = [res["w4_output_tok_s"]]
        for stage, seed in ((not default, 5000), (default, 6000), (not default, 7000)):
            llm._stage_frames = stage
            res.setdefault(key(stage), []).append(w4_again(seed))
        res["w4_default_staging"] = default
        llm._stage_frames = default
    # where W4's time goes (a run on other pixels, hooked: its tok/s is lower than the timed runs')
    prof = instrument(llm)
    res["w4_hooked_output_tok_s"] = w4_again(8000)
    res["w4"].update(time_split=prof, stats_after=llm.stats())
    RESULTS["engine"] = res
    log(res)
    on = [o.outputs[0].token_ids[:32] for o in outs]
    W4_FIRST_TOKENS[:] = on
    del llm, outs
    release()
    skip = set(os.environ.get("BENCH_SKIP", "").split(","))  # e.g. BENCH_SKIP=fast_paths,w5 for a short call
    if "fast_paths" not in skip:
        res["fast_paths_check"] = fast_paths_check(ours, prompts, [r[0].shape[1] for r in reqs], greedy, on)
        log(res["fast_paths_check"])
        release()
    if "w5" not in skip:
        res["w5"] = w5_memory(ours, frames_prompt(ids, pix), SamplingParams(max_tokens=w1_tokens, **greedy))
        log(res["w5"])


W4_FIRST_TOKENS: list = []  # the engine section's W4 first 32 tokens per request, for engine_eager_ops


@contextlib.contextmanager
def env_vars(values: dict):
    """The environment variables in `values` set inside (engines read their switches when built), then restored."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compile_ops_env(value: str):
    """QWENVL_COMPILE_OPS and QWENVL_COMPILE_VIT (the engine's compiled decoder ops and ViT blocks) set to `value`
    while engines are built inside, then restored."""
    return env_vars({"QWENVL_COMPILE_OPS": value, "QWENVL_COMPILE_VIT": value})


@section("engine_eager_ops")
def engine_eager_ops(ours, hf, cfg, w1_tokens=256):
    """W1, W2 and W4 again with QWENVL_COMPILE_OPS=0 and QWENVL_COMPILE_VIT=0: the decoder's norms, rotary, SwiGLU
    and split-K merge, and the ViT blocks' elementwise work, as eager kernels instead of the default
    inductor-compiled ones (engine/fused.py, engine/vision_graphs.py), in the same process as the
    engine section. W4's first 32 tokens are compared with the engine section's (compiled) ones."""
    from qwenvl.engine import LLM, SamplingParams

    greedy = dict(temperature=0.0, ignore_eos=True)
    with compile_ops_env("0"):
        t0 = time.time()
        llm = LLM(ours, max_model_len=8192, max_num_seqs=256, gpu_memory_utilization=0.9)
        res = {"init_s": time.time() - t0, "compiled_ops": llm.stats()["compiled_ops"]}

    ids, pix, _ = image_request(cfg, frames=True)
    drive(llm, "warm", frames_prompt(ids, pix), SamplingParams(max_tokens=32, **greedy))
    ids, pix, _ = image_request(cfg, seed=9, frames=True)
    ttft, dec, toks = drive(llm, "w1", frames_prompt(ids, pix), SamplingParams(max_tokens=w1_tokens, **greedy))
    res["w1_decode_tok_s"] = (len(toks) - 1) / dec
    res["w2_ttft_new_image_ms"] = ttft * 1e3
    reqs = w4_requests(cfg, n=W4_REQUESTS, frames=True)
    outs, dt, n_out = timed_generate(llm, [frames_prompt(*r[:2]) for r in reqs],
                                     [SamplingParams(max_tokens=r[3], **greedy) for r in reqs])
    res["w4_output_tok_s"] = n_out / dt
    if W4_FIRST_TOKENS:
        same = sum(o.outputs[0].token_ids[:32] == t for o, t in zip(outs, W4_FIRST_TOKENS))
        res["w4_same_first_32_as_compiled_ops"] = f"{same}/{len(outs)}"
    RESULTS["engine_eager_ops"] = res
    log(res)
    del llm, outs
    release()


GIB = 2 ** 30


def param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def release():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def slow_run(ours, prompts, greedy, n_first=32, chat=False, max_num_seqs=256, **llm_kw):
    """The engine with its fast paths off (no CUDA graphs, no Triton paged decode, no compiled decoder ops or ViT
    blocks, no RMSNorm / silu / residual inside the GEMVs, padded SDPA instead of FlashAttention varlen in the ViT):
    the first n_first greedy tokens of every prompt, their top-2 logprobs and the engine's stats. With
    batch_invariant=True in llm_kw the ViT keeps its attention kernel (the mode fixes its kernels; what differs is
    the batching, the prefill chunks and the CUDA graphs)."""
    import qwenvl.layers as layers
    from qwenvl.engine import LLM, SamplingParams

    saved = layers._flash_varlen
    invariant = bool(llm_kw.get("batch_invariant"))
    try:
        if not invariant:
            layers._flash_varlen = None
        with compile_ops_env("0") if not invariant else contextlib.nullcontext():
            llm = LLM(ours, max_model_len=8192, max_num_seqs=max_num_seqs, gpu_memory_utilization=0.9,
                      enable_cuda_graphs=False, **llm_kw)
        llm.runner.use_triton = False
        llm.runner.fused_gemv = False  # (on by default since 6e1fb99: the off run stays as it was before)
        # top-2 logprobs: where a request parts, how close its two best tokens were there
        params = [SamplingParams(max_tokens=n_first, logprobs=2, **greedy) for _ in prompts]
        outs = llm.chat(prompts, params) if chat else llm.generate(prompts, params)
        off = [o.outputs[0].token_ids[:n_first] for o in outs]
        off_lps = [o.outputs[0].logprobs or [] for o in outs]
        stats = llm.stats()
        stats["prompt_lens"] = [len(o.prompt_token_ids) for o in outs]
        del llm, outs
    finally:
        layers._flash_varlen = saved
    return off, off_lps, stats


def agreement(on, off, off_lps, prompt_lens) -> dict:
    """How many requests have the same first tokens in `on` and `off`; where they part, the `off` run's logprob gap
    between its token and the other run's (same prefix up to there): a near tie is a gap bf16 rounding can flip."""
    diverge = []
    for i, (a, b) in enumerate(zip(on, off)):
        n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if n is not None or len(a) != len(b):
            d = {"request": i, "first_diverging_token": n if n is not None else min(len(a), len(b)),
                 "prompt_tokens": int(prompt_lens[i])}
            d.update(divergence_margin(a, b, off_lps[i], n))
            diverge.append(d)
    same = len(on) - len(diverge)
    margins = sorted(d["top2_margin"] for d in diverge if "top2_margin" in d)
    return {"requests": len(on), "same_first_32": same, "fraction": same / len(on), "target": 0.95,
            "diverging_at_the_slow_runs_second_choice": sum(d.get("fast_token_is_second_choice", False)
                                                            for d in diverge),
            "divergence_top2_margin_quantiles": {q: margins[min(len(margins) - 1, int(q * len(margins)))]
                                                 for q in (0.5, 0.9, 0.99)} if margins else None,
            "diverging": diverge[:20]}


def fast_paths_check(ours, prompts, prompt_lens, greedy, on, n_first=32, chat=False, **llm_kw):
    """The issue's bf16 check: the first 32 greedy tokens of every W4 request with the engine's fast paths off
    (slow_run) vs on. `on`: the first tokens of the fast run; the slow run is a fresh engine over the same weights
    (`ours`: a model or a checkpoint folder, `llm_kw` to LLM) and prompts (conversations for llm.chat where `chat`).
    Near-ties in bf16 make a few differ."""
    t0 = time.perf_counter()
    off, off_lps, stats_off = slow_run(ours, prompts, greedy, n_first, chat, **llm_kw)
    res = agreement(on, off, off_lps, prompt_lens)
    res.update(fast_off={k: stats_off.get(k) for k in ("cuda_graph_batch_sizes", "triton_decode")},
               seconds=time.perf_counter() - t0)
    return res


def nano_suite_prompts(n_per_task: int):
    """The held-out nano suite's conversations (n_per_task of each task), the dtype to run them in, greedy params."""
    from qwenvl.evaluate.cli import suite_data
    from qwenvl.evaluate.harness import load_samples, prompt_messages

    convs = [prompt_messages(r, b) for r, b in load_samples(suite_data("nano", n_per_task))]
    return convs, torch.bfloat16 if DEV == "cuda" else torch.float32, dict(temperature=0.0, ignore_eos=True)


def fast_run(path, convs, greedy, n_first, dtype, **llm_kw):
    """The engine as configured (fast paths on unless the environment or llm_kw say otherwise): the first n_first
    greedy tokens of every conversation, the prompt lengths, and the engine's switches (stats without counters)."""
    from qwenvl.engine import LLM, SamplingParams

    llm = LLM(path, dtype=dtype, device=DEV, max_model_len=8192, max_num_seqs=256, gpu_memory_utilization=0.5,
              **llm_kw)
    outs = llm.chat(convs, SamplingParams(max_tokens=n_first, **greedy))
    on = [o.outputs[0].token_ids[:n_first] for o in outs]
    lens = [len(o.prompt_token_ids) for o in outs]
    stats = {k: v for k, v in llm.stats().items() if not k.startswith("num_")}
    del llm, outs
    return on, lens, stats


def fast_paths_trained(path: str = "runs/nano/latest", n_per_task: int = 24, n_first: int = 32) -> dict:
    """The fast-paths check on a TRAINED model, where greedy tokens are not the near ties of random weights: the
    nano model (docs/NANO.md) in bf16 on the held-out nano suite's prompts (its 11 tasks, images and clips), the
    first 32 greedy tokens with the engine's fast paths on (as configured by default) and off; with the logits in
    bf16 (QWENVL_FP32_LOGITS=0, both runs) and in fp32 (the default on CUDA since 2026-12-06)."""
    convs, dtype, greedy = nano_suite_prompts(n_per_task)
    out = {}
    for flag in ("0", "1"):
        t0 = time.perf_counter()
        with env_vars({"QWENVL_FP32_LOGITS": flag}):
            on, lens, stats_on = fast_run(path, convs, greedy, n_first, dtype)
            release()
            res = fast_paths_check(path, convs, lens, greedy, on, n_first=n_first, chat=True, dtype=dtype,
                                   device=DEV)
        res.update(model=path, suite=f"nano held-out, {n_per_task} per task", fast_on=stats_on,
                   seconds=time.perf_counter() - t0)
        out["fp32_logits" if flag == "1" else "bf16_logits"] = res
        RESULTS["fast_paths_trained"] = out
        log(res)
        release()
    return out


# one fast path off at a time (the others on): which of them moves greedy tokens away from the slow run's
ABLATION = (("all_on", {}), ("no_cuda_graphs", {}), ("no_triton_decode", {}),
            ("no_compiled_ops", {"QWENVL_COMPILE_OPS": "0"}), ("no_compiled_vit", {"QWENVL_COMPILE_VIT": "0"}),
            ("no_vit_graphs", {"QWENVL_VIT_GRAPHS": "0"}), ("no_flash_vit", {}),
            ("no_triton_silu", {"QWENVL_TRITON_SILU": "0"}), ("no_fused_rope_kv", {"QWENVL_FUSED_ROPE_KV": "0"}),
            ("no_gqa_prefill", {"QWENVL_GQA_PREFILL": "0"}), ("no_fused_gemv", {"QWENVL_FUSED_GEMV": "0"}),
            ("no_bf16_gemv", {}), ("no_decode_ahead", {"QWENVL_DECODE_AHEAD": "0"}))


def fast_paths_ablation(path: str = "runs/nano/latest", n_per_task: int = 16, n_first: int = 32,
                        variants: str = "") -> dict:
    """The trained fast-paths check taken apart (fp32 logits in every run): the slow run once, then the engine
    with all fast paths on and with each one off alone (ABLATION; `variants`: a comma list of their names, empty:
    all), and two slow runs more: the same again (is the slow run deterministic?) and with at most 16 requests
    per step (how much does the batch alone move tokens?). Each: how many of the nano suite's requests keep the
    slow run's first 32 greedy tokens."""
    from unittest import mock

    import qwenvl.layers as layers
    import qwenvl.engine.runner as runner_mod
    import qwenvl.quant.fp8_gemv as G

    convs, dtype, greedy = nano_suite_prompts(n_per_task)
    out = {}
    with env_vars({"QWENVL_FP32_LOGITS": "1"}):
        off, off_lps, slow_stats = slow_run(path, convs, greedy, n_first, True, dtype=dtype, device=DEV)
        lens = slow_stats["prompt_lens"]
        release()
        wanted = set(filter(None, variants.split(",")))
        for name, env in ABLATION + (("slow_again", {}), ("slow_batch16", {})):
            if wanted and name not in wanted:
                continue
            t0 = time.perf_counter()
            try:
                if name.startswith("slow"):
                    on, _, stats = slow_run(path, convs, greedy, n_first, True,
                                            max_num_seqs=16 if name == "slow_batch16" else 256, dtype=dtype,
                                            device=DEV)
                else:
                    with contextlib.ExitStack() as stack:
                        stack.enter_context(env_vars(env))
                        if name == "no_triton_decode":
                            stack.enter_context(mock.patch.object(runner_mod, "triton_decode_ok", lambda *a, **k: False))
                        if name == "no_flash_vit":
                            stack.enter_context(mock.patch.object(layers, "_flash_varlen", None))
                        if name == "no_bf16_gemv":
                            old = G.set_enabled(bf16_enabled=False)
                            stack.callback(lambda: G.set_enabled(**old))
                        on, _, stats = fast_run(path, convs, greedy, n_first, dtype,
                                                enable_cuda_graphs=name != "no_cuda_graphs")
                res = agreement(on, off, off_lps, lens)
                res["fast_on"] = {k: v for k, v in stats.items() if not k.startswith("num_")
                                  and k not in ("cuda_graph_batch_sizes", "prompt_lens")}
                res["diverging"] = res["diverging"][:5]
            except Exception as e:  # one variant that fails must not cost the others
                res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            res["seconds"] = round(time.perf_counter() - t0, 1)
            out[name] = res
            RESULTS["fast_paths_ablation"] = out
            log(name, {k: res.get(k) for k in ("same_first_32", "requests", "error", "seconds")})
            release()
    return out


def batch_invariant(ours, hf, cfg, n_alone: int = 8, w1_tokens: int = 256) -> dict:
    """LLM(batch_invariant=True) (engine/batch_invariant.py) at the bench shape: its kernels' invariance, W1 and W4
    speed, and the first 32 greedy tokens of every W4 request from the fast run (CUDA graphs, up to 256 requests
    per step) against a slow run (no CUDA graphs, at most 16 requests and 2,048 tokens per step: other batches,
    other prefill chunks) and against n_alone requests run one at a time: all equal is the claim. Then the default
    mode's W1 / W2 / W4 on the same card in the same call (BENCH_BI_BASELINE=0: skipped), for the mode's cost."""
    from qwenvl.engine import LLM, SamplingParams

    from qwenvl.engine.batch_invariant import invariance_report

    res = {"kernels": invariance_report(cfg.text, DEV)}
    log(res)
    greedy = dict(temperature=0.0, ignore_eos=True)
    reqs = w4_requests(cfg, n=W4_REQUESTS, frames=True)
    prompts = [frames_prompt(*r[:2]) for r in reqs]
    lens = [r[0].shape[1] for r in reqs]

    def w1_w2(llm) -> dict:  # two warm-up requests (as the engine section: the first new images run slower), then
        for seed in (7, 8):  # W1 and W2 with a new image
            ids, pix, grid = image_request(cfg, seed=seed, frames=True)
            drive(llm, "warm", frames_prompt(ids, pix), SamplingParams(max_tokens=8, **greedy))
        ids, pix, grid = image_request(cfg, seed=9, frames=True)
        ttft, dec, toks = drive(llm, "w1", frames_prompt(ids, pix), SamplingParams(max_tokens=w1_tokens, **greedy))
        return {"w1_decode_tok_s": (len(toks) - 1) / dec, "w2_ttft_new_image_ms": ttft * 1e3}

    t0 = time.time()
    llm = LLM(ours, max_model_len=8192, max_num_seqs=256, gpu_memory_utilization=0.9, batch_invariant=True)
    res["init_s"] = time.time() - t0
    res["stats"] = {k: v for k, v in llm.stats().items() if not k.startswith("num_")}
    res.update(w1_w2(llm))
    log(res)
    outs, dt, n_out = timed_generate(llm, prompts, [SamplingParams(max_tokens=r[3], **greedy) for r in reqs])
    res["w4_output_tok_s"] = n_out / dt
    on = [o.outputs[0].token_ids[:32] for o in outs]
    alone = [llm.generate([prompts[i]], SamplingParams(max_tokens=32, **greedy))[0].outputs[0].token_ids
             for i in range(n_alone)]
    res["alone_vs_batch_256"] = {"requests": n_alone, "same_first_32": sum(a == on[i] for i, a in enumerate(alone))}
    log(res)
    del llm, outs
    release()
    off, off_lps, stats_off = slow_run(ours, prompts, greedy, 32, batch_invariant=True, max_num_seqs=16,
                                       max_num_batched_tokens=2048)
    res["fast_vs_slow"] = agreement(on, off, off_lps, lens)
    res["fast_vs_slow"]["slow_stats"] = {k: stats_off.get(k) for k in ("cuda_graph_batch_sizes", "batch_invariant",
                                                                       "num_preemptions")}
    RESULTS["batch_invariant"] = res
    log(res)
    release()
    if os.environ.get("BENCH_BI_BASELINE", "1") == "1":  # the default mode's W1 / W4 in the same call, for the cost
        llm = LLM(ours, max_model_len=8192, max_num_seqs=256, gpu_memory_utilization=0.9, batch_invariant=False)
        base = w1_w2(llm)
        reqs2 = w4_requests(cfg, n=W4_REQUESTS, frames=True)  # the same requests, fresh objects (no hashes kept)
        _, dt, n_out = timed_generate(llm, [frames_prompt(*r[:2]) for r in reqs2],
                                      [SamplingParams(max_tokens=r[3], **greedy) for r in reqs2])
        base["w4_output_tok_s"] = n_out / dt
        res["default_mode_same_call"] = base
        log(base)
        del llm
        release()
    return res


def divergence_margin(fast: list[int], slow: list[int], slow_logprobs: list, n: int | None) -> dict:
    """At the first position n where the fast run's token differs from the slow run's: the slow run's logprob gap
    between its top two tokens there, and whether the fast run took the second."""
    if n is None or n >= len(slow_logprobs) or not slow_logprobs[n]:
        return {}
    top = sorted(slow_logprobs[n].items(), key=lambda kv: -kv[1])
    if len(top) < 2:
        return {}
    return {"top2_margin": round(top[0][1] - top[1][1], 5), "fast_token_is_second_choice": fast[n] == top[1][0]}


def w5_memory(ours, prompt, params):
    """W5: peak GPU memory of W1 with a KV cache sized for this one request (as `--kv-cache-bytes` would):
    weights + KV cache + everything else at the peak (activations, ViT, CUDA graph pools, logits).
    The target is: weights + KV actually used + < 2 GiB."""
    from qwenvl.engine import LLM

    if DEV != "cuda":
        return {"skipped": "cpu"}
    n_tokens = len(prompt["prompt_token_ids"]) + params.max_tokens
    release()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # the weights (and nothing else, after release())
    llm = LLM(ours, max_model_len=n_tokens + 16, max_num_seqs=1, num_blocks=-(-n_tokens // 16) + 1)
    kv_bytes = llm.runner.kv_bytes_per_block() * llm.stats()["num_blocks"]
    used_blocks = -(-n_tokens // 16)
    llm.generate([prompt], [params])
    peak = torch.cuda.max_memory_allocated()
    w = param_bytes(ours)
    res = {"weights_gib": w / GIB, "kv_allocated_gib": kv_bytes / GIB,
           "kv_used_gib": used_blocks * llm.runner.kv_bytes_per_block() / GIB,
           "peak_allocated_gib": (w + peak - before) / GIB,
           "peak_reserved_gib_all": torch.cuda.max_memory_reserved() / GIB,  # the whole process's pool
           "other_at_peak_gib": (peak - before - kv_bytes) / GIB, "target_other_gib": 2.0}
    del llm
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--sections", default="parity,vision,prefill,decode,batch_hf,engine,engine_eager_ops")
    ap.add_argument("--ckpt", default="/tmp/qwenvl-bench-ckpt")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script with --shape tiny")
    ap.add_argument("--w4-requests", type=int, default=256)
    ap.add_argument("--tokenizer", default=None, help="a directory with tokenizer.json: the engine detokenizes")
    a = ap.parse_args()
    global DEV, W4_REQUESTS, TOKENIZER_DIR, OUT_DIR
    DEV, W4_REQUESTS, TOKENIZER_DIR, OUT_DIR = a.device, a.w4_requests, a.tokenizer, a.out
    os.makedirs(a.out, exist_ok=True)
    sections = a.sections.split(",")
    import transformers

    RESULTS["env"] = {"date": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
                      "gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "torch": torch.__version__,
                      "transformers": transformers.__version__, "shape": a.shape}
    log(RESULTS["env"])
    cfg = qwenvl.preset(a.shape)
    t0 = time.time()
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    ours = Qwen25VL.random(cfg, dtype=dtype, device=DEV, seed=0).eval()
    log(f"built ours in {time.time() - t0:.1f}s")
    hf = None
    if any(s in sections for s in ("parity", "vision", "prefill", "decode", "batch_hf")):
        t0 = time.time()
        shutil.rmtree(a.ckpt, ignore_errors=True)
        ours.save_pretrained(a.ckpt)
        from transformers import Qwen2_5_VLForConditionalGeneration

        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(a.ckpt, dtype=dtype, device_map=DEV,
                                                                attn_implementation="sdpa").eval()
        log(f"saved + loaded transformers in {time.time() - t0:.1f}s")
    for name in sections:
        if name == "engine" and hf is not None:  # the engine sizes its KV cache from free memory
            hf = None
            gc.collect()
            if DEV == "cuda":
                torch.cuda.empty_cache()
        fn = {"parity": parity, "vision": vision, "prefill": prefill, "decode": decode, "batch_hf": batch_hf,
              "vision_profile": vision_profile, "engine": engine,
              "engine_eager_ops": engine_eager_ops, "batch_invariant": batch_invariant,
              "fast_paths_trained": lambda *_: fast_paths_trained(  # BENCH_TRAINED_MODEL: another checkpoint
                  os.environ.get("BENCH_TRAINED_MODEL", "runs/nano/latest"),
                  int(os.environ.get("BENCH_TRAINED_N", "24"))),
              "fast_paths_ablation": lambda *_: fast_paths_ablation(
                  os.environ.get("BENCH_TRAINED_MODEL", "runs/nano/latest"),
                  int(os.environ.get("BENCH_TRAINED_N", "16")), variants=os.environ.get("BENCH_ABLATION", ""))}.get(name)
        if fn is not None:
            fn(ours, hf, cfg)
        with open(os.path.join(a.out, "results.json"), "w") as f:  # partial results survive a timeout
            json.dump(RESULTS, f, indent=2, default=str)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(RESULTS, f, indent=2)
    log("\n| metric | ours | transformers |\n|---|---|---|")
    for k, v in RESULTS.items():
        if isinstance(v, dict) and k != "env":
            log(f"| {k} | {json.dumps(v)} |")


if __name__ == "__main__":
    main()
