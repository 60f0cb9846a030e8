"""Weight quantisation: FP8 (e4m3, per-output-channel scales) for the decoder linears (see fp8.py)."""

from .fp8 import (FP8_QUANT_CONFIG, FP8Linear, compare_logits, fp8_backend, fp8_quality, fuse_linears,
                  has_fp8_decoder, load_fp8, quantize_model_fp8, quantize_weight, dequantize_weight, save_fp8)

__all__ = ["FP8Linear", "FP8_QUANT_CONFIG", "quantize_model_fp8", "quantize_weight", "dequantize_weight",
           "fp8_backend", "fuse_linears", "save_fp8", "load_fp8", "compare_logits", "fp8_quality",
           "has_fp8_decoder"]
