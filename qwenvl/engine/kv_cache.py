"""Paged KV cache: per-layer K and V pools [num_blocks + 1, block_size, kv_heads, head_dim], a block
allocator (free list, ref counts) and the prefix cache (full blocks keyed by a hash chain).

A sequence owns a block table (list of block ids); token i lives in block table[i // block_size], slot
i % block_size. The extra last block of each pool is the *null block*: never allocated, it is where padded
rows of a CUDA-graph batch write and read.

Prefix caching: a full, computed block is registered under hash(parent block's hash, its token ids, and for
image/video pad tokens the content hash of the item and the offset inside it), so two prompts share a block
only when everything the block's K/V depend on is equal (MRoPE positions are a function of exactly that).
Freed blocks keep their hash and stay findable until the allocator reuses them (least recently freed first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from .sequence import Sequence


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_blocks + 1, block_size, kv_heads, head_dim)
        # zeros, not empty: masked-out slots are still multiplied by 0 in attention, and 0 * NaN = NaN
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.null_block = num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def block_hash(seq: Sequence, j: int, parent: bytes, block_size: int) -> bytes:
    """Hash of block j of seq given its parent's hash."""
    a, b = j * block_size, (j + 1) * block_size
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", seq.token_ids[a:b]).tobytes())
    for item in seq.prompt.items:
        if item.offset < b and item.end > a:
            h.update(item.content_hash)
            h.update((max(a, item.offset) - item.offset).to_bytes(8, "little"))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.hash_of_block: dict[int, bytes] = {}
        self.block_of_hash: dict[bytes, int] = {}
        self.prefix_hits = 0  # tokens served from the prefix cache (a statistic)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks seq needs to hold num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens; False (nothing changed) if blocks are short."""
        n = self.blocks_needed(seq, num_tokens)
        if n > len(self.free):
            return False
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            old = self.hash_of_block.pop(block, None)  # evict its cached content
            if old is not None:
                del self.block_of_hash[old]
            self.ref_count[block] = 1
            seq.block_table.append(block)
        return True

    def free_seq(self, seq: Sequence) -> None:
        """Release seq's blocks (tail first, so the tail is evicted first); cached ones stay findable."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []

    def match_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks of seq's leading full blocks; returns the number of tokens they hold.

        At least one token is always left to compute (its logits give the first sampled token)."""
        assert not seq.block_table and seq.num_computed == 0
        if not self.enable_prefix_caching:
            return 0
        parent = b""
        for j in range((seq.num_tokens - 1) // self.block_size):
            h = block_hash(seq, j, parent, self.block_size)
            block = self.block_of_hash.get(h)
            if block is None:
                break
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        n = len(seq.block_table) * self.block_size
        self.prefix_hits += n
        return n

    def register_computed(self, seq: Sequence) -> None:
        """Register seq's newly completed (full and computed) blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        for j in range(len(seq.block_hashes), seq.num_computed // self.block_size):
            h = block_hash(seq, j, seq.block_hashes[-1] if seq.block_hashes else b"", self.block_size)
            seq.block_hashes.append(h)
            block = seq.block_table[j]
            if h not in self.block_of_hash and block not in self.hash_of_block:
                self.block_of_hash[h] = block
                self.hash_of_block[block] = h

    def reset_prefix_cache(self) -> None:
        self.hash_of_block.clear()
        self.block_of_hash.clear()
