"""Model-based scoring: the model's own log-likelihood of each answer (Qwen25VL, teacher forcing on the
assistant tokens exactly as training encodes them), and a filter that drops the least likely records.

The report scored answers with reward models; with no reward model at this scale the model's likelihood is the
proxy: a low mean log-prob under a model trained on the rest of the data flags noisy or off-distribution labels.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def answer_logprob(model, encoder, record: dict, base_dir: str | None = None) -> dict:
    """{"logp_mean", "logp_sum", "n_tokens"} of the record's assistant tokens under `model`."""
    from ..train.packing import collate, device_pixels

    dev = model.device
    batch = device_pixels(collate([encoder.encode(record, base_dir)]), dev)
    kw = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()
          if k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")}
    h = model.hidden_states(batch["input_ids"].to(dev), **kw)[0]
    targets = batch["targets"][0].to(dev)
    keep = targets != -100
    logp = model.lm_head(h[keep]).float().log_softmax(-1).gather(-1, targets[keep][:, None]).squeeze(-1)
    n = int(keep.sum())
    return {"logp_mean": float(logp.mean()) if n else 0.0, "logp_sum": float(logp.sum()), "n_tokens": n}


def score_samples(samples: list[tuple[dict, str]], model, encoder) -> tuple[list[tuple[dict, str]], dict]:
    """Each record gets "score": answer_logprob(...); unreadable records get "score": None (counted)."""
    out, failed = [], 0
    for rec, base in samples:
        try:
            s = answer_logprob(model, encoder, rec, base)
        except Exception as e:  # noqa: BLE001 - a bad record is the filters' business; keep going
            s, failed = {"error": f"{type(e).__name__}: {e}"}, failed + 1
        out.append(({**rec, "score": s}, base))
    vals = sorted(r["score"]["logp_mean"] for r, _ in out if "logp_mean" in r["score"])
    report = {"records": len(samples), "scored": len(vals), "failed": failed,
              "logp_mean": {"min": vals[0], "median": vals[len(vals) // 2], "max": vals[-1]} if vals else None}
    return out, report


def filter_by_score(samples: list[tuple[dict, str]], min_logp: float | None = None,
                    drop_fraction: float | None = None, by: str | None = "domain") -> tuple[list, list, dict]:
    """Keep records whose score.logp_mean >= min_logp and that are not in the lowest `drop_fraction` of their
    group (records grouped by the key `by`, e.g. the tagger's "domain", so each domain loses the same share).
    Records without a score are removed. Returns (kept, removed, report)."""
    groups: dict[str, list[int]] = {}
    for i, (rec, _) in enumerate(samples):
        groups.setdefault(str(rec.get(by)) if by else "all", []).append(i)
    drop = set()
    reasons = {"no score": 0, "below min_logp": 0, "lowest fraction": 0}
    for idx in groups.values():
        scored = [i for i in idx if "logp_mean" in (samples[i][0].get("score") or {})]
        for i in set(idx) - set(scored):
            drop.add(i)
            reasons["no score"] += 1
        if min_logp is not None:
            for i in scored:
                if samples[i][0]["score"]["logp_mean"] < min_logp:
                    drop.add(i)
                    reasons["below min_logp"] += 1
        if drop_fraction:
            worst = sorted(scored, key=lambda i: samples[i][0]["score"]["logp_mean"])[:math.floor(drop_fraction * len(scored))]
            for i in worst:
                if i not in drop:
                    drop.add(i)
                    reasons["lowest fraction"] += 1
    kept = [s for i, s in enumerate(samples) if i not in drop]
    removed = [s for i, s in enumerate(samples) if i in drop]
    report = {"records": len(samples), "kept": len(kept), "removed": len(removed),
              "removed_fraction": round(len(removed) / max(1, len(samples)), 4), "by_reason": reasons}
    return kept, removed, report
