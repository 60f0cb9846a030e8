"""Continuous batching: which tokens of which sequences run in the next step.

Each step has a token budget (max_num_batched_tokens). Running sequences are served first, decodes (one
token) before prefill chunks, oldest first; then waiting sequences are admitted FIFO while the budget, the
sequence limit and free blocks allow. A prompt longer than the budget is prefilled in chunks over several
steps. When a running sequence needs a block and none is free, the youngest running sequence is preempted
by recompute: its blocks are freed and it goes back to the waiting queue (in arrival order, so ahead of
every newer request); it later re-runs its prompt + generated tokens as a prefill (the prefix cache usually
still holds most of it).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .kv_cache import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first token index computed in this step
    num_tokens: int
    samples: bool  # the chunk reaches the last known token: the step samples the next one

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def is_decode(self) -> bool:
        """A single generated token (its position is context + rope_delta: the CUDA-graph path)."""
        return self.num_tokens == 1 and self.start >= self.seq.prompt_len


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove seq (finished or aborted) and free its blocks."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.vision_features.clear()
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.num_computed = 0
        seq.vision_features.clear()
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: dict[Sequence, ScheduledChunk] = {}
        preempted = False
        decodes = [s for s in self.running if s.num_tokens - s.num_computed == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed > 1]
        for seq in decodes + prefills:
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            if budget == 0:
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.allocate(seq, seq.num_computed + n):
                victim = self.running[-1]  # the youngest
                if victim in chunks:
                    budget += chunks.pop(victim).num_tokens
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status == Status.RUNNING:
                chunks[seq] = ScheduledChunk(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens)
                budget -= n
        # Admit waiting sequences (FIFO: stop at the first that does not fit); none after a preemption.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - cached, budget)
            if not self.blocks.allocate(seq, cached + n):
                self.blocks.free_seq(seq)
                break
            self.waiting.pop(0)
            seq.num_computed = cached
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            chunks[seq] = ScheduledChunk(seq, cached, n, cached + n == seq.num_tokens)
            budget -= n
        return list(chunks.values())

    def after_step(self, chunks: list[ScheduledChunk]) -> None:
        """The step computed these chunks' K/V: advance and register the newly full blocks."""
        for c in chunks:
            c.seq.num_computed = c.end
            self.blocks.register_computed(c.seq)
