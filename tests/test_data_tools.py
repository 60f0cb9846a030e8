"""Curation tools: rule filters remove planted bad samples and keep good ones, tagging, model log-likelihood
scores, rejection sampling, media-path relocation and the `qwenvl data` CLI."""
from __future__ import annotations

import json
import os

import pytest
import torch

from qwenvl import synth
from qwenvl.data import filters, io, tagging
from qwenvl.data.cli import main as data_main
from qwenvl.data.likelihood import answer_logprob, filter_by_score, score_samples
from qwenvl.data.rejection import reject_sample
from qwenvl.evaluate import reference_text


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("good"))
    synth.generate(out, "all", 4, "train", 3)
    return out


def chat(answer, prompt="Question?", image=None, task=None):
    content = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": prompt}]
    r = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}
    return {**r, "task": task} if task else r


def planted(good_dir):
    """(record, the rules it must fail)."""
    img = next(json.loads(line) for line in open(os.path.join(good_dir, "grounding.jsonl")))
    image = img["messages"][0]["content"][0]["image"]
    rh, rw = img["meta"]["resized_hw"]
    box = '```json\n[{"bbox_2d": [%s], "label": "a"}]\n```'
    return [
        (chat("The cat is on the mat. " * 4), ["repetition"]),
        (chat("This is very very very very very very good."), ["repetition"]),
        (chat('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "a"}]\n```'),
         ["repetition"]),
        (chat('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6'), ["truncated"]),
        (chat('<html><body>\n<p data-bbox="1 2 3 4">abc</p>'), ["truncated"]),
        (chat('<tool_call>\n{"name": "computer_use", "arguments": {"action": "left_click"'), ["truncated"]),
        (chat("The image shows a red circle and"), ["truncated"]),
        (chat("```json\n{'a': }\n```"), ["malformed"]),
        (chat("<tool_call>\nclick the button\n</tool_call>"), ["malformed"]),
        (chat("It happens at some point.", task="video_grounding"), ["malformed"]),
        (chat(box % "30, 10, 20, 40", image=image), ["boxes"]),
        (chat(box % "-5, 0, 10, 10", image=image), ["boxes"]),
        (chat(box % f"10, 10, {rw + 30}, 50", image=image), ["boxes"]),
        (chat('{"point_2d": [1, 2, 3]}', image=image), ["boxes"]),
        (chat(""), ["empty"]),
        ({"messages": [{"role": "user", "content": "hi"}]}, ["empty"]),
    ]


def test_filters_remove_planted_and_keep_good(good):
    bad = planted(good)
    for rec, want in bad:
        assert filters.check(rec, good) == want, (reference_text(rec) if rec["messages"][-1]["role"] == "assistant"
                                                  else rec, want)
    extra_good = [chat("The answer is 42."), chat("Yes, the the cat sat."), chat('```json\n{"a": 1}\n```'),
                  chat(f'```json\n[{{"bbox_2d": [1, 2, 30, 40]}}]\n```', image="missing.png")]
    samples = io.read(good)
    records = [r for r, _ in samples] + extra_good + [r for r, _ in bad]
    kept, removed, report = filters.filter_records(records, good)
    assert report["records"] == len(records) and report["removed"] == len(bad)
    assert report["kept"] == len(samples) + len(extra_good)
    assert report["by_rule"] == {"empty": 2, "repetition": 3, "truncated": 4, "malformed": 3, "boxes": 4}
    assert all("removed_by" in r for r in removed)


def test_tagging(good):
    for rec, _ in io.read(good):
        assert tagging.task_for(rec) == {"caption": "general"}.get(rec["task"], rec["task"]), rec["task"]
    llava = {"image": "x.png", "conversations": [{"from": "human", "value": "<image>\nRead all the text in the image."},
                                                  {"from": "gpt", "value": "STOP"}]}
    assert tagging.tag(llava) == "ocr.text"
    assert tagging.tag(chat("def f():\n    return 1", "Write a python function")) == "text.coding"
    assert tagging.tag(chat("x = 3", "Solve 2x + 1 = 7")) == "text.math"
    assert tagging.tag({"text": "plain pretraining text"}) == "text.general"
    tagged, report = tagging.tag_records([llava, llava])
    assert report["counts"] == {"ocr.text": 2} and tagged[0]["domain"] == "ocr.text"


@pytest.fixture(scope="module")
def tiny():
    from qwenvl.hub import tiny_random_checkpoint
    from qwenvl.model import Qwen25VL
    from qwenvl.processor import Processor
    from qwenvl.train.data import ChatEncoder

    path = tiny_random_checkpoint()
    proc = Processor.from_pretrained(path)
    return path, Qwen25VL.from_pretrained(path, device="cpu").eval(), ChatEncoder.from_processor(proc), proc


def test_answer_logprob_matches_full_forward(good, tiny):
    _, model, enc, proc = tiny
    rec = next(r for r, _ in io.read(good) if r["task"] == "grounding")
    got = answer_logprob(model, enc, rec, good)
    sample = enc.encode(rec, good)
    with torch.no_grad():
        logits = model(torch.tensor([sample.input_ids]), pixel_values=sample.pixel_values,
                       image_grid_thw=torch.tensor(sample.image_grid_thw))[0].float()
    lp = logits.log_softmax(-1)
    want = [float(lp[i - 1, t]) for i, t in enumerate(sample.labels) if t != -100 and i > 0]
    assert got["n_tokens"] == len(want) == len(proc.tokenizer.encode(reference_text(rec) + "<|im_end|>"))
    assert got["logp_sum"] == pytest.approx(sum(want), rel=1e-4)


def test_score_filter(good, tiny):
    _, model, enc, _ = tiny
    samples = [s for s in io.read(good) if s[0]["task"] in ("ocr", "chart")]
    scored, info = score_samples(samples + [({"messages": "broken"}, good)], model, enc)
    assert info["scored"] == len(samples) and info["failed"] == 1
    kept, removed, rep = filter_by_score(scored, drop_fraction=0.5, by="task")
    assert rep["by_reason"] == {"no score": 1, "below min_logp": 0, "lowest fraction": 4}  # 2 of 4 per task
    worst_ocr = min((r for r, _ in scored if r.get("task") == "ocr"), key=lambda r: r["score"]["logp_mean"])
    assert any(r is worst_ocr for r, _ in removed)
    cut = sorted(r["score"]["logp_mean"] for r, _ in scored if "logp_mean" in r["score"])[3]
    kept, removed, rep = filter_by_score(scored, min_logp=cut, by=None)
    assert rep["by_reason"]["below min_logp"] == 3 and len(kept) == len(samples) - 3


def test_packed_scoring_equals_one_record_at_a_time(good, tiny):
    """score_samples packs records into rows (per-sample attention and positions, as training packs them): the same
    scores as one forward pass per record; past max_records the rest pass on unscored and filter_by_score keeps
    them."""
    _, model, enc, _ = tiny
    samples = [s for s in io.read(good) if s[0]["task"] in ("ocr", "chart", "grounding")]
    one = [answer_logprob(model, enc, r, b) for r, b in samples]
    for pack in (10**6, 400):  # everything in one row; rows of a few records
        scored, info = score_samples(samples, model, enc, pack_tokens=pack)
        assert info["scored"] == len(samples) and info["not_scored"] == 0
        for (r, _), want in zip(scored, one):
            assert r["score"]["n_tokens"] == want["n_tokens"]
            assert r["score"]["logp_sum"] == pytest.approx(want["logp_sum"], rel=1e-4, abs=1e-3)
    scored, info = score_samples(samples, model, enc, max_records=3)
    assert info["scored"] == 3 and info["not_scored"] == len(samples) - 3
    assert all("score" not in r for r, _ in scored[3:])
    kept, removed, rep = filter_by_score(scored, drop_fraction=0.5, by=None)
    assert rep["kept_not_scored"] == len(samples) - 3 and len(removed) == 1 and rep["by_reason"]["no score"] == 0


def test_rejection_sampling(good):
    samples = [s for s in io.read(good) if s[0]["task"] in ("ocr", "count")]
    ocr = [s for s in samples if s[0]["task"] == "ocr"]
    count = [s for s in samples if s[0]["task"] == "count"]

    def sampler(convs, k):
        out = []
        for conv in convs:
            rec = next(r for r, b in samples if conv[0]["content"][0]["image"].endswith(r["messages"][0]["content"][0]["image"]))
            ref = reference_text(rec)
            if rec["task"] == "ocr":  # wrong for the first half of the OCR records, right (second try) for the rest
                i = [r for r, _ in ocr].index(rec)
                out.append(["nonsense", "also wrong"] if i < 2 else ["nonsense", ref])
            else:  # the right count, but with a duplicated box: the repetition rule rejects it
                dup = '```json\n[{"bbox_2d": [1, 1, 9, 9]}, {"bbox_2d": [1, 1, 9, 9]}]\n```\n' + ref.split("```")[-1].strip()
                out.append([dup, dup])
        return out

    pairs = []
    accepted, rejected, rep = reject_sample(ocr + count, sampler, k=2, batch=3, pairs=pairs, pairs_per_record=2)
    assert rep["accepted_records"] == 2 and rep["rejected_records"] == 2 + len(count)
    assert rep["by_task"]["ocr"] == {"records": 4, "accepted": 2}
    assert all(reference_text(r) == reference_text(o) for (r, _), (o, _) in zip(accepted, ocr[2:]))
    assert rep["candidate_pass_rate"] == pytest.approx(2 / (2 * len(ocr + count)))
    # on-policy DPO pairs: every distinct failed answer (up to 2 per record) against the record's own answer; the
    # count records' duplicated-box answer counts as failed (a rule), once although it was sampled twice
    want = [(o, ["nonsense", "also wrong"] if i < 2 else ["nonsense"]) for i, o in enumerate(ocr)]
    want += [(c, None) for c in count]
    assert len(pairs) == 2 * 2 + 2 + len(count) and rep["pairs_by_task"] == {"count": len(count), "ocr": 6}
    got = iter(pairs)
    for (rec, base), failed in want:
        for bad in failed or [None]:
            pair, pbase = next(got)
            assert pbase == base and pair["chosen"] == reference_text(rec) and pair["corruption"] == "model"
            assert pair["messages"] == rec["messages"][:-1]  # the prompt without the answer
            if bad is not None:
                assert pair["rejected"] == bad and pair["rejected_score"] < 1.0
            else:
                assert pair["rejected"].startswith("```json") and pair["rejected_score"] == 1.0  # right count, bad rule
    first_only = []
    reject_sample(ocr, sampler, k=2, batch=3, pairs=first_only)
    assert [p["rejected"] for p, _ in first_only] == ["nonsense"] * len(ocr)


def test_relocate_keeps_media_valid(good, tmp_path):
    samples = io.read(good)
    out = tmp_path / "sub" / "copy.jsonl"
    io.write(str(out), samples[:5])
    for (orig, base), line in zip(samples, open(out)):
        rec = json.loads(line)
        src = [it for it in rec["messages"][-2]["content"] if it["type"] in ("image", "video")][0]
        old = [it for it in orig["messages"][-2]["content"] if it["type"] in ("image", "video")][0]
        path = src[src["type"]]
        assert not os.path.isabs(path) and os.path.samefile(out.parent / path, os.path.join(base, old[old["type"]]))
    llava = io.relocate({"images": ["a.png"], "conversations": []}, "/data/x", "/data/y")
    assert llava["images"] == ["../x/a.png"]


def test_cli_filter_tag_score_reject(good, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r, _ in planted(good)[:3]) + "\n")
    out = tmp_path / "o" / "kept.jsonl"
    assert data_main(["filter", good, str(bad), "--out", str(out), "--removed", str(tmp_path / "rm.jsonl"),
                      "--report", str(tmp_path / "rep.json")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["removed"] == 3 and rep["by_rule"]["repetition"] == 3 and rep == json.load(open(tmp_path / "rep.json"))
    assert data_main(["tag", str(out), "--out", str(tmp_path / "tagged.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["domains"]["grounding.box"] == 4
    two = tmp_path / "two.jsonl"
    two.write_text("".join(open(os.path.join(good, "chart.jsonl")).readlines()[:2]).replace('"media/', f'"{good}/media/'))
    assert data_main(["score", str(two), "--out", str(tmp_path / "scored.jsonl"), "--drop-fraction", "0.5",
                      "--by", ""]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kept"] == 1 and rep["by_reason"]["lowest fraction"] == 1
    scored = [json.loads(line) for line in open(tmp_path / "scored.jsonl")]
    assert len(scored) == 1 and "logp_mean" in scored[0]["score"]
    pairs_out = tmp_path / "dpo" / "pairs.jsonl"
    assert data_main(["reject", str(two), "--out", str(tmp_path / "rs.jsonl"), "--k", "2", "--max-tokens", "3",
                      "--backend", "generate", "--pairs", str(pairs_out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["records"] == 2 and rep["kept"] + rep["removed"] >= 2 and rep["backend"] == "generate"
    # the random model's 3-token answers fail both charts: one on-policy pair each, media paths valid from dpo/
    pairs = [json.loads(line) for line in open(pairs_out)]
    assert rep["pairs"] == len(pairs) == 2 and rep["pairs_by_task"] == {"chart": 2}
    for pair, line in zip(pairs, open(two)):
        rec = json.loads(line)
        assert pair["chosen"] == reference_text(rec) != pair["rejected"] and pair["corruption"] == "model"
        image = [it for it in pair["messages"][-1]["content"] if it["type"] == "image"][0]["image"]
        assert os.path.isfile(pairs_out.parent / image)


def test_preference_pairs_fail_the_metric_and_train(good, tmp_path, capsys):
    """`qwenvl data pairs`: chosen = the record's answer, rejected = a corrupted copy that fails the task; checked here
    with hand-computed quantities (box IoU, stated count, character differences), and the pairs encode for DPO."""
    import random
    import re

    from qwenvl.data.preference import replace_chars, shift_numbers
    from qwenvl.tasks import grounding as G
    from qwenvl.train.data import ChatEncoder

    rng = random.Random(0)
    text = 'box [12, 0, 250, 3.5] at 00:07.25 and x1="9"'
    moved = shift_numbers(text, rng)
    nums = lambda s: re.findall(r"\d+(?:\.\d+)?", s)  # noqa: E731
    assert len(nums(moved)) == len(nums(text)) and moved.count(".") == text.count(".")
    assert all(a != b and float(b) >= 0 and abs(float(a) - float(b)) >= 2 for a, b in zip(nums(text), nums(moved))
               if not (a == "1" and b == "1"))  # the 1 of x1 is part of a name: untouched
    garbled = replace_chars("AB-12 c.", rng, 1.0)  # rate 1: every letter and digit replaced by one of its kind
    assert 'x1="' in moved and len(garbled) == 8 and garbled[2] + garbled[5] + garbled[7] == "- ."
    assert all(x != y and x.isupper() == y.isupper() and x.isdigit() == y.isdigit()
               for x, y in zip("AB-12 c.", garbled) if x.isalnum())

    out = tmp_path / "pairs" / "p.jsonl"
    assert data_main(["pairs", good, "--out", str(out), "--removed", str(tmp_path / "skip.jsonl")]) == 0
    rep = json.loads(capsys.readouterr().out)
    sources = {r["id"]: r for r, _ in io.read(good)}
    pairs = [json.loads(line) for line in open(out)]
    assert rep["kept"] == len(pairs) >= 0.95 * rep["records"]
    assert sum(t["pairs"] for t in rep["by_task"].values()) == len(pairs)
    enc = ChatEncoder(max_pixels=64 * 28 * 28)
    checked = set()
    for p in pairs:
        src = sources[p["id"]]
        assert p["chosen"] == reference_text(src) != p["rejected"]
        assert all(m["role"] != "assistant" for m in p["messages"]) and len(p["messages"]) == len(src["messages"]) - 1
        if p["task"] == "grounding" and G.parse_boxes(p["chosen"]):
            a, b = G.parse_boxes(p["chosen"])[0].xyxy, (G.parse_boxes(p["rejected"]) or [None])[0]
            if b is not None:
                b = b.xyxy
                ix = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
                area = lambda x: max(0, x[2] - x[0]) * max(0, x[3] - x[1])  # noqa: E731
                assert ix / (area(a) + area(b) - ix) < 0.5
            checked.add("grounding")
        if p["task"] == "count":
            assert p["rejected"].split()[-4:] != p["chosen"].split()[-4:] or G.count(p["rejected"]) != G.count(p["chosen"])
            checked.add("count")
        if p["task"] == "ocr":
            diff = sum(x != y for x, y in zip(p["chosen"], p["rejected"])) + abs(len(p["chosen"]) - len(p["rejected"]))
            assert diff >= 0.5 * len(p["chosen"].strip())
            checked.add("ocr")
        chosen, rejected = enc.encode_pair(p, str(out.parent))  # media relocated next to the output
        assert chosen.n_labels > 0 and rejected.n_labels > 0
    assert checked == {"grounding", "count", "ocr"}
