"""Model configuration: dataclasses, Hugging Face config.json in both layouts, named presets.

transformers 4.x writes the text fields at the top level of config.json (the Hub files are "flat"); 4.52+
and 5.x also (or only) write a nested `text_config`. We read either. As transformers does, a missing key
takes the class default of transformers and an unknown key is kept (in `extra`) without failing; a key
with a value of the wrong type, or an unknown `model_type`, is a ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

MODEL_TYPES = ("qwen2_5_vl",)
MROPE_TEMPORAL = ("absolute", "frame")  # video temporal ids (rope.video_time_factors)
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def env_flag(name: str, default: bool) -> bool:
    """An on/off switch from the environment (QWENVL_VIT_GRAPHS, QWENVL_FP8_GEMV, QWENVL_COMPILE_OPS): 1/on/true/yes
    or 0/off/false/no, any case; unset or empty is `default`; anything else is a ConfigError naming the variable."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _ON or value in _OFF:
        return value in _ON
    raise ConfigError(f"{name}={os.environ[name]!r}: expected one of {', '.join(_ON + _OFF)}")


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 3584  # transformers' class default; every released checkpoint says 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: float = 4  # class default; the Hub configs say 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 80
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # MRoPE temporal ids of video: "absolute" (time-aligned, the released models; transformers' only behaviour) or
    # "frame" (the temporal patch index, fps-independent: the ablation of docs/NANO.md §4). Not a transformers key:
    # written to config.json only when not "absolute", so real checkpoints' files load and save unchanged.
    mrope_temporal: str = "absolute"
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {mt!r} is not supported (expected one of {MODEL_TYPES})")
        d = dict(d)
        vision_d = d.pop("vision_config", None) or {}
        text_d = d.pop("text_config", None)
        if text_d is None:  # transformers 4 "flat" layout: text fields at top level
            text_d = {k: v for k, v in d.items() if k in _field_names(TextConfig) or k == "rope_scaling"}
        else:
            text_d = dict(text_d)
            # v5 may keep tie_word_embeddings at the root only
            if "tie_word_embeddings" in d and "tie_word_embeddings" not in text_d:
                text_d["tie_word_embeddings"] = d["tie_word_embeddings"]
        rope = text_d.pop("rope_scaling", None) or text_d.pop("rope_parameters", None) or {}
        if "mrope_section" in rope:
            text_d["mrope_section"] = rope["mrope_section"]
        if "rope_theta" in rope and "rope_theta" not in text_d:
            text_d["rope_theta"] = rope["rope_theta"]
        if rope.get("type", rope.get("rope_type", "default")) not in ("mrope", "default"):
            raise ConfigError(f"{source}: rope_scaling type {rope.get('type', rope.get('rope_type'))!r} is not supported")
        vision = _build(VisionConfig, vision_d, f"{source}: vision_config",
                        ignore={"model_type", "in_chans", "spatial_patch_size", "torch_dtype", "dtype", "rope_parameters"})
        if "in_chans" in vision_d and "in_channels" not in vision_d:
            vision.in_channels = int(vision_d["in_chans"])
        text = _build(TextConfig, text_d, f"{source}: text_config",
                      ignore={"model_type", "torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id",
                              "layer_types", "use_cache", "image_token_id", "video_token_id",
                              "vision_start_token_id", "vision_end_token_id", "vision_token_id",
                              "architectures", "transformers_version", "rope_scaling", "head_dim"},
                      strict_unknown=False)
        top_fields = {f.name for f in dataclasses.fields(cls)} - {"vision", "text", "extra", "torch_dtype"}
        kw = {}
        for k in top_fields:
            if k in d and d[k] is not None:
                kw[k] = _coerce(d[k], cls.__dataclass_fields__[k].type, f"{source}: {k}")
        dtype = d.get("torch_dtype", d.get("dtype", "bfloat16"))
        known = top_fields | _field_names(TextConfig) | {"model_type", "torch_dtype", "dtype", "architectures",
                                                         "transformers_version", "rope_scaling", "use_cache",
                                                         "layer_types", "rope_parameters"}
        extra = {k: v for k, v in d.items() if k not in known}
        if extra:
            log.info("%s: keeping unknown keys as extra: %s", source, sorted(extra))
        if kw.get("mrope_temporal", "absolute") not in MROPE_TEMPORAL:
            raise ConfigError(f"{source}: mrope_temporal must be one of {MROPE_TEMPORAL}, got {kw['mrope_temporal']!r}")
        return cls(vision=vision, text=text, torch_dtype=str(dtype), extra=extra, **kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hub layout of config.json: text fields at the top level, vision_config nested."""
        t = dataclasses.asdict(self.text)
        mrope = t.pop("mrope_section")
        rope_scaling = {"type": "mrope", "mrope_section": list(mrope)}
        t["rope_scaling"] = rope_scaling
        v = dataclasses.asdict(self.vision)
        v["in_chans"] = v["in_channels"]
        v["spatial_patch_size"] = v["patch_size"]
        v["model_type"] = "qwen2_5_vl"
        d: dict[str, Any] = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            **t,
            "vision_config": v,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": self.vision_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
        }
        if self.pad_token_id is not None:
            d["pad_token_id"] = self.pad_token_id
        if self.mrope_temporal != "absolute":
            d["mrope_temporal"] = self.mrope_temporal
        d.update(self.extra)
        return d

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        p = os.path.join(os.fspath(path), "config.json") if os.path.isdir(path) else os.fspath(path)
        if not os.path.exists(p):
            raise ConfigError(f"{p}: no config.json found")
        try:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=p)

    def save(self, path: str | os.PathLike) -> None:
        with open(os.path.join(os.fspath(path), "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2)

    def validate(self) -> "ModelConfig":
        v, t = self.vision, self.text
        checks = [
            (v.hidden_size % v.num_heads == 0, "vision_config.hidden_size must be divisible by num_heads"),
            (v.head_dim % 4 == 0, "vision head_dim must be divisible by 4 (2D rotary over h and w)"),
            (all(0 <= i < v.depth for i in v.fullatt_block_indexes), "vision_config.fullatt_block_indexes out of range"),
            (t.hidden_size % t.num_attention_heads == 0, "hidden_size must be divisible by num_attention_heads"),
            (t.num_attention_heads % t.num_key_value_heads == 0, "num_attention_heads must be divisible by num_key_value_heads"),
            (sum(t.mrope_section) * 2 == t.head_dim, f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}"),
            (v.window_size % (v.patch_size * v.spatial_merge_size) == 0, "vision window_size must be a multiple of patch_size*spatial_merge_size"),
            (self.mrope_temporal in MROPE_TEMPORAL, f"mrope_temporal must be one of {MROPE_TEMPORAL}, got {self.mrope_temporal!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


SCALARS = {"int", "float", "bool", "str"}


def coerce_scalar(value: Any, kind: str, where: str) -> Any:
    """An int / float / bool / str as a config file gives it: no bool where a number goes, no 1.5 for an int.
    Raises ConfigError naming `where`. (Shared by the model and the training configs.)"""
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if not isinstance(value, {"bool": bool, "str": str}[kind]):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind}, got {value!r}") from None


def _coerce(value: Any, typ: Any, where: str) -> Any:
    typ = str(typ)
    if typ in SCALARS:
        return coerce_scalar(value, typ, where)
    try:
        if typ.startswith("list[int]"):
            return [int(x) for x in value]
        if typ == "int | None":
            return None if value is None else int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {typ}, got {value!r}") from None
    return value


def _build(cls, d: dict[str, Any], where: str, ignore: set[str] = frozenset(), strict_unknown: bool = False):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    names = _field_names(cls)
    kw = {}
    for k, v in d.items():
        if k in names:
            kw[k] = _coerce(v, cls.__dataclass_fields__[k].type, f"{where}.{k}")
        elif k not in ignore and strict_unknown:
            raise ConfigError(f"{where}: unknown key {k!r}")
    return cls(**kw)


def _vision(out_hidden: int, intermediate: int = 3420) -> VisionConfig:
    return VisionConfig(depth=32, hidden_size=1280, intermediate_size=intermediate, num_heads=16,
                        tokens_per_second=2, out_hidden_size=out_hidden, fullatt_block_indexes=[7, 15, 23, 31])


def _text(**kw) -> TextConfig:
    base = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=128000, mrope_section=[16, 24, 24],
                sliding_window=32768)
    base.update(kw)
    return TextConfig(**base)


def preset(name: str) -> ModelConfig:
    """Named shapes of the released checkpoints (3b, 7b, 72b), a tiny one for tests and qwenvl-nano."""
    if name == "3b":
        return ModelConfig(vision=_vision(2048), text=_text(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                                            num_hidden_layers=36, num_attention_heads=16,
                                                            num_key_value_heads=2, tie_word_embeddings=True,
                                                            max_window_layers=70))
    if name == "7b":
        return ModelConfig(vision=_vision(3584), text=_text(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                                            num_hidden_layers=28, num_attention_heads=28,
                                                            num_key_value_heads=4, max_window_layers=28))
    if name == "72b":
        return ModelConfig(vision=_vision(8192, 3456), text=_text(vocab_size=152064, hidden_size=8192,
                                                                  intermediate_size=29568, num_hidden_layers=80,
                                                                  num_attention_heads=64, num_key_value_heads=8,
                                                                  max_window_layers=80))
    if name == "tiny":
        # Real patch/window/merge geometry and real vocabulary size (so real token ids work), tiny widths.
        return ModelConfig(
            vision=VisionConfig(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, tokens_per_second=2,
                                out_hidden_size=64, fullatt_block_indexes=[1, 3]),
            text=_text(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3],
                       tie_word_embeddings=False, max_window_layers=2),
            torch_dtype="float32")
    if name == "nano":
        # docs/NANO.md §1: ~11.3 M parameters (22.6 MB in bf16), the pruned 8192-token vocabulary (§2), whose
        # special tokens are the last 22 ids (old id - 151643 + 8170).
        return ModelConfig(
            vision=VisionConfig(depth=6, hidden_size=192, intermediate_size=512, num_heads=3, tokens_per_second=2,
                                out_hidden_size=256, fullatt_block_indexes=[2, 5]),
            text=_text(vocab_size=8192, hidden_size=256, intermediate_size=640, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, mrope_section=[8, 12, 12],
                       tie_word_embeddings=True, max_window_layers=8),
            image_token_id=8182, video_token_id=8183, vision_start_token_id=8179, vision_end_token_id=8180,
            vision_token_id=8181, bos_token_id=8170, eos_token_id=8172)
    raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")


PRESETS = ("3b", "7b", "72b", "tiny", "nano")
