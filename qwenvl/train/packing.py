"""Length-balanced packing: samples -> fixed-capacity packed rows -> steps balanced across data-parallel ranks.

The report (Qwen2.5-VL §2.2) packs samples by their LLM sequence length to 8192 (32768 for long context) so that
every GPU does about the same work. Here:
  1. `pack_lengths`: samples into bins of `capacity` tokens (each bin = one packed row, B = 1, with per-sample
     boundaries `seq_lens`: the model's block-diagonal mask and restarting MRoPE positions), as few bins as best-fit
     decreasing needs, with every length range (hence every task of a mix) spread over the bins;
  2. `plan_steps`: each optimizer step takes world * grad_accum bins; inside a step the bins go to ranks by
     longest-processing-time first on a compute cost sum(len) + w * sum(len^2) (linear layers + attention),
     grad_accum bins per rank;
  3. `PackedLoader`: reads a chunk of records, measures them (no pixels), packs, plans, and materializes only this
     rank's bins. Its state (chunk start position + steps taken in the chunk) gives exact resume.
     With `workers > 0` a process pool measures the chunk's records and materializes the bins of the next steps
     ahead of the trainer (the same rows in the same order as without workers). A row carries its images and videos
     as uint8 frames (collate); the trainer makes the pixel values on its device (device_pixels).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import os
import shutil
from typing import Any

import numpy as np
import torch

from .. import preprocess
from ..layers import to_device
from .data import IGNORE, BadSample, DataError, JsonlStream, Position, Sample, SkipStats, shuffled


# ------------------------------------------------------------------------------------------------ bin packing
def pack_lengths(lengths: list[int], capacity: int, mix: bool = True) -> list[list[int]]:
    """Indices grouped into bins with sum(length) <= capacity, never more bins than best-fit decreasing needs.

    mix=False: best-fit decreasing (ties keep input order): the tightest packing, but it fills one bin after the
    other from the longest samples down, so a row holds samples of one length, which in a multi-task mix means
    mostly one task (a step of one or two rows then sees one task: a noisy loss). mix=True (default) spreads the
    samples instead (`_spread`): each row gets a share of every length range, hence of every task, and this is kept
    only when it needs no more bins than best-fit decreasing (else the best-fit bins are returned).
    """
    tight = _best_fit_decreasing(lengths, capacity)
    if mix:
        for head in (1.0, 0.5, 0.25):
            bins = _spread(lengths, capacity, head)
            if len(bins) <= len(tight):
                return bins
    return tight


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best fit keeps the fullest bins full; with many short samples it is within a few % of optimal."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than the bin capacity {capacity}")
    _best_fit(order, lengths, capacity, bins, [])
    return bins


def _best_fit(order: list[int], lengths: list[int], capacity: int, bins: list[list[int]],
              free: list[tuple[int, int]]) -> None:
    """Each index of `order` into the bin with the least free space that holds it (a new bin if none does);
    `free`: sorted (free space, bin id) of `bins`, updated in place."""
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))


def _spread(lengths: list[int], capacity: int, head: float) -> list[list[int]]:
    """Worst-fit decreasing over the lower-bound number of bins for the longest `head` share of the samples (each
    goes into the emptiest bin: the bins fill level with samples of every length), then best fit for the rest and
    for what did not fit (new bins only if needed)."""
    import heapq

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    k = max(1, -(-sum(lengths) // capacity))
    bins: list[list[int]] = [[] for _ in range(k)]
    heap = [(-capacity, b) for b in range(k)]  # (-free space, bin id): the emptiest bin on top
    n_head = int(len(order) * head)
    rest = []
    for i in order[:n_head]:
        neg_free, b = heap[0]
        if -neg_free >= lengths[i]:
            heapq.heapreplace(heap, (neg_free + lengths[i], b))
            bins[b].append(i)
        else:
            rest.append(i)
    free = sorted((-neg_free, b) for neg_free, b in heap if neg_free < 0)
    rest = sorted(rest + order[n_head:], key=lambda i: (-lengths[i], i))
    _best_fit(rest, lengths, capacity, bins, free)
    return [b for b in bins if b]


def attention_weight(config) -> float:
    """w in cost = sum(len) + w * sum(len^2): FLOPs of causal attention per token pair over FLOPs of the linear
    layers per token. Linear: 2 * P (non-embedding decoder params); attention: 2 * hidden * layers per (q, k)
    pair counting QK^T and AV with the causal half, i.e. w = hidden * layers / P."""
    t = config.text
    kv = t.num_key_value_heads * t.head_dim
    per_layer = 2 * t.hidden_size * t.hidden_size + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size
    return t.hidden_size * t.num_hidden_layers / (per_layer * t.num_hidden_layers)


def bin_cost(lengths: list[int], attn_weight: float) -> float:
    return float(sum(lengths) + attn_weight * sum(n * n for n in lengths))


def balance(costs: list[float], n_ranks: int, per_rank: int) -> list[list[int]]:
    """Items -> n_ranks groups of at most per_rank items, largest first onto the least loaded rank (LPT)."""
    groups: list[list[int]] = [[] for _ in range(n_ranks)]
    load = [0.0] * n_ranks
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min((r for r in range(n_ranks) if len(groups[r]) < per_rank), key=lambda r: (load[r], r))
        groups[r].append(i)
        load[r] += costs[i]
    return groups


def plan_steps(bin_costs: list[float], world: int, accum: int) -> list[list[list[int]]]:
    """Bins (already in random order) -> steps; step[rank] = the bin ids that rank runs (<= accum of them)."""
    per_step = world * accum
    steps = []
    for s in range(0, len(bin_costs), per_step):
        ids = list(range(s, min(s + per_step, len(bin_costs))))
        groups = balance([bin_costs[i] for i in ids], world, accum)
        steps.append([[ids[j] for j in g] for g in groups])
    return steps


# ------------------------------------------------------------------------------------------------ collation
def collate(samples: list[Sample]) -> dict[str, Any]:
    """Samples -> one packed row: input_ids/targets [1, T] (targets shifted inside each sample, -100 at its end),
    seq_lens, the grids (and second_per_grid_ts) in sample order (the order the model consumes them in), and the
    images' and videos' uint8 frames in one buffer: "frames" (uint8 [bytes]: every image, then every video, each
    in its own memory order) and "frames_hwc" (per item: True for T x H x W x 3 bytes, False for T x 3 x H x W).
    `device_pixels` turns them into pixel_values / pixel_values_videos on the training device."""
    ids, targets = [], []
    for s in samples:
        ids += s.input_ids
        targets += s.labels[1:] + [IGNORE]
    batch: dict[str, Any] = {"input_ids": torch.tensor([ids], dtype=torch.long),
                             "targets": torch.tensor([targets], dtype=torch.long),
                             "seq_lens": [len(s) for s in samples]}
    grids = [g for s in samples for g in s.image_grid_thw]
    vgrids = [g for s in samples for g in s.video_grid_thw]
    if grids:
        batch["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    if vgrids:
        batch["video_grid_thw"] = torch.tensor(vgrids, dtype=torch.long)
        batch["second_per_grid_ts"] = torch.tensor([x for s in samples for x in s.second_per_grid_ts])
    items = [v for s in samples for v in s.images] + [v for s in samples for v in s.videos]
    if len(items) != len(grids) + len(vgrids):
        raise ValueError(f"{len(items)} vision items for {len(grids) + len(vgrids)} grids (samples made without pixels?)")
    if items:
        dense = [preprocess.dense_frames(v.frames) for v in items]  # no transposing copy for either layout
        frames = torch.empty(sum(d.numel() for d, _ in dense), dtype=torch.uint8)
        off = 0
        for d, _ in dense:
            frames[off:off + d.numel()] = d.reshape(-1)
            off += d.numel()
        batch["frames"], batch["frames_hwc"] = frames, [hwc for _, hwc in dense]
    refs = [s.ref_logp for s in samples]
    if all(r is not None for r in refs):
        batch["ref_logps"] = torch.tensor(refs, dtype=torch.float64)
    return batch


def pixel_bytes(batch: dict | None) -> int:
    """Bytes of a row's vision input as it travels: its uint8 frames (or float pixel values, if it has those)."""
    if not batch:
        return 0
    if "frames" in batch:
        return int(batch["frames"].numel())
    return sum(int(batch[k].numel() * batch[k].element_size()) for k in ("pixel_values", "pixel_values_videos")
               if k in batch)


def device_pixels(batch: dict, device, dtype: torch.dtype | None = None) -> dict:
    """The row with its uint8 "frames" replaced by pixel_values / pixel_values_videos made on `device`.

    The frames go to the device in one copy (pinned, non-blocking: layers.to_device) and each item is normalised
    and patchified there by `preprocess.pixel_values_from_frames`, bit for bit the processor's float32 values;
    `dtype` (e.g. bf16, what bf16 compute rounds the patch embedding's input to anyway) is the values' dtype.
    A row without frames (text only, float pixel values, the trainer's vision dummies) comes back as it is; a
    modality whose pixel values are already there (a dummy) is left alone."""
    if "frames" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k not in ("frames", "frames_hwc")}
    frames = to_device(batch["frames"], device)
    layout = list(batch["frames_hwc"])
    off = item_no = 0
    for key, grid_key, frames_per_t in (("pixel_values", "image_grid_thw", 1),
                                        ("pixel_values_videos", "video_grid_thw", preprocess.TEMPORAL_PATCH_SIZE)):
        if grid_key not in batch or key in batch:
            continue
        grids = batch[grid_key].tolist()
        n_rows = sum(t * h * w for t, h, w in grids)
        values = torch.empty(n_rows, 3 * preprocess.TEMPORAL_PATCH_SIZE * preprocess.PATCH_SIZE ** 2,
                             dtype=dtype or torch.float32, device=frames.device)
        row = 0
        for t, h, w in grids:
            T, H, W = t * frames_per_t, h * preprocess.PATCH_SIZE, w * preprocess.PATCH_SIZE
            n = T * 3 * H * W
            if item_no >= len(layout) or off + n > frames.numel():
                break  # reported below
            item = frames[off:off + n]
            item = item.view(T, H, W, 3).permute(0, 3, 1, 2) if layout[item_no] else item.view(T, 3, H, W)
            values[row:row + t * h * w] = preprocess.pixel_values_from_frames(item)  # cast to dtype in the copy
            off, row, item_no = off + n, row + t * h * w, item_no + 1
        out[key] = values
    if off != frames.numel() or item_no != len(layout):
        raise ValueError(f"the row's frames ({frames.numel()} bytes, {len(batch['frames_hwc'])} items) do not match "
                         "its grids")
    return out


# ------------------------------------------------------------------------------------------------ loader
class PackedLoader:
    """Steps of packed rows for one rank, from a JSONL stream; `state_dict()` / `load_state_dict()` resume exactly.

    Every rank reads and measures the same records (cheap: tokenization and media headers) so all ranks agree on
    the plan without communication; each rank decodes pixels only for its own bins. `pairs=True` keeps a DPO
    record's chosen and rejected sequences together in one row (chosen first).
    A micro-batch is None when this rank has nothing to run in a step (the trainer runs a dummy one so that
    collectives stay matched).
    """

    def __init__(self, stream: JsonlStream, encoder, *, capacity: int = 8192, world: int = 1, rank: int = 0,
                 accum: int = 1, seed: int = 0, chunk_size: int = 1024, shuffle: bool = True,
                 stats: SkipStats | None = None, attn_weight: float = 0.0, pairs: bool = False, workers: int = 0,
                 prefetch: int | None = None, transport: str = "auto"):
        self.stream, self.encoder = stream, encoder
        self.capacity, self.world, self.rank, self.accum = capacity, world, rank, accum
        self.seed, self.chunk_size, self.shuffle = seed, chunk_size, shuffle
        self.stats = stats or SkipStats()
        self.attn_weight, self.pairs = attn_weight, pairs
        self.pos = Position()  # start of the current chunk
        self.step_in_chunk = 0
        self._chunk: list | None = None  # [(where, record, base_dir, length)]
        self._steps: list | None = None
        self._next_pos: Position | None = None
        self._replay = False  # re-reading a chunk after resume: its skips are already counted
        self.workers = workers
        if transport not in ("auto", "shm", "file", "pipe"):
            raise ValueError(f"transport must be auto, shm, file or pipe, got {transport!r}")
        self.transport = transport  # how workers send rows back (see _start_pool)
        self._pool = None
        self._ahead: collections.deque = collections.deque()  # (async results, state after the step), workers > 0
        self._consumed: dict | None = None  # the state after the last step handed out (workers > 0)
        self.prefetch = prefetch or max(1, -(-2 * workers // accum))  # steps in flight
        # rows by the way they reached this process ("main": built here, workers=0), and their vision bytes
        self.rows_via: collections.Counter = collections.Counter()
        self.pixel_bytes = 0
        self.last_step: dict = {}  # the last step's {"via": {path: rows}, "pixel_bytes": ...}
        self.shm_free_start: int | None = None  # /dev/shm bytes free when the pool started
        self._spool: str | None = None  # folder of the "file" transport's row files (removed by close)

    def rows_in_flight(self) -> int:
        """Rows that can hold shared memory at once: the prefetched steps (built or being built), the step the
        trainer still holds and the one it is being handed."""
        return (self.prefetch + 2) * self.accum

    def _start_pool(self):
        """A fork pool (workers inherit the encoder; no CUDA in them). Each row comes back through shared memory
        (its tensors moved to /dev/shm; this process maps them: no copy) or pickled through the pipe (this process
        reads and unpickles every byte). transport="auto" (default): shared memory while /dev/shm has room for
        SHM_MARGIN x rows_in_flight() rows of this row's size, and whenever moving the row there fails; else its large
        tensors as raw files in a temporary folder (this process reads them back: one copy from the page cache, ~20x
        less CPU than unpickling them from the pipe); the pipe when writing fails. "shm" / "file" / "pipe" force one
        way."""
        import multiprocessing
        import tempfile

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.shm_free_start = _shm_free()
        if self.transport in ("auto", "file"):
            self._spool = tempfile.mkdtemp(prefix="qwenvl-rows-")
        self._pool = multiprocessing.get_context("fork").Pool(
            self.workers, initializer=_worker_init,
            initargs=(self.encoder, self.pairs, self.transport, SHM_MARGIN * self.rows_in_flight(), self._spool))

    def close(self) -> None:
        if self._pool is not None:
            # Let the prefetched steps finish first: terminate() with results still outstanding can race the
            # pool's result thread (CPython: "Cannot have cache with result_hander not alive").
            pending = [r for results, _ in self._ahead for r in results]
            for r in pending:
                r.wait(timeout=60)
            if all(r.ready() for r in pending):
                self._pool.close()
            else:  # a worker hangs: nothing left to lose
                self._pool.terminate()
            self._pool.join()
            self._pool = None
        self._ahead.clear()
        if self._spool is not None:  # files of rows prefetched but never taken
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    @property
    def epoch(self) -> int:
        return self.pos.epoch

    def _position(self) -> dict:
        return {"epoch": self.pos.epoch, "file": self.pos.file, "offset": self.pos.offset,
                "step_in_chunk": self.step_in_chunk}

    def state_dict(self) -> dict:
        """Where the trainer is (with workers: after the last step handed out, not the steps planned ahead;
        skip counts then include records measured ahead)."""
        pos = self._consumed if self.workers and self._consumed is not None else self._position()
        return {**pos, "stats": self.stats.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self._ahead.clear()
        self._consumed = None
        self.pos = Position(d["epoch"], d["file"], d["offset"])
        self.step_in_chunk = d["step_in_chunk"]
        self.stats.load_state_dict(d["stats"])
        self._chunk = self._steps = None
        self._replay = True

    def _skip(self, where, err):
        if not self._replay:
            self.stats.skip(where, err)

    def _load_chunk(self) -> None:
        records, self._next_pos = self.stream.read(self.pos, self.chunk_size)
        if self.shuffle:
            records = shuffled(records, self.seed, self.pos.epoch, self.pos.file, self.pos.offset)
        if self._pool is not None:  # lines that are not JSON stay here (their error is already made)
            todo = [i for i, (_, rec, _) in enumerate(records) if not isinstance(rec, Exception)]
            measured = [(None, rec) for _, rec, _ in records]
            for i, r in zip(todo, self._pool.map(_worker_measure, [records[i][1:] for i in todo], chunksize=16)):
                measured[i] = r
        else:
            measured = [_measure(self.encoder, self.pairs, rec, base) for _, rec, base in records]
        chunk = []
        for (where, rec, base), (n, err) in zip(records, measured):
            try:
                if err is not None:
                    raise err
                if n > self.capacity:
                    raise BadSample("too long", f"{n} tokens > pack capacity {self.capacity}")
            except DataError:
                raise
            except Exception as e:  # a bad record never stops training; too many of them do (SkipStats)
                self._skip(where, e)
                continue
            if not self._replay:
                self.stats.ok()
            chunk.append((where, rec, base, n))
        bins = pack_lengths([c[3] for c in chunk], self.capacity)
        if self.shuffle:  # else steps go longest-first, as packed
            bins = shuffled(bins, self.seed, "bins", self.pos.epoch, self.pos.file, self.pos.offset)
        costs = [bin_cost([chunk[i][3] for i in b], self.attn_weight) for b in bins]
        self._chunk = chunk
        self._steps = [[[bins[j] for j in group] for group in step] for step in plan_steps(costs, self.world, self.accum)]
        self._replay = False

    def next_step(self) -> list[dict | None]:
        """This rank's micro-batches for the next optimizer step (always `accum` of them, None = nothing)."""
        if not self.workers:
            return self._step_done([(*_encode_bin(self.encoder, self.pairs, items), "main")
                                    for items in self._plan_step()])
        if self._pool is None:
            self._start_pool()
        while len(self._ahead) < self.prefetch:
            bins = self._plan_step()
            self._ahead.append(([self._pool.apply_async(_worker_encode, (items,)) for items in bins],
                                self._position()))
        results, self._consumed = self._ahead.popleft()
        return self._step_done([_unpack(r.get()) for r in results])

    def _step_done(self, rows: list[tuple]) -> list[dict | None]:
        """(batch or None, failures, how it came) per row -> the step's micro-batches; counts skips and transport."""
        out = [self._finish(batch, failures) for batch, failures, _ in rows]
        self.last_step = {"via": dict(collections.Counter(via for b, _, via in rows if b is not None)),
                          "pixel_bytes": sum(pixel_bytes(b) for b in out)}
        self.rows_via.update(self.last_step["via"])
        self.pixel_bytes += self.last_step["pixel_bytes"]
        return out + [None] * (self.accum - len(out))

    def transport_summary(self) -> dict:
        """How rows reached this process so far: rows by path (shm, file, pipe; main = built here without workers),
        mean vision MB per row, /dev/shm free when the pool started."""
        rows = sum(self.rows_via.values())
        return {"rows_via": dict(self.rows_via), "pixel_mb_per_row": self.pixel_bytes / max(rows, 1) / 2**20,
                "dev_shm_free_mb": None if self.shm_free_start is None else self.shm_free_start / 2**20}

    def _plan_step(self) -> list[list[tuple]]:
        """Advance the plan by one step: this rank's bins, each a list of (where, record, base_dir, length)."""
        crossed = 0  # epoch boundaries crossed by a run of chunks without any step
        while True:
            if self._steps is None:
                self._load_chunk()
            if self.step_in_chunk < len(self._steps):
                break
            if self._next_pos.epoch != self.pos.epoch:
                crossed += 1
                if crossed >= 2:  # a whole epoch gave nothing
                    raise DataError("a whole pass over the training files gave no usable sample\n" + self.stats.report())
            self.pos, self.step_in_chunk, self._steps = self._next_pos, 0, None
        mine = self._steps[self.step_in_chunk][self.rank]
        self.step_in_chunk += 1
        return [[self._chunk[i] for i in b] for b in mine]

    def _finish(self, batch: dict | None, failures: list) -> dict | None:
        for where, err in failures:  # header fine, pixels not: only this rank knows, so it counts but never stops
            self.stats.seen -= 1  # the record was already counted as seen when measured
            self.stats.skip(where, err, check=False)
        return batch


# ------------------------------------------------------------------------------------------------ work items
def _measure(encoder, pairs: bool, rec, base) -> tuple[int | None, Exception | None]:
    """(LLM length, None) or (None, the error) of one record; DataError propagates."""
    try:
        if isinstance(rec, Exception):
            raise rec
        return encoder.measure(rec, base, pair=pairs), None
    except DataError:
        raise
    except Exception as e:
        return None, e


def _encode_bin(encoder, pairs: bool, items: list[tuple]) -> tuple[dict | None, list]:
    """One packed row from (where, record, base_dir, measured length) items: (batch or None, [(where, error)])."""
    samples, failures = [], []
    for where, rec, base, n in items:
        try:
            got = list(encoder.encode_pair(rec, base)) if pairs else [encoder.encode(rec, base)]
            if sum(len(s) for s in got) != n:
                raise BadSample("size mismatch", f"measured {n} tokens, encoded {sum(len(s) for s in got)}")
        except DataError:
            raise
        except Exception as e:
            failures.append((where, e))
            continue
        samples += got
    return (collate(samples) if samples else None), failures


_WORKER: dict = {}
SHM_MARGIN = 2  # /dev/shm must have room for this many times the rows that can be in flight (auto transport)


def _shm_free() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize
    except OSError:
        return None


def _worker_init(encoder, pairs: bool, transport: str, shm_rows: int, spool: str | None = None) -> None:
    torch.set_num_threads(1)  # one process per core; intra-op threads only contend
    _WORKER.update(encoder=encoder, pairs=pairs, transport=transport, shm_rows=shm_rows, spool=spool, files=0)


def _portable(err: Exception | None) -> Exception | None:
    """An error that pickles back as itself (BadSample's constructor takes two arguments)."""
    if err is None or isinstance(err, DataError):
        return err
    out = BadSample(getattr(err, "reason", None) or type(err).__name__)
    out.args = (str(err),)
    return out


def _worker_measure(item) -> tuple[int | None, Exception | None]:
    n, err = _measure(_WORKER["encoder"], _WORKER["pairs"], *item)
    return n, _portable(err)


def _worker_encode(items: list[tuple]):
    """(batch, failures, "shm" | "file" | "pipe" | None): the row's tensors in shared memory, its large tensors in
    files, or as numpy for the pipe."""
    batch, failures = _encode_bin(_WORKER["encoder"], _WORKER["pairs"], items)
    failures = [(w, _portable(e)) for w, e in failures]
    if batch is None:
        return batch, failures, None
    if _to_shm(batch):
        return batch, failures, "shm"
    filed = _to_files(batch)
    if filed is not None:
        return filed, failures, "file"
    return {k: _to_np(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, failures, "pipe"


FILE_MIN_BYTES = 1 << 20  # tensors below this go through the pipe with the rest of the row


def _to_files(batch: dict) -> dict | None:
    """The row with each tensor of >= FILE_MIN_BYTES written raw to the spool folder and replaced by
    ("file", path, numpy dtype, shape, bf16); None when the transport is not file/auto or a write fails (full disk:
    the pipe then; forced "file" raises)."""
    mode, spool = _WORKER["transport"], _WORKER.get("spool")
    if mode not in ("auto", "file") or spool is None:
        return None
    out, written = {}, []
    try:
        for k, v in batch.items():
            if isinstance(v, torch.Tensor) and v.numel() * v.element_size() >= FILE_MIN_BYTES:
                _, a, bf16 = _to_np(v.contiguous())
                _WORKER["files"] += 1
                path = os.path.join(spool, f"{os.getpid()}-{_WORKER['files']}.bin")
                written.append(path)
                _write_raw(a, path)
                out[k] = ("file", path, a.dtype.str, a.shape, bf16)
            else:
                out[k] = _to_np(v) if isinstance(v, torch.Tensor) else v
    except OSError:
        for path in written:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if mode == "file":
            raise
        return None
    return out if written else None  # nothing large: the pipe carries it as cheaply


def _write_raw(a: np.ndarray, path: str) -> None:
    a.tofile(path)


def _to_shm(batch: dict) -> bool:
    """Move the row's tensors to shared memory when the transport allows it (auto, shm) and /dev/shm has room (auto:
    free >= shm_rows x the row's bytes); False: send it by file or pipe. Should /dev/shm fill up anyway (other rows,
    other processes), torch fails to reserve the pages of the row's shm file ("No space left on device", checked on
    torch 2.13 with a 4 MB tmpfs) and the row goes by file or pipe; "shm" then raises."""
    mode = _WORKER["transport"]
    if mode not in ("auto", "shm"):
        return False
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    if mode == "auto" and (_shm_free() or 0) < _WORKER["shm_rows"] * nbytes:
        return False
    try:
        for t in tensors:
            t.share_memory_()
    except RuntimeError:
        if mode == "shm":
            raise
        return False
    return True


def _to_np(t: torch.Tensor) -> tuple:
    bf16 = t.dtype == torch.bfloat16  # numpy has no bf16: sent as int16 bits
    return "np", (t.view(torch.int16) if bf16 else t).numpy(), bf16


def _from_np(v) -> torch.Tensor:
    t = torch.from_numpy(v[1])
    return t.view(torch.bfloat16) if v[2] else t


def _from_file(v) -> torch.Tensor:
    _, path, dtype, shape, bf16 = v
    a = np.fromfile(path, dtype=np.dtype(dtype)).reshape(shape)
    os.unlink(path)
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if bf16 else t


def _unpack(result) -> tuple[dict | None, list, str | None]:
    batch, failures, via = result
    if batch is not None:
        batch = {k: _from_np(v) if isinstance(v, tuple) and len(v) == 3 and v[0] == "np"
                 else _from_file(v) if isinstance(v, tuple) and len(v) == 5 and v[0] == "file" else v
                 for k, v in batch.items()}
    return batch, failures, via
