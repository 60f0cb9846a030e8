"""Training throughput: random weights of a preset shape, synthetic packed rows, the real trainer.

    python -m qwenvl.train.bench --preset 3b --steps 8 --pack-length 8192 [--lora-r 64] [--images] [--baseline]
                                 [--param-dtype bf16]

Writes a synthetic JSONL (pre-tokenized samples of random lengths; with --images, chat samples with one random
image each), trains `steps` steps with the given options and reports, from the step log (first 2 steps dropped as
warm-up): tokens/s (all ranks), peak memory (rank 0), and MFU = model FLOPs / step time / (GPUs * peak bf16
FLOP/s), where model FLOPs per step = 6 * P_decoder * tokens + 6 * hidden * layers * sum(len^2) (causal attention)
+ 6 * vocab * hidden * targets (the head runs on target tokens only), without activation-recompute and ViT FLOPs.
The bench's timing (with the trainer's per-step synchronize) is steady after ~2 steps; runs on a shared machine vary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def synthetic_data(path: str, n: int, pack_length: int, vocab: int, images: bool, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder = os.path.dirname(path)
    with open(path, "w") as f:
        for i in range(n):
            length = min(pack_length, int(rng.lognormvariate(6.5, 1.0)) + 16)
            if images:
                from PIL import Image
                import numpy as np
                name = f"img{i % 16}.png"
                if not os.path.exists(os.path.join(folder, name)):
                    arr = np.random.default_rng(i).integers(0, 256, (448, 448, 3), dtype=np.uint8)
                    Image.fromarray(arr).save(os.path.join(folder, name))
                words = " ".join(str(rng.randint(0, 9999)) for _ in range(max(1, length // 8)))
                f.write(json.dumps({"images": [name], "messages": [
                    {"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": words}]}) + "\n")
            else:
                ids = [rng.randrange(vocab - 1000) for _ in range(length)]
                f.write(json.dumps({"input_ids": ids}) + "\n")


def model_flops(config, log_entries, lengths_sq_sum: float) -> float:
    t = config.text
    kv = t.num_key_value_heads * t.head_dim
    p_dec = t.num_hidden_layers * (2 * t.hidden_size ** 2 + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size)
    tokens = sum(e["tokens"] for e in log_entries)
    targets = sum(e["targets"] for e in log_entries)
    return (6 * p_dec * tokens + 6 * t.hidden_size * t.num_hidden_layers * lengths_sq_sum
            + 6 * t.vocab_size * t.hidden_size * targets)


def transformers_baseline(data: str, preset_cfg, pack_length: int, steps: int, checkpointing: bool,
                          lr: float = 1e-5, device: str = "cuda", freeze_vit: bool = False) -> list[dict]:
    """The peer: transformers' Qwen2.5-VL model (same shape, random weights) in a plain training loop over the same
    pre-tokenized samples, in file order: right-padded batches of at most `pack_length` padded tokens, bf16
    autocast over fp32 weights, fused AdamW, gradient checkpointing when ours uses activation checkpointing, the ViT
    frozen when ours freezes it (the report's SFT/DPO setting).
    Returns the step log in the trainer's format (tokens = real tokens, padding excluded)."""
    import time

    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    samples = [json.loads(line)["input_ids"] for line in open(data)]
    with tempfile.TemporaryDirectory() as tmp:  # only config.json: the peer initialises its own weights
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(preset_cfg.to_hf_dict(), f)
        hf_cfg = AutoConfig.from_pretrained(tmp)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, dtype=torch.float32,
                                                                attn_implementation="sdpa")
    model.train()
    if freeze_vit:
        model.model.visual.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=cuda)
    log, i, pad = [], 0, preset_cfg.bos_token_id
    for _ in range(steps):
        batch = []
        while i < len(samples) and (len(batch) + 1) * max(len(x) for x in batch + [samples[i]]) <= pack_length:
            batch.append(samples[i])
            i += 1
        if not batch:  # a sample longer than pack_length alone
            batch, i = [samples[i][:pack_length]], i + 1
        L = max(len(x) for x in batch)
        ids = torch.full((len(batch), L), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), L, dtype=torch.long)
        for r, x in enumerate(batch):
            ids[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        n = int(mask.sum())
        log.append({"tokens": n, "targets": n, "sq": sum(len(x) ** 2 for x in batch), "padded": ids.numel(),
                    "step_s": time.perf_counter() - t0, "loss": float(loss.detach()),
                    "memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0})
    return log


def main(argv=None) -> dict:
    import torch

    from .. import preset as get_preset
    from .config import TrainConfig
    from .trainer import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="3b")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--pack-length", type=int, default=8192)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--lora-r", type=int, default=0)
    p.add_argument("--images", action="store_true")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--checkpoint-layers", type=int, default=None,
                   help="recompute only this many decoder layers, spread evenly (default: all)")
    p.add_argument("--freeze-vit", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile decoder layers and ViT blocks")
    p.add_argument("--grad-accum", type=int, default=1, help="packed rows per rank per step (1 GPU x 2 == 2 GPUs x 1)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="TrainConfig.param_dtype: bf16 parameters with fp32 masters in the optimizer (MasterAdamW)")
    p.add_argument("--baseline", action="store_true",
                   help="also time transformers' model in a plain padded-batch loop on the same samples (text only)")
    a = p.parse_args(argv)
    cfg_model = get_preset(a.preset)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "bench.jsonl")
        synthetic_data(data, a.samples, a.pack_length, cfg_model.text.vocab_size, a.images)
        cfg = TrainConfig(model=a.preset, train_files=[data], output_dir=os.path.join(tmp, "run"),
                          max_steps=a.steps, pack_length=a.pack_length, save_every=0, export=False,
                          resume=False, lora_r=a.lora_r, lr=a.lr, grad_accum=a.grad_accum, freeze_vit=a.freeze_vit,
                          activation_checkpointing=not a.no_checkpointing, checkpoint_layers=a.checkpoint_layers,
                          compile=a.compile, chunk_size=a.samples, param_dtype=a.param_dtype,
                          max_bad_fraction=1.0)
        train(cfg)
        if int(os.environ.get("RANK", "0")) != 0:
            return {}
        log = [json.loads(line) for line in open(os.path.join(tmp, "run", "log.jsonl"))]
        peer = None
        if a.baseline and torch.cuda.is_available() and not a.images:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            peer = transformers_baseline(data, cfg_model, a.pack_length, a.steps, not a.no_checkpointing,
                                         freeze_vit=a.freeze_vit)
    timed = log[2:] if len(log) > 3 else log
    profiled = int(os.environ.get("QWENVL_PROFILE_STEP", "0") or 0)  # the profiler slows its step: leave it out
    timed = [e for e in timed if e["step"] != profiled] or timed
    secs = sum(e["step_s"] for e in timed)
    # sum(len^2) is not logged per step: use the synthetic length distribution's ratio to tokens
    rng = random.Random(0)
    lens = [min(a.pack_length, int(rng.lognormvariate(6.5, 1.0)) + 16) for _ in range(a.samples)]
    sq_per_token = sum(x * x for x in lens) / sum(lens)
    flops = model_flops(cfg_model, timed, sq_per_token * sum(e["tokens"] for e in timed))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))  # tokens in the log are summed over ranks
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    out = {"device": name, "preset": a.preset, "pack_length": a.pack_length, "lora_r": a.lora_r, "images": a.images,
           "grad_accum": a.grad_accum, "lr": a.lr, "param_dtype": a.param_dtype,
           "steps_timed": len(timed), "tokens_per_s": sum(e["tokens"] for e in timed) / secs,
           "step_s": secs / len(timed), "peak_memory_gb": max(e["memory_gb"] for e in log),
           "gpus": world, "model_tflops_per_s": flops / secs / 1e12,
           "mfu": flops / secs / (peak * world) if peak else None,
           "data_s": [round(e["data_s"], 3) for e in log], "step_s_all": [round(e["step_s"], 3) for e in log],
           # how rank 0's rows reached the trainer (shm / pipe from data workers, main: built in the loop) and their
           # uint8 frame bytes per step
           "rows_via": {k: sum(e.get("rows_via", {}).get(k, 0) for e in log)
                        for k in sorted({k for e in log for k in e.get("rows_via", {})})},
           "pixel_mb_per_step": round(sum(e.get("pixel_mb", 0.0) for e in log) / len(log), 2),
           "losses": [round(e["loss"], 4) for e in log]}
    if peer:
        pt = peer[2:] if len(peer) > 3 else peer
        psecs = sum(e["step_s"] for e in pt)
        pflops = model_flops(cfg_model, pt, sum(e["sq"] for e in pt))
        out["transformers"] = {"tokens_per_s": sum(e["tokens"] for e in pt) / psecs, "step_s": psecs / len(pt),
                               "padding_fraction": 1 - sum(e["tokens"] for e in pt) / sum(e["padded"] for e in pt),
                               "peak_memory_gb": max(e["memory_gb"] for e in peer),
                               "mfu": pflops / psecs / peak if peak else None,
                               "losses": [round(e["loss"], 4) for e in peer]}
        out["speedup_vs_transformers"] = out["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
