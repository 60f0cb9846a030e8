"""bench/train_nano.sh (the one-call nano recipe, docs/NANO.md §6) as a CPU dry run: NANO_SMOKE=1 runs the same
steps (data, train on a wall budget, eval, package) with tiny budgets; the outputs fit the device's return limits.
The smoke run trains with the ablation's frame-index MRoPE ids (NANO_MROPE_TEMPORAL=frame) and evaluates the
unseen-fps clips too; NANO_DRY_RUN=1 checks what NANO_STAGE=1 and the defaults would run, in a second."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_nano_script_smoke(tmp_path):
    pytest.importorskip("qwenvl.nano")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "NANO_SMOKE": "1", "OUT": str(out), "NANO_WORK": str(work), "PYTHON": sys.executable,
           "QWENVL_SYNTH_VIDEO": "frames", "NANO_MROPE_TEMPORAL": "frame"}  # as on the device (no PyAV)
    r = subprocess.run(["bash", "bench/train_nano.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("data", "train", "eval", "package"):
        assert f"{name}: rc=0" in r.stdout, r.stdout + (out / "steps.log").read_text()
    from qwenvl.synth.common import font_names  # the fonts the data was drawn in, said up front (one: a warning)
    assert "synth fonts: " + " ".join(font_names()) in r.stdout
    assert ("only Pillow's built-in font" in r.stderr) == (font_names() == ["pil-default"])
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 8 and all(os.path.getsize(f) <= 15_000_000 for f in files)
    assert all(os.path.relpath(f, out).count(os.sep) <= 1 for f in files)  # $OUT/a/file at most
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_from"] == "final" and summary["train"]["steps"] >= 1
    assert summary["data"]["unique"]["video_grounding"] >= 1 and summary["eval"]["tasks"]
    assert summary["stage"] == 2 and summary["trained"] == ["vit", "merger", "llm"] and summary["init"] == "random"
    assert summary["mrope_temporal"] == "frame"
    tasks = json.loads((out / "eval_report.json").read_text())["tasks"]
    assert {"grounding", "chart", "video_grounding_unseen_fps", "dense_caption_unseen_fps"} <= set(tasks)
    assert set(tasks["video_grounding_unseen_fps"]["by_group"]) == {"3 fps"}
    assert "| video_grounding_unseen_fps (3 fps) | mIoU |" in r.stdout
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in (out / "model").glob("*.safetensors"):
        (model_dir / f.name).write_bytes(f.read_bytes())
    with tarfile.open(out / "model" / "model_files.tar") as tar:
        tar.extractall(model_dir)
    assert {"config.json", "tokenizer.json", "vocab_map.json", "preprocessor_config.json"} <= set(os.listdir(model_dir))
    from qwenvl.model import Qwen25VL
    from qwenvl.processor import Processor

    m = Qwen25VL.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert m.config.text.vocab_size == 8192 and json.loads((model_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert m.config.mrope_temporal == "frame" == json.loads((model_dir / "config.json").read_text())["mrope_temporal"]
    assert Processor.from_pretrained(model_dir).max_pixels == 448 * 448
    import qwenvl

    out = qwenvl.LLM(str(model_dir), device="cpu").chat([[{"role": "user", "content": "hi"}]],
                                                        qwenvl.SamplingParams(max_tokens=2, temperature=0.0))
    assert len(out[0].token_ids) <= 2 and all(0 <= t < 8192 for t in out[0].token_ids)


@pytest.mark.slow
def test_package_falls_back_to_the_newest_checkpoint(tmp_path):
    """Training killed before its export: the package step exports the newest checkpoint instead."""
    from qwenvl.train import TrainConfig, train

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    run = tmp_path / "run"
    train(TrainConfig(model="tiny", train_files=[str(data)], output_dir=str(run), max_steps=2, save_every=1,
                      export=False, pack_length=64))
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import nano_recipe

    assert nano_recipe.main(["package", "--run", str(run), "--eval", str(tmp_path / "none"), "--data",
                             str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model_from"] == "step_00000002" and summary["train"]["steps"] == 2
    assert (tmp_path / "out" / "model" / "model_files.tar").exists()


def _dry_run(names=("data", "train", "eval", "package"), **env):
    r = subprocess.run(["bash", "bench/train_nano.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "NANO_DRY_RUN": "1", "OUT": "/nonexistent/out", **env})
    assert r.returncode == 0, r.stdout + r.stderr
    steps = {}
    for line in r.stdout.splitlines():
        name, _, cmd = line.partition(" (limit ")
        steps[name] = cmd.split(": ", 1)[1].split()
    assert list(steps) == list(names) and not os.path.exists("/nonexistent/out")
    return steps, r.stderr


def _train_config(cmd):
    from qwenvl.train import TrainConfig

    overrides = [shlex.split(a)[0] for a in cmd[cmd.index("qwenvl.train.cli") + 1:]]  # undo printf %q
    return TrainConfig.load(None, overrides)


def test_dry_run_stage_and_ablation_switches():
    """NANO_STAGE=1: the stage-1 mix, LLM frozen (TrainConfig.freeze_llm); NANO_MROPE_TEMPORAL=frame reaches the
    trainer; the unseen-fps tasks are generated with the suite and evaluated; the defaults pass neither."""
    train_config = _train_config
    steps, err = _dry_run(NANO_STAGE="1", NANO_MROPE_TEMPORAL="frame")
    assert "frozen RANDOM LLM" in err  # stage 1 without NANO_INIT
    cfg = train_config(steps["train"])
    assert cfg.freeze_llm and not cfg.freeze_vit and not cfg.freeze_merger and cfg.mrope_temporal == "frame"
    assert steps["data"][steps["data"].index("--stage") + 1] == "1"
    assert "--add-tasks" in steps["eval"] and steps["package"][-4:] == ["--stage", "1", "--init", "''"]
    steps, err = _dry_run(NANO_INIT="/some/model", NANO_EVAL_UNSEEN_FPS="0")
    cfg = train_config(steps["train"])
    assert not err and cfg.model == "/some/model" and not cfg.freeze_llm and cfg.mrope_temporal is None
    assert steps["data"][steps["data"].index("--stage") + 1] == "2"
    assert steps["eval"][steps["eval"].index("--add-tasks") + 1] == "ocr_single_line"  # the unseen-fps clips left out
    r = subprocess.run(["bash", "bench/train_nano.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "NANO_DRY_RUN": "1", "NANO_MROPE_TEMPORAL": "index"})
    assert r.returncode == 2 and "NANO_MROPE_TEMPORAL" in r.stderr


def test_dry_run_without_eval_gives_training_the_eval_reserve():
    """NANO_EVAL_N=0: no suite in the data step, no eval step, and training may run until 45 s before the end
    instead of the eval's limit + 45 s (the model is evaluated elsewhere, e.g. on the CPU)."""
    budget = dict(NANO_TOTAL_SECONDS="545", NANO_TRAIN_SECONDS="1000")
    steps, _ = _dry_run(**budget)
    assert _train_config(steps["train"]).max_train_seconds == 545 - (115 + 45)
    steps, err = _dry_run(["data", "train", "package"], NANO_EVAL_N="0", **budget)
    assert not err and _train_config(steps["train"]).max_train_seconds == 545 - 45
    data = [shlex.split(w)[0] for w in steps["data"]]
    assert data[data.index("--suite-n") + 1] == "0" and data[data.index("--suite-extra") + 1] == ""


def test_dry_run_video_mix_for_the_ablation():
    """NANO_MIX=video: clips only in the data step, the eval narrowed to the video tasks and their unseen-fps
    variants, per-arm inits through NANO_ARMS (an arm's model= comes after the common one, and the last wins)."""
    names = ["data", "train_A", "train_F", "eval_A", "eval_F", "package_A", "package_F"]
    steps, err = _dry_run(names, NANO_MIX="video", NANO_INIT="/init", NANO_ARMS="A:model=/a;F:model=/f")
    assert steps["data"][steps["data"].index("--mix") + 1] == "video"
    ev = [shlex.split(w)[0] for w in steps["eval_A"]]  # undo printf %q
    assert ev[:3] == ["env", "QWENVL_COMPILE_OPS=0", "QWENVL_COMPILE_VIT=0"]  # no inductor compile for a short eval
    assert ev[ev.index("--tasks") + 1] == "video_grounding,dense_caption"
    assert ev[ev.index("--add-tasks") + 1] == "video_grounding_unseen_fps,dense_caption_unseen_fps"
    assert _train_config(steps["train_A"]).model == "/a" and _train_config(steps["train_F"]).model == "/f"
    assert steps["package_F"][steps["package_F"].index("--init") + 1] == "/f"  # the summary names the arm's init
    assert "--mix" not in _dry_run()[0]["data"]
    data = _dry_run(NANO_VIDEO_FPS="dynamic")[0]["data"]
    assert data[data.index("--video-fps") + 1] == "dynamic"
    assert _dry_run()[0]["data"][data.index("--video-fps") + 1] == "2"
    for bad in ({"NANO_MIX": "clips"}, {"NANO_MIX": "video", "NANO_STAGE": "1"}, {"NANO_VIDEO_FPS": "4"}):
        r = subprocess.run(["bash", "bench/train_nano.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "NANO_DRY_RUN": "1", **bad})
        assert r.returncode == 2 and next(iter(bad)) in r.stderr, r.stderr


def test_stage_mixes_and_compare(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import nano_recipe

    assert set(nano_recipe.round_counts(100_000, 1)) == {"caption", "ocr", "spotting", "grounding", "chart"}
    assert nano_recipe.round_counts(100_000) == nano_recipe.round_counts(100_000, 2)
    video = nano_recipe.round_counts(100_000, 2, "video")  # ~50 k tokens of each clip task per round
    assert set(video) == {"video_grounding", "dense_caption"}
    assert all(abs(n * nano_recipe.TOKENS[t] - 50_000) < nano_recipe.TOKENS[t] for t, n in video.items())
    assert abs(sum(nano_recipe.MIX_STAGE1.values()) - 1) < 1e-9 and abs(sum(nano_recipe.MIX.values()) - 1) < 1e-9
    # dynamic FPS: the clip tasks of any mix become their 1/2/4 fps variants, the rest of the mix unchanged
    for stage, mix in ((2, ""), (2, "video"), (3, "")):
        fixed, dyn = (nano_recipe.round_counts(100_000, stage, mix, fps) for fps in ("2", "dynamic"))
        renamed = {nano_recipe.DYNAMIC_FPS_TASKS.get(t, t) for t in fixed}
        assert set(dyn) == renamed and renamed != set(fixed) and set(dyn) <= set(nano_recipe.TOKENS)
        assert all(dyn[t] == n for t, n in fixed.items() if t in dyn)
    with pytest.raises(ValueError, match="video_fps"):
        nano_recipe.round_counts(100_000, 2, "", "4")
    paths = []
    for name, mode, v in (("abs", "absolute", 0.5), ("frame", "frame", 0.25)):
        (tmp_path / name).mkdir()
        paths.append(str(tmp_path / name / "summary.json"))
        task = {"n": 2, "mIoU": v, "R@0.5": v, "by_group": {"1 fps": {"n": 1, "mIoU": v, "R@0.5": 0.0}}}
        json.dump({"stage": 2, "mrope_temporal": mode, "eval": {"tasks": {"video_grounding_unseen_fps": task}}},
                  open(paths[-1], "w"))
    assert nano_recipe.main(["compare", *paths]) == 0
    out = capsys.readouterr().out
    assert "| 2/absolute (abs) | 2/frame (frame) |" in out
    assert "| video_grounding_unseen_fps (1 fps) | mIoU | 50.0 | 25.0 |" in out


def test_dry_run_arms():
    """NANO_ARMS: one data step, then per arm a training with its own extra keys and output folder and half the data
    workers, an eval with a small KV cache of its own (several evals share the GPU), a package into $OUT/NAME;
    a bad arm name stops the script before any work."""
    names = ["data", "train_base", "train_t100", "eval_base", "eval_t100", "package_base", "package_t100"]
    steps, _ = _dry_run(names, NANO_ARMS="base:;t100:rope_theta=100 lr=5e-4", NANO_DATA_WORKERS="10")
    base, t100 = _train_config(steps["train_base"]), _train_config(steps["train_t100"])
    assert base.rope_theta is None and t100.rope_theta == 100 and t100.lr == 5e-4 and base.lr == 1e-3
    assert base.data_workers == t100.data_workers == 5 and base.output_dir != t100.output_dir
    assert t100.output_dir.endswith("run_t100")
    for arm in ("base", "t100"):
        ev = steps[f"eval_{arm}"]
        assert ev[ev.index("--kv-cache-mb") + 1] == "4096" and ev[ev.index("--model") + 1].endswith(f"run_{arm}/final")
        assert steps[f"package_{arm}"][steps[f"package_{arm}"].index("--out") + 1] == f"/nonexistent/out/{arm}"
    one, _ = _dry_run()
    assert "--kv-cache-mb" not in one["eval"]  # one training: the engine sizes its cache from free memory
    r = subprocess.run(["bash", "bench/train_nano.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "NANO_DRY_RUN": "1", "NANO_ARMS": "ok:;bad/name:x"})
    assert r.returncode == 2 and "bad arm name 'bad/name'" in r.stderr and not r.stdout


@pytest.mark.slow
def test_train_nano_script_arms_smoke(tmp_path):
    """Two arms trained at once on the CPU: each arm's model (its rope_theta in config.json) and a tar of its other
    files come back within the device's 8 files; the stdout compares the arms' evals."""
    pytest.importorskip("qwenvl.nano")
    out = tmp_path / "out"
    env = {**os.environ, "NANO_SMOKE": "1", "OUT": str(out), "NANO_WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable, "QWENVL_SYNTH_VIDEO": "frames", "NANO_ARMS": "a:;b:rope_theta=100"}
    r = subprocess.run(["bash", "bench/train_nano.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("data", "train_a", "train_b", "eval_a", "eval_b", "package_a", "package_b"):
        assert f"{name}: rc=0" in r.stdout, r.stdout + (out / "steps.log").read_text()
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 8 and all(f.count(os.sep) <= 2 for f in files)
    assert "| task | metric | a: | b: rope_theta=100 |" in r.stdout
    for arm, theta in (("a", 1e6), ("b", 100.0)):
        with tarfile.open(out / arm / f"{arm}.tar") as tar:
            names = set(tar.getnames())
            assert {"./summary.json", "./eval_report.json", "./train.log", "./model/model_files.tar"} <= names
            summary = json.load(tar.extractfile("./summary.json"))
            with tarfile.open(fileobj=tar.extractfile("./model/model_files.tar")) as inner:
                config = json.load(inner.extractfile("config.json"))
        assert summary["arm"] == f"{arm}:{' rope_theta=100' if arm == 'b' else ''}" and summary["train"]["steps"] >= 1
        assert config["rope_theta"] == theta and len(list((out / arm / "model").glob("*.safetensors"))) == 2


def test_dry_run_dpo_stage():
    """NANO_STAGE=dpo: pairs made from the data step's train.jsonl, DPO loss from NANO_INIT with ViT and merger frozen,
    lr 1e-5 unless NANO_LR; without NANO_INIT it stops before any work."""
    steps, _ = _dry_run(["data", "pairs", "train", "eval", "package"], NANO_STAGE="dpo", NANO_INIT="/some/model")
    cfg = _train_config(steps["train"])
    assert cfg.stage == "dpo" and cfg.model == "/some/model" and cfg.freeze_vit and cfg.freeze_merger
    assert not cfg.freeze_llm and cfg.lr == 1e-5 and cfg.dpo_beta == 0.1
    assert cfg.train_files[0].endswith("pairs.jsonl") and steps["pairs"][steps["pairs"].index("--out") + 1] == cfg.train_files[0]
    assert steps["data"][steps["data"].index("--stage") + 1] == "2"
    assert steps["package"][steps["package"].index("--stage") + 1] == "dpo"
    r = subprocess.run(["bash", "bench/train_nano.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "NANO_DRY_RUN": "1", "NANO_STAGE": "dpo"})
    assert r.returncode == 2 and "needs NANO_INIT" in r.stderr and not r.stdout


def test_dry_run_sft_stage():
    """NANO_STAGE=sft: the stage-2 mix through `qwenvl data filter`, `tag` and `score` (NANO_INIT's
    log-likelihood, the least likely 5 % per domain dropped), trained from NANO_INIT with the ViT frozen (LLM and
    merger train), lr 2e-4 unless NANO_LR, the SFT loss; without NANO_INIT it stops before any work."""
    names = ["data", "filter", "tag", "score", "train", "eval", "package"]
    steps, _ = _dry_run(names, NANO_STAGE="sft", NANO_INIT="/some/model")
    flt, tag, score = steps["filter"], steps["tag"], steps["score"]
    assert flt[flt.index("qwenvl.data.cli") + 1] == "filter" and flt[flt.index("qwenvl.data.cli") + 2].endswith(
        "data/train.jsonl")
    assert score[score.index("qwenvl.data.cli") + 1] == "score"
    assert tag[tag.index("qwenvl.data.cli") + 2] == flt[flt.index("--out") + 1]
    assert score[score.index("qwenvl.data.cli") + 2] == tag[tag.index("--out") + 1]
    assert score[score.index("--model") + 1] == "/some/model" and score[score.index("--drop-fraction") + 1] == "0.05"
    assert score[score.index("--max-records") + 1] == "4000"
    cfg = _train_config(steps["train"])
    assert cfg.stage == "sft" and cfg.model == "/some/model" and cfg.freeze_vit and not cfg.freeze_merger
    assert not cfg.freeze_llm and cfg.lr == 2e-4 and cfg.train_files == [score[score.index("--out") + 1]]
    assert steps["data"][steps["data"].index("--stage") + 1] == "2"
    assert steps["package"][steps["package"].index("--stage") + 1] == "sft"
    assert _train_config(_dry_run(names, NANO_STAGE="sft", NANO_INIT="/m", NANO_LR="1e-4")[0]["train"]).lr == 1e-4
    r = subprocess.run(["bash", "bench/train_nano.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "NANO_DRY_RUN": "1", "NANO_STAGE": "sft"})
    assert r.returncode == 2 and "needs NANO_INIT" in r.stderr and not r.stdout


def test_train_nano_script_sft_smoke(tmp_path):
    """NANO_STAGE=sft end to end on the CPU from the committed nano model: every curation step runs (filter, tag,
    score on the first records), the summary says what each removed, and only the merger and LLM trained."""
    init = os.path.join(ROOT, "runs", "nano", "latest")
    assert os.path.isfile(os.path.join(init, "config.json")), "the committed nano model (runs/nano/latest)"
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "NANO_SMOKE": "1", "OUT": str(out), "NANO_WORK": str(work), "PYTHON": sys.executable,
           "QWENVL_SYNTH_VIDEO": "frames", "NANO_STAGE": "sft", "NANO_INIT": init}
    r = subprocess.run(["bash", "bench/train_nano.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("data", "filter", "tag", "score", "train", "eval", "package"):
        assert f"{name}: rc=0" in r.stdout, r.stdout + (out / "steps.log").read_text()
    s = json.loads((out / "summary.json").read_text())
    assert s["stage"] == "sft" and s["trained"] == ["merger", "llm"] and s["init"] == init
    assert s["filter"]["records"] == s["data"]["records"] and s["tag"]["records"] == s["filter"]["kept"]
    assert s["score"]["records"] == s["tag"]["kept"] and s["score"]["scores"]["scored"] == 40
    assert s["train"]["steps"] >= 1


def test_dry_run_text_stage_0():
    """NANO_STAGE=0: text-only data (the stage-0 mix: synth.text), the LLM trains with the ViT and merger frozen, a
    short generation step, and an eval narrowed to two tasks without the unseen-fps ones."""
    steps, _ = _dry_run(NANO_STAGE="0")
    cfg = _train_config(steps["train"])
    assert cfg.freeze_vit and cfg.freeze_merger and not cfg.freeze_llm and cfg.model == "nano"
    data = steps["data"]
    assert data[data.index("--stage") + 1] == "0" and data[data.index("--seconds") + 1] == "6"
    ev = [shlex.split(w)[0] for w in steps["eval"]]
    assert ev[ev.index("--tasks") + 1] == "grounding,video_grounding" and "--add-tasks" not in ev
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import nano_recipe

    assert nano_recipe.round_counts(100_000, 0) == {"text": round(100_000 / nano_recipe.TOKENS["text"])}


def test_named_mixes_reach_the_data_step_and_sum_to_one():
    """NANO_MIX=spatial / reading / glyphs: the data step gets the named mix; each named mix is a distribution over tasks the
    generators know, and `reading` gives the text-reading tasks (OCR, spotting, KIE, GUI) 65 % of the tokens."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import nano_recipe

    from qwenvl import synth

    for name in ("spatial", "reading", "glyphs", "glyphs_fonts"):
        steps = _dry_run(NANO_MIX=name, NANO_INIT="/init")[0]
        assert steps["data"][steps["data"].index("--mix") + 1] == name
        # the glyph curriculum's held-out strings are evaluated with its mix only
        added = shlex.split(steps["eval"][steps["eval"].index("--add-tasks") + 1])[0].split(",")  # undo printf %q
        assert ("glyphs" in added) == name.startswith("glyphs") and "ocr_single_line" in added
    for name, mix in nano_recipe.NAMED_MIXES.items():
        assert abs(sum(mix.values()) - 1) < 1e-9 and set(mix) <= set(nano_recipe.TOKENS), name
        assert all(synth.generator(t) for t in mix)
    reading = nano_recipe.NAMED_MIXES["reading"]
    assert abs(sum(reading[t] for t in ("ocr", "spotting", "kie", "gui")) - 0.65) < 1e-9
    # glyphs: the random-string curriculum a quarter of the tokens; one round of it makes every task of the mix
    assert nano_recipe.NAMED_MIXES["glyphs"]["glyphs"] == 0.25
    assert set(nano_recipe.round_counts(100_000, 2, "glyphs")) == set(nano_recipe.NAMED_MIXES["glyphs"])


def test_nano_diagnose_groups_ocr_scores_by_font_size_and_font(tmp_path):
    """bench/nano_diagnose.py ocr: an eval's OCR char accuracy averaged per size band and per font (scores made up
    here: 1.0 for fonts of 16 px and more, 0.0 below), from the font and size each prediction carries, or for older
    predictions from the suite's records of the same id, which must be the same samples (the same reference)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import nano_diagnose
    from qwenvl.evaluate.cli import suite_data
    from qwenvl.evaluate.harness import load_samples
    from qwenvl.evaluate.scoring import reference_text

    recs = [r for r, _ in load_samples(suite_data("nano", 4)) if r["task"] == "ocr"]

    def predictions(name, carry_meta, reference=reference_text):
        path = tmp_path / name
        path.write_text("".join(json.dumps({
            "id": r["id"], "task": "ocr", "reference": reference(r), "scores": {
                "char_acc": float(r["meta"]["font_size"] >= 16)},
            **({"font": r["meta"]["font"], "font_size": r["meta"]["font_size"]} if carry_meta else {})}) + "\n"
            for r in recs))
        return str(path)

    for carry_meta in (False, True):
        got = nano_diagnose.ocr(predictions(f"p{carry_meta}.jsonl", carry_meta), 4,
                                data=None if not carry_meta else str(tmp_path / "nowhere"))
        bands = {k: v for k, v in got.items() if k.endswith(" px")}
        assert sum(v["n"] for v in bands.values()) == len(recs)
        assert bands.get("12-15 px", {"char_acc": 0.0})["char_acc"] == 0.0
        assert all(v["char_acc"] == 1.0 for k, v in bands.items() if k != "12-15 px")
        fonts = {k: v for k, v in got.items() if k not in bands}
        assert sum(v["n"] for v in fonts.values()) == len(recs)
    # the same ids answering other text (data drawn with other fonts): refused, not mislabelled
    with pytest.raises(SystemExit, match="other samples"):
        nano_diagnose.ocr(predictions("other.jsonl", False, lambda r: "x" + reference_text(r)), 4)


def test_reading_probe_images_hold_their_answer():
    """bench/nano_probe.py char / word (the OCR probes of NANO.md §7): the answer is one glyph of GLYPHS, or four
    upper-case letters, drawn whole inside the canvas (as much ink as the text drawn alone on a large canvas),
    deterministic."""
    import random

    import numpy as np
    from PIL import Image, ImageDraw

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import nano_probe
    from qwenvl.synth.common import font

    def ink_alone(text, font_size):
        big = Image.new("RGB", (400, 200), (225, 225, 225))
        ImageDraw.Draw(big).text((100, 50), text, font=font("dejavu-sans", font_size), fill=(10, 10, 10))
        return int((np.asarray(big.convert("L")) < 128).sum())

    for task, size in (("char", 112), ("word", 224)):
        for font_size in (14, 24):
            rng, again = random.Random(1), random.Random(1)
            for _ in range(20):
                im, text = nano_probe.make_sample(task, rng, size, font_size)
                im2, text2 = nano_probe.make_sample(task, again, size, font_size)
                assert text == text2 and np.array_equal(np.asarray(im), np.asarray(im2))
                if task == "char":
                    assert len(text) == 1 and text in nano_probe.GLYPHS and im.size == (size, size)
                else:
                    assert len(text) == 4 and text.isalpha() and text.isupper() and im.size == (size, size // 2)
                ink = int((np.asarray(im.convert("L")) < 128).sum())
                assert ink > 0 and ink == ink_alone(text, font_size), (text, font_size)


def test_flash_probe_clip_is_the_same_seconds_at_every_rate():
    """bench/nano_probe.py flash --eval-fps (the CPU temporal-id ablation, NANO.md §4): a held-out clip rendered at
    1, 2 or 4 fps is red for the same seconds [a, b) and keeps its answer; only the number of frames changes."""
    import random

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import nano_probe

    rng = random.Random(3)
    for _ in range(10):
        seconds, a, b = clip = nano_probe.draw_clip(rng)
        assert 4 <= seconds <= 12 and 0 <= a < b <= seconds
        for fps in (1, 2, 4):
            frames, answer = nano_probe.render_clip(clip, 16, fps)
            red = [i for i, f in enumerate(frames) if f.getpixel((0, 0)) == (220, 30, 30)]
            assert answer == f"{a} - {b}" and len(frames) == seconds * fps
            assert red == list(range(a * fps, b * fps))


def test_noise_gives_records_the_flaws_the_rule_filter_exists_for(tmp_path):
    """`nano_recipe.py data --noise F` (NANO_NOISE, the SFT curation check): F of the records get a cut-off, looping
    or broken-box answer, marked in meta.noise; qwenvl data filter (the independent rules) removes every looping and
    broken-box one, the cut-off JSON answers, and no clean record."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import nano_recipe

    from qwenvl import synth
    from qwenvl.data.filters import check

    recs = [synth.make_sample(task, i, str(tmp_path), "train", 3)
            for task in ("grounding", "point", "spotting", "kie", "count", "caption") for i in range(20)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    counts = nano_recipe.add_noise(str(path), 0.5, seed=1)
    out = [json.loads(line) for line in path.read_text().splitlines()]
    noisy = [r for r in out if (r.get("meta") or {}).get("noise")]
    assert len(out) == len(recs) and sum(counts.values()) == len(noisy) == len(recs) // 2
    assert all(counts[k] > 0 for k in nano_recipe.NOISE_KINDS)
    by_id = {r["id"]: r for r in recs}
    for r in out:
        kind = (r.get("meta") or {}).get("noise")
        answer, before = r["messages"][-1]["content"], by_id[r["id"]]["messages"][-1]["content"]
        reasons = check(r, str(tmp_path), max_pixels=448 * 448)
        if kind is None:
            assert answer == before and not reasons, (r["id"], reasons)
            continue
        assert answer != before
        if kind == "repetition":
            assert "repetition" in reasons
        elif kind == "boxes":
            assert "boxes" in reasons
        elif before.lstrip().startswith("```json") or before.lstrip().startswith("["):
            assert before.startswith(answer) and ({"truncated", "malformed"} & set(reasons)), (answer, reasons)
    # the same seed flaws the same records the same way
    path2 = tmp_path / "again.jsonl"
    path2.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert nano_recipe.add_noise(str(path2), 0.5, seed=1) == counts and path2.read_text() == path.read_text()


@pytest.mark.slow
def test_nano_ladder_chains_stages_and_brings_every_model_back(tmp_path):
    """bench/nano_ladder.sh (each stage's effect, NANO.md §6) on the CPU: stage 0 from random weights, then SFT from
    stage 0's model with 30 % flawed records and two arms (curated, raw via {data}); every model comes back as one
    archive within the device's return limits, unpacks with the tokenizer files and loads; the SFT summary says
    which injected flaws the rule filter removed."""
    out, keep = tmp_path / "out", tmp_path / "keep"
    env = {**os.environ, "NANO_SMOKE": "1", "OUT": str(out), "NANO_LADDER_KEEP": str(keep), "PYTHON": sys.executable,
           "QWENVL_SYNTH_VIDEO": "frames", "NANO_LADDER": "0:2:1 sft:2:1", "NANO_LADDER_ARM_KEYS": "pack_length=2048",
           "NANO_LADDER_ARMS_sft": "c:pack_length=2048;u:pack_length=2048 train_files=[{data}/train.jsonl]",
           "NANO_LADDER_ENV_sft": "NANO_NOISE=0.3", "NANO_LADDER_XZ_PRESET": "0",
           "NANO_LADDER_RETURN": "sft"}
    bad = subprocess.run(["bash", "bench/nano_ladder.sh"], cwd=ROOT, env={**env, "NANO_LADDER_RETURN": "sf"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "stage 'sf' is not in NANO_LADDER" in bad.stderr and not out.exists()
    r = subprocess.run(["bash", "bench/nano_ladder.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(os.listdir(out))
    assert files == ["ladder_logs.tar", "ssft.tar.xz", "ssft_u.tar.xz"], files  # stage 0 not asked back
    assert all(os.path.getsize(out / f) <= 16 * 2**20 for f in files)
    assert f"== stage sft from {keep}/s0" in r.stdout and (keep / "s0" / "config.json").exists()
    with tarfile.open(out / "ladder_logs.tar") as tar:
        names = tar.getnames()
        assert {"./s0.log", "./ssft.log", "./ssft/c/c.tar", "./ssft/u/u.tar"} <= set(names)
        arms = {}
        for arm in ("c", "u"):
            with tarfile.open(fileobj=tar.extractfile(f"./ssft/{arm}/{arm}.tar")) as inner:
                arms[arm] = json.load(inner.extractfile("./summary.json"))
    c, u = arms["c"], arms["u"]
    assert c["stage"] == u["stage"] == "sft" and c["init"] == u["init"] == f"{keep}/s0"
    injected = c["data"]["noise"]
    caught = c["filter"]["removed_by_noise_kind"]
    assert sum(injected.values()) > 0 and caught.get("clean", 0) == 0
    assert caught.get("repetition", 0) == injected["repetition"] and caught.get("boxes", 0) == injected["boxes"]
    assert "train_files=[{data}/train.jsonl]" in u["arm"]
    assert c["train"]["steps"] >= 1 and u["train"]["steps"] >= 1
    unpack = subprocess.run(["bash", os.path.join(ROOT, "bench", "nano_ladder.sh"), "unpack", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert unpack.returncode == 0, unpack.stdout + unpack.stderr
    from qwenvl.model import Qwen25VL

    for name in ("ssft", "ssft_u"):
        d = tmp_path / "runs" / "nano" / "ladder" / name
        assert {"tokenizer.json", "vocab_map.json", "config.json"} <= set(os.listdir(d))
        assert Qwen25VL.from_pretrained(d, dtype=torch.bfloat16).config.text.vocab_size == 8192


def test_nano_diagnose_flaws_counts_looping_and_cut_off_answers_per_task(tmp_path):
    """bench/nano_diagnose.py flaws: an eval's answers that the rule filter would call looping or cut off, per task."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import nano_diagnose

    preds = [("doc", "<html><body><p>ok</p>\n<p>a b</p>\n<p>a b</p>\n<p>a b</p>\n</body></html>"),  # a line 3x
             ("doc", "<html><body><h1>Title</h1></body></html>"),
             ("count", '```json\n[\n  {"bbox_2d": [1, 2, 30, 40], "label": "red'),  # stops mid-object
             ("count", "There are 2 red squares."),
             ("gui", "the the the the the the the the")]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"task": t, "prediction": p}) + "\n" for t, p in preds))
    r = nano_diagnose.flaws(str(path))
    assert r["by_task"]["doc"] == {"n": 2, "repetition": 1, "truncated": 0}
    assert r["by_task"]["count"] == {"n": 2, "repetition": 0, "truncated": 1}
    assert r["by_task"]["gui"]["repetition"] == 1 and r["all"]["n"] == 5


def test_nano_diagnose_video_finds_the_constant_answer_floor_and_malformed_answers(tmp_path):
    """bench/nano_diagnose.py video: the best constant answer's mIoU (from the model's own 2 fps answers, given to
    every clip) against hand-computed IoUs, the answer spread and the unparseable answers at unseen rates."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import nano_diagnose

    ans = "The given query happens in {} - {} seconds."
    refs = [(0, 2), (1, 3), (4, 6)]
    rows = [("video_grounding", ans.format(1, 3), refs[0], 1 / 3),  # IoU([1,3],[0,2]) = 1/3
            ("video_grounding", ans.format(1, 3), refs[1], 1.0),
            ("video_grounding", ans.format(4, 6), refs[2], 1.0),
            ("video_grounding_unseen_fps", ans.format(1, 3), refs[0], 1 / 3),
            ("video_grounding_unseen_fps", "The given query happens in 1.0000.50\", \"end", refs[1], 0.0),
            ("video_grounding_unseen_fps", ans.format(9, 12), refs[2], 0.0)]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"task": t, "prediction": p, "reference": ans.format(*r),
                                        "scores": {"mIoU": s, "R@0.5": float(s >= 0.5)}}) + "\n"
                            for t, p, r, s in rows))
    r = nano_diagnose.video(str(path))
    vg, un = r["video_grounding"], r["video_grounding_unseen_fps"]
    assert (vg["n"], vg["distinct"], vg["most_common"], vg["malformed"]) == (3, 2, 2, 0)
    assert vg["mIoU"] == round(100 * (1 / 3 + 1 + 1) / 3, 1)
    # "1 - 3" to every clip: IoUs 1/3, 1, 0; "4 - 6": 0, 0, 1: the first is the best constant
    assert vg["best_constant"] == ans.format(1, 3) and vg["best_constant_mIoU"] == round(100 * (4 / 3) / 3, 1)
    assert un["malformed"] == 1 and un["distinct"] == 3 and un["mIoU"] == round(100 / 9, 1)
    assert un["best_constant"] == ans.format(1, 3)  # candidates come from the 2 fps answers, not the unseen ones
