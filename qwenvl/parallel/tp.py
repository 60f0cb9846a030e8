"""Tensor parallelism for the decoder (Megatron style) over torch.distributed; the ViT replicated.

Per decoder layer, with world size W:
  q/k/v, gate/up   column-parallel: each rank holds H/W query heads, the kv heads those need, I/W MLP rows;
                   plain nn.Linear (or FP8Linear) of the local shape, no communication.
  o_proj, down     row-parallel: the matching input columns; one all-reduce of the output per sublayer.
  embed_tokens     vocab-parallel: rows [r*Vp, (r+1)*Vp) (Vp = ceil(V/W), zero rows pad the last shard);
                   out-of-shard ids give zeros, then one all-reduce.
  lm_head          vocab-parallel: local logits, all-gathered and cut to V. It gathers what it is given:
                   model.generate and the engine pass only the rows that sample (the last position).
GQA: kv heads are split when W divides them; when kv heads divide W each kv head is replicated on W/KV
ranks (every rank holds exactly the kv head its query heads use); other W are rejected.
model.config.text becomes a ShardedTextConfig describing the local shard (heads, kv heads, MLP width; the
full head_dim and vocab), so everything sized from the config -- model.generate's KVCache, the engine's
paged cache -- is sharded by heads with no change to that code.
ViT: weights replicated. vit="replicate" runs every image on every rank (no communication); vit="data"
splits a batch's images across ranks and all-gathers the features (PEERS.md 2.2, vLLM's
mm_encoder_tp_mode=data).

SPMD: every rank runs the same forward on the same inputs (ids, pixels, positions) and gets the same
logits (all-gathered), so greedy/seeded sampling agrees without further communication. The engine runs on
shards through LLM(..., tensor_parallel_size=N) (qwenvl/engine/spmd.py: rank 0 drives, the others mirror
its scheduler from a control message per step; the KV cache size is the minimum over ranks).

Two entry points: shard_model(model, rank, world) converts a full model in memory; load_tp(path, rank,
world, ...) builds the sharded model on the meta device and reads only this rank's slices from the
safetensors shards (safe_open(...).get_slice), so no rank ever holds the whole decoder.
FP8 composes: an FP8 checkpoint (or an FP8-quantised model) shards the same way (weight_scale follows the
output rows; row-parallel layers keep all of theirs), giving exactly the TP=1 FP8 model. quantize_model_fp8
after shard_model also works (row-parallel layers keep their all-reduce) but their scales are then taken over
each rank's input slice: a slightly different FP8 model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import _assign, check_complete, fit_shape, iter_checkpoint, resolve_dtype
from ..config import ModelConfig, TextConfig
from ..errors import CheckpointError, ConfigError
from ..quant.fp8 import FP8Linear, checkpoint_quantization, fp8_backend, make_fp8_modules
from ..rope import check_grid
from ..vision import VisionTransformer

log = logging.getLogger(__name__)

COLUMN = {"self_attn.q_proj": "q", "self_attn.k_proj": "kv", "self_attn.v_proj": "kv", "mlp.gate_proj": "mlp",
          "mlp.up_proj": "mlp"}
ROW = {"self_attn.o_proj": "q", "mlp.down_proj": "mlp"}


# ---------------------------------------------------------------------------------------------- layout
@dataclass
class ShardedTextConfig(TextConfig):
    """The decoder shape one tensor-parallel rank holds (see the module docstring)."""
    tp_rank: int = 0
    tp_world: int = 1
    full_num_attention_heads: int = 0
    full_num_key_value_heads: int = 0
    full_intermediate_size: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.full_num_attention_heads


@dataclass(frozen=True)
class TPLayout:
    rank: int
    world: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, t: TextConfig, rank: int, world: int) -> "TPLayout":
        if isinstance(t, ShardedTextConfig):
            raise ConfigError("the model is already tensor-parallel")
        H, KV, I = t.num_attention_heads, t.num_key_value_heads, t.intermediate_size
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} outside world {world}")
        if H % world or I % world or (KV % world and world % KV):
            raise ConfigError(f"tensor parallel size {world} must divide the {H} attention heads and the MLP width "
                              f"{I}, and divide or be a multiple of the {KV} kv heads")
        return cls(rank, world, H, KV, t.head_dim, I, t.vocab_size)

    @property
    def local_heads(self) -> int:
        return self.heads // self.world

    @property
    def local_kv(self) -> int:
        return max(1, self.kv_heads // self.world)

    @property
    def local_inter(self) -> int:
        return self.intermediate // self.world

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab // self.world)

    def rows(self, kind: str) -> tuple[int, int]:
        """[start, stop) of this rank's output rows (column-parallel) / input columns (row-parallel)."""
        D = self.head_dim
        if kind == "q":
            return self.rank * self.local_heads * D, (self.rank + 1) * self.local_heads * D
        if kind == "kv":  # the kv heads used by this rank's query heads
            kv0 = self.rank * self.local_heads // (self.heads // self.kv_heads)
            return kv0 * D, (kv0 + self.local_kv) * D
        if kind == "mlp":
            return self.rank * self.local_inter, (self.rank + 1) * self.local_inter
        if kind == "vocab":
            start = self.rank * self.vocab_per_rank
            return start, min(self.vocab, start + self.vocab_per_rank)
        raise ValueError(kind)

    def spec(self, name: str) -> tuple[int, int, int, int] | None:
        """(dim, start, stop, padded_len) of this rank's slice of a full tensor, or None when replicated."""
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            a, b = self.rows("vocab")
            return 0, a, b, self.vocab_per_rank
        if not name.startswith("model.layers."):
            return None
        mod, _, param = name.split(".", 3)[3].rpartition(".")
        if mod in COLUMN:
            a, b = self.rows(COLUMN[mod])
            return 0, a, b, b - a
        if mod in ROW and param == "weight":  # weight_scale of a row-parallel layer: per output row, replicated
            a, b = self.rows(ROW[mod])
            return 1, a, b, b - a
        return None

    def text_config(self, t: TextConfig) -> ShardedTextConfig:
        d = {f.name: getattr(t, f.name) for f in dataclasses.fields(TextConfig)}
        d.update(num_attention_heads=self.local_heads, num_key_value_heads=self.local_kv,
                 intermediate_size=self.local_inter, tp_rank=self.rank, tp_world=self.world,
                 full_num_attention_heads=self.heads, full_num_key_value_heads=self.kv_heads,
                 full_intermediate_size=self.intermediate)
        return ShardedTextConfig(**d)


# ---------------------------------------------------------------------------------------------- layers
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13


def all_gather_stacked(x: torch.Tensor, world: int, group=None) -> torch.Tensor:
    """[world, *x.shape]: every rank's x, in rank order (one collective; output laid out along dim 0)."""
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    with torch.no_grad():  # inference only; gloo's gather trips autograd's view checks in grad mode
        _gather_single(out, x, group=group)
    return out.view((world,) + tuple(x.shape))


class RowParallelLinear(nn.Linear):
    """Local input columns; the partial outputs are all-reduced, then the bias (if any) is added once."""
    reduce_output = True

    def __init__(self, *a, group=None, **kw):
        super().__init__(*a, **kw)
        self.group = group

    def forward(self, x):
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, rows: int, dim: int, start: int, real_rows: int, group=None, **kw):
        super().__init__(rows, dim, **kw)
        self.start, self.real_rows, self.group = start, real_rows, group

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.real_rows)
        h = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0)
        dist.all_reduce(h, group=self.group)
        return h


class VocabParallelLMHead(nn.Linear):
    def __init__(self, dim: int, rows: int, vocab: int, world: int, group=None, **kw):
        super().__init__(dim, rows, bias=False, **kw)
        self.vocab, self.world, self.group = vocab, world, group

    def forward(self, x):
        out = all_gather_stacked(F.linear(x, self.weight), self.world, self.group)
        return out.movedim(0, -2).flatten(-2)[..., :self.vocab]


class DataParallelVision(VisionTransformer):
    """The replicated ViT with a batch's images split across ranks (largest first, to the least-loaded
    rank), features all-gathered back into the original order. One image: every rank runs it (no comm)."""
    tp_group = None

    def forward(self, pixel_values, grid_thw):
        c = self.config
        grids = check_grid(grid_thw, c.spatial_merge_size)
        world, rank = dist.get_world_size(self.tp_group), dist.get_rank(self.tp_group)
        if len(grids) < 2 or world == 1:
            return super().forward(pixel_values, grid_thw)
        sizes = [t * h * w for t, h, w in grids]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        owner, load = [0] * len(grids), [0] * world
        for i in sorted(range(len(grids)), key=lambda i: -sizes[i]):
            owner[i] = min(range(world), key=lambda r: load[r])
            load[owner[i]] += sizes[i]
        per_rank = [[i for i in range(len(grids)) if owner[i] == r] for r in range(world)]
        unit = c.merge_unit
        mine = per_rank[rank]
        if mine:
            pix = torch.cat([pixel_values[starts[i]:starts[i] + sizes[i]] for i in mine])
            feats = super().forward(pix, [grids[i] for i in mine])
        else:
            feats = pixel_values.new_zeros(0, c.out_hidden_size, dtype=self.dtype)
        rows = [sum(sizes[i] for i in per_rank[r]) // unit for r in range(world)]
        padded = feats.new_zeros(max(rows), feats.shape[1])
        padded[:feats.shape[0]] = feats
        out = all_gather_stacked(padded, world, self.tp_group)
        pieces = {}
        for r in range(world):
            off = 0
            for i in per_rank[r]:
                pieces[i] = out[r, off:off + sizes[i] // unit]
                off += sizes[i] // unit
        return torch.cat([pieces[i] for i in range(len(grids))])


# ---------------------------------------------------------------------------------------------- structure
def _restructure(model, lay: TPLayout, group, vit: str) -> None:
    """Swap the decoder's modules for local-shape ones on the meta device (filled by the caller)."""
    t = model.config.text
    hidden = t.hidden_size
    for layer in model.model.layers:
        for path, kind in list(COLUMN.items()) + list(ROW.items()):
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            old = getattr(parent, attr)
            a, b = lay.rows(kind)
            row = path in ROW
            in_f, out_f = (b - a, hidden) if row else (hidden, b - a)
            has_bias = old.bias is not None
            if isinstance(old, FP8Linear):
                new = FP8Linear(in_f, out_f, has_bias, device="meta",
                                dtype=old.bias.dtype if has_bias else torch.bfloat16)
                new.backend, new.reduce_output, new.group = old.backend, row, group
            elif row:
                new = RowParallelLinear(in_f, out_f, bias=has_bias, group=group, device="meta", dtype=old.weight.dtype)
            else:
                new = nn.Linear(in_f, out_f, bias=has_bias, device="meta", dtype=old.weight.dtype)
            setattr(parent, attr, new)
        layer.self_attn.n_heads, layer.self_attn.n_kv = lay.local_heads, lay.local_kv
    emb = model.model.embed_tokens
    a, b = lay.rows("vocab")
    model.model.embed_tokens = VocabParallelEmbedding(lay.vocab_per_rank, hidden, a, b - a, group, device="meta",
                                                      dtype=emb.weight.dtype)
    model.lm_head = VocabParallelLMHead(hidden, lay.vocab_per_rank, lay.vocab, lay.world, group, device="meta",
                                        dtype=model.lm_head.weight.dtype)
    model.config = dataclasses.replace(model.config, text=lay.text_config(t))
    model.model.config = model.config.text
    if vit == "data":
        model.visual.__class__ = DataParallelVision
        model.visual.tp_group = group
    elif vit != "replicate":
        raise ConfigError(f"vit must be 'replicate' or 'data', got {vit!r}")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


def _check_group(world: int, group) -> None:
    if not dist.is_initialized() or dist.get_world_size(group) != world:
        raise RuntimeError(f"tensor parallel size {world} needs an initialised process group of that size "
                           "(torchrun + init_distributed(), or spawn())")


@torch.no_grad()
def shard_model(model, rank: int, world: int, group=None, vit: str = "replicate"):
    """Convert a full model (bf16/fp32, or FP8-quantised) into this rank's shard, in place; returns it.
    The full decoder tensors are released as their slices are taken."""
    if world == 1:
        return model
    _check_group(world, group)
    lay = TPLayout.of(model.config.text, rank, world)
    tied = model.config.text.tie_word_embeddings
    full = dict(model.state_dict(keep_vars=True))
    _restructure(model, lay, group, vit)
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if p.device.type != "meta" or (tied and name == "lm_head.weight"):
            continue
        src = full.pop(name).detach()
        spec = lay.spec(name)
        if spec is None:  # replicated inside a swapped module (the weight_scale of a row-parallel FP8 layer)
            t = src
        else:
            dim, a, b, n = spec
            t = src.narrow(dim, a, b - a).clone()
            t = _pad_rows(t, n) if dim == 0 else t
        _assign(model, name, t)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    del full
    return model.eval()


@torch.no_grad()
def load_tp(path: str | os.PathLike, rank: int = 0, world: int = 1, dtype=None, device="cpu", group=None,
            vit: str = "replicate", fp8_backend_name: str = "auto", stats: dict | None = None):
    """This rank's shard of a checkpoint (bf16/fp32, or FP8 per-channel), read slice by slice with
    safetensors get_slice straight into `dtype` on `device`. world == 1: the whole model (also the FP8 loader).
    stats (optional dict) receives bytes_read: the bytes this rank read from the files."""
    from ..model import Qwen25VL

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if world > 1:
        _check_group(world, group)
    config = ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype, config)
    vision_dtype = torch.bfloat16 if dtype == torch.float16 else dtype  # never run the ViT in fp16
    fp8 = checkpoint_quantization(config) == "fp8"
    with torch.device("meta"):
        model = Qwen25VL(config)
    if fp8:
        make_fp8_modules(model, fp8_backend_name)
    lay = None
    if world > 1:
        lay = TPLayout.of(config.text, rank, world)
        _restructure(model, lay, group, vit)
    tied = config.text.tie_word_embeddings
    expected = dict(model.named_parameters(remove_duplicate=False))
    seen: set[str] = set()
    nbytes = 0
    # static activation scales / zero points of symmetric FP8 schemes are not used
    for fpath, f, raw, name in iter_checkpoint(path, expected, tied, ("input_scale", "weight_zero_point")):
        spec = lay.spec(name) if lay else None
        if spec is None:
            t = f.get_tensor(raw)
        else:
            dim, a, b, n = spec
            sl = f.get_slice(raw)
            t = _pad_rows(sl[a:b], n) if dim == 0 else sl[:, a:b]
        nbytes += t.numel() * t.element_size()
        t = fit_shape(t, expected[name].shape, fpath, raw, name, f" on rank {rank}")
        if expected[name].dtype == torch.float8_e4m3fn:
            if t.dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"{fpath}: {raw!r} is {t.dtype}, expected float8_e4m3fn")
            target = t.dtype
        elif name.endswith("weight_scale"):
            target = torch.float32
        else:
            target = vision_dtype if name.startswith("visual.") else dtype
        _assign(model, name, t.to(device=device, dtype=target))
        seen.add(name)
    check_complete(path, expected, seen, tied)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if fp8:
        fp8_backend(device)
    if stats is not None:
        stats["bytes_read"] = nbytes
    return model.eval()


def param_bytes(model, prefix: str = "") -> int:
    """Bytes of the distinct parameters whose names start with prefix."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith(prefix))


@torch.no_grad()
def random_shard(config: ModelConfig, rank: int = 0, world: int = 1, dtype=torch.bfloat16, device="cpu",
                 seed: int = 0, std: float = 0.02, fp8: bool = False, group=None, vit: str = "replicate"):
    """This rank's shard of a random model (normal(0, std), norms at 1, biases 0; Qwen25VL.random's rule),
    allocated straight on `device` in `dtype`: the full model never exists anywhere, so a 72B shard costs
    only its own bytes (benchmarks at real shapes without a checkpoint). fp8: the decoder linears are
    FP8Linear, each weight drawn in `dtype` and quantised on its own (one weight's transient copy at a time).
    Replicated tensors draw from one generator on every rank (identical ViT everywhere); sharded ones from
    a per-rank one. Not the same values as Qwen25VL.random (use shard_model on that where equality matters)."""
    from ..model import Qwen25VL
    from ..quant.fp8 import quantize_weight

    if world > 1:
        _check_group(world, group)
    with torch.device("meta"):
        model = Qwen25VL(config).to(dtype)
    if fp8:
        make_fp8_modules(model)
    lay = TPLayout.of(config.text, rank, world) if world > 1 else None
    if lay is not None:
        _restructure(model, lay, group, vit)
    device = torch.device(device)
    shared = torch.Generator(device=device).manual_seed(seed)
    own = torch.Generator(device=device).manual_seed(seed + 7919 * (rank + 1))
    tied = config.text.tie_word_embeddings
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if (tied and name == "lm_head.weight") or name.endswith("weight_scale"):
            continue
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "layernorm" in name \
                or name.endswith("norm.weight") or name.endswith("ln_q.weight"):
            t = torch.ones(p.shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            t = torch.zeros(p.shape, dtype=dtype, device=device)
        else:
            gen = own if lay is not None and lay.spec(name) is not None else shared
            t = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
        if p.dtype == torch.float8_e4m3fn:
            t, scale = quantize_weight(t)
            _assign(model, name[:-len("weight")] + "weight_scale", scale)
        _assign(model, name, t)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if fp8:
        from ..quant.fp8 import _mark_quantized

        _mark_quantized(model)
        fp8_backend(device)
    return model.eval()


@dataclass(frozen=True)
class RandomWeights:
    """A picklable model factory f(rank, world, device) for LLM(f, tensor_parallel_size=N) and the benches:
    random weights at a preset shape ("7b", "72b", "tiny") or a ModelConfig, built on each rank's device.
    full=True: every rank draws the whole model (Qwen25VL.random, so TP=N has exactly the TP=1 weights) and
    keeps its shard; full=False: only the shard is ever allocated (random_shard: a 72B shard per GPU;
    values differ from TP=1), optionally with FP8 decoder linears."""
    shape: object = "tiny"
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    full: bool = True
    fp8: bool = False

    def __call__(self, rank: int = 0, world: int = 1, device=None):
        from ..config import preset
        from ..model import Qwen25VL

        config = preset(self.shape) if isinstance(self.shape, str) else self.shape
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        if not self.full:
            return random_shard(config, rank, world, self.dtype, device, self.seed, fp8=self.fp8)
        if self.fp8:
            raise ConfigError("RandomWeights: fp8 needs full=False (or quantise the model after)")
        model = Qwen25VL.random(config, self.dtype, device=device, seed=self.seed)
        return shard_model(model, rank, world) if world > 1 else model
