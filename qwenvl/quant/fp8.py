"""FP8 (e4m3) weights for the decoder linears: per-output-channel scales, two ways to multiply.

Format (the compressed-tensors "float-quantized" layout of FP8-Dynamic checkpoints, e.g. RedHatAI /
neuralmagic Qwen2.5-VL-*-Instruct-FP8-Dynamic made by llm-compressor, so those load too):
  `<linear>.weight`        float8_e4m3fn [out, in]
  `<linear>.weight_scale`  [out, 1] (we write float32; any float dtype is read), w ~= weight * weight_scale
  config.json `quantization_config` = FP8_QUANT_CONFIG below (weights: channel, static; activations: token,
  dynamic; lm_head and the ViT ignored). The Qwen team's own FP8 releases (Qwen3) use another layout,
  `quant_method: "fp8"` with 128x128 blocks and `weight_scale_inv`; it is rejected with a clear error.
Quantised: q/k/v/o and gate/up/down of every decoder layer. Embeddings, lm_head, norms and the ViT stay
in the model dtype (the ViT is 0.7B of 8.3B and sensitive; the head sets the logits directly).

Forward, chosen per device once (`fp8_backend`):
  "scaled_mm" (Hopper/Ada, bf16 activations): activations quantised per token, dynamically (scale =
      row amax / 448), then one `torch._scaled_mm` with row-wise scales (token scales x channel scales),
      bf16 out. Per token rather than per tensor: one outlier token does not cost every other token its
      precision, nothing to calibrate, and it is what FP8-Dynamic checkpoints were evaluated with.
  "dequant" (CPU, older GPUs, fp32/fp16 activations, shapes not multiples of 16): weight-only, the fp8
      weight cast to the activation dtype (exact: e4m3 fits in bf16/fp16/fp32), a plain matmul, then the
      per-channel scale on the output in fp32.
On CUDA the scaled_mm path is probed once against an fp32 emulation before it is used; a failure or a
mismatch falls back to "dequant" with a warning.
Small batches (decode: at most QWENVL_FP8_GEMV_MAX_M = 16 rows) take neither: a weight-only Triton GEMV
(fp8_gemv.py) reads each fp8 weight byte once and needs no activation quantisation (bf16/fp16 activations,
compute capability >= 8.9, probed once per device). QWENVL_FP8_GEMV=0 or fp8_gemv.set_enabled(False) turns
it off; backend "scaled_mm" / "dequant" on a module never uses it, "gemv" uses it even when switched off.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fp8_gemv as _gemv

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FP8_QUANT_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                              "dynamic": True},
        "output_activations": None,
    }},
    "ignore": ["lm_head", "re:visual.*", "re:model.visual.*"],
    "kv_cache_scheme": None,
}


# ---------------------------------------------------------------------------------------------- math
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric e4m3: (q [out, in] fp8, scale [out, 1] fp32) with w ~= q * scale.

    Round to nearest, so |w - q*scale| <= 2^-4 |w| for normal values and <= 2^-10 scale in the subnormal
    range (e4m3: 3 mantissa bits, smallest normal 2^-6)."""
    w32 = w.detach().float()
    scale = (w32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    q = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def quantize_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantisation: (q [M, K] fp8, scale [M, 1] fp32), one scale per row (token)."""
    xf = x2d.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


_act_quant = quantize_per_token  # eager: ~6 small kernels per linear; see compile_activation_quant()


def compile_activation_quant(enable: bool = True) -> bool:
    """Fuse the per-token activation quantisation into one or two kernels with torch.compile (matters for
    small-batch decode, where each linear is a GEMV and the extra eager kernels cost as much as the bytes
    FP8 saves). Checked against the eager function on CUDA; returns whether the compiled one is in use."""
    global _act_quant
    _act_quant = quantize_per_token
    if not enable or not torch.cuda.is_available():
        return False
    try:
        fn = torch.compile(quantize_per_token, dynamic=True, fullgraph=True)
        for m in (1, 7, 300):
            x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
            a, sa = fn(x)
            b, sb = quantize_per_token(x)
            # a reciprocal-multiply instead of a division may move a value across an fp8 rounding boundary
            differ = (a.float() != b.float()).float().mean().item()
            if differ > 1e-3 or not torch.allclose(sa, sb, rtol=1e-6):
                raise RuntimeError(f"compiled activation quantisation differs from eager ({differ:.2%} values)")
    except Exception as e:
        log.warning("fp8: compiled activation quantisation unavailable (%s); staying eager", e)
        return False
    _act_quant = fn
    return True


def _mm_scaled(x2d, q, scale_row, out_dtype):
    xq, xs = _act_quant(x2d)
    return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale_row, out_dtype=out_dtype)


def _mm_dequant(x, q, scale_row, out_dtype=None):
    if out_dtype == torch.float32:  # an unrounded product: multiply in fp32 (e4m3 is exact there)
        x = x.float()
    y = F.linear(x, q.to(x.dtype))
    return (y.float() * scale_row).to(out_dtype or x.dtype)


def emulate_scaled_mm(x2d, q, scale) -> torch.Tensor:
    """fp32 reference of the scaled_mm path: quantise x per token, dequantise both, multiply in fp32."""
    xq, xs = quantize_per_token(x2d)
    return (xq.float() * xs) @ dequantize_weight(q, scale).t()


_BACKENDS: dict[str, str] = {}


def fp8_backend(device) -> str:
    """'scaled_mm' where torch._scaled_mm with row-wise scales works and matches an fp32 emulation on this
    device (compute capability >= 8.9), else 'dequant'. Probed once per device; call it before capturing
    CUDA graphs (quantize_model_fp8 and the loaders do)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        _gemv.gemv_ok(device)  # the small-batch kernel's one-time probe, also before any CUDA graph capture
    key = str(device)
    if key in _BACKENDS:
        return _BACKENDS[key]
    backend = "dequant"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        try:
            g = torch.Generator(device=device).manual_seed(0)
            w = torch.randn(160, 256, generator=g, device=device) * 0.02
            q, s = quantize_weight(w)
            err = 0.0
            for m in (37, 1):  # a prefill-like and a decode-like row count
                x = torch.randn(m, 256, generator=g, device=device).to(torch.bfloat16)
                got = _mm_scaled(x, q, s.view(1, -1), torch.bfloat16).float()
                ref = emulate_scaled_mm(x, q, s)
                err = max(err, ((got - ref).norm() / ref.norm()).item())
            if err < 1e-2:
                backend = "scaled_mm"
            else:
                log.warning("fp8: torch._scaled_mm disagrees with the fp32 emulation (rel err %.3g); "
                            "using dequant", err)
        except Exception as e:  # old torch, missing kernel, unsupported layout
            log.warning("fp8: torch._scaled_mm unusable on %s (%s); using dequant", device, e)
    _BACKENDS[key] = backend
    return backend


# ---------------------------------------------------------------------------------------------- module
class FP8Linear(nn.Module):
    """y = x @ (weight * weight_scale)^T + bias. `backend`: 'auto' (the GEMV kernel for small batches where
    it is usable and switched on, else fp8_backend of the input's device), 'gemv' (the kernel where usable,
    even when switched off), 'scaled_mm' or 'dequant'. `reduce_output` (set by tensor parallelism for row-parallel layers): the
    output is a partial sum, all-reduced over `group` before the bias is added."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.backend = "auto"
        self.reduce_output = False
        self.group = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, backend: str = "auto") -> "FP8Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta", dtype=lin.weight.dtype)
        q, s = quantize_weight(lin.weight)
        m.weight = nn.Parameter(q, requires_grad=False)
        m.weight_scale = nn.Parameter(s, requires_grad=False)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        m.backend = backend
        m.reduce_output = getattr(lin, "reduce_output", False)
        m.group = getattr(lin, "group", None)
        return m

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"backend={self.backend}"

    def use_scaled_mm(self, x: torch.Tensor) -> bool:
        b = self.backend if self.backend != "auto" else fp8_backend(x.device)
        return (b == "scaled_mm" and self.weight.dtype == FP8 and (x.dtype == torch.bfloat16 or x.device.type == "cpu")
                and self.in_features % 16 == 0 and self.out_features % 16 == 0)

    def use_gemv(self, x: torch.Tensor) -> bool:
        if self.backend not in ("auto", "gemv"):
            return False
        return _gemv.use_gemv(x, self.weight, self.in_features, force=self.backend == "gemv")

    def gemv_operands(self, rows: int, dtype: torch.dtype, device) -> tuple | None:
        """(weight, scale, bias) for fp8_gemv.gemv when an input of `rows` rows would run the GEMV kernel (and the
        output is not a partial sum to all-reduce), else None: the engine's fused decode layers."""
        if self.backend not in ("auto", "gemv") or self.reduce_output:
            return None
        if _gemv.fp8_route(rows, dtype, device, self.weight, force=self.backend == "gemv"):
            return self.weight, self.weight_scale, self.bias
        return None

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """out_dtype: the output's dtype (default x's); torch.float32 keeps the product unrounded (the engine's fp32
        logits from an FP8 lm_head). Not for a row-parallel layer."""
        if out_dtype is not None and out_dtype != x.dtype and self.reduce_output:
            raise ValueError("FP8Linear: out_dtype is not supported on a row-parallel layer")
        if self.use_gemv(x):
            # the bias after the all-reduce of a row-parallel layer (a partial sum), else fused
            try:
                y = _gemv.fp8_gemv(x, self.weight, self.weight_scale, None if self.reduce_output else self.bias,
                                   out_dtype=out_dtype)
            except Exception as e:  # e.g. a config that does not compile at this shape on this triton: the
                # self-test probes small shapes only. Off for every layer, this call on the matmul path; a forced
                # backend or a graph being captured cannot fall back silently.
                if self.backend == "gemv" or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
                    raise
                log.warning("fp8 GEMV kernel failed at M=%d N=%d K=%d (%s: %s); using the FP8 matmul path from now on",
                            x.numel() // self.in_features, self.out_features, self.in_features, type(e).__name__, e)
                _gemv.set_enabled(False)
                return self.forward(x, out_dtype)
            if not self.reduce_output:
                return y
            torch.distributed.all_reduce(y, group=self.group)
            return y if self.bias is None else y + self.bias
        scale_row = self.weight_scale.view(1, -1).float()
        if self.use_scaled_mm(x):
            # _scaled_mm's row-wise scaling writes bf16 only: an fp32 out_dtype gets the bf16 product widened
            y = _mm_scaled(x.reshape(-1, self.in_features), self.weight, scale_row, x.dtype)
            y = y.view(*x.shape[:-1], self.out_features).to(out_dtype or x.dtype)
        else:
            y = _mm_dequant(x, self.weight, scale_row, out_dtype)
        if self.reduce_output:
            torch.distributed.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def fuse_linears(linears: list[nn.Module], share: bool = False) -> nn.Module:
    """One module computing cat([l(x) for l in linears], -1) (q/k/v, gate/up): an nn.Linear, or an FP8Linear
    (per-output-channel scales concatenate exactly). For the engine's fused projections. share=True re-points
    the original modules' tensors to views of the fused ones, so the weights are not held twice."""
    first = linears[0]
    has_bias = first.bias is not None
    if any((l.bias is not None) != has_bias or type(l) is not type(first) or getattr(l, "reduce_output", False)
           for l in linears):
        raise ValueError("fuse_linears: all linears must be of one type, all with or all without bias, "
                         "and none row-parallel")
    out = sum(l.out_features for l in linears)
    if isinstance(first, FP8Linear):
        m = FP8Linear(first.in_features, out, has_bias, device="meta",
                      dtype=first.bias.dtype if has_bias else torch.bfloat16)
        m.weight = nn.Parameter(torch.cat([l.weight for l in linears]), requires_grad=False)
        m.weight_scale = nn.Parameter(torch.cat([l.weight_scale.float() for l in linears]), requires_grad=False)
        m.backend = first.backend
    else:
        m = nn.Linear(first.in_features, out, bias=has_bias, device="meta", dtype=first.weight.dtype)
        m.weight = nn.Parameter(torch.cat([l.weight.detach() for l in linears]), requires_grad=False)
    if has_bias:
        m.bias = nn.Parameter(torch.cat([l.bias.detach() for l in linears]), requires_grad=False)
    if share:
        off = 0
        for l in linears:
            n = l.out_features
            for name in ("weight", "weight_scale", "bias"):
                if getattr(l, name, None) is not None:
                    getattr(l, name).data = getattr(m, name).data[off:off + n]
            off += n
    return m


# ---------------------------------------------------------------------------------------------- model
def _decoder_linears(model):
    for i, layer in enumerate(model.model.layers):
        for path in DECODER_LINEARS:
            parent_name, attr = path.split(".")
            yield f"model.layers.{i}.{path}", getattr(layer, parent_name), attr


def has_fp8_decoder(model) -> bool:
    """Whether the decoder's linears are FP8 (quantize_model_fp8 and the FP8 loaders convert all of them)."""
    return any(isinstance(m, FP8Linear) for m in model.model.layers[0].modules())


@torch.no_grad()
def quantize_model_fp8(model, backend: str = "auto"):
    """Replace every decoder linear by an FP8Linear, in place (one layer at a time: the bf16 weight is freed
    as soon as its fp8 copy exists). Marks model.config so save_pretrained writes FP8_QUANT_CONFIG."""
    for _, parent, attr in _decoder_linears(model):
        lin = getattr(parent, attr)
        if isinstance(lin, FP8Linear):
            continue
        setattr(parent, attr, FP8Linear.from_linear(lin, backend))
    _mark_quantized(model)
    fp8_backend(model.device)
    return model


def _mark_quantized(model) -> None:
    # a new config object: models built from one ModelConfig share it, and only this one is quantised
    model.config = dataclasses.replace(model.config, extra={**model.config.extra,
                                                            "quantization_config": FP8_QUANT_CONFIG})


def make_fp8_modules(model, backend: str = "auto"):
    """Swap the decoder linears for empty FP8Linear shells on the meta device (before loading an FP8 checkpoint)."""
    for _, parent, attr in _decoder_linears(model):
        lin = getattr(parent, attr)
        m = FP8Linear(lin.in_features, lin.out_features, lin.bias is not None, device="meta")
        m.backend = backend
        setattr(parent, attr, m)
    return model


def checkpoint_quantization(config) -> str | None:
    """'fp8' for a compressed-tensors FP8 checkpoint with per-channel weights, None for an unquantised one;
    anything else raises."""
    from ..errors import CheckpointError

    qc = config.extra.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "compressed-tensors" and qc.get("format") in ("float-quantized", "naive-quantized", None):
        for name, g in (qc.get("config_groups") or {}).items():
            w = g.get("weights") or {}
            if (w.get("type"), w.get("num_bits"), w.get("strategy")) != ("float", 8, "channel"):
                raise CheckpointError(f"quantization_config group {name}: only fp8 per-channel weights are "
                                      f"supported, got {json.dumps(w)}")
            a = g.get("input_activations")
            if a and not a.get("dynamic", False):
                log.warning("quantization_config group %s: static activation scales are ignored; activations "
                            "are quantised per token dynamically", name)
        return "fp8"
    raise CheckpointError(f"quantization_config quant_method={method!r} format={qc.get('format')!r} is not "
                          "supported (supported: compressed-tensors fp8 per-channel weights, e.g. FP8-Dynamic; "
                          "block-wise fp8 with weight_scale_inv is not)")


def save_fp8(model, path, **kw) -> None:
    """Our converted checkpoint: the Hub layout, fp8 decoder weights + weight_scale, config with
    quantization_config. Loadable by load_fp8 / load_tp (and by compressed-tensors readers)."""
    from ..checkpoint import save_model

    if not any(isinstance(m, FP8Linear) for m in model.modules()):
        raise ValueError("save_fp8: the model has no FP8Linear (run quantize_model_fp8 first)")
    _mark_quantized(model)
    save_model(model, path, **kw)


def load_fp8(path: str | os.PathLike, dtype=torch.bfloat16, device="cpu", backend: str = "auto"):
    """A whole FP8 checkpoint (ours or an FP8-Dynamic one) on one device; = load_tp(path, 0, 1)."""
    from ..parallel.tp import load_tp

    return load_tp(path, 0, 1, dtype=dtype, device=device, fp8_backend_name=backend)


# ---------------------------------------------------------------------------------------------- quality
@torch.no_grad()
def compare_logits(ref: torch.Tensor, test: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """Relative error ||test - ref|| / ||ref|| (fp32, over valid rows), max abs error, top-1 agreement."""
    ref, test = ref.float(), test.float()
    if mask is not None:
        ref, test = ref[mask.bool()], test[mask.bool()]
    ref, test = ref.reshape(-1, ref.shape[-1]), test.reshape(-1, test.shape[-1])
    return {"rel_err": ((test - ref).norm() / ref.norm()).item(),
            "max_abs_err": (test - ref).abs().max().item(),
            "top1_agree": (test.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "rows": ref.shape[0]}


@torch.no_grad()
def fp8_quality(model, batch: dict, backend: str = "auto") -> dict:
    """Logits of `model` (any dtype, unquantised) vs its FP8 copy on the same batch (kwargs of forward).
    Quantises a deep copy, so memory doubles for the decoder; for big models quantise in place and call
    compare_logits yourself."""
    import copy

    ref = model(**batch)
    q = quantize_model_fp8(copy.deepcopy(model), backend)
    out = q(**batch)
    return compare_logits(ref, out, batch.get("attention_mask"))
