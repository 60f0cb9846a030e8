"""Direct Preference Optimization (sigmoid loss, Rafailov et al. 2023), on packed rows of chosen/rejected pairs.

    h = beta * ((logp_pi(chosen) - logp_ref(chosen)) - (logp_pi(rejected) - logp_ref(rejected)))
    loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)          (eps = label_smoothing, "cDPO"; 0 = DPO)
         + alpha * nll_pi(chosen) / tokens(chosen)    (alpha = sft_weight: TRL's rpo_alpha, LLaMA-Factory's pref_ftx)

The optional NLL term keeps the chosen answers likely: plain DPO only widens the margin and can lower both answers'
likelihood together (a known failure when chosen and rejected share most of their tokens, as a count answer that
differs in one box does).

logp(.) is the summed log-probability of the response tokens (labels of the final assistant turn). A packed row holds
pairs laid out [chosen_1, rejected_1, chosen_2, rejected_2, ...] (PackedLoader with pairs=True). Reference log-probs
come from the record ("ref_chosen_logp", "ref_rejected_logp"), or from a reference model run without grad: a frozen
copy of the starting model, or, with LoRA, the same model with its adapters bypassed (no second copy in memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loss import target_nll
from .packing import device_pixels


def sequence_logps(model, batch: dict, with_counts: bool = False):
    """Summed log-prob of each sample's target tokens [n_samples] (float32) for a packed row; with_counts: also the
    number of target tokens of each sample."""
    nll, seg = target_nll(model, batch)
    zeros = torch.zeros(len(batch["seq_lens"]), dtype=torch.float32, device=nll.device)
    logps = zeros.index_add(0, seg, -nll.float())
    return (logps, zeros.index_add(0, seg, torch.ones_like(nll, dtype=torch.float32))) if with_counts else logps


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             sft_weight: float = 0.0, chosen_tokens: torch.Tensor | None = None):
    """Per-pair losses [n_pairs] and metrics (rewards are beta * (logp_pi - logp_ref), as TRL logs them); sft_weight
    adds sft_weight * the chosen answer's mean token NLL (needs chosen_tokens)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    h = chosen_reward - rejected_reward
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    # left on the device: the trainer reads them with the step's loss (one copy, no sync per row)
    metrics = {"reward_chosen": chosen_reward.detach().sum(),
               "reward_rejected": rejected_reward.detach().sum(),
               "reward_accuracy": (h.detach() > 0).float().sum()}
    if sft_weight:
        if chosen_tokens is None:
            raise ValueError("sft_weight needs the chosen answers' token counts")
        nll = -policy_chosen / chosen_tokens.clamp(min=1)
        losses = losses + sft_weight * nll
        metrics["nll_chosen"] = nll.detach().sum()
    return losses, metrics


def dpo_loss_sum(model, batch: dict, reference=None, beta: float = 0.1, label_smoothing: float = 0.0,
                 sft_weight: float = 0.0):
    """(sum of pair losses, number of pairs, metrics summed over pairs) for one packed row of pairs.

    reference: a callable batch -> per-sample logps (no grad), used when the batch has no "ref_logps".
    """
    n = batch.get("n_samples", len(batch["seq_lens"]))  # samples after n are padding (trainer's vision dummies)
    batch = device_pixels(batch, model.lm_head.weight.device)  # once for the policy and the reference model
    logps, counts = sequence_logps(model, batch, with_counts=True)
    logps, counts = logps[:n], counts[:n]
    if "ref_logps" in batch:
        ref = batch["ref_logps"].to(logps.device, torch.float32)
    else:
        if reference is None:
            raise ValueError("DPO needs reference log-probs: precomputed in the records or a reference model")
        with torch.no_grad():
            ref = reference(batch)[:n].detach().float()
    losses, metrics = dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], beta, label_smoothing, sft_weight,
                               counts[0::2])
    return losses.sum(), losses.numel(), metrics
