"""ModelRunner: the decoder forward over one step's flattened tokens, against the paged KV cache.

Written against the existing modules' weights (norms, o_proj, down_proj, embeddings and lm_head are
called as they are); q/k/v and gate/up are fused into single matrices built once here. On CUDA the
modules' own q/k/v/gate/up parameters are re-pointed to views of the fused tensors so the weights are
not held twice (same values: Qwen25VL.forward/generate are unchanged).

A step is a list of chunks (sequence, start, num_tokens). Tokens of all chunks are laid end to end:
  embeddings (+ ViT features scattered over image/video pad tokens) -> MRoPE cos/sin -> layers -> norm +
  lm_head only on the rows that sample (the last token of chunks that reach their sequence's end).
Attention per layer: the step's K/V are written to the pools first; single-token rows go through one
batched decode attention, prefill chunks through per-sequence SDPA over their cached prefix.

Decode-only steps (the steady state) run `_decode_core`, whose positions (context_len - 1 + rope_delta on
all three axes) are computed on the device; on CUDA it is captured as one CUDA graph per batch-size bucket
(static input buffers, padded rows write to the null block) when the Triton paged-decode kernel is usable.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..config import env_flag
from ..errors import InputError
from ..layers import to_device
from ..preprocess import dense_frames, pixel_values_from_frames
from ..quant.fp8 import FP8Linear, fuse_linears, has_fp8_decoder
from ..quant import fp8_gemv
from ..quant.fp8_gemv import GemvLinear, wrap_linear
from ..rope import _inv_freq
from .fused import DecoderOps, compile_ops_requested
from .attention import (decode_attention_gather, decode_attention_triton, fused_merge_max_splits, gqa_prefill_ok,
                        merge_splits_triton, triton_merge_ok,
                        num_splits_for, prefill_attention, triton_decode_ok, varlen_prefill_attention,
                        varlen_prefill_ok, write_kv)
from . import batch_invariant as BI
from .kv_cache import PagedKVCache
from .rope_kv import gemv_rope_ok, rope_write_kv, rope_write_kv_ok
from .silu_mul import silu_mul, silu_mul_ok
from .scheduler import ScheduledChunk
from .sequence import Sequence, VisionItem
from .vision_graphs import VisionGraphs, compile_vision_blocks, uncompile_vision_blocks

log = logging.getLogger(__name__)


@dataclass
class FusedLayer:
    module: torch.nn.Module  # the DecoderLayer (norms used as they are)
    qkv: torch.nn.Module  # q/k/v as one linear (nn.Linear, or FP8Linear for an FP8 model)
    gu: torch.nn.Module  # gate/up as one linear
    o: torch.nn.Module  # o_proj (these four behind fp8_gemv.GemvLinear on CUDA unless QWENVL_BF16_GEMV=0)
    down: torch.nn.Module  # down_proj


@dataclass
class StepInputs:
    """Device tensors and the attention plan of one (non-CUDA-graph) step."""
    ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [3, N]
    slots: torch.Tensor  # [N] flat slot of each token in the pools
    sample_rows: torch.Tensor  # [R] rows whose hidden state gives logits
    decode_rows: torch.Tensor | None = None  # rows of single-token chunks
    decode_block_tables: torch.Tensor | None = None  # [Bd, max_blocks] int32
    decode_context_lens: torch.Tensor | None = None  # [Bd] int32
    prefills: list[tuple[int, int, int, torch.Tensor | None]] = field(default_factory=list)  # row0, n, start, blocks
    # all prefill chunks in one varlen call (attention.varlen_prefill_attention): query rows, key slots, cu_q, cu_k,
    # max_q, max_k; None: the chunks attend one by one
    prefill_plan: tuple | None = None
    # batch-invariant attention (batch_invariant.bi_attention) of every row: block tables, tiles, positions
    bi_plan: tuple | None = None
    vision_rows: torch.Tensor | None = None
    vision_feats: torch.Tensor | None = None


_FP32_MM_OK: dict[str, bool] = {}


def fp32_matmul_ok(device, dtype: torch.dtype) -> bool:
    """Whether matmul_fp32_out runs on `device` for `dtype` inputs: the CPU always (upcast), CUDA where torch has
    mm's out_dtype (one small product, checked against the upcast one; cached per device and dtype)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return True
    key = f"{dev}-{dtype}"
    if key not in _FP32_MM_OK:
        try:
            g = torch.Generator(device=dev).manual_seed(0)
            a, b = (torch.randn(3, 64, generator=g, device=dev).to(dtype) for _ in range(2))
            y = torch.mm(a, b.t(), out_dtype=torch.float32)
            _FP32_MM_OK[key] = y.dtype == torch.float32 and bool(torch.allclose(y, a.float() @ b.float().t(),
                                                                                 rtol=1e-5, atol=1e-5))
        except (RuntimeError, TypeError) as e:
            log.warning("fp32 logits unavailable (torch.mm out_dtype: %s): logits stay in %s", e, dtype)
            _FP32_MM_OK[key] = False
    return _FP32_MM_OK[key]


def matmul_fp32_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w[V, K]^T with the fp32 accumulator as the result (not rounded to x's dtype): CUDA's mm with an
    fp32 output, the CPU through an fp32 upcast."""
    if not x.is_cuda:
        return torch.nn.functional.linear(x.float(), w.float())
    return torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out_dtype=torch.float32).view(*x.shape[:-1], w.shape[0])


def _cuda_graph_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


class ModelRunner:
    def __init__(self, model, *, block_size: int = 16, max_num_seqs: int = 256, enable_cuda_graphs: bool = True,
                 encoder_cache_tokens: int = 32768, batch_invariant: bool = False):
        self.model = model
        # every kernel's result for a row independent of the batch, the chunking and the CUDA graphs
        # (batch_invariant.py); slower, for reproducible outputs
        self.batch_invariant = batch_invariant
        self.device = model.device
        self.dtype = model.dtype
        t = model.config.text
        self.num_layers, self.heads, self.kv_heads, self.head_dim = (t.num_hidden_layers, t.num_attention_heads,
                                                                     t.num_key_value_heads, t.head_dim)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.enable_cuda_graphs = enable_cuda_graphs
        self.is_cuda = self.device.type == "cuda"
        self.inv_freq = _inv_freq(t.head_dim, t.rope_theta).to(self.device)
        self.mrope_section = list(t.mrope_section)
        self.layers = self._fuse_weights(share=self.is_cuda)
        self.lm_head = self._head(model)
        # the elementwise work between the matmuls; compiled (fused) only on request (fused.py)
        # silu * up as a Triton kernel, bit-equal to the eager ops (silu_mul.py): the compiled op ran at a third
        # of copy speed in prefill; QWENVL_TRITON_SILU=0 keeps the compiled one
        triton_silu = self.is_cuda and env_flag("QWENVL_TRITON_SILU", True) and silu_mul_ok(self.device, self.dtype)
        self.ops = DecoderOps(self.heads, self.kv_heads, self.head_dim, t.rms_norm_eps,
                              compiled=self.is_cuda and compile_ops_requested() and not batch_invariant,
                              kernels={"silu_mul": silu_mul} if triton_silu else None)
        self.ops.check(self.device, self.dtype, t.hidden_size)
        # decode rows that run every linear through the GEMV kernel take the fused layer (_layer_gemv): RMSNorm,
        # silu * up and the residual adds inside the GEMVs (QWENVL_FUSED_GEMV=0: apart). Since the GEMV's per-thread
        # partial sums it pays: W1 +1.6 % bf16, +0.8 % FP8 on an H200 (docs/BENCHMARKS.md 2026-12-06; before them it
        # cost FP8 14 %)
        self.fused_gemv = self.is_cuda and env_flag("QWENVL_FUSED_GEMV", True)
        self.fused_gemv_silu = env_flag("QWENVL_FUSED_GEMV_SILU", True)  # silu * up inside down's GEMV too
        # ... or in gate/up's epilogue instead (each product computed once, not in each of down's programs), where
        # its probe passes; QWENVL_GEMV_SILU_OUT=1, off until measured
        self.gemv_silu_out = self.fused_gemv and env_flag("QWENVL_GEMV_SILU_OUT", False)
        # lm_head's fp32 accumulator kept as the logits instead of being rounded to the model's dtype, so tokens one
        # bf16 step apart (or tied by the rounding) are ordered by their real values: on the trained nano model the
        # fast/slow greedy agreement went 69 -> 83 % with it, and W1 did not move (H100 2026-12-06, docs/BENCHMARKS.md).
        # On by default on CUDA (QWENVL_FP32_LOGITS=0: off); off on the CPU, whose fp32 product upcasts the whole head
        # every step; for a plain lm_head (not vocab-parallel, not FP8)
        self.fp32_logits = (env_flag("QWENVL_FP32_LOGITS", self.is_cuda) and self.dtype != torch.float32
                            and self.lm_head.bias is None
                            and ((type(self.lm_head) in (torch.nn.Linear, GemvLinear)
                                  and self.lm_head.weight.dtype == self.dtype
                                  and fp32_matmul_ok(self.device, self.dtype))
                                 or (type(self.lm_head) is FP8Linear and not self.lm_head.reduce_output)))
        self._gemv_plans: dict[tuple, list | None] = {}
        self.encoder_cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # content hash -> ViT features
        self.encoder_cache_tokens = encoder_cache_tokens
        self.encoder_cache_rows = 0
        self.num_encoder_runs = 0  # statistics
        self.num_encoded_items = 0
        # a lone prefill chunk with no cached prefix: FlashAttention varlen over the grouped k/v heads as they are
        # (batch-invariant mode attends with its own kernel: these paths and their start-up probes are off)
        self.gqa_prefill = (not batch_invariant and env_flag("QWENVL_GQA_PREFILL", True)
                            and gqa_prefill_ok(self.dtype, self.device, self.kv_heads, self.heads, self.head_dim))
        self.varlen_prefill = not batch_invariant and varlen_prefill_ok(self.dtype, self.device, block_size,
                                                                        self.kv_heads, self.heads, self.head_dim)
        self.use_triton = triton_decode_ok(self.dtype, self.device, block_size, self.kv_heads, self.heads,
                                           self.head_dim)
        # the decode kernel merges its splits itself up to a few splits (attention.fused_merge_max_splits), where its
        # probe passes; else a compiled merge after it
        cap = fused_merge_max_splits()
        self.decode_merge_max_splits = cap if cap and not batch_invariant and self.use_triton and triton_decode_ok(
            self.dtype, self.device, block_size, self.kv_heads, self.heads, self.head_dim, fused_merge=True) else 0
        # the splits merged after the kernel: one Triton kernel where its probe passes (QWENVL_TRITON_MERGE=0: the
        # compiled merge, two kernels; the Triton one took 7B W1 +1.1 % bf16, +1.8 % FP8 on an H100)
        self.decode_merge = (merge_splits_triton if self.use_triton and not batch_invariant
                             and env_flag("QWENVL_TRITON_MERGE", True)
                             and triton_merge_ok(self.device, self.dtype, self.head_dim) else None)
        # every step rotates q/k and stores k/v in one Triton kernel (rope_kv.py); QWENVL_FUSED_ROPE_KV=0: apart
        self.fused_rope_kv = (self.use_triton and env_flag("QWENVL_FUSED_ROPE_KV", True)
                              and rope_write_kv_ok(self.device, self.dtype, self.heads, self.kv_heads, self.head_dim,
                                                   block_size))
        # batch-1 decode rotates q/k and stores k/v in the q/k/v GEMV's epilogue (fp8_gemv.gemv(rope=...)) where
        # its probe passes: one kernel less per layer; QWENVL_GEMV_ROPE=0 keeps rope_write_kv after the GEMV
        self.gemv_rope = self.fused_rope_kv and env_flag("QWENVL_GEMV_ROPE", True)
        self.kv: PagedKVCache | None = None
        self.tp = None  # engine.spmd.TPChannel under tensor parallelism (set by the engine)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_sizes: list[int] = []  # sorted keys of graphs
        self.static: dict[str, torch.Tensor] = {}
        # the ViT replayed from CUDA graphs per grid list (vision_graphs.py); QWENVL_VIT_GRAPHS=0 keeps it eager
        self.vision_graphs = (VisionGraphs(model.visual) if enable_cuda_graphs and self.is_cuda
                              and env_flag("QWENVL_VIT_GRAPHS", True) else None)
        if ((self.vision_graphs is not None or (batch_invariant and self.is_cuda))
                and model.visual.dtype in (torch.bfloat16, torch.float16)):
            # Replayed from graphs the ViT is no longer launch-bound, and the 7B/72B ViT's 3420-wide MLP (not a
            # multiple of 8) falls off cuBLAS' Hopper kernels: zero-padded, graph 38.3 -> 28.1 ms for a 1280x720
            # image (H200, docs/BENCHMARKS.md 2026-12-05). Same outputs; a no-op where the width is a multiple of 16.
            model.visual.pad_mlp_hidden()
        # the ViT blocks' elementwise work fused by torch.compile (vision_graphs.compile_vision_blocks); CUDA only,
        # QWENVL_COMPILE_VIT=0 turns it off (and undoes an earlier engine's compile of the same model)
        if (self.is_cuda and model.visual.dtype in (torch.bfloat16, torch.float16)
                and env_flag("QWENVL_COMPILE_VIT", True)):
            compile_vision_blocks(model.visual, self.device)
        else:
            uncompile_vision_blocks(model.visual)
        if batch_invariant:
            self._use_invariant_kernels()

    @staticmethod
    def _head(model) -> torch.nn.Module:
        """The engine's lm_head: model.lm_head (on the bf16 GEMV path where that is on), or with QWENVL_FP8_LM_HEAD=1
        on a model whose decoder linears are FP8, an FP8 copy of it (per-vocab-row scales, as the decoder's): the
        head is 1.09 GB of the 7B's 7.6 GB read per decode step in FP8, so at batch 1 it is ~11 % of the step.
        Off by default (FP8-Dynamic checkpoints and vLLM keep the head in bf16: it sets the logits directly); the
        model's own head is left as it is (tied to the embeddings in the 3B)."""
        head = model.lm_head
        if env_flag("QWENVL_FP8_LM_HEAD", False):
            if type(head) is not torch.nn.Linear:
                log.warning("QWENVL_FP8_LM_HEAD=1 ignored: lm_head is a %s (vocab-parallel under tensor parallelism), "
                            "not a plain linear", type(head).__name__)
            elif has_fp8_decoder(model):
                return FP8Linear.from_linear(head)
            else:
                log.warning("QWENVL_FP8_LM_HEAD=1 ignored: the decoder is not FP8 (quantization='fp8' not set)")
        return wrap_linear(head)

    def _use_invariant_kernels(self) -> None:
        """Batch-invariant mode: the decoder's linears, norms and attention on batch_invariant.py's kernels, and
        the paths whose arithmetic depends on the batch (GEMV layers, varlen / SDPA prefill, split decode, compiled
        ops) off. The ViT encodes each image or video on its own (_encode_vision)."""
        if not BI.available(self.device) or self.dtype not in (torch.bfloat16, torch.float16):
            raise InputError(f"batch_invariant needs CUDA with triton and a bf16/fp16 model (got {self.device}, "
                             f"{self.dtype})")
        for L in self.layers:
            L.qkv, L.gu, L.o, L.down = (BI.InvariantLinear(m) for m in (L.qkv, L.gu, L.o, L.down))
        self.lm_head = BI.InvariantLinear(self.model.lm_head)
        self.fused_gemv = False
        # the split paged decode kernel is not used (its probe stays: fused_rope_kv's per-row rotary + K/V write,
        # which batch-invariant mode keeps, is enabled by it)
        self.use_triton = False
        eps = self.model.config.text.rms_norm_eps
        self.ops.add_rms_norm = lambda h, delta, weight: BI.bi_add_rms_norm(h, delta, weight, eps)

    # ------------------------------------------------------------------------------------------ set-up
    @torch.no_grad()
    def _fuse_weights(self, share: bool) -> list[FusedLayer]:
        """share: the modules keep working, on views of the fused tensors (no second copy in memory)."""
        fused = []
        for layer in self.model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv = fuse_linears([a.q_proj, a.k_proj, a.v_proj], share=share)
            gu = fuse_linears([mlp.gate_proj, mlp.up_proj], share=share)
            fused.append(FusedLayer(layer, *(wrap_linear(m) for m in (qkv, gu, a.o_proj, mlp.down_proj))))
        return fused

    @property
    def triton_silu(self) -> bool:
        """Whether silu * up runs the Triton kernel (its probe passed and the ops' check kept it)."""
        return self.ops.silu_mul is silu_mul

    @property
    def bf16_gemv(self) -> bool:
        """Whether decode linears run through the GEMV kernel (fp8_gemv.GemvLinear) at small batch."""
        return any(isinstance(m, GemvLinear) for L in self.layers for m in (L.qkv, L.gu, L.o, L.down))

    def kv_bytes_per_block(self) -> int:
        return PagedKVCache.bytes_per_block(self.num_layers, self.block_size, self.kv_heads, self.head_dim, self.dtype)

    @torch.inference_mode()
    def profile_num_blocks(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        """CUDA: blocks that fit in gpu_memory_utilization of the card after the weights, the activation peak
        of a max_num_batched_tokens prefill (measured) and the sampler's buffers (estimated)."""
        dev = self.device
        self.kv = PagedKVCache(self.num_layers, 0, self.block_size, self.kv_heads, self.head_dim, self.dtype, dev)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        n = max_num_batched_tokens
        dummy = StepInputs(ids=torch.zeros(n, dtype=torch.long, device=dev),
                           positions=torch.arange(n, device=dev).expand(3, -1),
                           slots=torch.zeros(n, dtype=torch.long, device=dev),
                           sample_rows=torch.arange(min(n, self.max_num_seqs), device=dev),
                           prefills=[(0, n, 0, None)])
        self._forward(dummy)
        torch.cuda.synchronize(dev)
        activation_peak = torch.cuda.max_memory_allocated(dev) - before
        vocab = self.model.config.text.vocab_size
        sampler = self.max_num_seqs * vocab * 4 * 6  # fp32 logits, sort values + int64 indices, probs, noise
        self.kv = None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        budget = total * gpu_memory_utilization - (total - free) - activation_peak - sampler
        log.info("KV budget %.2f GiB (activation peak %.2f GiB, sampler %.2f GiB)", budget / 2**30,
                 activation_peak / 2**30, sampler / 2**30)
        return max(0, int(budget // self.kv_bytes_per_block()))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv = PagedKVCache(self.num_layers, num_blocks, self.block_size, self.kv_heads, self.head_dim,
                               self.dtype, self.device)

    # ------------------------------------------------------------------------------------------ math
    def _cos_sin(self, positions: torch.Tensor):
        """cos/sin [N, head_dim] from positions [3, N]: the rope.mrope_cos_sin formula, with inv_freq already
        on the device (no host copy: CUDA-graph capturable)."""
        freqs = positions[..., None].float() * self.inv_freq  # [3, N, hd/2]
        parts, start = [], 0
        for axis, size in enumerate(self.mrope_section):
            parts.append(freqs[axis, :, start:start + size])
            start += size
        sel = torch.cat(parts, dim=-1)
        emb = torch.cat([sel, sel], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _rope_write(self, i: int, qkv: torch.Tensor, cos, sin, slots: torch.Tensor, keys_from_pools: bool):
        """(q, k, v) of a layer's fused q/k/v output, q and k rotated; k and v stored in the pools at slots, in one
        kernel (rope_write_kv) where it passed its probe. Steps whose attention reads keys from the pools only
        (decode, the varlen plan) get k = v = None; a lone prefill chunk also gets its k and v."""
        if self.fused_rope_kv:
            kv = self.kv
            out = rope_write_kv(qkv, cos, sin, slots, kv.k[i], kv.v[i], self.heads, self.kv_heads, self.head_dim,
                                kv_out=not keys_from_pools)
            return (out, None, None) if keys_from_pools else out
        q, k, v = self.ops.rope_qkv(qkv, cos, sin)
        write_kv(self.kv.k[i], self.kv.v[i], slots, k, v)
        return q, k, v

    def _layer(self, i: int, h: torch.Tensor, delta: torch.Tensor | None, cos, sin, slots: torch.Tensor, attend,
               keys_from_pools: bool = False):
        """One decoder layer on (h, delta): the residual stream is h + delta (delta: the previous layer's MLP
        output, None before the first layer), so each residual add is done inside the next RMSNorm. Returns the
        new (h, delta)."""
        L, ops = self.layers[i], self.ops
        layer = L.module
        N = h.shape[0]
        h, x = ops.add_rms_norm(h, delta, layer.input_layernorm.weight)
        q, k, v = self._rope_write(i, L.qkv(x), cos, sin, slots, keys_from_pools)
        a = L.o(attend(i, q, k, v).reshape(N, self.heads * self.head_dim))
        h, x = ops.add_rms_norm(h, a, layer.post_attention_layernorm.weight)
        return h, L.down(ops.silu_mul(L.gu(x)))

    def _layers(self, h: torch.Tensor, cos, sin, slots: torch.Tensor, attend,
                keys_from_pools: bool = False) -> torch.Tensor:
        """keys_from_pools: attention reads every row's keys from the pools only (decode rows; prefill chunks of the
        varlen plan), so the layers may rotate and store k/v in one kernel and hand attend k = v = None."""
        plan = self._gemv_plan(h.shape[0])
        if plan is not None:
            for i in range(self.num_layers):
                h = self._layer_gemv(i, h, plan[i], cos, sin, slots, attend, keys_from_pools)
            return h
        delta = None
        for i in range(self.num_layers):
            h, delta = self._layer(i, h, delta, cos, sin, slots, attend, keys_from_pools)
        return h + delta

    def _layer_gemv(self, i: int, h: torch.Tensor, operands, cos, sin, slots: torch.Tensor, attend,
                    keys_from_pools: bool = False) -> torch.Tensor:
        """_layer with each linear one fp8_gemv.gemv call that also does the elementwise work beside it: RMSNorm
        before q/k/v and gate/up, silu * up before down, the residual adds after o and down. Same maths; the
        normalised input is not rounded to the model dtype before the matmul (the rest is rounded as eagerly)."""
        layer = self.layers[i].module
        qkv_w, o_w, gu_w, down_w, rope, silu_out = operands
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        N = h.shape[0]
        if rope and keys_from_pools:  # rotary + KV write in the q/k/v GEMV's epilogue
            q = fp8_gemv.gemv(h, *qkv_w, norm_weight=n1.weight, eps=n1.eps, rope=(
                cos, sin, slots, self.kv.k[i], self.kv.v[i], self.heads, self.kv_heads, self.head_dim))
            k = v = None
        else:
            q, k, v = self._rope_write(i, fp8_gemv.gemv(h, *qkv_w, norm_weight=n1.weight, eps=n1.eps), cos, sin,
                                       slots, keys_from_pools)
        h = fp8_gemv.gemv(attend(i, q, k, v).reshape(N, self.heads * self.head_dim), *o_w, residual=h)
        if silu_out:
            act = fp8_gemv.gemv(h, *gu_w, norm_weight=n2.weight, eps=n2.eps, silu_out=True)
            return fp8_gemv.gemv(act, *down_w, residual=h)
        gu = fp8_gemv.gemv(h, *gu_w, norm_weight=n2.weight, eps=n2.eps)
        if not self.fused_gemv_silu:
            return fp8_gemv.gemv(self.ops.silu_mul(gu), *down_w, residual=h)
        return fp8_gemv.gemv(gu, *down_w, silu_mul=True, residual=h)

    def _gemv_plan(self, rows: int) -> list | None:
        """Per layer the (weight, scale, bias) of qkv, o, gate/up and down when all of them run the GEMV kernel at
        `rows` rows (fp8_gemv's switches and probes as they stand) and its fused prologues passed their probe,
        whether q/k/v's GEMV takes the rotary + KV-write epilogue (gemv_rope) and whether gate/up's takes the silu
        epilogue (gemv_silu_out); else None. Cached per (rows,
        switches)."""
        if not self.fused_gemv or rows != 1:  # the prologues run in the kernel on its M = 1 (FMA) path only
            return None
        key = (rows, tuple(sorted(fp8_gemv.settings().items())))
        if key not in self._gemv_plans:
            plan = []
            for L in self.layers:
                ops = [m.gemv_operands(rows, self.dtype, self.device) if hasattr(m, "gemv_operands") else None
                       for m in (L.qkv, L.o, L.gu, L.down)]
                if any(o is None or not fp8_gemv.fused_gemv_ok(self.device, o[0].dtype) for o in ops):
                    plan = None
                    break
                w = ops[0][0]
                rope = (self.gemv_rope and fp8_gemv.rope_route(rows, w.shape[0], w.shape[1], self.heads,
                                                               self.kv_heads, self.head_dim, self.device,
                                                               w.element_size())
                        and gemv_rope_ok(self.device, self.dtype, self.heads, self.kv_heads, self.head_dim, w.dtype,
                                         self.block_size))
                silu_out = self.gemv_silu_out and fp8_gemv.silu_out_ok(self.device, ops[2][0].dtype)
                plan.append(ops + [rope, silu_out])
            self._gemv_plans[key] = plan
        return self._gemv_plans[key]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head(norm(h)); one GEMV with the norm as its prologue where the head runs the kernel at h's rows."""
        norm = self.model.model.norm
        if self.batch_invariant:
            x = BI.bi_add_rms_norm(h, None, norm.weight, norm.eps)[1]
            return self.lm_head(x, out_dtype=torch.float32 if self.fp32_logits else None)
        ops = (self.lm_head.gemv_operands(1, self.dtype, self.device)
               if self.fused_gemv and h.shape[0] == 1 and hasattr(self.lm_head, "gemv_operands") else None)
        if ops is not None and fp8_gemv.fused_gemv_ok(self.device, ops[0].dtype):
            return fp8_gemv.gemv(h, *ops, norm_weight=norm.weight, eps=norm.eps,
                                 out_dtype=torch.float32 if self.fp32_logits else None)
        if self.fp32_logits:
            if isinstance(self.lm_head, FP8Linear):
                return self.lm_head(norm(h), out_dtype=torch.float32)
            return matmul_fp32_out(norm(h), self.lm_head.weight)
        return self.lm_head(norm(h))

    def _decode_attention(self, i, q, block_tables, context_lens):
        if self.use_triton:
            splits = num_splits_for(q.shape[0], self.kv_heads, self.device)
            return decode_attention_triton(q, self.kv.k[i], self.kv.v[i], block_tables, context_lens,
                                           num_splits=splits, merge=self.decode_merge or self.ops.merge_splits,
                                           fused_merge=splits <= self.decode_merge_max_splits)
        return decode_attention_gather(q, self.kv.k[i], self.kv.v[i], block_tables.long(), context_lens)

    def _forward(self, s: StepInputs) -> torch.Tensor:
        """Logits [R, V] (model dtype) for s.sample_rows."""
        h = self.model.model.embed_tokens(s.ids)
        if s.vision_rows is not None:
            h[s.vision_rows] = s.vision_feats.to(h.dtype)
        cos, sin = self._cos_sin(s.positions)
        cos, sin = cos[:, None], sin[:, None]
        single_prefill = s.decode_rows is None and len(s.prefills) == 1

        def attend(i, q, k, v):
            if s.bi_plan is not None:
                return BI.bi_attention(q, self.kv.k[i], self.kv.v[i], *s.bi_plan)
            if single_prefill:
                r0, n, start, blocks = s.prefills[0]
                return prefill_attention(q, k, v, self.kv.k[i], self.kv.v[i], blocks, start, self.gqa_prefill)
            out = torch.empty_like(q)
            if s.decode_rows is not None:
                out[s.decode_rows] = self._decode_attention(i, q[s.decode_rows], s.decode_block_tables,
                                                            s.decode_context_lens)
            if s.prefill_plan is not None:
                rows, k_slots, cu_q, cu_k, max_q, max_k = s.prefill_plan
                out[rows] = varlen_prefill_attention(q[rows], self.kv.k[i], self.kv.v[i], k_slots, cu_q, cu_k,
                                                     max_q, max_k)
                return out
            for r0, n, start, blocks in s.prefills:
                out[r0:r0 + n] = prefill_attention(q[r0:r0 + n], k[r0:r0 + n], v[r0:r0 + n], self.kv.k[i],
                                                   self.kv.v[i], blocks, start)
            return out

        # every row's attention reads its keys from the pools (decode rows, the varlen plan's chunks): the chunk's
        # own k/v are not needed apart, so the rotary and the K/V write can be one kernel (rope_kv.py)
        keys_from_pools = s.prefill_plan is not None or not s.prefills or s.bi_plan is not None
        h = self._layers(h, cos, sin, s.slots, attend, keys_from_pools=keys_from_pools)
        return self._logits(h[s.sample_rows])

    def _decode_core(self, ids, context_lens, rope_deltas, slots, block_tables) -> torch.Tensor:
        """Logits [B, V] for one generated token per sequence. ids/slots/rope_deltas long [B], context_lens
        int32 [B] (including this token), block_tables int32 [B, max_blocks]. Static shapes: graph-capturable."""
        pos = (context_lens.long() - 1 + rope_deltas).expand(3, -1)
        cos, sin = self._cos_sin(pos)
        cos, sin = cos[:, None], sin[:, None]
        h = self.model.model.embed_tokens(ids)
        if self.batch_invariant:  # one tile per row: the same kernel and arithmetic as a prefill chunk's rows
            rows = torch.arange(ids.shape[0], dtype=torch.int32, device=ids.device)
            plan = (block_tables, rows, torch.ones_like(rows), rows, context_lens - 1)

            def attend(i, q, k, v):
                return BI.bi_attention(q, self.kv.k[i], self.kv.v[i], *plan)
        else:
            def attend(i, q, k, v):
                return self._decode_attention(i, q, block_tables, context_lens)

        h = self._layers(h, cos, sin, slots, attend, keys_from_pools=True)
        return self._logits(h)

    # ------------------------------------------------------------------------------------------ a step
    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run one step; float32 logits [R, V] for the chunks with `samples`, in chunk order."""
        if chunks and all(c.is_decode for c in chunks):
            return self._execute_decode(chunks).float()
        s = self._prepare(chunks)
        logits = self._forward(s)
        for c in chunks:  # a sequence past its last vision item no longer needs the features
            items = c.seq.prompt.items
            if c.seq.vision_features and c.end >= max(it.end for it in items):
                c.seq.vision_features.clear()
        return logits.float()

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        p = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[p // self.block_size] * self.block_size + p % self.block_size

    @staticmethod
    def _table_width(tables) -> int:
        """Block-table width for a step: a multiple of 16, because Triton specialises integer arguments (the
        table's row stride) on divisibility by 16, and any other width would JIT-compile the decode kernel
        again, for a second or so, mid-serving."""
        return -(-max(len(t) for t in tables) // 16) * 16

    def _block_table_rows(self, seqs: list[Sequence]) -> torch.Tensor:
        width = self._table_width([s.block_table for s in seqs])
        bt = torch.full((len(seqs), width), self.kv.null_block, dtype=torch.int32)
        for r, s in enumerate(seqs):
            bt[r, :len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
        return bt

    def _prepare(self, chunks: list[ScheduledChunk]) -> StepInputs:
        dev = self.device
        ids, positions, slots, sample_rows = [], [], [], []
        decode_rows, decode_seqs, prefills = [], [], []
        # several prefill chunks, or one beside decode rows: one varlen call (one prefill alone keeps its SDPA call)
        n_prefill = sum(c.num_tokens > 1 for c in chunks)
        use_plan = self.varlen_prefill and 0 < n_prefill and (n_prefill > 1 or n_prefill < len(chunks))
        plan_rows, plan_slots = [], []
        vision_rows, vision_feats = [], []
        self._encode_vision(chunks)
        row = 0
        for c in chunks:
            seq = c.seq
            ids.extend(seq.token_ids[c.start:c.end])
            positions.append(seq.prompt.positions_of(c.start, c.end))
            slots.append(self._slots(seq, c.start, c.end))
            if c.num_tokens == 1:
                decode_rows.append(row)
                decode_seqs.append(c)
            elif use_plan:  # the plan reads keys by slot: no per-chunk block table
                prefills.append((row, c.num_tokens, c.start, None))
                plan_rows.append(torch.arange(row, row + c.num_tokens))
                plan_slots.append(self._slots(seq, 0, c.end))  # the cached prefix and the chunk
            else:
                blocks = None
                if c.start > 0:
                    nb = -(-c.end // self.block_size)
                    blocks = to_device(torch.tensor(seq.block_table[:nb], dtype=torch.long), dev)
                prefills.append((row, c.num_tokens, c.start, blocks))
            for idx, item in enumerate(seq.prompt.items):
                a, b = max(c.start, item.offset), min(c.end, item.end)
                if a < b:
                    vision_rows.append(torch.arange(row + a - c.start, row + b - c.start))
                    vision_feats.append(seq.vision_features[idx][a - item.offset:b - item.offset])
            row += c.num_tokens
            if c.samples:
                sample_rows.append(row - 1)
        # every host tensor goes over through pinned memory (layers.to_device): a pageable copy would wait for the
        # ViT just launched by _encode_vision to finish before the decoder's kernels could be queued behind it
        s = StepInputs(ids=to_device(torch.tensor(ids, dtype=torch.long), dev),
                       positions=to_device(torch.cat(positions, dim=1), dev), slots=to_device(torch.cat(slots), dev),
                       sample_rows=to_device(torch.tensor(sample_rows, dtype=torch.long), dev), prefills=prefills)
        if decode_rows:
            s.decode_rows = to_device(torch.tensor(decode_rows, dtype=torch.long), dev)
            s.decode_block_tables = to_device(self._block_table_rows([c.seq for c in decode_seqs]), dev)
            s.decode_context_lens = to_device(torch.tensor([c.end for c in decode_seqs], dtype=torch.int32), dev)
        if vision_rows:
            s.vision_rows = to_device(torch.cat(vision_rows), dev)
            s.vision_feats = torch.cat(vision_feats)
        if use_plan:
            n_q = [len(r) for r in plan_rows]
            n_k = [len(k) for k in plan_slots]
            cu = torch.tensor([[0, *itertools.accumulate(n_q)], [0, *itertools.accumulate(n_k)]], dtype=torch.int32)
            cu = to_device(cu, dev)
            s.prefill_plan = (to_device(torch.cat(plan_rows), dev), to_device(torch.cat(plan_slots), dev), cu[0], cu[1],
                              max(n_q), max(n_k))
        if self.batch_invariant:  # every row through one kernel: chunk j's rows and its row j of the block tables
            rows0 = itertools.accumulate((c.num_tokens for c in chunks), initial=0)
            tiles = torch.tensor(BI.attention_tiles([(r0, c.num_tokens, j) for j, (r0, c) in
                                                     enumerate(zip(rows0, chunks))]), dtype=torch.int32)
            pos = torch.cat([torch.arange(c.start, c.end, dtype=torch.int32) for c in chunks])
            s.bi_plan = (to_device(self._block_table_rows([c.seq for c in chunks]), dev), *to_device(tiles, dev),
                         to_device(pos, dev))
        return s

    def _execute_decode(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        return self._replay_decode([c.seq for c in chunks], [c.start for c in chunks])

    def _replay_decode(self, seqs: list[Sequence], positions: list[int], device_ids: torch.Tensor | None = None):
        """Decode-only step, one token per sequence at `positions`: host metadata as plain ints (this runs every
        step), then one graph replay (batch padded up to its bucket) or an eager _decode_core. device_ids: the
        tokens as a device tensor (decode_ahead: the host has not seen them yet; graph buckets only)."""
        B = len(seqs)
        bs, null = self.block_size, self.kv.null_block
        bucket = next((b for b in self.graph_sizes if b >= B), None)
        pad = (bucket or B) - B
        ids, ctx, deltas, slots, tables = [], [], [], [], []
        for seq, p in zip(seqs, positions):
            ids.append(seq.token_ids[p] if device_ids is None else 0)
            ctx.append(p + 1)
            deltas.append(seq.prompt.rope_delta)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            tables.append(seq.block_table)
        # padded rows: one token of context in the null block, written to the null block
        rows = torch.tensor([ids + [0] * pad, ctx + [1] * pad, deltas + [0] * pad, slots + [null * bs] * pad],
                            dtype=torch.long)
        width = self._table_width(tables)
        if bucket is not None:  # the graph reads its static table, whose width need not be a multiple of 16
            width = min(width, self.static["block_tables"].shape[1])
        bt = torch.tensor([t + [null] * (width - len(t)) for t in tables] + [[null] * width] * pad, dtype=torch.int32)
        if bucket is None:
            rows = rows.to(self.device)
            if device_ids is not None:
                rows[0].copy_(device_ids)
            return self._decode_core(rows[0], rows[1].int(), rows[2], rows[3], bt.to(self.device))
        st = self.static
        n = bucket
        # pinned staging: a copy from pageable memory first waits for the GPU to drain, which would keep a step
        # launched ahead (decode_ahead) from queueing behind the running one
        rows, bt = rows.pin_memory(), bt.pin_memory()
        st["ids"][:n].copy_(rows[0], non_blocking=True)
        if device_ids is not None:
            st["ids"][:B].copy_(device_ids)
        st["context_lens"][:n].copy_(rows[1], non_blocking=True)
        st["rope_deltas"][:n].copy_(rows[2], non_blocking=True)
        st["slots"][:n].copy_(rows[3], non_blocking=True)
        st["block_tables"][:n, :width].copy_(bt, non_blocking=True)
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:B]

    @torch.inference_mode()
    def decode_ahead(self, chunks: list[ScheduledChunk], token_ids: torch.Tensor):
        """Launch the decode step that follows the decode-only step `chunks` before the host has its tokens: each
        sequence's next token is token_ids[i] (sampled on the device) at position c.end. The host then turns this
        step's tokens into text while the GPU runs the next one. Returns a handle for take_ahead, or None where
        a position needs a block not yet allocated (the engine allocates them first). Without a graph bucket the step
        runs eagerly (the CPU: for tests).
        If the scheduler then picks other work (a finished, aborted or preempted sequence, an admitted request),
        the handle is dropped: the step wrote the right K/V (for the true tokens) at slots the sequences own or
        no longer use, so nothing is wrong, only the work is lost."""
        if any(c.end // self.block_size >= len(c.seq.block_table) for c in chunks):
            return None
        seqs, positions = [c.seq for c in chunks], [c.end for c in chunks]
        logits = self._replay_decode(seqs, positions, device_ids=token_ids).float()
        return list(zip(seqs, positions)), logits

    @staticmethod
    def take_ahead(handle, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        """The float32 logits decode_ahead launched, for `chunks` if they are decode chunks of that step's
        sequences, in its order, each at the predicted position: all of them, or some (the others finished,
        were aborted or preempted; each row of a decode step depends on its own sequence only). Else None."""
        key, logits = handle
        rows, j = [], 0
        for c in chunks:
            if not c.is_decode:
                return None
            while j < len(key) and key[j][0] is not c.seq:
                j += 1
            if j == len(key) or key[j][1] != c.start:
                return None
            rows.append(j)
            j += 1
        if len(rows) == len(key):
            return logits
        return logits[to_device(torch.tensor(rows), logits.device)]

    # ------------------------------------------------------------------------------------------ CUDA graphs
    @torch.inference_mode()
    def capture_cuda_graphs(self, max_model_len: int) -> None:
        """One graph of _decode_core per batch-size bucket; any failure leaves eager decoding in place.
        Tensor parallel: the NCCL collectives of the shard's layers are captured too (capture_error_mode
        thread_local: NCCL's watchdog thread queries events meanwhile), and every rank keeps its graphs only
        if all ranks captured every bucket (a replay on one rank and an eager step on another would still
        match collective for collective, but one failed capture must not leave the others' graphs half
        built: they agree after each bucket)."""
        tp = self.tp
        usable = self.enable_cuda_graphs and self.is_cuda and (self.use_triton or self.batch_invariant)
        if not (tp.agree(usable) if tp is not None else usable):
            return
        dev = self.device
        max_batch = self.max_num_seqs
        width = -(-max_model_len // self.block_size)
        null = self.kv.null_block
        self.static = st = {
            "ids": torch.zeros(max_batch, dtype=torch.long, device=dev),
            "context_lens": torch.ones(max_batch, dtype=torch.int32, device=dev),
            "rope_deltas": torch.zeros(max_batch, dtype=torch.long, device=dev),
            "slots": torch.full((max_batch,), null * self.block_size, dtype=torch.long, device=dev),
            "block_tables": torch.full((max_batch, width), null, dtype=torch.int32, device=dev),
        }
        try:
            pool = None
            for B in reversed(_cuda_graph_buckets(max_batch)):  # largest first: the others reuse its pool
                args = (st["ids"][:B], st["context_lens"][:B], st["rope_deltas"][:B], st["slots"][:B],
                        st["block_tables"][:B])
                stream = torch.cuda.Stream(dev)
                stream.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._decode_core(*args)
                torch.cuda.current_stream(dev).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                mode = "thread_local" if tp is not None else "global"
                with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
                    out = self._decode_core(*args)
                pool = graph.pool()
                self.graphs[B] = (graph, out)
                if tp is not None and not tp.agree(True):
                    raise RuntimeError("another rank failed to capture")
            torch.cuda.synchronize(dev)
            self.graph_sizes = sorted(self.graphs)
            log.info("captured %d decode CUDA graphs (batch sizes up to %d)", len(self.graphs), max_batch)
        except Exception as e:
            log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
            if tp is not None and "another rank" not in str(e):
                tp.agree(False)  # the others are waiting for this bucket's verdict
            self.graphs, self.graph_sizes = {}, []

    # ------------------------------------------------------------------------------------------ vision
    def _encode_vision(self, chunks: list[ScheduledChunk]) -> None:
        """Make seq.vision_features hold every vision item that overlaps a chunk of this step: from the
        encoder cache (content hash) or from one ViT call over all the step's missing items."""
        missing: dict[bytes, list[tuple[Sequence, int]]] = {}
        items = {}
        for c in chunks:
            seq = c.seq
            for idx, item in enumerate(seq.prompt.items):
                if item.offset >= c.end or item.end <= c.start or idx in seq.vision_features:
                    continue
                feats = self.encoder_cache.get(item.content_hash)
                if feats is not None:
                    self.encoder_cache.move_to_end(item.content_hash)
                    seq.vision_features[idx] = feats
                else:
                    missing.setdefault(item.content_hash, []).append((seq, idx))
                    items[item.content_hash] = item
        if not missing:
            return
        todo = list(items.values())
        parts = [self._pixel_values(it) for it in todo]
        grids = [it.grid_thw for it in todo]
        encode = self.vision_graphs if self.vision_graphs is not None else self.model.visual
        if self.batch_invariant:  # each item on its own: its features do not depend on what else came in this step
            feats = torch.cat([encode(p, [g]) for p, g in zip(parts, grids)])
        else:
            feats = encode(parts[0] if len(parts) == 1 else torch.cat(parts), grids)
        self.num_encoder_runs += 1
        self.num_encoded_items += len(todo)
        expected = sum(it.num_tokens for it in todo)
        if feats.shape[0] != expected:
            raise InputError(f"vision features ({feats.shape[0]} tokens) do not match the {expected} pad tokens")
        for it, f in zip(todo, feats.split([it.num_tokens for it in todo])):
            for seq, idx in missing[it.content_hash]:
                seq.vision_features[idx] = f
            self.encoder_cache[it.content_hash] = f
            self.encoder_cache_rows += f.shape[0]
        while self.encoder_cache_rows > self.encoder_cache_tokens and len(self.encoder_cache) > 1:
            _, old = self.encoder_cache.popitem(last=False)
            self.encoder_cache_rows -= old.shape[0]

    def _pixel_values(self, item: VisionItem) -> torch.Tensor:
        """The item's float32 pixel_values on the device. The processor's uint8 frames go over as they lie in host
        memory (pinned, not blocking: an eighth of the float bytes) and are normalised and patchified there."""
        if item.frames is None:
            return to_device(item.pixel_values, self.device)
        frames, channels_last = dense_frames(item.frames)
        if item.staged is not None and item.staged.shape == frames.shape and self.device.type == "cuda":
            # pinned when the prompt was encoded (VisionInput.content_hash(stage=True)); used once
            frames, item.staged = item.staged.to(self.device, non_blocking=True), None
        else:
            frames = to_device(frames, self.device)
        return pixel_values_from_frames(frames.permute(0, 3, 1, 2) if channels_last else frames)
