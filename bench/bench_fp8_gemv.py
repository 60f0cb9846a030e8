"""FP8 decode at batch 1..16 (issue 7): the weight-only GEMV kernel against bf16 and torch._scaled_mm, per decoder
linear and through the engine, in one device call.

    PYTHONPATH=. python bench/bench_fp8_gemv.py --shape 7b --out $OUT          # one GPU, ~4-6 minutes
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/bench_fp8_gemv.py --shape tiny --device cpu --out /tmp/b
        # CPU smoke run: every code path, the kernel under triton's interpreter (timings meaningless)

(1) micro: for each decoder linear as the engine runs it (fused qkv, o_proj, fused gate/up, down_proj; and the
    bf16 lm_head) and each M in --ms: median time and achieved GB/s (bytes a perfect kernel moves: weights once,
    activations, output) of the bf16 matmul (cuBLAS), the scaled_mm path as FP8Linear runs it (per-token
    activation quantisation + torch._scaled_mm) and the GEMV kernel with its heuristic config; for M in
    --sweep-ms also a sweep of GEMV configs (tile, warps, stages, split-K), the best one kept. Weights are
    rotated over enough copies to overflow L2, calls are timed as CUDA-graph replays (launch gaps out).
    Every GEMV output is checked against a float64 reference (error bound of one bf16 rounding).
    Sums per decode step (the four linears x layers + lm_head) at M=1 estimate the linear time of a step.
    For M <= 2 also the same kernel on the bf16 weights (GemvLinear, QWENVL_BF16_GEMV=1) against cuBLAS, swept
    like the FP8 one: whether bf16 decode can beat cuBLAS's ~2.4 TB/s (PEERS.md: the W1 >= 190 ceiling).
(2) engine: W1 (batch 1, one 1280x720 image (--image) + 64 text tokens, --w1-tokens greedy tokens; decode
    tok/s after the first token; as bench_tp_engine.py) for bf16, FP8 with the kernel off (scaled_mm), FP8 with the kernel (heuristic configs), and
    FP8 with the kernel on the sweep's best configs (set_tuned) when those differ; bf16 with the decode linears and
    lm_head through the kernel at batch 1 (bf16_gemv, and bf16_gemv_tuned on the sweep's winners). Random weights.
Writes $OUT/fp8_gemv.json after every measurement; prints tables. Exit 1 when a correctness check fails; the
issue's target (FP8 >= 1.7x bf16 W1 decode tok/s) is reported, not enforced.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import qwenvl  # noqa: E402
from qwenvl.quant import fp8_gemv as G  # noqa: E402
from qwenvl.quant.fp8 import _mm_scaled, quantize_weight  # noqa: E402

TARGET = 1.7


def log(*a):
    print(*a, flush=True)


def linear_shapes(cfg) -> list[tuple[str, int, int]]:
    """(name, N, K) of one decoder layer's linears as the engine runs them (qkv and gate/up fused)."""
    t = cfg.text
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    H, I = t.hidden_size, t.intermediate_size
    return [("qkv", q + 2 * kv, H), ("o_proj", H, q), ("gate_up", 2 * I, H), ("down_proj", H, I)]


def sweep_configs(M: int, N: int, K: int, num_sms: int, weight_bytes: int = 1) -> list[G.GemvConfig]:
    """A small grid around the heuristic: M == 1, FMA tiles (plain, and with per-thread partial sums of one 16-byte
    load: vec); M > 1, tl.dot tiles; each with its auto split, without split and (FMA) with the split pick_config's
    M == 1 rule gives by bytes per program."""
    base = []
    vec = 16 // weight_bytes
    if M == 1:  # the earlier sweeps' winners plain, then tiles of 8-16 KB with vec
        base += [(bn, bk, w, 1, False, 1) for bn, bk, w in ((8, 512, 4), (16, 256, 4), (16, 512, 8))]
        base += [(bn, bk, w, 1, False, vec) for bn, bk, w in
                 ((8, 512, 4), (16, 512, 4), (16, 512, 8), (8, 1024, 4), (16, 1024, 8), (32, 512, 8))]
        # twenty-fourth session: more, smaller programs (4-row tiles, 2 warps) and longer K tiles, for the small
        # q/k/v and o_proj matrices whose kernels are ramp-up bound (2.0 and 1.8 TB/s in FP8)
        base += [(bn, bk, w, 1, False, vec) for bn, bk, w in
                 ((4, 1024, 4), (4, 2048, 4), (8, 2048, 4), (8, 1024, 2), (4, 1024, 2))]
    else:  # tl.dot tiles: they never won at M == 1 (2026-12-05 sweeps)
        base += [(bn, bk, w, st, True, 1) for bn, bk, w, st in
                 ((16, 256, 4, 2), (32, 128, 4, 1), (32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3))]
    out = []
    for bn, bk, w, st, dot, v in base:
        bk = min(bk, max(16, G.triton_next_pow2(K)))
        splits = {1, G.auto_split(M, N, K, bn, bk, dot, num_sms)}
        if M == 1 and not dot and -(-K // bk) >= 2:
            splits.add(2)
        if M == 1 and not dot:
            per_program = -(-bn * K * weight_bytes // G.WEIGHT_BYTES_PER_PROGRAM)
            splits.add(G.normalize_split(-(-K // bk), min(per_program, G.max_split(M, K)))[0])
        for split in sorted(splits):
            c = G.GemvConfig(bn, bk, split, w, st, dot, min(v, bk))
            if c not in out:
                out.append(c)
    return out


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    """Seconds per call of fn(i) over rotating weight copies i: CUDA-graph replays of reps rounds (falls back to
    eager calls between events if the capture fails); wall clock on the CPU."""

    def __init__(self, device, reps: int, trials: int):
        self.dev, self.reps, self.trials = torch.device(device), reps, trials

    def __call__(self, fn, copies: int) -> tuple[float, str]:
        if self.dev.type != "cuda":
            t0 = time.perf_counter()
            for i in range(copies):
                fn(i)
            return (time.perf_counter() - t0) / copies, "cpu-wall"
        for i in range(copies):  # compile, warm
            fn(i)
        torch.cuda.synchronize(self.dev)
        n = self.reps * copies
        try:
            s = torch.cuda.Stream(self.dev)
            s.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(s):
                for i in range(copies):
                    fn(i)
            torch.cuda.current_stream(self.dev).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(self.reps):
                    for i in range(copies):
                        fn(i)
            run, how = g.replay, "graph"
        except Exception as e:  # report and time eagerly
            log(f"  (graph capture failed: {type(e).__name__}: {str(e)[:200]}; timing eager calls)")
            g = None

            def run():
                for _ in range(self.reps):
                    for i in range(copies):
                        fn(i)
            how = "eager"
        run()
        torch.cuda.synchronize(self.dev)
        times = []
        for _ in range(self.trials):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            torch.cuda.synchronize(self.dev)
            times.append(a.elapsed_time(b) / 1e3 / n)
        del g
        return sorted(times)[len(times) // 2], how


def n_copies(weight_bytes: int, device) -> int:
    dev = torch.device(device)
    if dev.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
    return max(2, min(16, math.ceil(3 * l2 / weight_bytes)))


def gemv_row(row: dict, prefix: str, timer, xs, weights, copies: int, weight_bytes: int, sweep: bool,
             sms: int) -> dict:
    """Time the GEMV kernel on weights [(w, scale or None)] (rotating copies) with the heuristic config, and with
    every sweep config when `sweep`; each output checked against the float64 reference. Fills row[prefix + ...]
    (gemv_us/GBs/config/correct, sweep, sweep_all_correct, best_us/GBs/config); returns {set_tuned key: best}."""
    M, N, K = row["M"], row["N"], row["K"]
    w0, s0 = weights[0]
    ref = G.reference(xs[0], w0, s0)
    bound = G.error_bound(xs[0], w0, s0, None, ref, xs[0].dtype)

    def measure(c):
        y = G.gemv(xs[0], w0, s0, config=c)
        ok = bool(((y.double() - ref).abs() <= bound).all())
        t, _ = timer(lambda i: G.gemv(xs[i], *weights[i], config=c), copies)
        return {"config": c.as_dict(), "us": t * 1e6, "GBs": G.bytes_moved(M, N, K, weight_bytes) / t / 1e9,
                "correct": ok}

    heur = G.pick_config(M, N, K, sms, weight_bytes)
    h = measure(heur)
    row.update({prefix + "gemv_us": h["us"], prefix + "gemv_GBs": h["GBs"], prefix + "gemv_config": h["config"],
                prefix + "gemv_correct": h["correct"]})
    if not sweep:
        return {}
    results = [h]
    for c in sweep_configs(M, N, K, sms, weight_bytes):
        if c == heur:
            continue
        try:
            results.append(measure(c))
        except Exception as e:  # a config that does not compile here: note it, go on
            results.append({"config": c.as_dict(), "error": f"{type(e).__name__}: {e}"[:200]})
    good = [r for r in results if r.get("correct")]
    row[prefix + "sweep"] = results
    row[prefix + "sweep_all_correct"] = all(r.get("correct") for r in results if "error" not in r)
    if not good:
        return {}
    b = min(good, key=lambda r: r["us"])
    row.update({prefix + "best_us": b["us"], prefix + "best_GBs": b["GBs"], prefix + "best_config": b["config"]})
    return {G.tuned_key(M, N, K, weight_bytes): b["config"]}


# ---------------------------------------------------------------------------------------------- micro
def micro(a, R: dict, save) -> None:
    dev = torch.device(a.device)
    cfg = qwenvl.preset(a.shape)
    sms = G.num_sms(dev)
    timer = Timer(dev, a.reps, a.trials)
    kernel_ok = dev.type == "cuda" and G.gemv_ok(dev) or dev.type == "cpu" and G.interpreting()
    bf16_ok = dev.type == "cuda" and G.gemv_ok(dev, torch.bfloat16) or dev.type == "cpu" and G.interpreting()
    R["gemv_available"], R["bf16_gemv_available"] = kernel_ok, bf16_ok
    if not kernel_ok:
        R["gemv_unavailable_reason"] = ("CPU without TRITON_INTERPRET=1" if dev.type == "cpu" else
                                        "triton missing, compute capability < 8.9 or the self-test failed")
    ms = [int(m) for m in a.ms.split(",")]
    sweep_ms = {int(m) for m in a.sweep_ms.split(",") if m}
    act = torch.bfloat16
    rows, best = [], {}
    g = torch.Generator(device=dev).manual_seed(0)
    shapes = linear_shapes(cfg)
    for name, N, K in shapes + [("lm_head", cfg.text.vocab_size, cfg.text.hidden_size)]:
        fp8 = name != "lm_head"
        nc8, nc16 = n_copies(N * K, dev), n_copies(2 * N * K, dev)
        w16 = [(torch.randn(N, K, generator=g, device=dev) * 0.02).to(act) for _ in range(nc16)]
        qs = []  # (fp8 weight, fp32 scale row) copies
        if fp8:
            for i in range(nc8):
                q, s = quantize_weight(w16[i % nc16])
                qs.append((q, s.view(1, -1).contiguous()))
        for M in ms:
            xs = [torch.randn(M, K, generator=g, device=dev).to(act) for _ in range(max(nc8, nc16))]
            row = {"linear": name, "N": N, "K": K, "M": M}
            t, how = timer(lambda i: F.linear(xs[i], w16[i]), nc16)
            row["bf16_us"], row["bf16_GBs"], row["timing"] = t * 1e6, G.bytes_moved(M, N, K, 2) / t / 1e9, how
            # the same kernel on the bf16 weights (GemvLinear); the 152k-row lm_head is too slow for triton's CPU
            # interpreter
            if bf16_ok and M <= 2 and (dev.type == "cuda" or name != "lm_head"):
                best.update(gemv_row(row, "bf16_", timer, xs, [(w, None) for w in w16], nc16, 2, M in sweep_ms, sms))
            if fp8:
                try:
                    t, _ = timer(lambda i: _mm_scaled(xs[i], qs[i][0], qs[i][1], act), nc8)
                    row["scaled_mm_us"], row["scaled_mm_GBs"] = t * 1e6, G.bytes_moved(M, N, K) / t / 1e9
                except Exception as e:  # e.g. CPU builds without _scaled_mm
                    row["scaled_mm_error"] = f"{type(e).__name__}: {e}"[:200]
            if fp8 and kernel_ok:
                best.update(gemv_row(row, "", timer, xs, qs, nc8, 1, M in sweep_ms, sms))
            rows.append(row)
            log(fmt_row(row))
            R["micro"] = rows
            save()
        w16 = qs = xs = None  # free the copies before the next shape
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    R["tuned_table"] = [[list(k), v] for k, v in best.items()]
    # a decode step's linear time at M=1: four linears x layers + lm_head (bf16 in every variant)
    L = cfg.text.num_hidden_layers
    by = {(r["linear"], r["M"]): r for r in rows}
    if 1 in ms:
        head = by[("lm_head", 1)]["bf16_us"]
        step = {}
        for key in ("bf16_us", "scaled_mm_us", "gemv_us", "best_us", "bf16_gemv_us", "bf16_best_us"):
            vals = [by[(n, 1)].get(key) for n, _, _ in shapes]
            own_head = by[("lm_head", 1)].get(key) if key.startswith("bf16_") else None
            if all(v is not None for v in vals):
                step[key.replace("_us", "_ms")] = (L * sum(vals) + (own_head or head)) / 1e3
        R["step_linear_ms_M1"] = step
    save()


def fmt_row(r: dict) -> str:
    def f(k):
        return f"{r[k + '_us']:8.1f} us {r[k + '_GBs']:6.0f} GB/s" if k + "_us" in r else " " * 23
    return (f"{r['linear']:9s} N={r['N']:6d} K={r['K']:6d} M={r['M']:2d} | bf16 {f('bf16')} | scaled_mm "
            f"{f('scaled_mm')} | gemv {f('gemv')} | best {f('best')} | bf16 gemv {f('bf16_gemv')} | "
            f"best {f('bf16_best')}")


# ---------------------------------------------------------------------------------------------- engine
def engine(a, R: dict, save) -> None:
    import bench
    import bench_tp_engine as E
    from qwenvl.engine import SamplingParams
    from qwenvl.parallel import RandomWeights

    bench.DEV = a.device
    cfg = qwenvl.preset(a.shape)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = RandomWeights(a.shape, dtype, seed=0)(0, 1, a.device)
    small = dict(max_num_seqs=16, gpu_memory_utilization=0.45)
    tuned = {tuple(k): v for k, v in R.get("tuned_table", [])}
    # the engine-only call has no micro section to say whether the kernel runs here
    R.setdefault("gemv_available", bool(torch.device(a.device).type == "cuda" and G.gemv_ok(torch.device(a.device))))
    # the bf16 arms first: quantization="fp8" converts the shared model's linears in place
    # (name, quantization, FP8 GEMV on, tuned table, bf16 GEMV on, env). The engine's decode defaults: steps
    # launched one ahead (QWENVL_DECODE_AHEAD), rotary + KV write in one kernel (QWENVL_FUSED_ROPE_KV), RMSNorm /
    # residual / silu*up inside the GEMVs (QWENVL_FUSED_GEMV, _SILU); "_unfused" arms switch all of them off, the
    # arms between add one at a time.
    unfused = {"QWENVL_FUSED_GEMV": "0", "QWENVL_FUSED_ROPE_KV": "0", "QWENVL_DECODE_AHEAD": "0"}
    ahead = {"QWENVL_FUSED_GEMV": "0", "QWENVL_FUSED_ROPE_KV": "0"}
    rope_kv = {"QWENVL_FUSED_GEMV": "0"}
    merge_apart = {**rope_kv, "QWENVL_DECODE_FUSED_MERGE": "0"}  # the decode attention's splits merged after it
    splits32 = {**rope_kv, "QWENVL_DECODE_MAX_SPLITS": "32"}  # up to 32 splits (one 64-token tile each in W1)
    merge16 = {"QWENVL_DECODE_FUSED_MERGE_MAX_SPLITS": "16"}  # the defaults, the splits merged in the kernel at batch 1
    no_silu = {"QWENVL_FUSED_GEMV": "1", "QWENVL_FUSED_GEMV_SILU": "0"}
    fused = {"QWENVL_FUSED_GEMV": "1", "QWENVL_FUSED_GEMV_SILU": "1"}
    no_rope = {**fused, "QWENVL_GEMV_ROPE": "0"}  # the defaults but rotary + KV write after the q/k/v GEMV
    pdl = {"QWENVL_GEMV_PDL": "1"}  # the defaults + programmatic dependent launch of the GEMVs
    bf16_logits = {**fused, "QWENVL_FP32_LOGITS": "0"}  # the defaults but lm_head's output rounded to bf16
    fused_pdl = {**fused, **pdl}
    fp8_head = {**fused, "QWENVL_FP8_LM_HEAD": "1"}  # the defaults + lm_head in FP8 too (FP8 arms only)
    tmerge = {**fused, "QWENVL_TRITON_MERGE": "1"}  # the decode splits merged by one Triton kernel (the default)
    cmerge = {**fused, "QWENVL_TRITON_MERGE": "0"}  # ... by the compiled merge (two kernels), the default before
    silu_out = {**fused, "QWENVL_GEMV_SILU_OUT": "1"}  # silu * up in gate/up's epilogue, not down's prologue
    # 4-row tiles for o_proj (and down_proj): the twenty-fourth session's M = 1 sweep winners on an H100, FP8 [4, 2048],
    # bf16 [4, 1024] (down_proj's silu prologue would run in twice the programs: with silu_out only)
    shp = {n: (N, K) for n, N, K in linear_shapes(cfg)}
    o4 = {G.tuned_key(1, *shp["o_proj"]): G.GemvConfig(4, 2048, 1, 4, 1, False, 16),
          G.tuned_key(1, *shp["o_proj"], 2): G.GemvConfig(4, 1024, 1, 4, 1, False, 8)}
    o4d4 = {**o4, G.tuned_key(1, *shp["down_proj"]): G.GemvConfig(4, 2048, 1, 4, 1, False, 16),
            G.tuned_key(1, *shp["down_proj"], 2): G.GemvConfig(4, 1024, 1, 4, 1, False, 8)}
    splits8 = {"QWENVL_DECODE_MAX_SPLITS": "8"}  # batch 1: 8 splits (~3 64-token tiles each in W1), merged apart
    splits8_in = {**splits8, "QWENVL_DECODE_FUSED_MERGE_MAX_SPLITS": "8"}  # 8 splits merged in the kernel
    variants = [("bf16", None, False, None, False, unfused)]
    heur = {k: G.pick_config(*k[:3], G.num_sms(a.device), *k[3:]).as_dict() for k in tuned}
    if a.device == "cpu" or G.gemv_ok(torch.device(a.device), torch.bfloat16):  # CPU: the plumbing only
        variants += [("bf16_gemv_unfused", None, False, None, True, unfused),
                     ("bf16_gemv_ahead", None, False, None, True, ahead),
                     ("bf16_gemv_merge_apart", None, False, None, True, merge_apart),
                     ("bf16_gemv_rope_kv", None, False, None, True, rope_kv),
                     ("bf16_gemv_s32", None, False, None, True, splits32),
                     ("bf16_gemv_no_silu", None, False, None, True, no_silu),
                     ("bf16_gemv_no_rope", None, False, None, True, no_rope),
                     ("bf16_gemv", None, False, None, True, fused),
                     ("bf16_gemv_merge16", None, False, None, True, merge16),
                     ("bf16_gemv_bf16_logits", None, False, None, True, bf16_logits),
                     ("bf16_gemv_pdl", None, False, None, True, pdl),
                     ("bf16_gemv_fused_pdl", None, False, None, True, fused_pdl),
                     ("bf16_gemv_tmerge", None, False, None, True, tmerge),
                     ("bf16_gemv_cmerge", None, False, None, True, cmerge),
                     ("bf16_gemv_siluout", None, False, None, True, silu_out),
                     ("bf16_gemv_o4", None, False, o4, True, fused),
                     ("bf16_gemv_siluout_o4d4", None, False, o4d4, True, silu_out),
                     ("bf16_gemv_s8", None, False, None, True, {**fused, **splits8}),
                     ("bf16_gemv_s8_in", None, False, None, True, {**fused, **splits8_in}),
                     ("bf16_gemv_s8_tmerge", None, False, None, True, {**tmerge, **splits8})]
        if any(tuned[k] != heur[k] for k in tuned if len(k) == 4):
            variants.append(("bf16_gemv_tuned", None, False, tuned, True, fused))
    variants += [("fp8_scaled_mm", "fp8", False, None, False, unfused),
                 ("fp8_gemv_unfused", "fp8", True, None, False, unfused),
                 ("fp8_gemv_merge_apart", "fp8", True, None, False, merge_apart),
                 ("fp8_gemv_rope_kv", "fp8", True, None, False, rope_kv),
                 ("fp8_gemv_s32", "fp8", True, None, False, splits32),
                 ("fp8_gemv_no_silu", "fp8", True, None, False, no_silu),
                 ("fp8_gemv_no_rope", "fp8", True, None, False, no_rope),
                 ("fp8_gemv", "fp8", True, None, False, fused),
                 ("fp8_gemv_merge16", "fp8", True, None, False, merge16),
                 ("fp8_gemv_bf16_logits", "fp8", True, None, False, bf16_logits),
                 ("fp8_gemv_pdl", "fp8", True, None, False, pdl),
                 ("fp8_gemv_fused_pdl", "fp8", True, None, False, fused_pdl),
                 ("fp8_gemv_head", "fp8", True, None, False, fp8_head),
                 # the engine's default: the bf16 GEMV on too, which takes the FP8 model's bf16 lm_head
                 ("fp8_gemv_bf16_head", "fp8", True, None, True, fused),
                 ("fp8_gemv_head_tmerge", "fp8", True, None, False, {**fp8_head, **tmerge}),
                 ("fp8_gemv_head_cmerge", "fp8", True, None, False, {**fp8_head, **cmerge}),
                 ("fp8_gemv_head_siluout", "fp8", True, None, False, {**fp8_head, **silu_out}),
                 ("fp8_gemv_head_o4", "fp8", True, o4, False, fp8_head),
                 ("fp8_gemv_head_siluout_o4d4", "fp8", True, o4d4, False, {**fp8_head, **silu_out}),
                 ("fp8_gemv_head_s8", "fp8", True, None, False, {**fp8_head, **splits8}),
                 ("fp8_gemv_head_s8_in", "fp8", True, None, False, {**fp8_head, **splits8_in}),
                 ("fp8_gemv_head_s8_tmerge", "fp8", True, None, False, {**fp8_head, **tmerge, **splits8})]
    if any(tuned[k] != heur[k] for k in tuned if len(k) == 3):
        variants += [("fp8_gemv_tuned", "fp8", True, tuned, False, fused),
                     ("fp8_gemv_head_tuned", "fp8", True, tuned, False, fp8_head)]
    E_args = argparse.Namespace(device=a.device)
    quality_ids = torch.randint(0, cfg.text.vocab_size, (1, 256), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the bf16 model's logits, before any arm converts its decoder linears to FP8
        quality_ref = model(quality_ids.to(a.device)).float().cpu()
    h, w = (int(v) for v in a.image.split("x")[::-1])
    greedy = dict(temperature=0.0, ignore_eos=True)
    tokens = {}
    if a.variants:
        variants = [v for v in variants if v[0] in a.variants.split(",")]
    for name, quant, gemv, table, bf16, env in variants:
        old = G.set_enabled(gemv, bf16_enabled=bf16, bf16_max_m=1, pdl=env.get("QWENVL_GEMV_PDL") == "1")
        G.set_tuned(table)
        try:
            with bench.env_vars(env):  # the engine reads some switches when built, some per step
                llm, t = E.make_llm(E_args, model, 1, quantization=quant, **small)
                try:
                    # W1 as bench_tp_engine's: a warm-up request, then a new image (the ViT runs) alone
                    ids, pix, grid = bench.image_request(cfg, n_text=64, h=h, w=w, seed=7)
                    bench.drive(llm, "w1-warm", E.prompt_of(ids, pix, grid), SamplingParams(max_tokens=4, **greedy))
                    ids, pix, grid = bench.image_request(cfg, n_text=64, h=h, w=w, seed=8)
                    ttft, dec, toks = bench.drive(llm, "w1", E.prompt_of(ids, pix, grid),
                                                  SamplingParams(max_tokens=a.w1_tokens, **greedy))
                    r = {"decode_tok_s": (len(toks) - 1) / dec, "ttft_ms": ttft * 1e3, "tokens": len(toks),
                         "prompt_tokens": ids.shape[1], "init_s": t,
                         "cuda_graph_batch_sizes": llm.stats()["cuda_graph_batch_sizes"],
                         "bf16_gemv": llm.stats().get("bf16_gemv"),
                         "fused_gemv_layers": llm.runner._gemv_plan(1) is not None,
                         "fused_rope_kv": llm.runner.fused_rope_kv, "gemv_rope": llm.stats().get("gemv_rope"),
                         "gemv_silu_out": llm.stats().get("gemv_silu_out"),
                         "decode_ahead_steps": llm.stats()["decode_ahead_steps"], "gemv_pdl": G.settings()["pdl"]}
                    graph = llm.runner.graphs.get(1)
                    if graph is not None:  # the step's device time alone: W1's per-token time minus it is host work
                        r["graph_replay_ms"] = bench.cuda_time(graph[0].replay, warmup=3, iters=20) * 1e3
                        r["host_ms_per_token"] = 1e3 / r["decode_tok_s"] - r["graph_replay_ms"]
                        if a.profile_replays:
                            r["graph_profile"] = profile_replays(graph[0].replay, a.profile_replays)
                    r["fp8_lm_head"] = type(llm.runner.lm_head).__name__ == "FP8Linear"
                    r["triton_merge"] = llm.runner.decode_merge is not None
                    ids, pix, grid = bench.image_request(cfg, n_text=64, h=h, w=w, seed=9)
                    out = llm.generate([E.prompt_of(ids, pix, grid)], SamplingParams(max_tokens=a.eq_tokens, **greedy))
                    tokens[name] = out[0].token_ids
                finally:
                    llm.shutdown()
        finally:
            G.set_enabled(**old)
            G.set_tuned(None)
        R.setdefault("engine", {})[name] = r
        log(name, json.dumps(r))
        save()
        del llm
        gc.collect()
        if a.device == "cuda":
            torch.cuda.empty_cache()
    R["fp8_logit_quality"] = fp8_logit_quality(model, quality_ids.to(a.device), quality_ref)
    save()
    eng = R["engine"]
    base = (eng.get("bf16") or next(iter(eng.values())))["decode_tok_s"]  # the cuBLAS arm, else the first run
    R["w1_vs_bf16"] = {k: v["decode_tok_s"] / base for k, v in eng.items()}
    ref = next((r for r in ("fp8_gemv", "bf16") if r in tokens), next(iter(tokens)))  # an arm that ran
    R[f"first_divergence_vs_{ref}"] = {k: first_divergence(tokens[ref], v) for k, v in tokens.items()}
    save()


@torch.no_grad()
def fp8_logit_quality(model, ids, ref) -> dict:
    """Logits of 256 random text tokens against the bf16 model's (ref): the FP8 decoder with the bf16 head, and with
    the head in FP8 too (QWENVL_FP8_LM_HEAD's copy). Run after the arms: quantization="fp8" converted the shared
    model's decoder in place (an engine without FP8 arms leaves it bf16: nothing to compare)."""
    from qwenvl.quant import FP8Linear, compare_logits, has_fp8_decoder

    if not has_fp8_decoder(model):
        return {"skipped": "no FP8 arm ran"}
    out = {"bf16_head": compare_logits(ref, model(ids).float().cpu())}
    head = model.lm_head
    model.lm_head = FP8Linear.from_linear(head)
    try:
        out["fp8_head"] = compare_logits(ref, model(ids).float().cpu())
    finally:
        model.lm_head = head
    return out


def profile_replays(fn, n: int, top: int = 25) -> dict:
    """Kernels of n calls of fn (a decode graph's replay) under torch.profiler: per call, the kernel count, the sum
    of kernel time, the span from the first kernel's start to the last one's end and the time between kernels
    (span - busy), and the `top` kernels by time (us per call). Says where a decode step's time goes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start),
                key=lambda e: e.time_range.start)
    if not ev:
        return {"error": "no kernel events recorded for the replays"}
    busy, end = 0.0, ev[0].time_range.start
    for e in ev:  # the union of the kernels' intervals
        s, t = max(e.time_range.start, end), e.time_range.end
        if t > s:
            busy += t - s
        end = max(end, t)
    per: dict[str, list] = {}
    for e in ev:
        v = per.setdefault(e.name, [0, 0.0])
        v[0] += 1
        v[1] += e.time_range.end - e.time_range.start
    kernels = sorted(per.items(), key=lambda kv: -kv[1][1])
    return {"calls": n, "kernels_per_call": len(ev) / n, "kernel_us_per_call": sum(v[1] for v in per.values()) / n,
            "busy_us_per_call": busy / n, "span_us_per_call": (end - ev[0].time_range.start) / n,
            "idle_us_per_call": (end - ev[0].time_range.start - busy) / n,
            "top": [{"name": k[:120], "count_per_call": v[0] / n, "us_per_call": v[1] / n} for k, v in kernels[:top]]}


def first_divergence(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------------------------- main
def summary(R: dict) -> str:
    rows = ["| linear | N | K | M | bf16 us (GB/s) | scaled_mm us (GB/s) | GEMV us (GB/s) | best GEMV us (GB/s) | "
            "bf16 GEMV us (GB/s) | best bf16 GEMV us (GB/s) |", "|---|---|---|---|---|---|---|---|---|---|"]

    def c(r, k):
        return f"{r[k + '_us']:.1f} ({r[k + '_GBs']:.0f})" if k + "_us" in r else ""
    for r in R.get("micro", []):
        rows.append(f"| {r['linear']} | {r['N']} | {r['K']} | {r['M']} | {c(r, 'bf16')} | {c(r, 'scaled_mm')} | "
                    f"{c(r, 'gemv')} | {c(r, 'best')} | {c(r, 'bf16_gemv')} | {c(r, 'bf16_best')} |")
    if "step_linear_ms_M1" in R:
        rows.append(f"decode step, linears only, M=1 (ms): {json.dumps(R['step_linear_ms_M1'])}")
    for k, v in R.get("engine", {}).items():
        graph = (f"  graph {v['graph_replay_ms']:.2f} ms + host {v['host_ms_per_token']:.2f} ms per token"
                 if "graph_replay_ms" in v else "")
        rows.append(f"W1 {k:17s} decode {v['decode_tok_s']:.1f} tok/s  TTFT {v['ttft_ms']:.0f} ms  "
                    f"({R.get('w1_vs_bf16', {}).get(k, float('nan')):.2f}x bf16){graph}")
        p = v.get("graph_profile")
        if p and "error" not in p:
            rows.append(f"    profile: {p['kernels_per_call']:.0f} kernels, busy {p['busy_us_per_call']:.0f} us, "
                        f"idle {p['idle_us_per_call']:.0f} us per step; top: " + "; ".join(
                            f"{t['name'][:40]} {t['us_per_call']:.0f} us x{t['count_per_call']:.0f}" for t in p["top"][:8]))
    for k, v in (R.get("fp8_logit_quality") or {}).items():
        if isinstance(v, dict):
            rows.append(f"logits vs bf16, FP8 decoder + {k}: rel err {v['rel_err']:.4f}, top-1 agree {v['top1_agree']:.3f}")
    for ref in ("fp8_gemv", "bf16"):
        if f"first_divergence_vs_{ref}" in R:
            rows.append(f"greedy tokens, first divergence vs {ref}: {R[f'first_divergence_vs_{ref}']}")
    rows += [f"check {k}: {'PASS' if v else 'FAIL'}" for k, v in R.get("checks", {}).items()]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--sections", default="micro,engine")
    ap.add_argument("--ms", default="1,2,4,8,16", help="batch rows timed per linear")
    ap.add_argument("--sweep-ms", default="1,4,16", help="rows at which GEMV configs are swept")
    ap.add_argument("--reps", type=int, default=10, help="rounds over the weight copies per timed replay")
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--w1-tokens", type=int, default=256)
    ap.add_argument("--eq-tokens", type=int, default=32, help="greedy tokens compared across the variants")
    ap.add_argument("--image", default="1280x720", help="W1's image, WxH pixels")
    ap.add_argument("--variants", default="", help="engine arms to run, e.g. bf16,bf16_gemv (default: all)")
    ap.add_argument("--profile-replays", type=int, default=0,
                    help="profile this many batch-1 graph replays per engine arm (kernels, busy and idle time)")
    a = ap.parse_args(argv)
    if a.device == "cpu":
        a.reps, a.trials = 1, 1
    os.makedirs(a.out, exist_ok=True)
    R: dict = {"shape": a.shape, "torch": torch.__version__, "triton": getattr(G.triton, "__version__", None),
               "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
               "interpreter": G.interpreting(), "gemv_settings": G.settings(), "complete": False}
    path = os.path.join(a.out, "fp8_gemv.json")

    def save():
        with open(path, "w") as f:
            json.dump(R, f, indent=2, default=str)

    code = 0
    for name in a.sections.split(","):
        t0 = time.time()
        try:
            {"micro": micro, "engine": engine}[name](a, R, save)
        except Exception as e:  # keep what the other section measured
            R[f"{name}_error"] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
            code = 1
        log(f"--- {name} done in {time.time() - t0:.0f}s")
    micro_rows = R.get("micro", [])
    R["checks"] = {"gemv_outputs_within_bf16_bound": all(r.get(k, True) for r in micro_rows for k in (
        "gemv_correct", "sweep_all_correct", "bf16_gemv_correct", "bf16_sweep_all_correct"))}
    if a.device == "cuda":
        R["checks"]["gemv_in_use"] = bool(R.get("gemv_available"))
        arms = [v for k, v in R.get("engine", {}).items() if k.startswith("bf16_gemv")]
        if arms:  # the engine wrapped its decode linears (an arm on an FP8-converted model would not)
            R["checks"]["bf16_gemv_in_use"] = all(v.get("bf16_gemv") for v in arms)
        fused = [v for k, v in R.get("engine", {}).items() if k in ("bf16_gemv", "fp8_gemv")]
        if fused:  # the default arms ran the fused decode layers (not a silent fallback after a failed probe)
            R["checks"]["fused_decode_in_use"] = all(v.get("fused_gemv_layers") and v.get("fused_rope_kv")
                                                     and v.get("gemv_rope") for v in fused)
    ratio = R.get("w1_vs_bf16", {})
    if any(k.startswith("fp8_gemv") for k in ratio):
        R["issue7_target"] = {"target": TARGET, "fp8_gemv": ratio.get("fp8_gemv"),
                              "best": max(v for k, v in ratio.items() if k.startswith("fp8_gemv")),
                              "met": max(v for k, v in ratio.items() if k.startswith("fp8_gemv")) >= TARGET}
        eng = R["engine"]
        best_bf16 = max(v["decode_tok_s"] for k, v in eng.items() if k.startswith("bf16"))
        R["issue7_target"]["best_fp8_vs_best_bf16"] = max(
            v["decode_tok_s"] for k, v in eng.items() if k.startswith("fp8_gemv")) / best_bf16
    R["complete"] = True
    save()
    log(summary(R))
    if "issue7_target" in R:
        log(f"issue 7 target (FP8 W1 >= {TARGET}x bf16): {json.dumps(R['issue7_target'])}")
    return code if all(R["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
