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


def init_distributed(backend: str | None = None, timeout_s: float | None = None, env: dict | None = None
                     ) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*); single process
    without them. Returns (rank, world, device): cuda:LOCAL_RANK with NCCL, else cpu. timeout_s bounds how
    long a collective may wait (a rank that died then fails the others instead of hanging them). env: those
    variables given explicitly instead of read from os.environ (start_workers' rank 0: the caller's process)."""
    env = os.environ if env is None else env
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    local = int(env.get("LOCAL_RANK", rank))
    backend = backend or default_backend(world)
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        kw = {"device_id": device} if device.type == "cuda" else {}
        if timeout_s:
            kw["timeout"] = datetime.timedelta(seconds=timeout_s)
        if env is not os.environ:
            kw["init_method"] = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    return rank, world, device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> dict:
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank))


def leave_process_group(timeout_s: float = 10.0) -> bool:
    """destroy_process_group, but never for longer than timeout_s: NCCL teardown can block (seen with the
    engine's CUDA graphs on 2 GPUs), and a process that is leaving anyway must not hang on it. True if it
    finished; otherwise the daemon thread is abandoned and process exit releases the communicator."""
    import threading

    if not dist.is_initialized():
        return True
    t = threading.Thread(target=dist.destroy_process_group, daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive()


def _worker(fn, rank, world, port, backend, args, results, timeout_s=None):
    os.environ.update(_rank_env(rank, world, port))
    try:
        if backend == "gloo":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        init_distributed(backend, timeout_s)
        out = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory handles: this process may exit before the parent reads
        results.put((rank, True, buf.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        leave_process_group()


def spawn(fn, world: int, *args, backend: str | None = None, timeout: float = 600.0) -> list:
    """Run fn(rank, world, *args) in `world` new processes sharing one process group; return the per-rank
    return values (rank order). fn must be importable (module level) and its return value picklable by
    torch.save. A failing rank raises here with its traceback, and the other ranks are terminated.

    (The engine's one-process tensor parallelism uses start_workers instead: the caller stays rank 0.)"""
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


class Workers:
    """Ranks 1..world-1 in new processes, this process rank 0 of the same process group (see start_workers)."""

    def __init__(self, procs, results):
        self.procs, self.results = procs, results

    def failures(self) -> list[str]:
        """Tracebacks of ranks that failed so far, and ranks that died without one."""
        out = []
        while True:
            try:
                rank, ok, payload = self.results.get_nowait()
            except queue.Empty:
                break
            if not ok:
                out.append(f"rank {rank} failed:\n{payload}")
        dead = [i + 1 for i, p in enumerate(self.procs) if p.exitcode not in (None, 0)]
        if dead and not out:
            out.append(f"rank process(es) {dead} died (exit codes {[self.procs[r - 1].exitcode for r in dead]})")
        return out

    def join(self, timeout: float = 30.0) -> None:
        for p in self.procs:
            p.join(timeout=timeout)
            if p.is_alive():
                p.terminate()
                p.join()


def start_workers(fn, world: int, *args, backend: str | None = None, timeout_s: float | None = None
                  ) -> tuple[Workers, torch.device]:
    """Start fn(rank, world, *args) for ranks 1..world-1 in new processes (as spawn does) and make the calling
    process rank 0 of their process group (GPU 0 with NCCL). Returns (workers, this rank's device). fn must be
    importable; its return value is ignored. The caller runs rank 0's part itself, then joins the workers."""
    backend = backend or default_backend(world)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, backend, args, results, timeout_s), daemon=True)
             for r in range(1, world)]
    for p in procs:
        p.start()
    workers = Workers(procs, results)
    try:
        _, _, device = init_distributed(backend, timeout_s, env=_rank_env(0, world, port))
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    return workers, device
