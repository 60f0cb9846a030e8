"""Sharded safetensors checkpoints in both tensor-name layouts; only safetensors are read (never pickle).

Hub checkpoints name tensors `visual.*`, `model.layers.*`, `model.embed_tokens`, `lm_head`; transformers 5 (and
some fine-tuning tools) write `model.visual.*`, `model.language_model.*`. The model is built on the meta
device and each tensor is read straight into its target dtype/device, one at a time, so host memory peaks
near one tensor rather than the whole model.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def to_internal_name(name: str) -> str:
    """Map any known layout to ours (= the Hub layout)."""
    if name.startswith("model.visual."):
        name = name[len("model."):]
    elif name.startswith("model.language_model."):
        name = "model." + name[len("model.language_model."):]
    if name == "visual.patch_embed.linear_proj.weight":  # transformers 5 optional conv->linear fusion
        name = "visual.patch_embed.proj.weight"
    return name


def to_layout_name(name: str, layout: str) -> str:
    if layout == "hub":
        return name
    if layout == "v5":
        if name.startswith("visual."):
            return "model." + name
        if name.startswith("model."):
            return "model.language_model." + name[len("model."):]
        return name
    raise CheckpointError(f"unknown checkpoint layout {layout!r} (use 'hub' or 'v5')")


def checkpoint_files(path: str) -> dict[str, list[str]]:
    """{file: [tensor names]} for a checkpoint dir; every shard named in the index must exist."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files: dict[str, list[str]] = defaultdict(list)
        for name, fname in weight_map.items():
            files[fname].append(name)
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{path}: shard(s) named in {INDEX} are missing: {', '.join(sorted(missing))}")
        return dict(files)
    single = os.path.join(path, SINGLE)
    if os.path.exists(single):
        with _open(single) as f:
            return {SINGLE: list(f.keys())}
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))] if os.path.isdir(path) else []
    hint = f" (found {pickles[0]}: pickle checkpoints are never loaded; convert to safetensors)" if pickles else ""
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}{hint}")


def _open(fpath: str):
    try:
        return safe_open(fpath, "pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{fpath}: not a readable safetensors file ({e})") from None


def resolve_dtype(dtype, config: ModelConfig) -> torch.dtype:
    if dtype is None:
        dtype = config.torch_dtype
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise CheckpointError(f"unsupported dtype {dtype!r}")
        dtype = _DTYPES[dtype]
    return dtype


def load_model(path, dtype=None, device="cpu", config: ModelConfig | None = None):
    from .model import Qwen25VL

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = config or ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = Qwen25VL(config)
    # The vision tower must not run in fp16 (its last MLP overflows): keep it in bf16 then.
    vision_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    expected = dict(model.named_parameters(remove_duplicate=False))
    tied = config.text.tie_word_embeddings
    seen: set[str] = set()
    for fpath, f, raw, name in iter_checkpoint(path, expected, tied):
        t = fit_shape(f.get_tensor(raw), expected[name].shape, fpath, raw, name)
        target = vision_dtype if name.startswith("visual.") else dtype
        _assign(model, name, t.to(device=device, dtype=target))
        seen.add(name)
    check_complete(path, expected, seen, tied)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def iter_checkpoint(path: str, expected, tied: bool, ignore_suffixes: tuple[str, ...] = ()):
    """(file path, open file, stored name, internal name) of every tensor of a checkpoint that the model has:
    the index is checked against the files; a tied head and unexpected tensors (warned about, unless their
    name ends with one of ignore_suffixes) are skipped."""
    for fname, names in checkpoint_files(path).items():
        fpath = os.path.join(path, fname)
        with _open(fpath) as f:
            available = set(f.keys())
            for raw in names:
                if raw not in available:
                    raise CheckpointError(f"{fpath}: tensor {raw!r} listed in the index is not in the file")
                name = to_internal_name(raw)
                if name == "lm_head.weight" and tied:
                    continue  # tied to embed_tokens
                if name not in expected:
                    if not name.endswith(ignore_suffixes):
                        log.warning("%s: ignoring unexpected tensor %s", fpath, raw)
                    continue
                yield fpath, f, raw, name


def fit_shape(t: torch.Tensor, want, fpath: str, raw: str, name: str, where: str = "") -> torch.Tensor:
    """The tensor in the model's shape (the patch embedding may be stored flat or as Conv3d), or an error."""
    if t.shape == want:
        return t
    if name == "visual.patch_embed.proj.weight" and t.numel() == want.numel():
        return t.reshape(want)
    raise CheckpointError(f"{fpath}: tensor {raw!r} has shape {tuple(t.shape)}{where}, expected {tuple(want)} "
                          "for this config")


def check_complete(path: str, expected, seen: set[str], tied: bool) -> None:
    missing = sorted(n for n in expected if n not in seen and not (tied and n == "lm_head.weight"))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:5]}")


def _assign(model, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(tensor, requires_grad=False))


def save_model(model, path, layout: str = "hub", max_shard_bytes: int = 5 * 2**30, num_shards: int | None = None):
    """config.json + safetensors shards (+ index when more than one); loadable by transformers and by us."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.config.save(path)
    tied = model.config.text.tie_word_embeddings
    tensors = [(to_layout_name(n, layout), p.detach().contiguous().cpu())
               for n, p in model.state_dict(keep_vars=False).items()
               if not (tied and n == "lm_head.weight")]
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    if num_shards:  # exactly num_shards contiguous groups, as even in bytes as the tensors allow
        max_shard_bytes = -(-total // num_shards)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for i, (n, t) in enumerate(tensors):
        b = t.numel() * t.element_size()
        left = len(tensors) - i
        must_split = num_shards and left <= num_shards - len(shards)
        may_split = not num_shards or len(shards) < num_shards
        if shards[-1] and may_split and (size + b > max_shard_bytes or must_split):
            shards.append([])
            size = 0
        shards[-1].append((n, t))
        size += b
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(dict(shards[0]), os.path.join(path, SINGLE), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), os.path.join(path, fname), metadata=meta)
        weight_map.update({n: fname for n, _ in shard})
    with open(os.path.join(path, INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def average_checkpoints(paths: list[str], out: str) -> str:
    """Checkpoint averaging (a "model soup" of one training run): the element-wise mean, in fp32, of the tensors of
    checkpoints with the same config, cast back to the first one's dtypes and written in its files (same shards, same
    tensor names), shard by shard (host memory: one shard in fp32); its other files (tokenizer, chat template,
    processor, vocab map) are copied beside them. Nearby checkpoints of one run average into a flatter minimum
    (the nano model's runs 20a + 20b, docs/NANO.md §7)."""
    import shutil

    if len(paths) < 2:
        raise CheckpointError("average_checkpoints needs at least two checkpoints")
    configs = []
    for p in paths:
        try:
            with open(os.path.join(p, "config.json"), encoding="utf-8") as f:
                configs.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p}: no readable config.json ({e})") from None
    for p, c in zip(paths[1:], configs[1:]):
        diff = sorted(k for k in set(c) | set(configs[0]) if c.get(k) != configs[0].get(k))
        if diff:
            raise CheckpointError(f"{p}: config differs from {paths[0]}'s in {', '.join(diff)}: only checkpoints "
                                  "of one architecture can be averaged")
    files = [checkpoint_files(p) for p in paths]
    # per checkpoint: internal name -> (file path, stored name); the layouts may differ
    where = [{to_internal_name(raw): (os.path.join(p, fname), raw) for fname, raws in f.items() for raw in raws}
             for p, f in zip(paths, files)]
    for p, w in zip(paths[1:], where[1:]):
        if set(w) != set(where[0]):
            odd = sorted(set(w) ^ set(where[0]))
            raise CheckpointError(f"{p}: tensors differ from {paths[0]}'s ({len(odd)}: {', '.join(odd[:3])} ...)")
    if any(os.path.realpath(out) == os.path.realpath(p) for p in paths):
        raise CheckpointError(f"{out}: is one of the checkpoints being averaged; choose another output dir")
    if os.path.isdir(out) and os.listdir(out):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new output dir (nothing was written)")
    tmp = f"{out.rstrip(os.sep)}.tmp{os.getpid()}"  # written here, then renamed: no half-written model at `out`
    os.makedirs(tmp, exist_ok=True)
    try:
        handles: dict[str, object] = {}

        def read(fpath: str, raw: str) -> torch.Tensor:
            if fpath not in handles:
                handles[fpath] = _open(fpath)
            return handles[fpath].get_tensor(raw)

        for fname, raws in files[0].items():
            shard = {}
            for raw in raws:
                name = to_internal_name(raw)
                first = read(os.path.join(paths[0], fname), raw)
                total = first.float()
                for p, w in zip(paths[1:], where[1:]):
                    fpath, other = w[name]
                    t = read(fpath, other)
                    if t.shape != first.shape:
                        raise CheckpointError(f"{fpath}: {other} has shape {tuple(t.shape)}, "
                                              f"{paths[0]} {tuple(first.shape)}")
                    total += t.float()
                shard[raw] = (total / len(paths)).to(first.dtype)
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
        for name in os.listdir(paths[0]):  # index, config, tokenizer, templates, processor, vocab map
            src = os.path.join(paths[0], name)
            if os.path.isfile(src) and not name.endswith(".safetensors"):
                shutil.copyfile(src, os.path.join(tmp, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
    os.replace(tmp, out)
    return out
