"""LoRA on any nn.Linear, saved as a PEFT adapter that `peft` loads into transformers' Qwen2_5_VLForConditionalGeneration.

y = base(x) + (B A dropout(x)) * alpha / r, A [r, in] kaiming-uniform, B [out, r] zeros (PEFT's init), so training
starts from the base model. Targets are PEFT-style: names matched against the end of a module path ("q_proj",
"mlp.down_proj", "attn.qkv"), or "all-linear" (every Linear but the LM head, as PEFT). `parts` limits where
adapters go (llm, vit, merger): ms-swift's rule of placing adapters in the parts that are not frozen.

PEFT key names (checked by running peft 0.21 on transformers 4.57): transformers 4.57 names the modules
model.language_model.layers.N..., model.visual.blocks.N..., lm_head; PEFT saves
base_model.model.<module path>.lora_A.weight / lora_B.weight and lists target modules in adapter_config.json.
We write the exact module paths there, so peft puts adapters on exactly the modules we trained.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..checkpoint import to_layout_name, to_internal_name
from ..errors import CheckpointError, ConfigError

PARTS = ("llm", "vit", "merger")


class LoRALinear(nn.Module):
    """A Linear with a low-rank update. Parameter names follow PEFT (base_layer, lora_A, lora_B)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False

    # Code that reads .weight / .bias of the layer (dtype, device, tied heads) keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))).to(out.dtype) * self.scaling

    def merged(self) -> nn.Linear:
        """The base Linear with B A * scaling added to its weight (in fp32, then back to its dtype)."""
        base = self.base_layer
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        return base


def part_of(name: str) -> str:
    """Which part of the model a module/parameter path belongs to: vit, merger or llm (decoder + head)."""
    if name.startswith("visual.merger"):
        return "merger"
    if name.startswith("visual."):
        return "vit"
    return "llm"


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def target_names(model: nn.Module, targets="all-linear", parts=PARTS) -> list[str]:
    """Paths of the nn.Linear modules that `targets` selects inside `parts`."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ConfigError(f"unknown LoRA part(s) {bad} (use {', '.join(PARTS)})")
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or part_of(name) not in parts or ".lora_" in name:
            continue
        if targets == "all-linear" or targets == ["all-linear"]:
            if name != "lm_head":
                names.append(name)
        elif _matches(name, [targets] if isinstance(targets, str) else targets):
            names.append(name)
    if not names:
        raise ConfigError(f"LoRA targets {targets!r} match no Linear layer in parts {list(parts)}")
    return names


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, targets="all-linear",
               parts=PARTS, seed: int | None = None) -> list[str]:
    """Freeze every parameter, wrap the targeted Linears in LoRALinear; returns their paths."""
    if seed is not None:
        torch.manual_seed(seed)
    names = target_names(model, targets, parts)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, attr, LoRALinear(getattr(holder, attr), r, alpha, dropout))
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "modules": names}
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model (adapters bypassed): the DPO reference for free when training with LoRA."""
    mods = lora_modules(model).values()
    for m in mods:
        m.disabled = True
    try:
        yield
    finally:
        for m in mods:
            m.disabled = False


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain Linears back (same names as before LoRA)."""
    for name, mod in lora_modules(model).items():
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, attr, mod.merged())
    if getattr(model, "config", None) is not None and model.config.text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.__dict__.pop("lora_config", None)
    return model


def merge_lora_state_dict(state: dict[str, torch.Tensor], lora_config: dict) -> dict[str, torch.Tensor]:
    """The merged model's state dict (plain names) from a LoRA model's state dict (base_layer / lora_A / lora_B)."""
    state = dict(state)
    scaling = lora_config["lora_alpha"] / lora_config["r"]
    for name in lora_config["modules"]:
        a, b = state.pop(f"{name}.lora_A.weight"), state.pop(f"{name}.lora_B.weight")
        w = state.pop(f"{name}.base_layer.weight")
        state[f"{name}.weight"] = (w.float() + (b.float() @ a.float()) * scaling).to(w.dtype)
        if f"{name}.base_layer.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return state


# ------------------------------------------------------------------------------------------------ PEFT files
def peft_module_name(name: str) -> str:
    """Our module path -> transformers 4.57's (model.language_model.*, model.visual.*, lm_head)."""
    return to_layout_name(name + ".weight", "v5")[: -len(".weight")]


def adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{PEFT key: tensor} of the adapters; `state` (our parameter names) overrides the module's tensors, e.g. a
    full state dict gathered from FSDP."""
    out = {}
    for name in lora_modules(model):
        for ab in ("lora_A", "lora_B"):
            ours = f"{name}.{ab}.weight"
            t = state[ours] if state is not None else model.get_submodule(f"{name}.{ab}").weight
            out[f"base_model.model.{peft_module_name(name)}.{ab}.weight"] = t.detach().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, path: str, base_model_name_or_path: str | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors, as `PeftModel.save_pretrained` writes them."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ConfigError("the model has no LoRA adapters (apply_lora first)")
    os.makedirs(path, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
        "target_modules": sorted(peft_module_name(n) for n in cfg["modules"]),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "auto_mapping": {"base_model_class": "Qwen2_5_VLForConditionalGeneration",
                         "parent_library": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"},
    }
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(adapter_state_dict(model, state), os.path.join(path, "adapter_model.safetensors"),
              metadata={"format": "pt"})


def load_adapter(model: nn.Module, path: str) -> list[str]:
    """Apply a PEFT LoRA adapter (ours or peft's, for this architecture) to `model`; returns the adapted paths."""
    cfg_path, w_path = os.path.join(path, "adapter_config.json"), os.path.join(path, "adapter_model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise CheckpointError(f"{path}: needs adapter_config.json and adapter_model.safetensors")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("rank_pattern"):
        raise CheckpointError(f"{cfg_path}: only plain LoRA adapters are supported")
    tensors = load_file(w_path)
    modules = sorted({to_internal_name(k[len("base_model.model."):].rsplit(".lora_", 1)[0] + ".weight")[:-len(".weight")]
                      for k in tensors if ".lora_" in k})
    names = apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), modules)
    for name in names:
        for ab in ("lora_A", "lora_B"):
            key = f"base_model.model.{peft_module_name(name)}.{ab}.weight"
            w = model.get_submodule(f"{name}.{ab}").weight
            with torch.no_grad():
                w.copy_(tensors[key].to(w.dtype))
    return names
