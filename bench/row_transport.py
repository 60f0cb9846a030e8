"""What receiving one packed training row costs the training process (issue 6): the main process's CPU per row that
a data worker sends back, through the pipe (pickled numpy), as raw files and through shared memory, on the rows of a real
mix.

    python -m qwenvl.synth --out D --tasks all --n 40          # (QWENVL_SYNTH_VIDEO=frames without PyAV)
    python bench/row_transport.py --data D [--pack 32768] [--rows 4] [--modes pipe,file,shm]

Rows are planned exactly as bench/profile_train_row.py plans them (the nano recipe's encoder options, one chunk of
every task file, packed and shuffled); each is built by one worker of the PackedLoader's fork pool (its own
_worker_init / _worker_encode) and awaited by the main thread. The main process's CPU time (all its threads: the
pool's result thread reads and unpickles what arrives) from submitting a row to holding its tensors, minus the
process's idle CPU rate over the same wall time, is the cost per row. Runs against this checkout's packing module,
so the same script measures an older checkout (rows of float pixel values in `--pixel-dtype`) when copied there.
Then, where the checkout has it, `device_pixels` is timed on the host (on the CPU it does the whole conversion,
which on a GPU is device kernels after one pinned copy of the frames).
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import qwenvl.train.packing as packing  # noqa: E402
from profile_train_row import build  # noqa: E402


def row_bins(loader, pack: int, n: int, min_fill: float) -> list:
    bins = []
    while len(bins) < n:
        bins += [b for b in loader._plan_step() if sum(x[3] for x in b) >= min_fill * pack]
    return bins[:n]


def tensor_bytes(batch: dict) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def idle_cpu_rate(seconds: float = 2.0) -> float:
    c0, t0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    return (time.process_time() - c0) / (time.perf_counter() - t0)


def measure(enc, bins: list, mode: str, pixel_dtype) -> dict:
    params = list(inspect.signature(packing._worker_init).parameters)
    spool = None
    if "spool" in params:  # uint8 frames; "shm" / "file" / "pipe" forced
        import tempfile
        spool = tempfile.mkdtemp(prefix="qwenvl-rows-")
        initargs = (enc, False, mode, 1, spool)
    elif "transport" in params:  # uint8 frames; "shm" / "pipe" forced
        initargs = (enc, False, mode, 1)
    else:  # before: float pixel values (bf16 as the nano recipe sends them), pipe when pickle_tensors
        initargs = (enc, False, mode == "pipe", pixel_dtype)
    pool = multiprocessing.get_context("fork").Pool(1, initializer=packing._worker_init, initargs=initargs)
    try:
        pool.apply_async(packing._worker_encode, ([],)).get()  # the fork and first call, not timed
        idle = idle_cpu_rate()
        out = []
        for items in bins:
            c0, t0 = time.process_time(), time.perf_counter()
            r = pool.apply_async(packing._worker_encode, (items,))
            r.wait()  # blocks without CPU; the result thread reads and unpickles the row meanwhile
            batch = packing._unpack(r.get())[0]
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0
            out.append({"main_cpu_s": cpu - idle * wall, "wall_s": wall, "MB_sent": tensor_bytes(batch) / 2**20,
                        "batch": batch})
    finally:
        pool.close()
        pool.join()
        if spool:
            import shutil
            shutil.rmtree(spool, ignore_errors=True)
    return {"idle_cpu_per_s": idle, "rows": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pack", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--min-fill", type=float, default=0.8)
    ap.add_argument("--modes", default="pipe,file,shm")
    ap.add_argument("--pixel-dtype", default="bfloat16", help="older checkouts: the dtype rows carry pixels in")
    ap.add_argument("--json")
    a = ap.parse_args(argv)  # glibc's default malloc settings, as in the trainer (no profile_train_row.keep_heap)
    cfg, config, enc, loader = build(a.data, a.pack, a.chunk)
    bins = row_bins(loader, a.pack, a.rows, a.min_fill)
    result = {"pack": a.pack, "rows": a.rows, "modes": {}}
    last = None
    for mode in a.modes.split(","):
        m = measure(enc, bins, mode, getattr(torch, a.pixel_dtype))
        cpu = [r["main_cpu_s"] for r in m["rows"]]
        result["modes"][mode] = {
            "main_cpu_s_per_row_mean": round(statistics.mean(cpu), 4),
            "main_cpu_s_per_row_median": round(statistics.median(cpu), 4), "main_cpu_s_per_row_min": round(min(cpu), 4),
            "main_cpu_s_per_row": [round(x, 4) for x in cpu], "MB_sent_per_row": [round(r["MB_sent"], 1) for r in m["rows"]],
            "worker_wall_s_per_row": [round(r["wall_s"], 2) for r in m["rows"]],
            "idle_cpu_per_s": round(m["idle_cpu_per_s"], 4)}
        last = [r["batch"] for r in m["rows"]]
        print(mode, json.dumps(result["modes"][mode]), flush=True)
    if hasattr(packing, "device_pixels") and last:  # the conversion itself, here on the CPU (a GPU's kernels)
        torch.set_num_threads(1)
        times = []
        for b in last:
            t0 = time.perf_counter()
            packing.device_pixels(b, "cpu", torch.bfloat16)
            times.append(time.perf_counter() - t0)
        result["device_pixels_on_cpu_s_per_row"] = [round(x, 3) for x in times]
        print("device_pixels on the CPU (1 thread), s per row:", result["device_pixels_on_cpu_s_per_row"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
