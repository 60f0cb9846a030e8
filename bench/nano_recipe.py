"""Helpers of bench/train_nano.sh (qwenvl-nano in one device call; docs/NANO.md §6).

    python bench/nano_recipe.py data --out D --workers 14 --seconds 75 [--stage 2] [--suite-n 50 --suite-root R
                                     --suite-extra video_grounding_unseen_fps,...]
        synthetic training data: `workers` processes run `qwenvl.synth.generate` in rounds until the deadline (each
        round = every task of the stage's mix, sample counts set by its token shares, MIXES), the eval suite's
        held-out set (+ its opt-in tasks) in one more process; then one globally shuffled D/train.jsonl (charts
        repeated, see CHART_REPEAT) + D/data_stats.json.
    python bench/nano_recipe.py package --run RUN --eval EVAL --data D --out OUT [--stage S --init I --timings T]
        RUN/final (or its newest checkpoint) -> bf16 safetensors shards <= 15 MB in OUT/model/ + OUT/model/
        model_files.tar (config, index, tokenizer, processor files), the training log, the eval report and
        predictions, OUT/summary.json (stage, init, MRoPE temporal mode, eval after the stage); prints a short table.
    python bench/nano_recipe.py compare A/summary.json B/summary.json ...
        the eval of several runs side by side (e.g. the absolute-time vs frame-index ablation, docs/NANO.md §4).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import sys
import tarfile
import time

# Stage-2 row of docs/NANO.md §4 (share of tokens). No text corpus is generated here: its 15 % go to captions.
MIX = {"grounding": 0.25 / 3, "point": 0.25 / 3, "count": 0.25 / 3,
       "ocr": 0.0625, "spotting": 0.0625, "doc": 0.0625, "kie": 0.0625,
       "chart": 0.10, "video_grounding": 0.075, "dense_caption": 0.075, "gui": 0.10, "caption": 0.15}
# Stage-1 row (visual pretraining, LLM frozen): caption 40 %, ocr 30 %, spotting 10 %, grounding 10 %, chart 10 %.
MIX_STAGE1 = {"caption": 0.40, "ocr": 0.30, "spotting": 0.10, "grounding": 0.10, "chart": 0.10}
# Stage-3 row (long context): §4 plans long clips 40 %, multi-page documents 30 %, multi-step GUI 15 %, stage-2 mix
# 15 %; no multi-page or multi-step generator exists yet, so their 45 % go to the stage-2 mix (60 % in all).
MIX_STAGE3 = {"video_grounding_long": 0.20, "dense_caption_long": 0.20, **{t: 0.60 * v for t, v in MIX.items()}}
# Stage-0 row (text, LLM only): §4 plans synthetic prompts/answers as text 50 % + an English corpus 50 %; no corpus is
# bundled, so it is all synth.text (copying the prompt's words, the answer formats).
MIX_STAGE0 = {"text": 1.0}
MIXES = {0: MIX_STAGE0, 1: MIX_STAGE1, 2: MIX, 3: MIX_STAGE3}
# `--mix video` (NANO_MIX=video): clips only, for the temporal-id ablation (§4): the two rules differ only on video,
# and in the stage-2 mix video is 15 % of the tokens, too few for a model from random weights to read clips within
# one call (§7, runs 5A/5F).
MIX_VIDEO = {"video_grounding": 0.5, "dense_caption": 0.5}


def _focus(core: dict[str, float], rest_share: float) -> dict[str, float]:
    """`core`'s shares, and the stage-2 tasks it leaves out at rest_share of the tokens, in the stage-2 proportions."""
    rest = {t: v for t, v in MIX.items() if t not in core}
    return {**core, **{t: rest_share * v / sum(rest.values()) for t, v in rest.items()}}


# `--mix spatial` (NANO_MIX=spatial): the position-reading tasks at 75 % of the tokens (grounding 30, point 20,
# count 15, GUI clicks 10) and the rest of the stage-2 mix at 25 %, in its proportions (so the other tasks keep
# being seen): at 8 % of the tokens grounding had seen too few updates to read position by 168 M tokens (§7).
MIX_SPATIAL = _focus({"grounding": 0.30, "point": 0.20, "count": 0.15, "gui": 0.10}, 0.25)
# `--mix reading` (NANO_MIX=reading): after the spatial calls (grounding 68 %, count 80 %, OCR 22 %, GUI 28 % in run
# 12b, §7), the text-reading tasks at 65 % (OCR 30, spotting 10, KIE 5, GUI 20), the position tasks held at 20 %
# (grounding 8, point 6, count 6) and the rest of the stage-2 mix at 15 %, in its proportions.
MIX_READING = _focus({"ocr": 0.30, "spotting": 0.10, "kie": 0.05, "gui": 0.20, "grounding": 0.08, "point": 0.06,
                      "count": 0.06}, 0.15)
# `--mix glyphs` (NANO_MIX=glyphs): the reading mix did not teach glyphs (run 13a, §7: OCR 22 -> 25 %, answers that
# follow the words' prior); a GPU probe from 13a learned single glyphs after a plateau of ~36 k samples of nothing else
# (bench/reading_probes.sh). So random character strings (synth `glyphs`: no word to guess) take a quarter of the
# tokens, OCR lines and GUI stay, the position tasks are held at 20 %, the rest of the stage-2 mix at 10 %; and stage
# 0's text task at 5 % (~90 k samples a call): 13a answered every held-out `type` action with one word ("pocket")
# instead of copying the words its instruction quotes, which the text task's "Repeat exactly" samples teach.
MIX_GLYPHS = _focus({"glyphs": 0.25, "ocr": 0.15, "spotting": 0.05, "kie": 0.05, "gui": 0.15, "grounding": 0.10,
                     "point": 0.05, "count": 0.05, "text": 0.05}, 0.10)
# `--mix glyphs_fonts` (NANO_MIX=glyphs_fonts): the glyph curriculum once synth draws in every font (device calls carry
# them since the fifteenth session; runs 1-18 saw Pillow's built-in font only, §7): glyph strings 20 %, counting 10 %
# (run 18a's count fell 80 -> 76 on 5 %), and the text task at 8 %, whose quote / type kinds (synth VERSION 7) teach
# copying words from anywhere in the prompt (18a typed 0 of 17 quoted words in GUI instructions).
MIX_GLYPHS_FONTS = _focus({"glyphs": 0.20, "ocr": 0.15, "spotting": 0.05, "kie": 0.05, "gui": 0.15, "grounding": 0.10,
                           "point": 0.05, "count": 0.10, "text": 0.08}, 0.07)
NAMED_MIXES = {"video": MIX_VIDEO, "spatial": MIX_SPATIAL, "reading": MIX_READING, "glyphs": MIX_GLYPHS,
               "glyphs_fonts": MIX_GLYPHS_FONTS}
# Mean LLM tokens per sample (max_pixels 448*448; measured on 40 samples per task, the long clips on 6 each).
TOKENS = {"grounding": 205, "point": 221, "count": 297, "caption": 211, "ocr": 194, "spotting": 301, "doc": 520,
          "kie": 177, "chart": 199, "glyphs": 105, "video_grounding": 384, "dense_caption": 469, "gui": 1077,
          "video_grounding_long": 2500, "dense_caption_long": 3300,
          "text": 85,  # 62 until synth VERSION 7 added the quote / type kinds (81.5 on 400 samples, 59 before, same count)
          # clips at 1, 2 or 4 fps in turn: the video part (~300 / ~330 tokens at 2 fps) x 7/6 on average (estimate)
          "video_grounding_dynamic_fps": 430, "dense_caption_dynamic_fps": 525}
# `--video-fps dynamic` (NANO_VIDEO_FPS=dynamic): the clips of any mix sampled at 1, 2 or 4 fps (the report's dynamic
# FPS sampling, synth's *_dynamic_fps variants) instead of 2 fps throughout.
DYNAMIC_FPS_TASKS = {"video_grounding": "video_grounding_dynamic_fps", "dense_caption": "dense_caption_dynamic_fps"}
# matplotlib charts cost ~250 ms each (the other tasks 8-35 ms): fewer unique charts, each written this many times.
CHART_REPEAT = 4


def round_counts(round_tokens: int, stage: int = 2, mix_name: str = "", video_fps: str = "2") -> dict[str, int]:
    """Samples per task in one generation round of ~round_tokens tokens (after chart repetition), stage 1, 2 or 3,
    or the named mix (`NAMED_MIXES`) instead of the stage's when given; video_fps "dynamic": the 2 fps clip tasks
    replaced by their dynamic-FPS variants (the same share of tokens)."""
    mix = NAMED_MIXES[mix_name] if mix_name else MIXES[stage]
    if video_fps == "dynamic":
        mix = {DYNAMIC_FPS_TASKS.get(t, t): v for t, v in mix.items()}
    elif video_fps != "2":
        raise ValueError(f"video_fps must be 2 or dynamic, got {video_fps!r}")
    rep = {t: CHART_REPEAT if t == "chart" else 1 for t in mix}
    return {t: max(1, round(mix[t] * round_tokens / TOKENS[t] / rep[t])) for t in mix}


# ------------------------------------------------------------------------------------------------ data
def _gen_worker(w: int, workers: int, out: str, deadline: float, seed: int, counts: dict) -> None:
    from qwenvl import synth

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `timeout`: close the JSONL being written
    timing: dict[str, list[float]] = {}
    try:
        r = 0
        while r == 0 or time.time() < deadline:  # round 0 always completes: every task is there
            d = os.path.join(out, f"w{w:02d}", f"r{r:03d}")
            for task, k in counts.items():
                if r and time.time() >= deadline:
                    break
                t0 = time.time()
                synth.generate(d, [task], k, "train", seed, start=(r * workers + w) * k)
                n_s = timing.setdefault(task, [0, 0.0])
                n_s[0] += k
                n_s[1] += time.time() - t0
            r += 1
    finally:
        with open(os.path.join(out, f"w{w:02d}", "timing.json"), "w") as f:
            json.dump(timing, f)


def _suite_worker(n: int, root: str, extra: list[str]) -> None:
    from qwenvl.evaluate.cli import suite_data

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    t0 = time.time()
    folder = suite_data("nano", n, root, extra)
    print(f"eval suite (n={n}) in {time.time() - t0:.1f} s -> {folder}", flush=True)


def _relink(item_src, prefix: str):
    if isinstance(item_src, list):
        return [_relink(s, prefix) for s in item_src]
    return f"{prefix}/{item_src}" if isinstance(item_src, str) and not item_src.startswith("/") else item_src


def _relink_file(args) -> list[tuple[str, str]]:
    """(task, line) for every record of one round's JSONL, media paths made relative to the data root."""
    path, out = args
    prefix = os.path.relpath(os.path.dirname(path), out)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by `timeout`
                continue
            for m in rec["messages"]:
                if isinstance(m["content"], list):
                    for it in m["content"]:
                        if it.get("type") in ("image", "video"):
                            it[it["type"]] = _relink(it[it["type"]], prefix)
            rows.append((rec["task"], json.dumps(rec, ensure_ascii=False) + "\n"))
    return rows


def merge(out: str, seed: int, processes: int = 1) -> dict:
    """Every round's JSONL -> out/train.jsonl (media paths made relative to out, charts repeated, shuffled)."""
    import multiprocessing as mp

    paths = [(p, out) for p in sorted(glob.glob(os.path.join(out, "w*", "r*", "*.jsonl")))]
    with mp.get_context("fork").Pool(max(1, processes)) as pool:
        files = pool.map(_relink_file, paths, chunksize=4)
    lines, unique, tokens = [], {}, {}
    for rows in files:
        for task, line in rows:
            unique[task] = unique.get(task, 0) + 1
            rep = CHART_REPEAT if task == "chart" else 1
            tokens[task] = tokens.get(task, 0) + rep * TOKENS[task]
            lines += [line] * rep
    random.Random(seed).shuffle(lines)
    with open(os.path.join(out, "train.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(lines)
    total = sum(tokens.values()) or 1
    return {"records": len(lines), "unique": unique, "est_tokens": total,
            "token_share": {t: round(v / total, 4) for t, v in sorted(tokens.items())}}


# `--noise F` (NANO_NOISE, the SFT stage's curation check, docs/NANO.md §4): synth answers are clean by construction,
# so the report's rule filters would have nothing to remove; a fraction F of the records gets one of the flaws those
# rules exist for (web data's cut-off, looping and broken-box answers), marked in `meta.noise` so the filter's recall
# and the eval effect of curating can be measured. A cut-off plain-text answer may still look complete to the rules.
NOISE_KINDS = ("truncated", "repetition", "boxes")
_BOX = re.compile(r'"(bbox_2d|point_2d)": \[(-?\d+), (-?\d+)')


def corrupt_answer(text: str, kind: str, rng: random.Random) -> str | None:
    """`text` with the flaw `kind`, or None where it does not apply (no box to break, too short to cut)."""
    if kind == "truncated":
        if len(text) < 8:
            return None
        return text[:rng.randint(len(text) // 3, 2 * len(text) // 3)].rstrip()
    if kind == "repetition":
        lines = text.split("\n")
        i = max((j for j, ln in enumerate(lines) if re.search(r"[A-Za-z0-9]", ln)), default=None)
        return None if i is None else "\n".join(lines[:i + 1] + [lines[i]] * 4 + lines[i + 1:])
    m = _BOX.search(text)  # boxes: the first box's x1 past its x2 (a point's x negative)
    if not m:
        return None
    if m.group(1) == "point_2d":
        broken = f'"point_2d": [{-1 - abs(int(m.group(2)))}, {m.group(3)}'
    else:
        x1 = int(m.group(2))
        x2 = re.match(r",\s*(-?\d+)", text[m.end():])
        broken = f'"bbox_2d": [{int(x2.group(1)) + 5 if x2 else x1 + 5}, {m.group(3)}'
    return text[:m.start()] + broken + text[m.end():]


def add_noise(path: str, fraction: float, seed: int) -> dict:
    """Give `fraction` of the records in the JSONL `path` a flawed last answer (NOISE_KINDS in turn; a kind that does
    not apply to a record falls to the next); rewrites the file; returns {kind: records}."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    rng = random.Random(seed * 1_000_003 + 17)
    counts = dict.fromkeys(NOISE_KINDS, 0)
    for j, i in enumerate(rng.sample(range(len(lines)), round(fraction * len(lines)))):
        rec = json.loads(lines[i])
        msg = next((m for m in reversed(rec.get("messages", [])) if m.get("role") == "assistant"), None)
        if msg is None or not isinstance(msg.get("content"), str):
            continue
        for k in range(len(NOISE_KINDS)):
            kind = NOISE_KINDS[(j + k) % len(NOISE_KINDS)]
            new = corrupt_answer(msg["content"], kind, rng)
            if new is not None and new != msg["content"]:
                msg["content"] = new
                rec.setdefault("meta", {})["noise"] = kind
                counts[kind] += 1
                lines[i] = json.dumps(rec, ensure_ascii=False) + "\n"
                break
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return counts


def cmd_data(a) -> int:
    import multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from qwenvl import synth

    for task in synth.TASKS:  # import the generators (and matplotlib, building its font cache) once, before forking
        synth.generator(task)
    if synth.charts.have_matplotlib():
        import matplotlib.figure  # noqa: F401
    t0 = time.time()
    deadline = t0 + a.seconds
    counts = round_counts(a.round_tokens, a.stage, a.mix, a.video_fps)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_gen_worker, args=(w, a.workers, a.out, deadline, a.seed, counts))
             for w in range(a.workers)]
    if a.suite_n:
        extra = [t for t in a.suite_extra.split(",") if t]
        procs.append(ctx.Process(target=_suite_worker, args=(a.suite_n, a.suite_root, extra)))
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    gen_s = time.time() - t0
    stats = merge(a.out, a.seed, a.workers)
    if a.noise:
        stats["noise"] = add_noise(os.path.join(a.out, "train.jsonl"), a.noise, a.seed)
    per_task: dict[str, list[float]] = {}
    for path in glob.glob(os.path.join(a.out, "w*", "timing.json")):
        for task, (n, s) in json.load(open(path)).items():
            acc = per_task.setdefault(task, [0, 0.0])
            acc[0] += n
            acc[1] += s
    stats.update(stage=a.stage, mix=a.mix or f"stage {a.stage}", video_fps=a.video_fps, seed=a.seed, workers=a.workers, generation_s=round(gen_s, 1), merge_s=round(time.time() - t0 - gen_s, 1),
                 round_counts=counts, samples_per_s_per_process={t: round(n / s, 1) for t, (n, s) in per_task.items() if s})
    with open(os.path.join(a.out, "data_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps(stats))
    return 0


# ------------------------------------------------------------------------------------------------ package
def _final_or_checkpoint(run: str) -> tuple[str | None, str]:
    """RUN/final, else a model dir built from the newest checkpoint (training killed before its export)."""
    final = os.path.join(run, "final")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final, "final"
    latest = os.path.join(run, "checkpoints", "latest.json")
    if not os.path.isfile(latest):
        return None, "none"
    import torch
    import yaml
    from safetensors.torch import load_file

    from qwenvl.train import TrainConfig
    from qwenvl.train.data import ChatEncoder
    from qwenvl.train.trainer import Dist, TrainModule, export, load_base_model, load_tokenizer

    ckpt = os.path.join(run, "checkpoints", json.load(open(latest))["dir"])
    cfg = TrainConfig.from_dict({**yaml.safe_load(open(os.path.join(run, "config.yaml"))), "device": "cpu"})
    model = load_base_model(cfg, torch.device("cpu"))
    model.load_state_dict(load_file(os.path.join(ckpt, "trainable.safetensors")), strict=False)
    encoder = ChatEncoder(load_tokenizer(cfg, model.config), min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    out = export(run, TrainModule(model), cfg, encoder, Dist("cpu"))  # RUN/final, as the trainer writes it
    return out, os.path.basename(ckpt)


def _train_summary(log_path: str) -> dict:
    if not os.path.isfile(log_path):
        return {}
    log = [json.loads(x) for x in open(log_path) if x.strip()]
    if not log:
        return {}
    tail = log[len(log) // 10:] or log  # past the warm-up steps
    tps = sorted(x["tokens_per_s"] for x in tail)
    last = log[-20:]
    return {"steps": log[-1]["step"], "elapsed_s": round(log[-1].get("elapsed_s", 0.0), 1),
            "tokens": sum(x["tokens"] for x in log), "median_tokens_per_s": round(tps[len(tps) // 2]),
            "mean_tokens_per_s": round(sum(x["tokens"] for x in log) / max(sum(x["step_s"] for x in log), 1e-9)),
            "median_data_wait_s": round(sorted(x["data_s"] for x in tail)[len(tail) // 2], 4),
            "first_loss": round(log[0]["loss"], 4), "final_loss": round(sum(x["loss"] for x in last) / len(last), 4),
            "peak_memory_gb": round(max(x["memory_gb"] for x in log), 2)}


def _run_settings(run: str) -> dict:
    """What the run trained (from its config.yaml): trainable parts, loss, MRoPE temporal mode asked for."""
    path = os.path.join(run, "config.yaml")
    if not os.path.isfile(path):
        return {}
    import yaml

    cfg = yaml.safe_load(open(path)) or {}
    return {"trained": [p for p in ("vit", "merger", "llm") if not cfg.get(f"freeze_{p}")],
            "loss": cfg.get("stage"), "lr": cfg.get("lr"), "mrope_temporal": cfg.get("mrope_temporal")}


def cmd_package(a) -> int:
    os.makedirs(os.path.join(a.out, "model"), exist_ok=True)
    stage = int(a.stage) if a.stage.isdigit() else a.stage
    summary: dict = {"stage": stage, "init": a.init or "random", **({"arm": a.arm.strip()} if a.arm else {}),
                     **_run_settings(a.run),
                     "train": _train_summary(os.path.join(a.run, "log.jsonl"))}
    stats_path = os.path.join(a.data, "data_stats.json")
    if os.path.isfile(stats_path):
        summary["data"] = json.load(open(stats_path))
    # NANO_STAGE=dpo: what `qwenvl data pairs` made; sft: what the curation removed
    for key, name in (("pairs", "pairs_report.json"), ("filter", "filter_report.json"), ("tag", "tag_report.json"),
                      ("score", "score_report.json")):
        path = os.path.join(a.data, name)
        if os.path.isfile(path):
            summary[key] = {k: v for k, v in json.load(open(path)).items() if k not in ("out", "command")}
    removed = os.path.join(a.data, "removed.jsonl")  # the filter's removed records: which injected flaws it caught
    if "filter" in summary and os.path.isfile(removed):
        caught: dict[str, int] = {}
        for line in open(removed, encoding="utf-8"):
            kind = (json.loads(line).get("meta") or {}).get("noise", "clean")
            caught[kind] = caught.get(kind, 0) + 1
        summary["filter"]["removed_by_noise_kind"] = caught
    src, origin = _final_or_checkpoint(a.run)
    summary["model_from"] = origin
    if src:
        import torch

        from qwenvl.model import Qwen25VL

        tmp = os.path.join(a.run, "bf16")
        shutil.rmtree(tmp, ignore_errors=True)
        model = Qwen25VL.from_pretrained(src, dtype=torch.bfloat16, device="cpu")
        model.config.torch_dtype = "bfloat16"
        model.save_pretrained(tmp, max_shard_bytes=15_000_000)
        for f in os.listdir(src):  # tokenizer, processor, vocab map
            if not f.endswith(".safetensors") and not f.endswith(".index.json") and f != "config.json":
                shutil.copy(os.path.join(src, f), tmp)
        shards = sorted(f for f in os.listdir(tmp) if f.endswith(".safetensors"))
        for f in shards:
            shutil.copy(os.path.join(tmp, f), os.path.join(a.out, "model", f))
        with tarfile.open(os.path.join(a.out, "model", "model_files.tar"), "w") as tar:
            for f in sorted(os.listdir(tmp)):
                if f not in shards:
                    tar.add(os.path.join(tmp, f), arcname=f)
        summary["model_files"] = shards + ["model_files.tar"]
        summary["mrope_temporal"] = model.config.mrope_temporal  # what the exported config.json says
        summary["model_bytes"] = sum(os.path.getsize(os.path.join(tmp, f)) for f in shards)
    for src_path, name in ((os.path.join(a.run, "log.jsonl"), "train_log.jsonl"),
                           (os.path.join(a.eval, "report.json"), "eval_report.json"),
                           (os.path.join(a.eval, "predictions.jsonl"), "eval_predictions.jsonl")):
        if os.path.isfile(src_path):
            shutil.copy(src_path, os.path.join(a.out, name))
    report_path = os.path.join(a.eval, "report.json")
    if os.path.isfile(report_path):
        report = json.load(open(report_path))
        summary["eval"] = {"n": report.get("n"), "seconds": report.get("seconds"), "tasks": report.get("tasks")}
    if a.timings:
        summary["step_seconds"] = dict(kv.split("=") for kv in a.timings.split(","))
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(table(summary))
    return 0


def table(summary: dict) -> str:
    t = summary.get("train", {})
    d = summary.get("data", {})
    lines = ["| qwenvl-nano, one call | value |", "|---|---|",
             f"| stage | {summary.get('stage', '?')} from {summary.get('init', '?')}: trained "
             f"{'+'.join(summary.get('trained', [])) or '?'}, MRoPE temporal ids {summary.get('mrope_temporal', '?')} |",
             f"| data | {d.get('records', '?')} records ({sum(d.get('unique', {}).values())} unique), "
             f"~{d.get('est_tokens', 0) / 1e6:.1f} M tokens, {d.get('generation_s', '?')} s on {d.get('workers', '?')} processes |",
             f"| training | {t.get('steps', '?')} steps, {t.get('tokens', 0) / 1e6:.1f} M tokens in {t.get('elapsed_s', '?')} s |",
             f"| tokens/s | median {t.get('median_tokens_per_s', '?')}, mean {t.get('mean_tokens_per_s', '?')} "
             f"(median data wait {t.get('median_data_wait_s', '?')} s/step) |",
             f"| loss | {t.get('first_loss', '?')} -> {t.get('final_loss', '?')} (mean of the last 20 steps) |",
             f"| model | {summary.get('model_from', '?')}: {summary.get('model_bytes', 0) / 1e6:.1f} MB bf16 |"]
    ev = summary.get("eval")
    if ev:
        lines += ["", f"| task (eval n={ev.get('n')}, {ev.get('seconds')} s) | metric | score (%) |", "|---|---|---:|"]
        for task, res in (ev.get("tasks") or {}).items():
            for name, r in [(task, res)] + [(f"{task} ({g})", gr) for g, gr in (res.get("by_group") or {}).items()]:
                for m, v in r.items():
                    if m != "n" and isinstance(v, (int, float)):
                        lines.append(f"| {name} | {m} | {100 * v:.1f} |")
    if summary.get("step_seconds"):
        lines += ["", "step seconds: " + ", ".join(f"{k} {v}" for k, v in summary["step_seconds"].items())]
    return "\n".join(lines)


def _eval_rows(summary: dict) -> dict[tuple[str, str], float]:
    rows = {}
    for task, res in ((summary.get("eval") or {}).get("tasks") or {}).items():
        for name, r in [(task, res)] + [(f"{task} ({g})", gr) for g, gr in (res.get("by_group") or {}).items()]:
            for m, v in r.items():
                if m != "n" and isinstance(v, (int, float)):
                    rows[(name, m)] = v
    return rows


def cmd_compare(a) -> int:
    """Eval scores (%) of several runs' summary.json side by side; a run that lacks a row shows '-'."""
    runs = [json.load(open(p)) for p in a.summaries]
    tables = [_eval_rows(r) for r in runs]
    keys = list(dict.fromkeys(k for t in tables for k in t))
    head = [r.get("arm") or f"{r.get('stage', '?')}/{r.get('mrope_temporal', '?')} "
            f"({os.path.basename(os.path.dirname(os.path.abspath(p))) or p})"
            for r, p in zip(runs, a.summaries)]
    lines = ["| task | metric | " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(runs)]
    for key in ("steps", "tokens", "median_tokens_per_s", "final_loss"):  # the training side, not in %
        lines.append(f"| (training) | {key} | " + " | ".join(str(r.get("train", {}).get(key, "-")) for r in runs) + " |")
    for task, m in keys:
        cells = [f"{100 * t[(task, m)]:.1f}" if (task, m) in t else "-" for t in tables]
        lines.append(f"| {task} | {m} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", required=True)
    d.add_argument("--workers", type=int, default=14)
    d.add_argument("--seconds", type=float, default=75)
    d.add_argument("--round-tokens", type=int, default=100_000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--suite-n", type=int, default=0, help="also generate the eval suite (n per task)")
    d.add_argument("--suite-root", default=None)
    d.add_argument("--suite-extra", default="", help="opt-in suite tasks to generate too (comma-separated)")
    d.add_argument("--stage", type=int, default=2, choices=sorted(MIXES), help="whose data mix (docs/NANO.md §4)")
    d.add_argument("--mix", default="", choices=["", *NAMED_MIXES], help="a named mix instead of the stage's")
    d.add_argument("--video-fps", default="2", choices=["2", "dynamic"],
                   help="clips sampled at 2 fps, or at 1, 2 or 4 fps in turn (dynamic FPS, NANO.md §4)")
    d.add_argument("--noise", type=float, default=0.0,
                   help="give this fraction of the records a flawed answer (cut off, looping, broken box; meta.noise)")
    k = sub.add_parser("package")
    k.add_argument("--run", required=True)
    k.add_argument("--eval", required=True)
    k.add_argument("--data", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--timings", default="", help="step=seconds,... for the summary")
    k.add_argument("--stage", default="2", help="0, 1, 2, 3, sft or dpo")
    k.add_argument("--init", default="", help="the model the run started from (empty: random weights)")
    k.add_argument("--arm", default="", help="'NAME: extra train args' of a NANO_ARMS arm (recorded in the summary)")
    c = sub.add_parser("compare")
    c.add_argument("summaries", nargs="+")
    a = p.parse_args(argv)
    return {"data": cmd_data, "package": cmd_package, "compare": cmd_compare}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
