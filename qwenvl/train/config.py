"""TrainConfig: every training option in one flat dataclass, read from YAML with `key=value` overrides.

docs/TRAINING.md documents each field; the stage recipes are YAML files in qwenvl/train/configs/.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import MROPE_TEMPORAL, SCALARS, coerce_scalar
from ..errors import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass
class TrainConfig:
    # ---- what to train
    model: str = "tiny"  # checkpoint dir, or a preset name (tiny, 3b, 7b, 72b, nano) for random weights
    tokenizer: str | None = None  # tokenizer dir (tokenizer.json); default: the checkpoint's, qwenvl.nano's for nano
    stage: str = "sft"  # sft | pretrain | dpo (pretrain = sft loss on every text token)
    mrope_temporal: str | None = None  # absolute | frame: sets the model config's video temporal ids (default: the
    #                                    checkpoint's / preset's, i.e. absolute); frame = the ablation of NANO.md §4
    rope_theta: float | None = None  # the LLM's RoPE base for random weights of a preset, or a checkpoint's with
    #                                  rebase_rope (default: the model's); the nano probe of NANO.md §7: MRoPE gives
    #                                  the width axis its lowest frequencies
    rebase_rope: bool = False  # allow rope_theta for a trained checkpoint (its weights then adapt to the new base)
    output_dir: str = "runs/train"
    # ---- data
    train_files: list[str] = field(default_factory=list)
    media_root: str | None = None  # relative media paths are resolved here (default: the JSONL's folder)
    loss_on: str | None = None  # assistant | last | all (default: all for pretrain, assistant for sft)
    pack_length: int = 8192  # tokens per packed row
    max_length: int | None = None  # longer samples are skipped (default: pack_length)
    min_pixels: int = 3136  # image pixel limits; inference must use the same ones (grounding coordinates)
    max_pixels: int = 1003520  # 1280 * 28 * 28
    video_min_pixels: int = 100352  # 128 * 28 * 28 per frame
    video_max_pixels: int = 602112  # 768 * 28 * 28 per frame
    video_total_pixels: int = 19267584  # 24576 * 28 * 28 for all frames of a video
    video_fps: float = 2.0
    video_max_frames: int = 768
    shuffle: bool = True
    chunk_size: int = 2048  # records read, shuffled and packed together
    data_workers: int = 0  # processes that measure records and build the next steps' rows ahead (0: in the loop)
    max_bad_fraction: float = 0.01  # stop with a report when more records than this are unusable
    # ---- which parameters train
    freeze_vit: bool = False
    freeze_merger: bool = False
    freeze_llm: bool = False
    # ---- optimization
    lr: float = 1e-5  # LLM (and the default for the two below)
    vit_lr: float | None = None
    merger_lr: float | None = None
    patch_embed_lr: float | None = None  # the ViT's patch embedding (None: vit_lr). Its inputs are alike across patches
    #                                      (blank background), so Adam moves every patch the same way at once; see TRAINING.md
    weight_decay: float = 0.0  # on matrices only (not biases, norms)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at max_steps
    max_steps: int = 1000
    max_train_seconds: float | None = None  # wall-clock budget: stop, save and export when spent; the cosine then
    #                                         runs over the budget (elapsed / max_train_seconds) instead of steps
    grad_accum: int = 1  # packed rows per rank per optimizer step
    max_grad_norm: float = 1.0  # 0 = no clipping
    # ---- execution
    precision: str = "bf16"  # bf16 (autocast / FSDP mixed precision, fp32 master weights) | fp32; CPU runs fp32
    param_dtype: str = "fp32"  # fp32 | bf16: the model's parameters in bf16 (no autocast casts), fp32 master weights
    #                            and moments in the optimizer (MasterAdamW); needs precision=bf16 and one process;
    #                            with LoRA the frozen base is bf16 (half its memory), the adapters have fp32 masters
    activation_checkpointing: bool = False
    checkpoint_layers: int | None = None  # with activation_checkpointing: recompute only this many decoder layers,
    #                                       spread evenly (None: all); the ViT blocks are always recomputed
    compile: bool = False  # torch.compile each decoder layer and ViT block (fuses norms, rotary, SwiGLU elementwise work)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    fsdp_reshard_after_forward: bool = True
    # ---- output
    save_every: int = 500  # steps between checkpoints (and one at the end); 0 = no checkpoints
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: bool = True  # continue from output_dir/checkpoints/latest when present
    export: bool = True  # write output_dir/final (transformers-loadable model; + adapter/ with LoRA)
    # ---- LoRA (off when lora_r == 0); adapters go in the parts not frozen
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Any = "all-linear"  # "all-linear" or a list of module-name suffixes (q_proj, mlp.down_proj, ...)
    # ---- DPO
    dpo_beta: float = 0.1
    dpo_label_smoothing: float = 0.0
    dpo_sft_weight: float = 0.0  # + this * the chosen answer's mean token NLL (TRL rpo_alpha, LLaMA-Factory pref_ftx)
    dpo_reference: str = "model"  # model (frozen copy; with LoRA the adapters switched off) | precomputed (records'
    #                               ref_chosen_logp / ref_rejected_logp)
    # ---- packing cost model
    attn_weight: float | None = None  # w in cost = sum(len) + w * sum(len^2); default from the model shape

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        checks = [
            (self.stage in ("sft", "pretrain", "dpo"), f"stage must be sft, pretrain or dpo, got {self.stage!r}"),
            (self.loss_on in (None, "assistant", "last", "all"), f"loss_on must be assistant, last or all"),
            (self.precision in ("bf16", "fp32"), f"precision must be bf16 or fp32, got {self.precision!r}"),
            (self.param_dtype in ("fp32", "bf16"), f"param_dtype must be fp32 or bf16, got {self.param_dtype!r}"),
            (self.param_dtype == "fp32" or self.precision == "bf16", "param_dtype=bf16 needs precision=bf16"),
            (self.pack_length > 0 and self.max_steps > 0 and self.grad_accum > 0,
             "pack_length, max_steps and grad_accum must be > 0"),
            (0 <= self.max_bad_fraction <= 1, "max_bad_fraction must be in [0, 1]"),
            (not (self.freeze_vit and self.freeze_merger and self.freeze_llm), "everything is frozen: nothing to train"),
            (self.lora_r >= 0, "lora_r must be >= 0"),
            (self.dpo_reference in ("model", "precomputed"), "dpo_reference must be model or precomputed"),
            (self.dpo_sft_weight >= 0, f"dpo_sft_weight must be >= 0, got {self.dpo_sft_weight!r}"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}"),
            (self.max_train_seconds is None or self.max_train_seconds > 0, "max_train_seconds must be > 0"),
            (self.data_workers >= 0, "data_workers must be >= 0"),
            (all(v is None or v >= 0 for v in (self.lr, self.vit_lr, self.merger_lr, self.patch_embed_lr)),
             "lr, vit_lr, merger_lr and patch_embed_lr must be >= 0"),
            (self.checkpoint_layers is None or self.checkpoint_layers >= 0,
             f"checkpoint_layers must be >= 0 (or unset: every layer), got {self.checkpoint_layers!r}"),
            (self.rope_theta is None or self.rope_theta > 1, f"rope_theta must be > 1, got {self.rope_theta!r}"),
            (self.mrope_temporal in (None, *MROPE_TEMPORAL),
             f"mrope_temporal must be absolute or frame, got {self.mrope_temporal!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"train config: {msg}")
        return self

    # ---------------------------------------------------------------- derived
    @property
    def effective_loss_on(self) -> str:
        if self.loss_on:
            return self.loss_on
        return {"pretrain": "all", "sft": "assistant", "dpo": "last"}[self.stage]

    @property
    def effective_max_length(self) -> int:
        return self.max_length or self.pack_length

    # ---------------------------------------------------------------- IO
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown} (see docs/TRAINING.md)")
        kw = {k: _coerce(v, names[k].type, f"{source}: {k}") for k, v in d.items()}
        return cls(**kw)

    @classmethod
    def load(cls, path: str | None = None, overrides: list[str] | dict | None = None) -> "TrainConfig":
        """YAML file (a path, or the name of a bundled recipe such as "sft") + overrides ["key=value", ...]."""
        import yaml

        d: dict[str, Any] = {}
        if path:
            if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, f"{path}.yaml")):
                path = os.path.join(CONFIG_DIR, f"{path}.yaml")
            if not os.path.isfile(path):
                raise ConfigError(f"{path}: config file not found")
            with open(path, encoding="utf-8") as f:
                d = yaml.safe_load(f) or {}
            if not isinstance(d, dict):
                raise ConfigError(f"{path}: expected a mapping of options")
        if isinstance(overrides, dict):
            d.update(overrides)
        else:
            for item in overrides or []:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ConfigError(f"override {item!r} must look like key=value")
                d[key.strip().lstrip("-").replace("-", "_")] = yaml.safe_load(value)
        return cls.from_dict(d, path or "overrides")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        import yaml

        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    typ = str(typ)
    if value is None:
        if "None" in typ:
            return None
        raise ConfigError(f"{where}: may not be null")
    kind = typ.split(" ")[0]  # "int | None" -> int
    if kind in SCALARS:
        return coerce_scalar(value, kind, where)
    if typ.startswith("list[str]"):
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{where}: expected {typ}, got {value!r}")
        return list(value)
    return value
