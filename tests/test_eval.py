"""Evaluation harness: perfect answers score 1.0, hand-corrupted answers score what we compute by hand, the
report/Markdown are written, and it runs end to end on the tiny random checkpoint."""
from __future__ import annotations

import copy
import json
import os

import pytest

from qwenvl import synth
from qwenvl.evaluate import TASK_METRICS, evaluate, load_samples, prompt_messages, reference_text, score, write_report
from qwenvl.evaluate.cli import main as eval_main


def rec(task, prompt, ref, meta=None, media=None):
    content = ([{"type": "image", "image": media}] if media else []) + [{"type": "text", "text": prompt}]
    return {"id": f"{task}-x", "task": task, "meta": meta or {},
            "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": ref}]}


def oracle(samples, answers=None):
    """A fake model: returns answers[i] (or the reference) for the conversation of sample i."""
    table = {}
    for i, (r, base) in enumerate(samples):
        key = json.dumps(prompt_messages(r, base), sort_keys=True)
        assert key not in table, "the fake model needs distinct prompts"
        table[key] = answers[i] if answers is not None else reference_text(r)

    def model_fn(convs, max_tokens):
        return [table[json.dumps(c, sort_keys=True)] for c in convs]
    return model_fn


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("heldout"))
    synth.generate(out, list(synth.TASKS) + list(synth.EVAL_TASKS) + list(synth.CURRICULUM_TASKS), 3, "heldout", 0)
    return out


def test_perfect_answers_score_one(heldout):
    samples = load_samples(heldout)
    report, rows = evaluate(samples, oracle(samples))
    assert set(report["tasks"]) == set(TASK_METRICS)  # caption is scored as general
    for task, res in report["tasks"].items():
        assert res["n"] == 3
        for m in TASK_METRICS[task]:
            assert res[m] == 1.0, (task, m)
    assert all(r["prediction"] == r["reference"] for r in rows)
    # a synthetic sample's font and size travel with its answer (breakdowns without regenerating the data)
    meta = {rec.get("id"): rec["meta"] for rec, _ in samples}
    ocr = [r for r in rows if r["task"] == "ocr"]
    assert ocr and all((r["font"], r["font_size"]) == (meta[r["id"]]["font"], meta[r["id"]]["font_size"]) for r in ocr)
    # the unseen-fps variants are reported apart, with a mean per sampling rate (samples 0, 2: 3 fps; 1: 6 fps)
    for task in [t for t in synth.EVAL_TASKS if t.endswith("_unseen_fps")]:
        groups = report["tasks"][task]["by_group"]
        assert {g: r["n"] for g, r in groups.items()} == {"3 fps": 2, "6 fps": 1}
        assert all(r[m] == 1.0 for r in groups.values() for m in TASK_METRICS[task])
    assert "by_group" not in report["tasks"]["video_grounding"]


def test_garbage_answers_score_zero(heldout):
    samples = load_samples(heldout, tasks=["point", "count", "ocr", "spotting", "doc", "kie", "chart",
                                           "video_grounding", "dense_caption", "gui"])
    report, _ = evaluate(samples, lambda convs, n: ["@@"] * len(convs))
    for task, res in report["tasks"].items():
        for m in TASK_METRICS[task]:
            assert res[m] == 0.0, (task, m)


BOX = '```json\n[{"bbox_2d": [%d, %d, %d, %d], "label": "red circle"}]\n```'
TOOL = '<tool_call>\n{"name": "computer_use", "arguments": %s}\n</tool_call>'
HTML = ('<html><body>\n<h1 data-bbox="10 10 200 40">Title here</h1>\n<p data-bbox="10 50 300 120">Some text.</p>\n'
        '<table data-bbox="10 130 300 200"><tr><td>a</td><td>1</td></tr></table>\n</body></html>')


def corrupted_cases():
    """(record, prediction, expected scores) computed by hand."""
    g = rec("grounding", "Locate the red circle", BOX % (10, 10, 30, 30))
    p = rec("point", "point to the red circle", '<points x1="20" y1="20" alt="c">c</points>', {"box": [10, 10, 30, 30]})
    kie_ref = '```json\n{"company": "ACME", "date": "01 Jan 2020", "address": "1 Main Street", "total": "$5.00"}\n```'
    ev = '[{"start_time": "00:02.00", "end_time": "00:06.00", "description": "a"}, ' \
         '{"start_time": "00:10.00", "end_time": "00:12.00", "description": "b"}]'
    spot_ref = '[{"bbox_2d": [0, 0, 10, 10], "text_content": "hello"}, {"bbox_2d": [0, 20, 10, 30], "text_content": "world"}]'
    gui = rec("gui", "Click OK", TOOL % '{"action": "left_click", "coordinate": [20, 20]}', {"box": [10, 10, 30, 30]})
    return [
        # IoU([12,10,32,30], [10,10,30,30]) = 360 / 440 = 0.82 -> hit; [20,10,40,30]: 200 / 600 = 0.33 -> miss
        (g, BOX % (12, 10, 32, 30), {"acc@0.5": 1.0}),
        (g, BOX % (20, 10, 40, 30), {"acc@0.5": 0.0}),
        (rec("grounding", "Locate the red star", "There is no red star in the image."), BOX % (1, 1, 5, 5), {"acc@0.5": 0.0}),
        (rec("grounding", "Locate the red star", "There is no red star in the image."), "None here.", {"acc@0.5": 1.0}),
        (p, '<points x1="29" y1="11" alt="c">c</points>', {"point_acc": 1.0}),
        (p, '{"point_2d": [31, 20]}', {"point_acc": 0.0}),
        (rec("count", "how many", "```json\n[]\n```\nThere are 4 red circles in the image."), "There are 3.", {"count_acc": 0.0}),
        (rec("count", "how many", "There are 4 red circles in the image."), "I count four.", {"count_acc": 1.0}),
        # one substitution in 11 characters
        (rec("ocr", "Read all the text in the image.", "hello world"), "hello wxrld", {"char_acc": 1 - 1 / 11}),
        # one of two lines right: P = R = 1/2 -> F1 1/2; "hello\nwurld" vs "hello\nworld": 1 edit in 11
        (rec("spotting", "Spotting", spot_ref), spot_ref.replace("world", "wurld"), {"f1": 0.5, "char_acc": 1 - 1 / 11}),
        # the table comes back as a paragraph: 2 of 3 elements match -> F1 2/3; texts equal -> ANLS 1
        (rec("doc", "QwenVL HTML", HTML), HTML.replace('<table data-bbox="10 130 300 200"><tr><td>a</td><td>1</td></tr></table>',
                                                       '<p data-bbox="10 130 300 200">a 1</p>'),
         {"element_f1": 2 / 3, "text_anls": 1.0}),
        (rec("kie", "Extract", kie_ref), kie_ref.replace("ACME", "ACNE"), {"field_acc": 0.75}),
        (rec("chart", "value?", "42"), "The value is 43.", {"relaxed_acc": 1.0}),  # 2.4 % off
        (rec("chart", "value?", "42"), "45", {"relaxed_acc": 0.0}),  # 7.1 % off
        (rec("chart", "highest?", "Mar"), "mar", {"relaxed_acc": 1.0}),
        # [4, 8] vs [2, 6]: overlap 2, union 6
        (rec("video_grounding", "when?", "The given query happens in 2.0 - 6.0 seconds."),
         "The given query happens in 4.0 - 8.0 seconds.", {"mIoU": 1 / 3, "R@0.5": 0.0}),
        # first event exact, second missing
        (rec("dense_caption", "events", ev), '[{"start_time": "00:02.00", "end_time": "00:06.00", "description": "a"}]',
         {"mIoU": 0.5, "R@0.5": 0.5}),
        (gui, TOOL % '{"action": "left_click", "coordinate": [28, 12]}', {"action_em": 1.0}),
        (gui, TOOL % '{"action": "left_click", "coordinate": [31, 12]}', {"action_em": 0.0}),
        (gui, TOOL % '{"action": "double_click", "coordinate": [20, 20]}', {"action_em": 0.0}),
        (rec("gui", "Type", TOOL % '{"action": "type", "text": "Hello"}'), TOOL % '{"action": "type", "text": "hello"}',
         {"action_em": 1.0}),
        (rec("gui", "Undo", TOOL % '{"action": "key", "keys": ["ctrl", "z"]}'), TOOL % '{"action": "key", "keys": ["ctrl", "y"]}',
         {"action_em": 0.0}),
        (rec("general", "What?", "blue car"), "blue cat", {"anls": 1 - 1 / 8, "exact": 0.0}),
    ]


@pytest.mark.parametrize("case", range(len(corrupted_cases())))
def test_corrupted_answer_scores(case):
    record, pred, want = corrupted_cases()[case]
    got = score(record["task"], pred, record)
    assert got == pytest.approx(want), (record["task"], pred, got)


def test_aggregate_and_report(tmp_path):
    cases = [copy.deepcopy(c) for c in corrupted_cases()]
    for i, (r, _, _) in enumerate(cases):  # distinct prompts for the fake model
        r["messages"][0]["content"][-1]["text"] += f" #{i}"
    samples = [(r, str(tmp_path)) for r, _, _ in cases]
    report, rows = evaluate(samples, oracle(samples, [p for _, p, _ in cases]), batch_size=2)
    assert report["n"] == len(cases)
    g = report["tasks"]["grounding"]
    assert g["n"] == 4 and g["acc@0.5"] == 0.5
    assert report["tasks"]["gui"]["action_em"] == pytest.approx(2 / 5)
    assert report["tasks"]["chart"]["relaxed_acc"] == pytest.approx(2 / 3)
    paths = write_report({**report, "model": "fake", "data": "cases"}, rows, str(tmp_path / "out"))
    md = open(paths["markdown"]).read()
    assert "| grounding | 4 | acc@0.5 | 50.0 |" in md and "| | | R@0.5 |" in md.replace("|  |  |", "| | |")
    assert json.load(open(paths["json"]))["tasks"]["kie"]["field_acc"] == 0.75
    assert len(open(paths["predictions"]).read().splitlines()) == len(cases)


def test_user_jsonl_without_task_is_tagged(tmp_path):
    """The harness reads any user JSONL (LLaVA format too); the task comes from the tagger."""
    data = tmp_path / "user.jsonl"
    recs = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nLocate the dog, output its bbox "
                                                  "coordinates using JSON format."},
                                                 {"from": "gpt", "value": BOX % (1, 2, 30, 40)}]},
            {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
            {"messages": "not a conversation"}]
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n")
    samples = load_samples(str(data))
    assert len(samples) == 2  # the unreadable record and line are skipped
    conv = prompt_messages(*samples[0])
    assert conv[0]["content"][0]["image"] == str(tmp_path / "a.png")  # media resolved against the JSONL's folder
    report, _ = evaluate(samples, oracle(samples))
    assert report["tasks"]["grounding"]["acc@0.5"] == 1.0 and report["tasks"]["general"]["exact"] == 1.0


@pytest.mark.parametrize("backend", ["generate", "auto"])
def test_end_to_end_tiny_random_checkpoint(heldout, tmp_path, backend, capsys):
    out = str(tmp_path / f"eval-{backend}")
    if backend == "generate":  # the user-data path
        tasks, source = "grounding,video_grounding", ["--data", heldout]
    else:  # the nano suite: its held-out set is generated on first use
        tasks, source = "ocr,gui", ["--suite", "nano", "--n", "2", "--suite-root", str(tmp_path / "suites")]
    rc = eval_main(source + ["--tasks", tasks, "--limit", "2", "--max-tokens", "4", "--out", out,
                             "--backend", backend, "--batch-size", "2"])
    assert rc == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["n"] == 4 and set(report["tasks"]) == set(tasks.split(","))
    assert report["suite"] == (None if backend == "generate" else "nano")
    assert report["backend"] == ("generate" if backend == "generate" else report["backend"])
    for res in report["tasks"].values():
        for r in [res, *res.get("by_group", {}).values()]:
            assert all(0.0 <= v <= 1.0 for k, v in r.items() if k not in ("n", "by_group"))
    assert "| task | n | metric | score |" in capsys.readouterr().out


def test_suite_opt_in_unseen_fps_tasks(tmp_path, capsys):
    """--add-tasks: the nano suite's default tasks stay as they are; the unseen-fps clips are generated into the same
    cached folder on request and reported apart, per sampling rate."""
    from qwenvl.evaluate.cli import SUITES

    assert "video_grounding_unseen_fps" not in SUITES["nano"]["tasks"]
    root, out = tmp_path / "suites", str(tmp_path / "eval")
    common = ["--suite", "nano", "--n", "1", "--suite-root", str(root), "--max-tokens", "2", "--backend", "generate",
              "--out", out]
    assert eval_main(common + ["--tasks", "video_grounding", "--add-tasks", "video_grounding_unseen_fps"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert set(report["tasks"]) == {"video_grounding", "video_grounding_unseen_fps"}
    assert set(report["tasks"]["video_grounding_unseen_fps"]["by_group"]) == {"3 fps"}
    assert "| video_grounding_unseen_fps (3 fps) | 1 | mIoU |" in capsys.readouterr().out
    (folder,) = root.iterdir()
    assert sorted(p.name for p in folder.glob(".complete*")) == [".complete", ".complete-video_grounding_unseen_fps"]
    with pytest.raises(SystemExit):
        eval_main(common + ["--add-tasks", "ocr"])  # not an opt-in task


def test_suite_seed_draws_another_held_out_sample(tmp_path):
    """--seed: a validation draw of the suite's held-out split (for choosing between models), in its own cached
    folder; the reported suite (seed 0) is untouched, and the draw is what synth.generate makes with that seed."""
    from qwenvl.evaluate.cli import suite_data

    root = str(tmp_path / "suites")
    a, b = suite_data("nano", 2, root), suite_data("nano", 2, root, seed=1)
    assert a != b and a.endswith("-s0-n2") and b.endswith("-s1-n2")
    count_a = [json.loads(x) for x in open(os.path.join(a, "count.jsonl"))]
    count_b = [json.loads(x) for x in open(os.path.join(b, "count.jsonl"))]
    assert [r["messages"] for r in count_a] != [r["messages"] for r in count_b]
    synth.generate(str(tmp_path / "direct"), ["count"], 2, "heldout", 1)
    direct = [json.loads(x) for x in open(tmp_path / "direct" / "count.jsonl")]
    assert [r["messages"] for r in direct] == [r["messages"] for r in count_b]
    with pytest.raises(SystemExit):  # records given by --data have no seed to draw with
        eval_main(["--data", os.path.join(b, "count.jsonl"), "--seed", "1", "--out", str(tmp_path / "e")])
