"""Model-based scoring: the model's own log-likelihood of each answer (Qwen25VL, teacher forcing on the
assistant tokens exactly as training encodes them), and a filter that drops the least likely records.

The report scored answers with reward models; with no reward model at this scale the model's likelihood is the
proxy: a low mean log-prob under a model trained on the rest of the data flags noisy or off-distribution labels.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def answer_logprobs(model, samples: list) -> list[dict]:
    """answer_logprob of several encoded samples (train.data.ChatEncoder.encode) in one packed forward pass: the
    samples back to back in one row, attention and MRoPE positions per sample (the trainer's packing), so each gets
    what it would alone (within the attention kernel's rounding)."""
    from ..train.packing import collate, device_pixels

    dev = model.device
    batch = device_pixels(collate(samples), dev)
    kw = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()
          if k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")}
    h = model.hidden_states(batch["input_ids"].to(dev), seq_lens=batch["seq_lens"], **kw)[0]
    targets = batch["targets"][0].to(dev)
    keep = targets != -100
    logp = torch.zeros(targets.shape[0], dtype=torch.float32, device=dev)
    logp[keep] = model.lm_head(h[keep]).float().log_softmax(-1).gather(-1, targets[keep][:, None]).squeeze(-1)
    out, start = [], 0
    for n in batch["seq_lens"]:
        k = int(keep[start:start + n].sum())
        total = float(logp[start:start + n].sum())
        out.append({"logp_mean": total / k if k else 0.0, "logp_sum": total, "n_tokens": k})
        start += n
    return out


def answer_logprob(model, encoder, record: dict, base_dir: str | None = None) -> dict:
    """{"logp_mean", "logp_sum", "n_tokens"} of the record's assistant tokens under `model`."""
    return answer_logprobs(model, [encoder.encode(record, base_dir)])[0]


def score_samples(samples: list[tuple[dict, str]], model, encoder, pack_tokens: int = 16384,
                  max_records: int | None = None) -> tuple[list[tuple[dict, str]], dict]:
    """Each record gets "score": answer_logprob(...), records packed into rows of up to pack_tokens tokens (one
    forward pass each); unreadable records get "score": {"error": ...} (counted). max_records: only the first
    max_records are scored, the rest pass on without a "score" key (filter_by_score keeps them)."""
    out, failed = [], 0
    todo = samples if max_records is None else samples[:max_records]
    row: list = []  # (index in out, encoded sample)

    def flush():
        if not row:
            return
        for (i, _), sc in zip(row, answer_logprobs(model, [smp for _, smp in row])):
            out[i] = ({**out[i][0], "score": sc}, out[i][1])
        row.clear()

    for rec, base in todo:
        try:
            smp = encoder.encode(rec, base)
        except Exception as e:  # noqa: BLE001 - a bad record is the filters' business; keep going
            out.append(({**rec, "score": {"error": f"{type(e).__name__}: {e}"}}, base))
            failed += 1
            continue
        if row and sum(len(x) for _, x in row) + len(smp) > pack_tokens:
            flush()
        out.append((rec, base))
        row.append((len(out) - 1, smp))
    flush()
    out += samples[len(todo):]
    vals = sorted(r["score"]["logp_mean"] for r, _ in out if "logp_mean" in (r.get("score") or {}))
    report = {"records": len(samples), "scored": len(vals), "failed": failed, "not_scored": len(samples) - len(todo),
              "logp_mean": {"min": vals[0], "median": vals[len(vals) // 2], "max": vals[-1]} if vals else None}
    return out, report


def filter_by_score(samples: list[tuple[dict, str]], min_logp: float | None = None,
                    drop_fraction: float | None = None, by: str | None = "domain") -> tuple[list, list, dict]:
    """Keep records whose score.logp_mean >= min_logp and that are not in the lowest `drop_fraction` of their
    group (records grouped by the key `by`, e.g. the tagger's "domain", so each domain loses the same share).
    Records whose scoring failed are removed; records never scored (no "score" key: past score_samples'
    max_records) are kept as they are and counted. Returns (kept, removed, report)."""
    groups: dict[str, list[int]] = {}
    for i, (rec, _) in enumerate(samples):
        groups.setdefault(str(rec.get(by)) if by else "all", []).append(i)
    drop = set()
    reasons = {"no score": 0, "below min_logp": 0, "lowest fraction": 0}
    not_scored = 0
    for idx in groups.values():
        scored = [i for i in idx if "logp_mean" in (samples[i][0].get("score") or {})]
        for i in set(idx) - set(scored):
            if "score" not in samples[i][0]:
                not_scored += 1
                continue
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
              "removed_fraction": round(len(removed) / max(1, len(samples)), 4), "by_reason": reasons,
              "kept_not_scored": not_scored}
    return kept, removed, report
