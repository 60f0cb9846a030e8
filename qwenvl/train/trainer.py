"""The training loop: SFT / pretraining / DPO, full fine-tuning or LoRA, one process or torchrun + FSDP2.

One step = this rank's `grad_accum` packed rows (PackedLoader). The loss is the sum over target tokens (DPO: over
pairs) divided by the step's count across all rows and ranks, so packing, accumulation and data parallelism give the
gradient of one big batch. Parameters and optimizer state stay fp32; compute is bf16 on CUDA (autocast, or FSDP2's
MixedPrecisionPolicy with fp32 gradient reduction). With param_dtype=bf16 the parameters themselves are bf16 and
the optimizer (MasterAdamW) holds their fp32 master copies; checkpoints and the export save those fp32 values.

Checkpoints (output_dir/checkpoints/step_N, written as step_N.tmp then renamed; `latest` names the newest):
trainable parameters (frozen ones come from the base model again), optimizer, scheduler, data position and skip
counts, every rank's RNG state: resuming continues bit-identically. Log: output_dir/log.jsonl, one line per step.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..checkpoint import save_model
from ..config import PRESETS, preset
from ..errors import ConfigError
from ..model import Qwen25VL
from .config import TrainConfig
from .data import IGNORE, ChatEncoder, JsonlStream, SkipStats
from .dpo import dpo_loss_sum, sequence_logps
from .lora import adapters_disabled, apply_lora, merge_lora_state_dict, part_of, save_adapter
from .loss import sft_loss_sum
from .master_adamw import MasterAdamW
from .packing import PackedLoader, attention_weight, device_pixels

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ distributed
class Dist:
    """Rank/world from torchrun's environment; a single process otherwise."""

    def __init__(self, device: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.enabled:
            dist.barrier()


# ------------------------------------------------------------------------------------------------ model
class TrainModule(nn.Module):
    """What one forward call computes in training; FSDP wraps this, so every hook runs on one __call__.

    kind: "sft" -> (sum of target nll, count); "dpo" -> (sum of pair losses, pairs, metrics); "logps" -> per-sample
    summed log-probs (the frozen DPO reference). vision_sync (FSDP): a row without images (or videos) gets a 3-token
    dummy sample with a 2x2-patch image (video), so every rank runs the same ViT calls in the same place of the graph
    and the sharded blocks' all-gathers and reduce-scatters line up (else a text-only rank hangs the others).
    """

    def __init__(self, model: Qwen25VL, vision_sync: bool = False):
        super().__init__()
        self.model = model
        self.vision_sync = vision_sync

    def forward(self, batch: dict, kind: str = "sft", reference=None, beta: float = 0.1, label_smoothing: float = 0.0,
                sft_weight: float = 0.0):
        if self.vision_sync:
            batch = with_vision_dummies(batch, self.model.config)
        if kind == "sft":
            return sft_loss_sum(self.model, batch)
        if kind == "logps":
            return sequence_logps(self.model, batch)
        if kind == "dpo":
            if reference == "adapters":  # LoRA: the base model is the reference
                def reference(b, m=self.model):
                    with adapters_disabled(m):
                        return sequence_logps(m, b)
            return dpo_loss_sum(self.model, batch, reference, beta, label_smoothing, sft_weight)
        raise ValueError(kind)


def with_vision_dummies(batch: dict, config) -> dict:
    """The batch plus, for each missing modality, one sample [vision_start, pad, vision_end] with a 2x2-patch
    image/video of zeros and no targets. `n_samples` keeps the count of real samples (DPO pairs)."""
    c = config.vision
    missing = [k for k in ("image", "video") if f"{k}_grid_thw" not in batch]
    if not missing:
        return batch
    out = dict(batch)
    out.setdefault("n_samples", len(batch["seq_lens"]))
    ids, targets, lens = [batch["input_ids"]], [batch["targets"]], list(batch["seq_lens"])
    dev = batch["input_ids"].device  # FSDP may already have moved the batch to the GPU
    for kind in missing:
        pad = config.image_token_id if kind == "image" else config.video_token_id
        ids.append(torch.tensor([[config.vision_start_token_id, pad, config.vision_end_token_id]], device=dev))
        targets.append(torch.full((1, 3), IGNORE, device=dev))
        lens.append(3)
        pix = torch.zeros(c.merge_unit, c.patch_dim, device=dev)
        grid = torch.tensor([[1, c.spatial_merge_size, c.spatial_merge_size]])
        if kind == "image":
            out["pixel_values"], out["image_grid_thw"] = pix, grid
        else:
            out["pixel_values_videos"], out["video_grid_thw"] = pix, grid
            out["second_per_grid_ts"] = torch.ones(1, device=dev)
    out["input_ids"], out["targets"], out["seq_lens"] = torch.cat(ids, 1), torch.cat(targets, 1), lens
    return out


def load_base_model(cfg: TrainConfig, device) -> Qwen25VL:
    """fp32 master weights: a checkpoint dir, or random weights of a preset shape (seeded); cfg.mrope_temporal, when
    set, replaces the config's video temporal-id mode, cfg.rope_theta the RoPE base (a preset's, or a checkpoint's with cfg.rebase_rope; both travel in the
    exported config.json)."""
    if os.path.isdir(cfg.model):
        model = Qwen25VL.from_pretrained(cfg.model, dtype=torch.float32, device=device)
    elif cfg.model in PRESETS:
        model = Qwen25VL.random(preset(cfg.model), torch.float32, device, seed=cfg.seed)
    else:
        raise ConfigError(f"model {cfg.model!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
    if cfg.mrope_temporal:
        model.config.mrope_temporal = cfg.mrope_temporal
    if cfg.rope_theta is not None and float(cfg.rope_theta) != model.config.text.rope_theta:
        if os.path.isdir(cfg.model):  # trained weights go with the positions they were trained with
            if not cfg.rebase_rope:
                raise ConfigError(f"rope_theta={cfg.rope_theta} differs from {cfg.model}'s "
                                  f"{model.config.text.rope_theta}: set rebase_rope=true to train the checkpoint on "
                                  "the new base (as context extension does), else leave rope_theta unset")
            log.warning("RoPE base %s -> %s for %s: its weights must adapt to the new positions",
                        model.config.text.rope_theta, cfg.rope_theta, cfg.model)
        model.config.text.rope_theta = float(cfg.rope_theta)
    return model.train()


def tokenizer_dir(cfg: TrainConfig) -> str | None:
    """cfg.tokenizer, else the checkpoint's folder, else qwenvl.nano's for the nano preset (None: the built-in
    Qwen vocabulary)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if os.path.isdir(cfg.model):
        return cfg.model
    if cfg.model == "nano":
        try:
            from ..nano import NANO_DIR
        except ImportError:
            raise ConfigError("model=nano needs the pruned tokenizer (qwenvl/nano) or tokenizer=DIR") from None
        return NANO_DIR
    return None


def load_tokenizer(cfg: TrainConfig, config):
    """The training tokenizer; its vision tokens must be the ids the model config says (where the model puts the
    vision embeddings), and <|im_end|> must fit the vocabulary."""
    from ..tokenizer import Tokenizer

    path = tokenizer_dir(cfg)
    if path is not None and not os.path.exists(path):
        raise ConfigError(f"tokenizer {path!r} does not exist")
    tok = Tokenizer.from_pretrained(path)
    want = {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
            "<|vision_start|>": config.vision_start_token_id}
    bad = {t: (tok.token_to_id(t), i) for t, i in want.items() if tok.token_to_id(t) != i}
    im_end = tok.token_to_id("<|im_end|>")
    if bad or im_end is None or im_end >= config.text.vocab_size:
        raise ConfigError(f"the tokenizer ({path or 'built-in'}) does not match the model config: "
                          f"{', '.join(f'{t} is {a}, config says {b}' for t, (a, b) in bad.items()) or ''}"
                          f"{'' if bad else f'<|im_end|> = {im_end}, vocab_size {config.text.vocab_size}'} "
                          "(set tokenizer=DIR)")
    return tok


def trainable_parts(cfg: TrainConfig) -> list[str]:
    return [p for p, frozen in (("vit", cfg.freeze_vit), ("merger", cfg.freeze_merger), ("llm", cfg.freeze_llm))
            if not frozen]


def setup_trainable(model: Qwen25VL, cfg: TrainConfig) -> None:
    parts = trainable_parts(cfg)
    if cfg.lora_r:
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, parts, seed=cfg.seed)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(part_of(name) in parts)


def compile_blocks(model: Qwen25VL) -> None:
    """torch.compile each decoder layer's and ViT block's forward (in place: names and state_dict unchanged).
    Per block, not the whole model: one compiled graph reused by every layer, and the data-dependent parts
    (packing plan, ViT windows, the loss) stay eager. dynamic=True: row and image sizes change every step."""
    for block in [*model.model.layers, *model.visual.blocks]:
        block.forward = torch.compile(block.forward, dynamic=True)


def checkpointed_layer_indexes(n_layers: int, n_checkpointed: int | None) -> list[int]:
    """Which decoder layers recompute in backward: all (None), or `n_checkpointed` of them spread evenly."""
    n = n_layers if n_checkpointed is None else min(n_checkpointed, n_layers)
    return [i * n_layers // n for i in range(n)]


def enable_activation_checkpointing(model: Qwen25VL, layers: int | None = None) -> None:
    """Recompute decoder layers (`layers` of them spread evenly, None: all) and every ViT block in backward (forward
    replaced in place: names unchanged). Fewer layers trade memory for the recompute's ~1/4 of a step: on one 80 GB
    card the 3B model's fp32 weights, gradients and AdamW state take 60 GB, too much to keep every layer's
    activations of an 8192-token row (H100 2026-12-05), but room for some."""
    from torch.utils.checkpoint import checkpoint

    def run(fwd, *args, **kw):
        return checkpoint(fwd, *args, use_reentrant=False, **kw)

    decoder = [model.model.layers[i] for i in checkpointed_layer_indexes(len(model.model.layers), layers)]
    for block in [*decoder, *model.visual.blocks]:
        block.forward = functools.partial(run, block.forward)


def shard(module: TrainModule, cfg: TrainConfig, dev: Dist) -> None:
    """FSDP2: one unit per decoder layer and per ViT block, the rest (embeddings, head, merger) in the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.precision == "bf16" and dev.device.type == "cuda" else MixedPrecisionPolicy()
    m = module.model
    for block in m.visual.blocks:  # called up to twice per row (images, videos): keep gathered until backward
        fully_shard(block, mp_policy=mp, reshard_after_forward=False)
    for layer in m.model.layers:
        fully_shard(layer, mp_policy=mp, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    fully_shard(module, mp_policy=mp, reshard_after_forward=cfg.fsdp_reshard_after_forward)


# ------------------------------------------------------------------------------------------------ optimizer
def part_lrs(cfg: TrainConfig) -> dict[str, float]:
    vit = cfg.vit_lr if cfg.vit_lr is not None else cfg.lr
    return {"vit": vit, "patch_embed": cfg.patch_embed_lr if cfg.patch_embed_lr is not None else vit,
            "merger": cfg.merger_lr if cfg.merger_lr is not None else cfg.lr, "llm": cfg.lr}


def optimizer_part(name: str, cfg: TrainConfig) -> str:
    """The learning-rate part of a parameter: its model part, with the patch embedding on its own when
    patch_embed_lr is set (a separate group only then, so older checkpoints' optimizer states still load)."""
    part = part_of(name)
    return "patch_embed" if part == "vit" and cfg.patch_embed_lr is not None and ".patch_embed." in name else part


def build_optimizer(model: Qwen25VL, cfg: TrainConfig, device) -> torch.optim.Optimizer:
    """AdamW with one group per (part, decay): ViT, (patch embedding,) merger and LLM learning rates; no decay on
    vectors. param_dtype=bf16: MasterAdamW (fp32 master weights of the bf16 parameters), else torch's (fused on
    CUDA)."""
    lrs = part_lrs(cfg)
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((optimizer_part(name, cfg), p.ndim >= 2), []).append(p)
    if not groups:
        raise ConfigError("no trainable parameters (check freeze_* and lora_* options)")
    param_groups = [{"params": ps, "lr": lrs[part], "weight_decay": cfg.weight_decay if decay else 0.0,
                     "name": f"{part}{'' if decay else '_no_decay'}"}
                    for (part, decay), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]
    if cfg.param_dtype == "bf16":
        return MasterAdamW(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    return torch.optim.AdamW(param_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=device.type == "cuda")


def lr_factor(step: int, cfg: TrainConfig, elapsed: float | None = None) -> float:
    """Linear warmup to 1, then cosine to min_lr_ratio at max_steps. With max_train_seconds (and `elapsed`, the
    training seconds so far) the cosine runs over the wall-clock budget and the warmup ramp multiplies it."""
    if cfg.max_train_seconds and elapsed is not None:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        return warm * _cosine(elapsed / cfg.max_train_seconds, cfg)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return _cosine((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps), cfg)


def _cosine(progress: float, cfg: TrainConfig) -> float:
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Clock:
    """Training seconds, continued across a resume (checkpoints store them)."""

    def __init__(self, elapsed: float = 0.0):
        self.start = time.perf_counter() - elapsed

    def __call__(self) -> float:
        return time.perf_counter() - self.start


# ------------------------------------------------------------------------------------------------ state
def _inner(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def full_state(module: TrainModule, dev: Dist, trainable_only: bool,
               opt: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """Parameters by the model's own names, gathered to full CPU tensors (a collective under FSDP). With MasterAdamW
    (param_dtype=bf16) in fp32, as the fp32 path saves them: the trainable parameters' master copies, the others
    upcast."""
    names = {n for n, p in module.named_parameters() if p.requires_grad or not trainable_only}
    if dev.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = module.state_dict()
        if isinstance(opt, MasterAdamW):
            for k, p in module.named_parameters():
                if (master := opt.master(p)) is not None:
                    sd[k] = master
    state = {_inner(k): v.detach().cpu().clone() for k, v in sd.items() if k in names}
    if isinstance(opt, MasterAdamW):  # the rest upcast on the host (no fp32 copy of them on the GPU)
        state = {k: v.float() for k, v in state.items()}
    return state


def load_trainable(module: TrainModule, tensors: dict[str, torch.Tensor], dev: Dist) -> None:
    sd = {"model." + k: v for k, v in tensors.items()}
    if dev.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)


def optimizer_state(module, opt, dev: Dist) -> dict:
    if dev.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optimizer_state(module, opt, state: dict, dev: Dist) -> None:
    if dev.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out_dir: str, step: int, module, opt, sched, loader, cfg: TrainConfig, dev: Dist,
                    elapsed: float = 0.0) -> str:
    """Everything needed to continue exactly; written to step_N.tmp and renamed, so a crash never leaves a
    half-written checkpoint behind `latest`."""
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    params = full_state(module, dev, trainable_only=True, opt=opt)  # collectives: every rank calls these
    optim = optimizer_state(module, opt, dev)
    if dev.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dev.barrier()
    torch.save(rng_state(dev.device), os.path.join(tmp, f"rng_rank{dev.rank}.pt"))
    if dev.main:
        save_file(params, os.path.join(tmp, "trainable.safetensors"))
        torch.save(optim, os.path.join(tmp, "optimizer.pt"))
        state = {"step": step, "scheduler": sched.state_dict(), "loader": loader.state_dict(), "world": dev.world,
                 "elapsed": elapsed, "config": cfg.to_dict()}
        _write_json_atomic(os.path.join(tmp, "state.json"), state)
    dev.barrier()
    if dev.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_json_atomic(os.path.join(root, "latest.json"), {"step": step, "dir": os.path.basename(final)})
        done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[:-cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dev.barrier()
    return final


def latest_checkpoint(out_dir: str) -> str | None:
    path = os.path.join(out_dir, "checkpoints", "latest.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return os.path.join(out_dir, "checkpoints", json.load(f)["dir"])


def load_checkpoint(path: str, module, opt, sched, loader, dev: Dist) -> tuple[int, float]:
    """Restores everything; returns (step, training seconds so far)."""
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    if state["world"] != dev.world:
        raise ConfigError(f"{path}: written by {state['world']} ranks, resuming on {dev.world} (data order would differ)")
    load_trainable(module, load_file(os.path.join(path, "trainable.safetensors")), dev)
    load_optimizer_state(module, opt, torch.load(os.path.join(path, "optimizer.pt"), weights_only=True), dev)
    sched.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    set_rng_state(torch.load(os.path.join(path, f"rng_rank{dev.rank}.pt"), weights_only=True), dev.device)
    return state["step"], float(state.get("elapsed", 0.0))


class _StateDictModel:
    """What checkpoint.save_model reads from a model: .config and .state_dict() (here a gathered dict)."""

    def __init__(self, config, state):
        self.config, self._state = config, state

    def state_dict(self, keep_vars=False):
        return self._state


def export(out_dir: str, module: TrainModule, cfg: TrainConfig, encoder: ChatEncoder, dev: Dist,
           opt: torch.optim.Optimizer | None = None) -> str:
    """output_dir/final: the trained model (LoRA merged) + tokenizer (+ its vocab_map.json, a pruned vocabulary's
    id map) + preprocessor_config.json with the training pixel limits (what inference must use); with LoRA also
    output_dir/adapter (PEFT)."""
    model = module.model
    state = full_state(module, dev, trainable_only=False, opt=opt)
    final = os.path.join(out_dir, "final")
    if dev.main:
        lora = getattr(model, "lora_config", None)
        if lora:
            save_adapter(model, os.path.join(out_dir, "adapter"), cfg.model if os.path.isdir(cfg.model) else None,
                         state=state)
            state = merge_lora_state_dict(state, lora)
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(_StateDictModel(model.config, state), tmp)
        from ..processor import Processor
        Processor(encoder.tokenizer, min_pixels=encoder.min_pixels, max_pixels=encoder.max_pixels).save_pretrained(tmp)
        src = tokenizer_dir(cfg)
        if src and os.path.isfile(os.path.join(src, "vocab_map.json")):
            shutil.copy(os.path.join(src, "vocab_map.json"), tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dev.barrier()
    return final


# ------------------------------------------------------------------------------------------------ loop
def dummy_batch(pairs: bool, token: int) -> dict:
    """A row with nothing to learn, for a rank that has no data in a step (keeps collectives matched); `token`:
    any id of the model's vocabulary (the config's bos, <|endoftext|>)."""
    n = 2 if pairs else 1
    return {"input_ids": torch.full((1, 2 * n), token), "targets": torch.full((1, 2 * n), IGNORE),
            "seq_lens": [2] * n}


def _count(batch: dict, pairs: bool) -> int:
    return len(batch["seq_lens"]) // 2 if pairs else int((batch["targets"] != IGNORE).sum())


def _memory_gb(device) -> float:
    if device.type == "cuda":
        gb = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return gb
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (Linux reports KiB)


def cuda_allocator_defaults() -> bool:
    """Expandable segments for the CUDA caching allocator unless the user configured it (PYTORCH_CUDA_ALLOC_CONF, or
    PYTORCH_ALLOC_CONF, its newer name): the 3B shape without activation checkpointing peaks at 76.8 GB and fits an
    80 GB card only without the fragmentation of fixed segments (without them it ran out of memory with 1.7 GB
    reserved but unused; docs/BENCHMARKS.md, 2026-12-06 thirteenth session). Returns whether it was applied."""
    if {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & set(os.environ) or not torch.cuda.is_available():
        return False
    # newer torch names it torch._C._accelerator_setAllocatorSettings (2.11 warns that the torch.cuda one is deprecated)
    set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None) \
        or torch.cuda.memory._set_allocator_settings
    try:
        set_settings("expandable_segments:True")
    except (AttributeError, RuntimeError) as e:  # a build without it: train with fixed segments
        log.warning("could not enable expandable CUDA segments (%s)", e)
        return False
    return True


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict:
    """Run training to cfg.max_steps (or stop after `stop_after` steps of this call: a simulated interruption,
    used by tests). Returns a summary: steps, last loss, skip stats, paths."""
    if cfg.param_dtype == "bf16" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("param_dtype=bf16 is not supported under torchrun/FSDP: use param_dtype=fp32 (FSDP's mixed "
                          "precision computes in bf16 from fp32 shards)")
    cuda_allocator_defaults()
    dev = Dist(cfg.device)
    torch.manual_seed(cfg.seed)
    out_dir = cfg.output_dir
    if dev.main:
        os.makedirs(out_dir, exist_ok=True)
        cfg.save(os.path.join(out_dir, "config.yaml"))
    pairs = cfg.stage == "dpo"

    model = load_base_model(cfg, "cpu" if dev.enabled else dev.device)
    if cfg.param_dtype == "bf16":  # bf16 working weights, also frozen ones; MasterAdamW keeps fp32 masters
        model.to(torch.bfloat16)
    setup_trainable(model, cfg)
    reference, ref_module = None, None  # DPO reference: "adapters" (LoRA off), a frozen copy, or in the data
    if pairs and cfg.dpo_reference == "model":
        if cfg.lora_r:
            reference = "adapters"
        else:
            ref_module = TrainModule(copy.deepcopy(model).requires_grad_(False).eval(), vision_sync=dev.enabled)
    if cfg.compile:
        compile_blocks(model)  # inside the checkpoint wrapper: the recompute runs the compiled forward too
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model, cfg.checkpoint_layers)
    module = TrainModule(model, vision_sync=dev.enabled)
    if dev.enabled:
        shard(module, cfg, dev)
        if ref_module is not None:
            shard(ref_module, cfg, dev)
    if ref_module is not None:
        reference = functools.partial(ref_module, kind="logps")

    opt = build_optimizer(model, cfg, dev.device)
    clock = Clock()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, clock()))
    encoder = ChatEncoder(load_tokenizer(cfg, model.config), min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                          video_min_pixels=cfg.video_min_pixels, video_max_pixels=cfg.video_max_pixels,
                          video_total_pixels=cfg.video_total_pixels, fps=cfg.video_fps,
                          max_frames=cfg.video_max_frames, media_root=cfg.media_root,
                          loss_on=cfg.effective_loss_on, max_length=cfg.effective_max_length)
    stats = SkipStats(max_bad_fraction=cfg.max_bad_fraction)
    loader = PackedLoader(JsonlStream(cfg.train_files), encoder, capacity=cfg.pack_length, world=dev.world,
                          rank=dev.rank, accum=cfg.grad_accum, seed=cfg.seed, chunk_size=cfg.chunk_size,
                          shuffle=cfg.shuffle, stats=stats, pairs=pairs,
                          attn_weight=cfg.attn_weight if cfg.attn_weight is not None else attention_weight(model.config),
                          workers=cfg.data_workers)
    try:
        return _loop(cfg, dev, module, opt, sched, loader, encoder, stats, reference, pairs, clock, stop_after)
    finally:
        loader.close()


def _loop(cfg, dev, module, opt, sched, loader, encoder, stats, reference, pairs, clock, stop_after) -> dict:
    out_dir = cfg.output_dir
    step, elapsed = 0, 0.0
    ckpt = latest_checkpoint(out_dir) if cfg.resume else None
    if ckpt:
        step, elapsed = load_checkpoint(ckpt, module, opt, sched, loader, dev)
        # The saved lr is the old schedule's; recompute it (identical unless max_steps/warmup/lr changed).
        sched.base_lrs = [part_lrs(cfg)[g["name"].removesuffix("_no_decay")] for g in opt.param_groups]
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * lr_factor(step, cfg, elapsed)
    log_path = os.path.join(out_dir, "log.jsonl")
    if dev.main:
        _truncate_log(log_path, step)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) \
        if cfg.precision == "bf16" and dev.device.type == "cuda" and not dev.enabled else nullcontext()
    # rows carry uint8 frames; their pixel values are made on the device, in bf16 under bf16 compute (the patch
    # embedding rounds its input to bf16 anyway: the same result in half the memory)
    pixel_dtype = torch.bfloat16 if cfg.precision == "bf16" and dev.device.type == "cuda" else None
    trainable = [p for p in module.parameters() if p.requires_grad]
    # bf16 parameters: a step's micro-batch gradients are summed in fp32 by the optimizer, not in bf16 by autograd
    fp32_grad_sums = isinstance(opt, MasterAdamW) and cfg.grad_accum > 1
    loss_value, steps_run, out_of_time = float("nan"), 0, False
    pending, t_prev = None, None  # the last step's record, logged after the next step is queued (see below)
    # A step's numbers are read one step late (below); QWENVL_STEP_SYNC=1 reads them at once (the GPU idles while the
    # host fetches and queues the next step: with the folded clipping ~2 % of a 3B step, docs/TRAINING.md "Throughput")
    step_sync = os.environ.get("QWENVL_STEP_SYNC", "0") == "1"

    def log_step(r: dict) -> float:
        """Reads a step's GPU numbers (waits for them only), sums them over ranks, writes its log line; returns its
        loss."""
        loss_sum, grad_norm, *metric_sums = _read_host(r["gpu"])
        sums = dev.all_sum([loss_sum] + metric_sums)
        loss = sums[0] / max(r["total_n"], 1.0)
        if dev.main and (r["step"] % cfg.log_every == 0 or r["last"]):
            entry = {"step": r["step"], "loss": loss, "lr": r["lr"], "grad_norm": grad_norm,
                     "tokens": int(r["total_tokens"]), "targets": int(r["total_n"]),
                     "tokens_per_s": r["total_tokens"] / r["step_s"], "step_s": r["step_s"], "data_s": r["t_data"],
                     "memory_gb": _memory_gb(dev.device), "epoch": r["epoch"], "skipped": r["skipped"],
                     "elapsed_s": r["elapsed_s"],
                     # this rank's rows: how they reached the trainer (shm / file / pipe / main) and their uint8 frame bytes
                     "rows_via": r["rows_via"], "pixel_mb": r["pixel_mb"]}
            entry.update({k: v / max(r["total_n"], 1.0) for k, v in zip(r["metric_names"], sums[1:])})
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        return loss

    def drain(r: dict) -> dict:
        """The last queued step (unless QWENVL_STEP_SYNC=1): wait for the GPU to finish it and count that wait in its time."""
        if dev.device.type == "cuda":
            torch.cuda.synchronize(dev.device)
            r["step_s"] += time.perf_counter() - t_prev
        return r

    profile_step = int(os.environ.get("QWENVL_PROFILE_STEP", "0") or 0)  # where a step's time goes (see _profiler)
    clock.start = time.perf_counter() - elapsed  # the budget counts training, not model loading
    while step < cfg.max_steps and not out_of_time and (stop_after is None or steps_run < stop_after):
        prof = _profiler(dev.device) if dev.main and step + 1 == profile_step else None
        t0 = time.perf_counter()
        micro = loader.next_step()
        t_data = time.perf_counter() - t0
        local_n = sum(_count(b, pairs) for b in micro if b is not None)
        local_tokens = sum(int(b["input_ids"].numel()) for b in micro if b is not None)
        total_n, total_tokens = dev.all_sum([local_n, local_tokens])
        scale = dev.world / max(total_n, 1.0)  # FSDP averages gradients over ranks; undo that, divide by the count
        loss_sum, metric_sums = torch.zeros((), dtype=torch.float64, device=dev.device), {}  # read once per step
        for i, b in enumerate(micro):
            if dev.enabled:
                module.set_requires_gradient_sync(i == len(micro) - 1)
            batch = b if b is not None else dummy_batch(pairs, module.model.config.bos_token_id)
            batch = device_pixels(batch, dev.device, pixel_dtype)
            if pairs and cfg.dpo_reference == "model":  # never mix precomputed and model reference values
                batch = {k: v for k, v in batch.items() if k != "ref_logps"}
            with autocast:
                if pairs:
                    loss, _, metrics = module(batch, kind="dpo", reference=reference, beta=cfg.dpo_beta,
                                              label_smoothing=cfg.dpo_label_smoothing,
                                              sft_weight=cfg.dpo_sft_weight)
                else:
                    loss, _ = module(batch, kind="sft")
                    metrics = {}
            weight = 0.0 if b is None else 1.0
            (loss * (scale * weight)).backward()
            if fp32_grad_sums:
                opt.accumulate_grads()
            loss_sum += loss.detach().double() * weight
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v * weight
        for p in trainable:  # a step without images still moves the ViT by momentum, as it does under FSDP
            if _grad(p, opt) is None:
                p.grad = torch.zeros_like(p)
        grad_norm = _clip(trainable, cfg.max_grad_norm, opt)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        steps_run += 1
        gpu_numbers = [loss_sum, grad_norm, *metric_sums.values()]  # read with float() at once, or from an async copy
        record = {"step": step, "gpu": (gpu_numbers, None) if step_sync else _to_host_async(gpu_numbers),
                  "metric_names": list(metric_sums),
                  "total_n": total_n, "total_tokens": total_tokens, "t_data": t_data,
                  "lr": {g["name"]: g["lr"] for g in opt.param_groups}, "epoch": loader.epoch,
                  "skipped": stats.skipped, "rows_via": loader.last_step.get("via", {}),
                  "pixel_mb": loader.last_step.get("pixel_bytes", 0) / 2**20}
        if prof is not None or step_sync:
            if dev.device.type == "cuda":
                torch.cuda.synchronize(dev.device)  # the step's time is the GPU's, not the launch queue's
            record["step_s"] = time.perf_counter() - t0
        else:  # steady state: the host waits on the launch queue, so its time per step is the GPU's
            record["step_s"] = time.perf_counter() - (t_prev if t_prev is not None else t0)
        if prof is not None:
            _write_profile(prof, os.path.join(out_dir, f"profile_step{step}.txt"), record["step_s"])
        t_prev = time.perf_counter()  # after the profile's tables: the next step's time is its own
        elapsed = clock()
        if cfg.max_train_seconds:  # every rank stops at the same step: when any rank's budget is spent
            out_of_time = dev.all_sum([float(elapsed >= cfg.max_train_seconds)])[0] > 0
        record["elapsed_s"], record["last"] = elapsed, out_of_time or step == cfg.max_steps
        # Unless QWENVL_STEP_SYNC=1 the step's GPU numbers (loss, gradient norm) are read one step late, after the next
        # step's work is queued: reading them now makes the GPU idle while the host fetches and launches the next step.
        if step_sync:
            loss_value = log_step(record)
        else:
            if pending is not None:
                loss_value = log_step(pending)
            pending = record
        if cfg.save_every > 0 and (step % cfg.save_every == 0 or step == cfg.max_steps or out_of_time):
            if pending is not None:
                loss_value, pending = log_step(drain(pending)), None
            save_checkpoint(out_dir, step, module, opt, sched, loader, cfg, dev, elapsed)
            t_prev = time.perf_counter()  # the next step's time starts after the save
    if pending is not None:
        loss_value = log_step(drain(pending))
    final = None
    done = step >= cfg.max_steps or out_of_time
    if done and cfg.export:
        final = export(out_dir, module, cfg, encoder, dev, opt)
    summary = {"step": step, "loss": loss_value, "skipped": stats.skipped, "seen": stats.seen,
               "skip_reasons": dict(stats.reasons), "final": final, "output_dir": out_dir,
               "stopped": "time" if out_of_time else "max_steps" if done else "interrupted",
               "elapsed_s": clock(), "data_transport": loader.transport_summary()}
    if dev.enabled:
        dist.destroy_process_group()
    return summary


def _profiler(device):
    """QWENVL_PROFILE_STEP=N: torch.profiler over step N (data, forward, backward, optimizer), started here."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts)
    prof.__enter__()
    return prof


def _write_profile(prof, path: str, step_s: float) -> None:
    """The profiled step's ops by self device time and by self host time (a launch-bound step shows host time far
    above device time), to `path` and the first rows to stdout."""
    prof.__exit__(None, None, None)
    ka = prof.key_averages()
    cuda = any(getattr(e, "self_device_time_total", 0) for e in ka)
    dev_total = sum(getattr(e, "self_device_time_total", 0) for e in ka) / 1e3
    cpu_total = sum(e.self_cpu_time_total for e in ka) / 1e3
    head = (f"profiled step: {step_s * 1e3:.1f} ms wall, {cpu_total:.1f} ms host op time, "
            f"{dev_total:.1f} ms device op time, {sum(e.count for e in ka)} op calls\n")
    tables = [ka.table(sort_by="self_cuda_time_total", row_limit=40)] if cuda else []
    tables.append(ka.table(sort_by="self_cpu_time_total", row_limit=40))
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + "\n\n".join(tables))
    print(head + tables[0][:6000], flush=True)


def _to_host_async(values: list) -> tuple:
    """Scalars (tensors or numbers) on their way to the host: on CUDA one non-blocking copy into pinned memory and an
    event after it, so reading them later waits for that copy only, not for everything queued since (`float()` on a
    CUDA tensor would wait for the whole stream)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor) and v.is_cuda]
    if not tensors:
        return [float(v) for v in values], None
    packed = torch.stack([v.detach().reshape(()).double() if isinstance(v, torch.Tensor)
                          else torch.tensor(float(v), dtype=torch.float64, device=tensors[0].device) for v in values])
    host = torch.empty(packed.shape, dtype=torch.float64, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _read_host(pending: tuple) -> list[float]:
    values, done = pending
    if done is not None:
        done.synchronize()
    return [float(v) for v in values]


def _clip(params, max_norm: float, opt: torch.optim.Optimizer | None = None) -> torch.Tensor | float:
    """Clip the gradients' global norm to max_norm (0: only measure it); returns the norm before clipping (a tensor:
    reading it waits for the GPU).
    With a fused Adam(W) over plain tensors the clipping is folded into the optimizer step (QWENVL_FUSED_CLIP=0: not):
    its `grad_scale` divides every gradient by max(1, norm / max_norm) inside the fused kernel, which saves
    clip_grad_norm_'s separate pass over the gradients (9 ms of a 409 ms step at the 3B shape, docs/TRAINING.md
    "Throughput")."""
    found = [(p, g) for p in params if (g := _grad(p, opt)) is not None]
    if opt is not None and getattr(opt, "grad_scale", None) is not None:
        opt.grad_scale = None  # a previous step's
    if not found:
        return 0.0
    grads, gs = [p for p, _ in found], [g for _, g in found]
    folded = opt is not None and fused_adam_scales_grads(opt, grads)
    # bf16 gradients (param_dtype=bf16) or MasterAdamW's fp32 sums without the folded clipping: clip_grad_norm_ would
    # take the norm in bf16 (and reads p.grad only), so the norm is taken here and the gradients scaled in place
    by_hand = not folded and all(type(g) is torch.Tensor for g in gs) and any(
        g.dtype != torch.float32 or g is not p.grad for p, g in found)
    if folded or by_hand:
        if all(g.dtype == torch.float32 for g in gs):
            norm = torch.nn.utils.get_total_norm(gs, 2.0).float()  # clip_grad_norm_'s own norm
        else:  # bf16 gradients: get_total_norm would round the norms to bf16
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs, 2.0, dtype=torch.float32)))
        if folded:
            opt.grad_scale = (norm + 1e-6).div(max_norm).clamp(min=1.0) if max_norm > 0 else None
        elif max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(gs, coef)  # an fp32 scalar tensor, as clip_grad_norm_ passes it: one rounding
        return norm.detach()
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP
        norm = norm.full_tensor()
    return norm.detach()


def fused_adam_scales_grads(opt: torch.optim.Optimizer, params) -> bool:
    """Whether opt is a fused Adam/AdamW whose step takes `grad_scale` (as torch.amp.GradScaler uses it), or a
    MasterAdamW (which takes it the same way), over plain (not FSDP-sharded) tensors, unless QWENVL_FUSED_CLIP=0 (the
    A/B switch of docs/TRAINING.md "Throughput")."""
    takes_scale = isinstance(opt, MasterAdamW) or (
        isinstance(opt, torch.optim.Adam) and bool(opt.defaults.get("fused"))
        and getattr(opt, "_step_supports_amp_scaling", False))
    return (os.environ.get("QWENVL_FUSED_CLIP", "1") != "0" and takes_scale
            and all(type(p) is torch.nn.Parameter and type(_grad(p, opt)) is torch.Tensor for p in params))


def _grad(p: torch.Tensor, opt) -> torch.Tensor | None:
    """p's gradient for this step: MasterAdamW's fp32 sum of the micro-batches' gradients (grad_accum > 1 with
    param_dtype=bf16), else p.grad."""
    return opt.grad(p) if isinstance(opt, MasterAdamW) else p.grad


def _truncate_log(path: str, step: int) -> None:
    """After a resume, drop log lines of steps that are about to be run again."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
