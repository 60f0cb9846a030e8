"""Starting torch.distributed: under torchrun (`init_distributed`) or from Python (`spawn`).

Backend: NCCL when CUDA has a GPU per rank, gloo otherwise (CPU tests). Each CUDA rank uses GPU `LOCAL_RANK`.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def default_backend(world: int) -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*); single process
    without them. Returns (rank, world, device): cuda:LOCAL_RANK with NCCL, else cpu. timeout_s bounds how
    long a collective may wait (a rank that died then fails the others instead of hanging them)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = backend or default_backend(world)
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        kw = {"device_id": device} if device.type == "cuda" else {}
        if timeout_s:
            kw["timeout"] = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    return rank, world, device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world, port, backend, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        if backend == "gloo":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        init_distributed(backend)
        out = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory handles: this process may exit before the parent reads
        results.put((rank, True, buf.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world: int, *args, backend: str | None = None, timeout: float = 600.0) -> list:
    """Run fn(rank, world, *args) in `world` new processes sharing one process group; return the per-rank
    return values (rank order). fn must be importable (module level) and its return value picklable by
    torch.save. A failing rank raises here with its traceback, and the other ranks are terminated.

    `qwenvl serve --tensor-parallel-size N` -> spawn(serve_rank, N, args): every rank loads its shard with
    load_tp(path, rank, world, ...) and runs the same steps; rank 0 owns the HTTP server."""
    backend = backend or default_backend(world)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, backend, args, results), daemon=False)
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, bytes] = {}
    errors: list[str] = []
    waited = 0.0
    try:
        while len(got) + len(errors) < world:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and not errors:
                    errors.append(f"rank process(es) {[procs.index(p) for p in dead]} died "
                                  f"(exit codes {[p.exitcode for p in dead]}) without a result")
                if errors or waited > timeout:
                    break
                continue
            if ok:
                got[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors and len(got) == world else 1)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors or len(got) < world:
        raise RuntimeError("spawn: " + ("\n".join(errors) or f"timed out after {timeout:.0f}s"))
    return [torch.load(io.BytesIO(got[r]), weights_only=False) for r in range(world)]
