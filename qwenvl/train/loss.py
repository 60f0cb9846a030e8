"""Token losses on packed rows without materializing [T, vocab] logits.

Only the positions that have a target go through the LM head, in chunks, and the backward recomputes each chunk's
logits instead of keeping them: at 8192 tokens x 152k vocabulary the fp32 logits alone would be 5 GB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers import to_device
from .data import IGNORE
from .packing import device_pixels


class _LinearNLL(torch.autograd.Function):
    """nll[i] = logsumexp(h_i W^T) - (h_i W^T)[t_i], chunk by chunk; softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype):
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        w = weight.to(dtype)
        for i in range(0, hidden.shape[0], chunk):
            logits = (hidden[i:i + chunk].to(dtype) @ w.t()).float()
            t = targets[i:i + chunk]
            nll[i:i + chunk] = logits.logsumexp(-1) - logits.gather(1, t[:, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.dtype = chunk, dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, targets = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk].to(dtype)
            logits = (h @ w.t()).float()
            p = logits.softmax(-1)  # d nll / d logits = softmax - onehot
            p[torch.arange(p.shape[0], device=p.device), targets[i:i + chunk]] -= 1
            p = (p * grad_nll[i:i + chunk, None].float()).to(dtype)
            grad_h[i:i + chunk] = (p @ w).to(hidden.dtype)
            grad_w += (p.t() @ h).float()
        return grad_h, grad_w.to(weight.dtype), None, None, None


def linear_nll(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per-token negative log-likelihood [N] of `targets` under logits = head(hidden); hidden [N, D]."""
    if type(head) is not torch.nn.Linear or head.bias is not None:  # e.g. a LoRA-wrapped head: plain path
        return torch.cat([F.cross_entropy(head(hidden[i:i + chunk]).float(), targets[i:i + chunk], reduction="none")
                          for i in range(0, hidden.shape[0], chunk)]) if hidden.shape[0] else hidden.new_zeros(0)
    dtype = hidden.dtype
    if hidden.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    return _LinearNLL.apply(hidden, head.weight, targets, chunk, dtype)


def model_inputs(batch: dict) -> dict:
    """The model keyword arguments of a batch (packing.collate) whose pixel values are made (packing.device_pixels)."""
    keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    return {k: batch[k] for k in keys if k in batch}


def target_nll(model, batch: dict, device=None, samples: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(nll of every target token [N], sample index of each [N], or None with samples=False) for a packed row.

    Which tokens have a target is worked out on the host (the batch's targets are host tensors): no boolean indexing
    on the device, whose output size would make the host wait for the GPU in every row."""
    device = device or model.lm_head.weight.device
    batch = device_pixels(batch, device)  # a row with uint8 frames (the trainer makes its pixel values beforehand)
    ids = to_device(batch["input_ids"], device)
    kw = model_inputs(batch)  # grids and second_per_grid_ts stay on the host: the model reads them as lists
    for k in ("pixel_values", "pixel_values_videos"):
        if k in kw:
            kw[k] = to_device(kw[k], device).to(model.visual.dtype)
    pos = model._packed_positions(batch["input_ids"].cpu(), batch["seq_lens"], kw.get("image_grid_thw"),
                                  kw.get("video_grid_thw"), kw.get("second_per_grid_ts"))  # from the host ids
    hidden = model.hidden_states(ids, seq_lens=batch["seq_lens"], position_ids=to_device(pos, device), **kw)[0]  # [T, D]
    targets = batch["targets"][0].cpu()  # already on the host unless a caller moved the batch
    keep = (targets != IGNORE).nonzero().flatten()
    seg = None
    if samples:
        seg = torch.repeat_interleave(torch.arange(len(batch["seq_lens"])), torch.tensor(batch["seq_lens"]))
        seg = to_device(seg[keep], device)
    hidden = hidden.index_select(0, to_device(keep, hidden.device))
    return linear_nll(hidden, model.lm_head, to_device(targets[keep], device)), seg


def sft_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of target-token nll, number of target tokens): divide by the step's total count, never per row, so that
    packing, grad accumulation and data parallelism all give the same gradient as one big batch."""
    nll, _ = target_nll(model, batch, samples=False)
    return nll.sum(), nll.numel()
