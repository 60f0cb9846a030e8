"""The engine (qwenvl.LLM) under tensor parallelism and FP8: correctness and W1/W4, in one device call.

    PYTHONPATH=. python bench/bench_tp_engine.py --out $OUT            # 2 GPUs (2x H100): ~6-9 minutes
    PYTHONPATH=. python bench/bench_tp_engine.py --device cpu --shape tiny --big tiny --w4-requests 4 \
        --big-w4-requests 2 --eq-requests 4 --eq-tokens 8 --w1-tokens 8 --out /tmp/b   # CPU dry run (gloo)

Sections, each in a subprocess of its own session (a fresh GPU state; at its time limit it is killed together
with the rank processes it started; its JSON is rewritten after every measurement, so what was measured stays):
  tp1   7B shape, TP=1, bf16: greedy tokens of --eq-requests W4-style requests (--eq-tokens each), W1, W4
  tp2   the same weights at TP=2 (LLM(..., tensor_parallel_size=2): this process rank 0, rank 1 started by it):
        the same requests -> first divergence position per request against tp1, W1, W4
  big   72B shape at TP=2 (--big-tp), random weights drawn per rank straight on its GPU (no full model
        anywhere): bf16 when a rank's weights fit in --big-fit of the card, else FP8 (--big-dtype forces one);
        W1 and W4 (--big-w4-requests). 72B FP8 on one H200: --sections big --big-tp 1 --big-dtype fp8
  fp8   one GPU, 7B: W1 bf16, then the same weights quantised (quantization="fp8" path) with the small-batch
        GEMV kernel off (fp8: torch._scaled_mm), with it (fp8g), and with the activation quantisation compiled
        (fp8c, kernel off). Per-linear timings of the kernel: bench/bench_fp8_gemv.py
W1 = batch 1, one 1280x720 image + 64 text tokens, --w1-tokens greedy tokens, decode tok/s after the first
token; W4 = --w4-requests requests at once, each one image 448x448..1280x720, 32-128 text tokens, 128-256
greedy output tokens (bench.py's builders); output tok/s over the whole run. Random weights, ignore_eos.
Writes $OUT/<section>.json and $OUT/summary.json; prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench  # noqa: E402  (request builders: image_request, w4_requests, drive)
import qwenvl  # noqa: E402
from qwenvl.engine import LLM, SamplingParams  # noqa: E402
from qwenvl.parallel import RandomWeights  # noqa: E402

SECTIONS = ("tp1", "tp2", "big", "fp8")
GREEDY = dict(temperature=0.0, ignore_eos=True)


def log(*a):
    print(*a, flush=True)


class Out:
    """A section's results, rewritten to disk after every measurement."""

    def __init__(self, path: str, **head):
        self.path, self.r = path, dict(head, complete=False)

    def __setitem__(self, k, v):
        self.r[k] = v
        self.save()

    def __getitem__(self, k):
        return self.r[k]

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.r, f, indent=2, default=str)


def prompt_of(ids, pix, grid) -> dict:
    return {"prompt_token_ids": ids[0].tolist(), "images": [(pix, grid[0])]}


def sync(llm):
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)


def equality_tokens(llm, cfg, a) -> list[list[int]]:
    reqs = bench.w4_requests(cfg, n=a.eq_requests, seed=5)
    outs = llm.generate([prompt_of(*r[:3]) for r in reqs], SamplingParams(max_tokens=a.eq_tokens, **GREEDY))
    return [o.outputs[0].token_ids for o in outs]


def w1(llm, cfg, a) -> dict:
    ids, pix, grid = bench.image_request(cfg, n_text=64, seed=7)
    bench.drive(llm, "w1-warm", prompt_of(ids, pix, grid), SamplingParams(max_tokens=4, **GREEDY))
    ids, pix, grid = bench.image_request(cfg, n_text=64, seed=8)  # a new image: the ViT runs
    params = SamplingParams(max_tokens=a.w1_tokens, **GREEDY)
    ttft, dec, toks = bench.drive(llm, "w1", prompt_of(ids, pix, grid), params)
    return {"decode_tok_s": (len(toks) - 1) / dec, "ttft_ms": ttft * 1e3, "tokens": len(toks),
            "prompt_tokens": ids.shape[1]}


def w4(llm, cfg, n: int) -> dict:
    reqs = bench.w4_requests(cfg, n=n)
    prompts = [prompt_of(*r[:3]) for r in reqs]
    params = [SamplingParams(max_tokens=r[3], **GREEDY) for r in reqs]
    sync(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(llm)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tok_s": n_out / dt, "requests": n, "output_tokens": n_out, "seconds": dt,
            "prompt_tokens": sum(r[0].shape[1] for r in reqs), "preemptions": llm.stats()["num_preemptions"]}


def engine_info(llm, t_init: float) -> dict:
    st = llm.stats()
    r = llm.runner
    return {"init_s": t_init, "num_blocks": st["num_blocks"], "max_model_len": st["max_model_len"],
            "cuda_graph_batch_sizes": st["cuda_graph_batch_sizes"], "triton_decode": st["triton_decode"],
            "local_heads": r.heads, "local_kv_heads": r.kv_heads,
            "weight_gib_rank0": sum(p.numel() * p.element_size() for p in llm.model.parameters()) / 2**30}


def make_llm(a, factory, tp: int, **kw) -> tuple[LLM, float]:
    t0 = time.time()
    kw = dict(dict(max_model_len=8192, max_num_seqs=256, gpu_memory_utilization=0.9), **kw)
    if a.device == "cpu":
        kw.update(device="cpu", kv_cache_bytes=1 << 30)
        kw.pop("gpu_memory_utilization")
    llm = LLM(factory, tensor_parallel_size=tp, processor=None, **kw)
    return llm, time.time() - t0


def first_divergence(a: list[int], b: list[int]):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------------------------- sections
def measure(a, R: Out, cfg, factory, tp: int, n_w4: int, check=None, **llm_kw) -> None:
    """Engine info, check(llm) (optional), W1, W4 on one engine; the ranks it started stop at the end."""
    llm, t = make_llm(a, factory, tp, **llm_kw)
    try:
        R["engine"] = engine_info(llm, t)
        log(R["engine"])
        if check is not None:
            check(llm)
        R["w1"] = w1(llm, cfg, a)
        log("W1", R["w1"])
        R["w4"] = w4(llm, cfg, n_w4)
        log("W4", R["w4"])
    finally:
        llm.shutdown()


def run_tp(a, R: Out, tp: int) -> None:
    cfg = qwenvl.preset(a.shape)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32

    def check(llm):
        R["eq_tokens"] = toks = equality_tokens(llm, cfg, a)
        ref_path = os.path.join(a.out, "tp1.json")
        ref = json.load(open(ref_path)).get("eq_tokens") if tp > 1 and os.path.exists(ref_path) else None
        if ref:
            div = [first_divergence(x, y) for x, y in zip(ref, toks)]
            R["vs_tp1"] = {"requests": len(div), "identical": sum(d is None for d in div), "first_divergence": div}
            log("vs TP=1:", R["vs_tp1"])

    measure(a, R, cfg, RandomWeights(a.shape, dtype, seed=0), tp, a.w4_requests, check)


def weight_bytes_per_rank(cfg, world: int, fp8: bool) -> int:
    """Bytes of one rank's weights (bf16; FP8 decoder linears + fp32 scales), from the config alone."""
    from qwenvl.model import Qwen25VL

    with torch.device("meta"):
        m = Qwen25VL(cfg)
    total = 0
    for name, p in m.named_parameters():
        linear = name.startswith("model.layers.") and name.endswith("proj.weight")
        b = p.numel() * (1 if linear and fp8 else 2) + (p.shape[0] * 4 if linear and fp8 else 0)
        total += b if name.startswith("visual.") or "norm" in name else b // world  # replicated or sharded
    return total


def run_big(a, R: Out) -> None:
    cfg = qwenvl.preset(a.big)
    if a.device == "cuda":
        card = torch.cuda.get_device_properties(0).total_memory
        need_bf16 = weight_bytes_per_rank(cfg, a.big_tp, fp8=False)
        fp8 = a.big_dtype == "fp8" or (a.big_dtype == "auto" and need_bf16 > a.big_fit * card)
        R["fit"] = {"card_gib": card / 2**30, "bf16_weights_gib_per_rank": need_bf16 / 2**30,
                    "fp8_weights_gib_per_rank": weight_bytes_per_rank(cfg, a.big_tp, fp8=True) / 2**30}
        dtype = torch.bfloat16
    else:
        fp8, dtype = a.big_dtype == "fp8", torch.float32
    R["dtype"], R["tp"] = "fp8" if fp8 else str(dtype), a.big_tp
    measure(a, R, cfg, RandomWeights(a.big, dtype, seed=0, full=False, fp8=fp8), a.big_tp, a.big_w4_requests,
            gpu_memory_utilization=a.big_gpu_util, max_num_seqs=a.big_max_seqs)


def run_fp8(a, R: Out) -> None:
    from qwenvl.quant import fp8_gemv
    from qwenvl.quant.fp8 import compile_activation_quant, fp8_backend

    cfg = qwenvl.preset(a.shape)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = RandomWeights(a.shape, dtype, seed=0)(0, 1, a.device)
    R["fp8_backend"] = fp8_backend(model.device)
    small = dict(max_num_seqs=16, gpu_memory_utilization=0.45)  # W1 only; leaves room for the next engine
    R["fp8g_kernel_usable"] = fp8_gemv.gemv_ok(model.device)
    for name in ("bf16", "fp8", "fp8g", "fp8c"):
        if name == "fp8c":
            R["fp8c_compiled"] = compile_activation_quant(True)
            if not R["fp8c_compiled"]:
                break
        old = fp8_gemv.set_enabled(name == "fp8g")  # read while the engine captures its decode graphs
        try:
            # quantization="fp8": the model's decoder linears become FP8Linear in place, layer by layer
            llm, t = make_llm(a, model, 1, quantization=None if name == "bf16" else "fp8", **small)
            R[name] = dict(engine_info(llm, t), w1=w1(llm, cfg, a))
        finally:
            fp8_gemv.set_enabled(**old)
        log(name, R[name])
        del llm
        gc.collect()
        if a.device == "cuda":
            torch.cuda.empty_cache()
    compile_activation_quant(False)
    R["fp8_vs_bf16_w1"] = R["fp8"]["w1"]["decode_tok_s"] / R["bf16"]["w1"]["decode_tok_s"]
    R["fp8g_vs_bf16_w1"] = R["fp8g"]["w1"]["decode_tok_s"] / R["bf16"]["w1"]["decode_tok_s"]
    if "fp8c" in R.r:
        R["fp8c_vs_bf16_w1"] = R["fp8c"]["w1"]["decode_tok_s"] / R["bf16"]["w1"]["decode_tok_s"]


def run_section(a) -> int:
    name = a.run
    R = Out(os.path.join(a.out, f"{name}.json"), section=name, torch=torch.__version__,
            device=torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu")
    try:
        {"tp1": lambda: run_tp(a, R, 1), "tp2": lambda: run_tp(a, R, 2), "big": lambda: run_big(a, R),
         "fp8": lambda: run_fp8(a, R)}[name]()
        R["complete"] = True
        return 0
    except Exception as e:
        R["error"] = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
        return 1


# ---------------------------------------------------------------------------------------------- driver
def table(out: str) -> str:
    def load(n):
        p = os.path.join(out, f"{n}.json")
        return json.load(open(p)) if os.path.exists(p) else {}

    rows = ["| section | W1 decode tok/s | W1 TTFT ms | W4 output tok/s | notes |", "|---|---|---|---|---|"]
    for n in ("tp1", "tp2", "big"):
        r = load(n)
        if not r:
            continue
        w1_, w4_ = r.get("w1", {}), r.get("w4", {})
        e = r.get("engine", {})
        note = [f"graphs {len(e.get('cuda_graph_batch_sizes', []))}", f"blocks {e.get('num_blocks')}"]
        if "vs_tp1" in r:
            v = r["vs_tp1"]
            note.append(f"identical to TP=1 {v['identical']}/{v['requests']}, first divergences "
                        f"{[d for d in v['first_divergence'] if d is not None]}")
        if n == "big":
            note.append(f"dtype {r.get('dtype')}, TP={r.get('tp')}")
        if "error" in r:
            note.append("ERROR " + r["error"][:200])
        if not r.get("complete"):
            note.append("incomplete")
        rows.append(f"| {n} | {w1_.get('decode_tok_s', float('nan')):.1f} | {w1_.get('ttft_ms', float('nan')):.0f} | "
                    f"{w4_.get('output_tok_s', float('nan')):.1f} ({w4_.get('requests')} req) | {'; '.join(note)} |")
    r = load("fp8")
    if r:
        parts = [f"{k} {r[k]['w1']['decode_tok_s']:.1f}" for k in ("bf16", "fp8", "fp8g", "fp8c") if k in r]
        ratios = ", ".join(f"{k}/bf16 {r[f'{k}_vs_bf16_w1']:.2f}x" for k in ("fp8", "fp8g", "fp8c")
                           if f"{k}_vs_bf16_w1" in r)
        rows.append(f"| fp8 (1 GPU, W1) | {' / '.join(parts)} | | | {ratios}, backend {r.get('fp8_backend')}"
                    f"{'; ERROR ' + r['error'][:200] if 'error' in r else ''} |")
    return "\n".join(rows)


def drive_all(a, argv) -> int:
    os.makedirs(a.out, exist_ok=True)
    limits = dict(zip(SECTIONS, (a.tp1_s, a.tp2_s, a.big_s, a.fp8_s)))
    start = time.time()
    codes = {}
    for name in a.sections.split(","):
        left = a.budget - (time.time() - start)
        limit = min(limits[name], left - 5)
        if limit < 30:
            log(f"--- {name}: skipped (budget spent)")
            codes[name] = "skipped"
            continue
        log(f"--- {name} (limit {limit:.0f}s)")
        t0 = time.time()
        # a new session: at the limit the section and the rank processes it started die together
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--run", name],
                             start_new_session=True)
        try:
            codes[name] = p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            codes[name] = "timeout"
        log(f"--- {name}: {codes[name]} in {time.time() - t0:.0f}s")
    summary = {"codes": codes, "seconds": time.time() - start}
    for name in SECTIONS:
        p = os.path.join(a.out, f"{name}.json")
        if os.path.exists(p):
            summary[name] = json.load(open(p))
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(table(a.out))
    return 0 if all(c == 0 for c in codes.values()) else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--big", default="72b")
    ap.add_argument("--big-dtype", default="auto", choices=["auto", "bf16", "fp8"])
    ap.add_argument("--big-fit", type=float, default=0.9,
                    help="bf16 if a rank's weights fit in this share of the card")
    ap.add_argument("--big-tp", type=int, default=2, help="1: the 72B shape on one GPU (an H200, in FP8)")
    ap.add_argument("--big-gpu-util", type=float, default=0.95)
    ap.add_argument("--big-max-seqs", type=int, default=64)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--eq-requests", type=int, default=32)
    ap.add_argument("--eq-tokens", type=int, default=64)
    ap.add_argument("--w1-tokens", type=int, default=256)
    ap.add_argument("--w4-requests", type=int, default=256)
    ap.add_argument("--big-w4-requests", type=int, default=64)
    ap.add_argument("--budget", type=float, default=570.0, help="seconds for all sections together")
    ap.add_argument("--tp1-s", type=float, default=130.0)
    ap.add_argument("--tp2-s", type=float, default=150.0)
    ap.add_argument("--big-s", type=float, default=180.0)
    ap.add_argument("--fp8-s", type=float, default=130.0)
    ap.add_argument("--run", default=None, choices=SECTIONS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    bench.DEV = a.device
    if a.run:
        os.makedirs(a.out, exist_ok=True)
        return run_section(a)
    return drive_all(a, argv)


if __name__ == "__main__":
    sys.exit(main())
