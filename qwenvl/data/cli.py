"""`qwenvl data ...`: the report's curation steps as tools on any JSONL set (files or folders of *.jsonl).

    qwenvl data filter IN... --out OUT.jsonl [--rules repetition,truncated,...] [--removed BAD.jsonl]
    qwenvl data tag    IN... --out OUT.jsonl                     # adds "domain" (e.g. grounding.box)
    qwenvl data score  IN... --out OUT.jsonl [--model DIR] [--min-logp X] [--drop-fraction F] [--max-records N]
    qwenvl data reject IN... --out OUT.jsonl [--model DIR] [--k 4] [--temperature 0.8] [--keep first|all]
                       [--pairs PAIRS.jsonl]                    # + DPO pairs: the answer vs the model's failed one
    qwenvl data pairs  IN... --out OUT.jsonl [--seed 0] [--max-score 0.5]   # DPO pairs: answer vs a corrupted copy

Each prints a JSON report (records in, kept, removed and why); --report FILE also writes it. Media paths in
the output are rewritten relative to OUT's folder.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import io


def _common(sp) -> None:
    sp.add_argument("inputs", nargs="+", help="JSONL files or folders")
    sp.add_argument("--out", required=True, help="output JSONL")
    sp.add_argument("--removed", default=None, help="also write the removed records here")
    sp.add_argument("--report", default=None, help="also write the JSON report here")


def _model_args(sp) -> None:
    sp.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    sp.add_argument("--device", default=None)
    sp.add_argument("--dtype", default=None)


def cmd_filter(a, samples):
    from .filters import RULES, check

    rules = tuple(a.rules.split(",")) if a.rules else RULES
    unknown = set(rules) - set(RULES)
    if unknown:
        raise SystemExit(f"unknown rules {sorted(unknown)}; known: {', '.join(RULES)}")
    kept, removed, counts = [], [], {r: 0 for r in rules}
    for rec, base in samples:
        failed = check(rec, base, rules, min_pixels=a.min_pixels, max_pixels=a.max_pixels)
        if failed:
            removed.append(({**rec, "removed_by": failed}, base))
            for r in failed:
                counts[r] += 1
        else:
            kept.append((rec, base))
    return kept, removed, {"by_rule": counts}


def cmd_tag(a, samples):
    from .tagging import tag

    counts: dict[str, int] = {}
    out = []
    for rec, base in samples:
        t = tag(rec)
        counts[t] = counts.get(t, 0) + 1
        out.append(({**rec, "domain": t}, base))
    return out, [], {"domains": dict(sorted(counts.items()))}


def cmd_score(a, samples):
    import torch

    from ..hub import resolve_model
    from ..model import Qwen25VL
    from ..processor import Processor
    from ..train.data import ChatEncoder
    from .likelihood import filter_by_score, score_samples

    path = resolve_model(a.model)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Qwen25VL.from_pretrained(path, dtype=getattr(torch, a.dtype) if a.dtype else None, device=device).eval()
    encoder = ChatEncoder.from_processor(Processor.from_pretrained(path))
    scored, info = score_samples(samples, model, encoder, a.pack_tokens, a.max_records)
    kept, removed, rep = filter_by_score(scored, a.min_logp, a.drop_fraction, a.by or None)
    return kept, removed, {"model": path, "scores": info, "by_reason": rep["by_reason"],
                           "kept_not_scored": rep["kept_not_scored"]}


def cmd_reject(a, samples):
    from ..evaluate.generation import ModelGenerator
    from .rejection import reject_sample

    gen = ModelGenerator(a.model, a.backend, a.device, a.dtype, a.batch_size)

    def sampler(convs, k):
        return gen.sample(convs, k, a.temperature, a.max_tokens, a.seed)

    pairs = [] if a.pairs else None
    accepted, rejected, rep = reject_sample(samples, sampler, a.k, a.min_score, a.keep, a.batch_size * 4, pairs,
                                            a.pairs_per_record)
    if a.pairs:
        io.write(a.pairs, pairs)
        rep = {**rep, "pairs": len(pairs), "pairs_out": a.pairs}
    return accepted, rejected, {"model": gen.path, "backend": gen.backend, **rep}


def cmd_pairs(a, samples):
    from .preference import preference_pairs

    return preference_pairs(samples, a.seed, a.max_score)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwenvl data", description="Data curation: rule filters, domain tags, "
                                "model-based scores, rejection sampling, preference pairs.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("filter", help="rule-based filters (repetition, truncated, malformed, boxes, empty)")
    _common(f)
    f.add_argument("--rules", default=None, help="comma-separated subset (default: all)")
    f.add_argument("--min-pixels", type=int, default=3136, help="processor limits used to size box bounds")
    f.add_argument("--max-pixels", type=int, default=12845056)
    f.set_defaults(fn=cmd_filter)
    t = sub.add_parser("tag", help="add a rule-based domain tag")
    _common(t)
    t.set_defaults(fn=cmd_tag)
    s = sub.add_parser("score", help="model log-likelihood of each answer; drop the least likely")
    _common(s)
    _model_args(s)
    s.add_argument("--min-logp", type=float, default=None, help="drop answers with mean token log-prob below this")
    s.add_argument("--drop-fraction", type=float, default=None, help="drop this lowest-scoring share of each group")
    s.add_argument("--by", default="domain", help="group key for --drop-fraction ('' for one group)")
    s.add_argument("--pack-tokens", type=int, default=16384, help="records scored together in rows of this length")
    s.add_argument("--max-records", type=int, default=None,
                   help="score only the first N records; the rest are kept unscored")
    s.set_defaults(fn=cmd_score)
    r = sub.add_parser("reject", help="rejection sampling against the ground truth")
    _common(r)
    _model_args(r)
    r.add_argument("--k", type=int, default=4)
    r.add_argument("--temperature", type=float, default=0.8)
    r.add_argument("--min-score", type=float, default=1.0, help="task metric a sample must reach (0..1)")
    r.add_argument("--keep", default="first", choices=["first", "all"])
    r.add_argument("--max-tokens", type=int, default=512)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--backend", default="auto", choices=["auto", "engine", "generate"])
    r.add_argument("--pairs", default=None, help="also write on-policy DPO pairs here: chosen = the record's answer, "
                   "rejected = a sampled answer that fails (the model's own mistake)")
    r.add_argument("--pairs-per-record", type=int, default=1, help="at most this many failed answers per record")
    r.set_defaults(fn=cmd_reject)
    q = sub.add_parser("pairs", help="DPO pairs: chosen = the answer, rejected = a corrupted copy failing the metric")
    _common(q)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--max-score", type=float, default=0.5, help="the rejected answer's task metric is at most this")
    q.set_defaults(fn=cmd_pairs)
    a = p.parse_args(argv)

    samples = io.read(a.inputs)
    kept, removed, extra = a.fn(a, samples)
    io.write(a.out, kept)
    if a.removed:
        io.write(a.removed, removed)
    report = {"command": a.cmd, "records": len(samples), "kept": len(kept), "removed": len(removed),
              "removed_fraction": round(len(removed) / max(1, len(samples)), 4), **extra, "out": a.out}
    text = json.dumps(report, indent=2)
    print(text)
    if a.report:
        with open(a.report, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
