"""Token losses on packed rows without materializing [T, vocab] logits.

Only the positions that have a target go through the LM head, in chunks: at 8192 tokens x 152k vocabulary the fp32
logits alone would be 5 GB. Per-token losses (DPO's sequence log-probs) recompute each chunk's logits in the backward;
the summed SFT loss makes its gradients in the forward instead (linear_nll_sum).
"""

from __future__ import annotations

import functools

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
            _, p = nll_and_logit_grad(h @ w.t(), targets[i:i + chunk], grad_nll[i:i + chunk])
            grad_h[i:i + chunk] = (p @ w).to(hidden.dtype)
            grad_w += (p.t() @ h).float()
        return grad_h, grad_w.to(weight.dtype), None, None, None


def nll_and_logit_grad(logits: torch.Tensor, targets: torch.Tensor,
                       scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll [N] fp32, d nll / d logits = softmax - onehot [N, V], times each row's `scale` [N] if given, in the
    logits' dtype) of one chunk; fp32 inside."""
    x = logits.float()
    lse = x.logsumexp(-1, keepdim=True)
    rows = torch.arange(x.shape[0], device=x.device)
    nll = lse.squeeze(1) - x[rows, targets]
    p = (x - lse).exp()
    p[rows, targets] -= 1
    if scale is not None:
        p = p * scale.float()[:, None]
    return nll, p.to(logits.dtype)


@functools.cache
def compiled_nll_and_logit_grad():
    # one pass over the chunk's bf16 logits instead of eager's seven over fp32 copies (~25 ms of a 3B step on H100)
    return torch.compile(nll_and_logit_grad, dynamic=True)


class _LinearNLLSum(torch.autograd.Function):
    """sum_i nll_i with the gradients made in the forward, chunk by chunk: the loss is a sum, so its backward only
    scales them by the incoming scalar. Per chunk three matmuls (logits, grad of hidden, grad of the weight) instead
    of four, and the weight's gradient accumulates in place (addmm) when it has the compute dtype. A frozen head
    (stage 1, LoRA) gets no weight gradient made at all."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype):
        need_h, need_w = ctx.needs_input_grad[:2]
        w = weight.to(dtype)
        step = compiled_nll_and_logit_grad() if hidden.is_cuda else nll_and_logit_grad
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        in_place = weight.dtype == dtype
        grad_w = torch.zeros(weight.shape, dtype=weight.dtype if in_place else torch.float32,
                             device=weight.device) if need_w else None
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk].to(dtype)
            nll, p = step(h @ w.t(), targets[i:i + chunk])
            total += nll.sum()
            if need_h:
                grad_h[i:i + chunk] = (p @ w).to(hidden.dtype)
            if need_w and in_place:
                torch.addmm(grad_w, p.t(), h, out=grad_w)
            elif need_w:
                grad_w += (p.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_total.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_total.to(grad_w.dtype), None, None, None)


def linear_nll_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                   chunk: int = 2048) -> torch.Tensor:
    """sum of linear_nll(hidden, head, targets): the same value and gradients, about one LM-head pass cheaper."""
    trains = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    if not trains or type(head) is not torch.nn.Linear or head.bias is not None or not hidden.shape[0]:
        return linear_nll(hidden, head, targets, chunk).sum()
    return _LinearNLLSum.apply(hidden, head.weight, targets, chunk, _compute_dtype(hidden))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    if hidden.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return hidden.dtype


def linear_nll(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per-token negative log-likelihood [N] of `targets` under logits = head(hidden); hidden [N, D]."""
    if type(head) is not torch.nn.Linear or head.bias is not None:  # e.g. a LoRA-wrapped head: plain path
        return torch.cat([F.cross_entropy(head(hidden[i:i + chunk]).float(), targets[i:i + chunk], reduction="none")
                          for i in range(0, hidden.shape[0], chunk)]) if hidden.shape[0] else hidden.new_zeros(0)
    return _LinearNLL.apply(hidden, head.weight, targets, chunk, _compute_dtype(hidden))


def model_inputs(batch: dict) -> dict:
    """The model keyword arguments of a batch (packing.collate) whose pixel values are made (packing.device_pixels)."""
    keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    return {k: batch[k] for k in keys if k in batch}


def target_nll(model, batch: dict, device=None, samples: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(nll of every target token [N], sample index of each [N], or None with samples=False) for a packed row."""
    hidden, targets, seg = target_hidden(model, batch, device, samples)
    return linear_nll(hidden, model.lm_head, targets), seg


def target_hidden(model, batch: dict, device=None, samples: bool = True):
    """(last hidden state of every target token [N, D], its target ids [N], sample index of each [N] or None).

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
    return hidden, to_device(targets[keep], device), seg


def sft_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of target-token nll, number of target tokens): divide by the step's total count, never per row, so that
    packing, grad accumulation and data parallelism all give the same gradient as one big batch."""
    hidden, targets, _ = target_hidden(model, batch, samples=False)
    return linear_nll_sum(hidden, model.lm_head, targets), targets.numel()
