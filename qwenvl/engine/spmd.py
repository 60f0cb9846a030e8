"""The engine under tensor parallelism: one identical LLM per rank (SPMD), rank 0 the driver.

Every rank holds its shard of the decoder (qwenvl.parallel: column/row-parallel attention and MLP,
vocab-parallel embedding and head, the ViT replicated) and a paged KV cache over its own kv heads
(the runner sizes everything from the shard's config). Rank 0 owns the request stream: the caller's
add_request / abort / step run there, and at the start of every step it broadcasts one control message
over a CPU (gloo) group:

    (kind, results of its previous step, new requests, aborts)      kind: "step" | "return" | "shutdown"

results = [(request id, completion index, token id, finish reason or None)] in the order rank 0 applied
them. The other ranks (`LLM.follow`) apply exactly that, then run the same schedule -> forward; they
never sample and never detokenize, so their scheduler state equals rank 0's by construction (token choice,
stop strings and max_model_len included) even if their logits differed in the last bit. Every step's
forward therefore issues the same collectives in the same order on every rank, CUDA graphs included
(one graph per batch bucket per rank, NCCL all-reduces captured inside).

KV cache size: each rank sizes its own, then the minimum over ranks is used (all_reduce MIN), so block
ids mean the same memory everywhere.

Entry points (LLM(..., tensor_parallel_size=N)):
  - one process (`LLM(path, tensor_parallel_size=2)`, `qwenvl serve --tensor-parallel-size 2`): ranks
    1..N-1 are started here (start_workers) and loop in LLM.follow(); the caller's process is rank 0 and
    gets the outputs. The model is a checkpoint path or a picklable factory `f(rank, world, device)`.
  - torchrun --nproc-per-node N: every rank constructs LLM(...) with the same arguments and calls
    generate/chat with the same arguments; rank 0 returns the outputs, the others return [] once rank 0
    is done (their prompts are not read). Or rank 0 serves and the others call follow().
"""

from __future__ import annotations

import atexit
import datetime
import io
import logging
import os
import pickle
import weakref

import torch
import torch.distributed as dist

from ..errors import InputError

log = logging.getLogger(__name__)

QUANTIZATIONS = (None, "fp8")
# The control group may idle for as long as a server has no requests: its receives must not time out.
CONTROL_TIMEOUT = datetime.timedelta(days=365)
TENSOR_OUT_OF_BAND = 1 << 16  # bytes: larger tensors of a control message are sent raw, not pickled
STAGING_BYTES = 64 << 20  # chunk of a raw transfer (the GPU staging buffer's size under NCCL)
INLINE_BYTES = 16 << 10  # a control message this long (every decode step's) is one gloo collective


class _Pickler(pickle.Pickler):
    """Pickles everything but large tensors, which it collects for the raw transfer."""

    def __init__(self, f, tensors: list):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor) and obj.numel() * obj.element_size() >= TENSOR_OUT_OF_BAND:
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, tensors: list):
        super().__init__(f)
        self.tensors = tensors

    def persistent_load(self, pid):
        return self.tensors[pid]


class TPChannel:
    """rank 0 -> all control messages and small agreements, over a gloo group of all ranks. Large tensors of a
    message (the pixels of new requests) travel raw, outside the pickle: over NCCL in chunks through one GPU
    staging buffer when the ranks have GPUs, else over the gloo group."""

    def __init__(self, device: torch.device):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device)
        self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self._staging: torch.Tensor | None = None
        self._head = torch.zeros(8 + INLINE_BYTES, dtype=torch.uint8)

    def broadcast(self, obj=None):
        """rank 0: send obj to every rank; others: return what rank 0 sent."""
        tensors: list[torch.Tensor] = []
        if self.rank == 0:
            buf = io.BytesIO()
            _Pickler(buf, tensors).dump(obj)
            payload = pickle.dumps((buf.getvalue(), [(tuple(t.shape), t.dtype, t.device.type) for t in tensors]),
                                   protocol=pickle.HIGHEST_PROTOCOL)
        payload = self._broadcast_bytes(payload if self.rank == 0 else b"")
        payload, metas = pickle.loads(payload)
        if self.rank != 0:
            tensors = [torch.empty(shape, dtype=dtype, device="cpu" if kind == "cpu" else self.device)
                       for shape, dtype, kind in metas]
        for t in tensors:
            self._broadcast_tensor(t)
        return obj if self.rank == 0 else _Unpickler(io.BytesIO(payload), tensors).load()

    def _broadcast_bytes(self, data: bytes) -> bytes:
        """One gloo collective for a message up to INLINE_BYTES (the length travels in its first 8 bytes),
        a second one for the rest of a longer message."""
        head = self._head
        if self.rank == 0:
            n = len(data)
            head[:8] = torch.tensor([n], dtype=torch.int64).view(torch.uint8)
            k = min(n, INLINE_BYTES)
            head[8:8 + k] = torch.frombuffer(bytearray(data[:k]), dtype=torch.uint8) if k else head[8:8]
        dist.broadcast(head, src=0, group=self.group)
        n = int(head[:8].view(torch.int64).item())
        k = min(n, INLINE_BYTES)
        if n <= INLINE_BYTES:
            return data if self.rank == 0 else head[8:8 + k].numpy().tobytes()
        rest = torch.frombuffer(bytearray(data[k:]), dtype=torch.uint8) if self.rank == 0 \
            else torch.empty(n - k, dtype=torch.uint8)
        dist.broadcast(rest, src=0, group=self.group)
        return data if self.rank == 0 else head[8:8 + k].numpy().tobytes() + rest.numpy().tobytes()

    def _broadcast_tensor(self, t: torch.Tensor) -> None:
        src = t if t.is_contiguous() else t.contiguous()  # rank 0 only: receivers allocate contiguous
        flat = src.view(-1).view(torch.uint8)
        if flat.device.type == "cuda" or self.device.type != "cuda":
            group = None if flat.device.type == "cuda" else self.group
            for i in range(0, flat.numel(), STAGING_BYTES):
                dist.broadcast(flat[i:i + STAGING_BYTES], src=0, group=group)
            return
        if self._staging is None:
            self._staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, device=self.device)
        for i in range(0, flat.numel(), STAGING_BYTES):
            n = min(STAGING_BYTES, flat.numel() - i)
            chunk = self._staging[:n]
            if self.rank == 0:
                chunk.copy_(flat[i:i + n])
            dist.broadcast(chunk, src=0)
            if self.rank != 0:
                flat[i:i + n].copy_(chunk)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def min_int(self, x: int) -> int:
        t = torch.tensor([int(x)], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def agree(self, ok: bool) -> bool:
        """True only when every rank says True."""
        return bool(self.min_int(int(bool(ok))))


def check_options(tensor_parallel_size, quantization) -> None:
    if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) or tensor_parallel_size < 1:
        raise InputError(f"LLM: tensor_parallel_size={tensor_parallel_size!r} must be a positive integer")
    if quantization not in QUANTIZATIONS:
        raise InputError(f"LLM: quantization={quantization!r} is not supported (choose from {QUANTIZATIONS})")


def _rank_device(device, world: int) -> tuple[str, torch.device | None]:
    """(backend, device) for the ranks of a new process group: NCCL and cuda:rank when there is a GPU per
    rank (and device is not cpu), gloo on the CPU for device="cpu" or a machine without CUDA; too few GPUs
    is an error (not a silent fall back to the CPU)."""
    want = torch.device(device) if device is not None else None
    if (want is None or want.type == "cuda") and torch.cuda.is_available() and torch.cuda.device_count() >= world:
        return "nccl", None
    if (want is None and torch.cuda.is_available()) or (want is not None and want.type == "cuda"):
        raise InputError(f"LLM: tensor_parallel_size={world} on CUDA needs {world} GPUs, this machine has "
                         f"{torch.cuda.device_count()}")
    return "gloo", torch.device("cpu")


def setup(model, device, world: int, init_kwargs: dict):
    """Join (or create) the process group of `world` ranks. Returns (rank, device, workers): workers are the
    processes this call started (one-process mode, rank 0 here), else None."""
    from ..parallel import init_distributed, start_workers

    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise InputError(f"LLM: tensor_parallel_size={world} but the process group has {dist.get_world_size()} "
                             "ranks")
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        return dist.get_rank(), dev, None
    backend, _ = _rank_device(device, world)
    if int(os.environ.get("WORLD_SIZE", 1)) == world and "RANK" in os.environ:  # torchrun
        rank, _, dev = init_distributed(backend)
        return rank, dev, None
    if not (isinstance(model, (str, os.PathLike)) or (callable(model) and not isinstance(model, torch.nn.Module))):
        raise InputError("LLM: tensor_parallel_size > 1 in one process needs a checkpoint path or a picklable "
                         "model factory f(rank, world, device) (a built model lives in this process only); "
                         "under torchrun every rank may pass its own model")
    workers, dev = start_workers(_follower_main, world, model, init_kwargs, backend=backend)
    return 0, dev, workers


def _follower_main(rank: int, world: int, model, init_kwargs: dict) -> None:
    """Ranks 1..N-1 of the one-process mode: the same LLM, driven by rank 0's messages until shutdown."""
    from .engine import LLM

    logging.basicConfig(level=logging.WARNING)
    LLM(model, **init_kwargs).follow()


def build_model(model, dtype, device, rank: int, world: int, quantization):
    """(model on this rank: whole at world 1, else this rank's shard; checkpoint path or None)."""
    from ..model import Qwen25VL
    from ..parallel import load_tp, shard_model
    from ..parallel.tp import ShardedTextConfig
    from ..quant.fp8 import quantize_model_fp8

    path = None
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = load_tp(path, rank, world, dtype=dtype, device=device)
    else:
        if not isinstance(model, Qwen25VL) and callable(model):
            model = model(rank, world, device)
        if not isinstance(model, Qwen25VL):
            raise InputError(f"LLM: expected a checkpoint path or a Qwen25VL, got {type(model).__name__}")
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        text = model.config.text
        if isinstance(text, ShardedTextConfig):
            if text.tp_world != world or text.tp_rank != rank:
                raise InputError(f"LLM: the model is shard {text.tp_rank} of {text.tp_world}, expected "
                                 f"{rank} of {world}")
        elif world > 1:
            model = shard_model(model, rank, world)
    if quantization == "fp8":
        quantize_model_fp8(model)  # skips linears that are FP8 already (an FP8 checkpoint)
    return model.eval(), path


def register_shutdown(llm) -> None:
    """Stop the worker ranks at interpreter exit if the caller did not (before multiprocessing's own atexit
    hook, which would otherwise wait for them forever)."""
    ref = weakref.ref(llm)

    def stop():
        obj = ref()
        if obj is not None:
            try:
                obj.shutdown()
            except Exception:  # exiting anyway
                log.exception("tensor-parallel shutdown failed")

    atexit.register(stop)
