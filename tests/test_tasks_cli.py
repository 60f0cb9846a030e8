"""`qwenvl ground`, `qwenvl parse-doc`, `qwenvl video`: on injected answers (parsing, coordinate mapping back
to the original media, drawing) and end to end on the tiny random model (the pipeline runs; answers are noise)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from qwenvl.errors import InputError
from qwenvl.tasks import grounding
from qwenvl.tasks.cli import main, video_plan


def run(capsys, *argv) -> dict | str:
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    try:
        return json.loads(out)
    except ValueError:
        return out


def write_video(path, seconds: float, fps: float, w=64, h=48, gop=30):
    import av
    from fractions import Fraction

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1000))
        s.width, s.height, s.pix_fmt, s.gop_size = w, h, "yuv420p", gop
        for i in range(round(seconds * fps)):
            frame = np.full((h, w, 3), (i * 7) % 255, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


BOXES = ('```json\n[\n\t{"bbox_2d": [100, 100, 504, 350], "label": "red car"},\n'
         '\t{"bbox_2d": [600, 50, 900, 300], "label": "red car"}\n]\n```')


# ---------------------------------------------------------------------------------------------- ground
def test_ground_injected_answer_maps_to_original_pixels(tmp_path, capsys):
    img = tmp_path / "street.png"
    Image.new("RGB", (1000, 700), (128, 128, 128)).save(img)
    out = tmp_path / "boxes.png"
    r = run(capsys, "ground", img, "every red car", "--out", out, "--answer", BOXES)
    assert r["prompt"] == "Locate every red car, output the bbox coordinates in JSON format."
    assert r["image_size"] == [1000, 700] and r["resized_size"] == [1008, 700]  # smart_resize(700, 1000)
    assert [b["bbox_2d"] for b in r["boxes"]] == [[99.2, 100.0, 500.0, 350.0], [595.2, 50.0, 892.9, 300.0]]
    assert [b["label"] for b in r["boxes"]] == ["red car", "red car"]
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert drawn.shape == (700, 1000, 3)
    assert tuple(drawn[200, 99]) == (255, 0, 0)  # the first box's left edge, drawn in original pixels
    assert tuple(drawn[200, 300]) == (128, 128, 128)  # its inside untouched

    # a custom --max-pixels changes the size the model saw, and so the mapping
    r = run(capsys, "ground", img, "car", "--max-pixels", 200_000, "--answer", BOXES)
    rw, rh = r["resized_size"]
    assert rw * rh <= 200_000 and (rh, rw) == grounding.resized_hw((700, 1000), max_pixels=200_000)
    assert r["boxes"][0]["bbox_2d"][2] == pytest.approx(min(504 * 1000 / rw, 1000), abs=0.05)


def test_ground_points_from_answer_file(tmp_path, capsys):
    img = tmp_path / "p.jpg"
    Image.new("RGB", (280, 560), "white").save(img)
    ans = tmp_path / "answer.txt"
    ans.write_text('<points x1="140" y1="280" alt="cup">cup</points> and {"point_2d": [28, 56], "label": "spoon"}')
    r = run(capsys, "ground", img, "the cup", "--points", "--answer", f"@{ans}", "--out", tmp_path / "p.png")
    assert "point_2d" in r["prompt"] and r["boxes"] == []
    assert [(p["point_2d"], p["label"]) for p in r["points"]] == [([140.0, 280.0], "cup"), ([28.0, 56.0], "spoon")]


def test_ground_on_the_tiny_model(tmp_path, capsys):
    img = tmp_path / "small.png"
    Image.new("RGB", (112, 84), (10, 200, 10)).save(img)
    r = run(capsys, "ground", img, "the green thing", "--max-tokens", 6, "--out", tmp_path / "o.png")
    assert r["resized_size"] == [112, 84] and isinstance(r["answer"], str) and isinstance(r["boxes"], list)
    assert (tmp_path / "o.png").exists()


# ---------------------------------------------------------------------------------------------- parse-doc
DOC = """```html
<html><body>
<h2 data-bbox="50 40 400 80">Quarterly Report</h2>
 <p data-bbox="50 100 540 200">Revenue grew.</p>
<table data-bbox="50 300 540 420"><tr><td>Q</td><td>Revenue</td></tr><tr><td>1</td><td>10</td></tr></table>
</body></html>
```"""


@pytest.fixture
def pdf(tmp_path):
    pages = []
    for i in range(3):
        page = Image.new("RGB", (600, 800), "white")
        ImageDraw.Draw(page).text((50, 50), f"Page {i + 1}", fill="black")
        pages.append(page)
    path = tmp_path / "doc.pdf"
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=72)
    return path


def test_parse_doc_pdf_injected(pdf, tmp_path, capsys):
    r = run(capsys, "parse-doc", pdf, "--dpi", 72, "--pages", "1,3", "--answer", DOC, "--md", tmp_path / "d.md",
            "--draw-dir", tmp_path / "drawn")
    assert [p["page"] for p in r["pages"]] == [1, 3]
    page = r["pages"][0]
    assert page["size"] == [600, 800] and page["resized_size"] == [588, 812]
    types = [e["type"] for e in page["elements"]]
    assert types == ["heading", "paragraph", "table"]
    sx, sy = 600 / 588, 800 / 812
    assert page["elements"][0]["bbox"] == pytest.approx([50 * sx, 40 * sy, 400 * sx, 80 * sy], abs=0.05)
    assert page["elements"][2]["rows"] == [["Q", "Revenue"], ["1", "10"]]
    assert "## Quarterly Report" in page["markdown"] and "| Q | Revenue |" in page["markdown"]
    assert (tmp_path / "d.md").read_text() == r["markdown"]
    assert (tmp_path / "drawn" / "page3.png").exists()
    md = run(capsys, "parse-doc", pdf, "--dpi", 72, "--pages", "2", "--markdown", "--answer", DOC)
    assert md.startswith("## Quarterly Report")
    assert main(["parse-doc", str(pdf), "--pages", "7", "--answer", DOC]) == 2  # a clear error, no traceback
    assert "pages 1..3" in capsys.readouterr().err


def test_parse_doc_image_on_the_tiny_model(tmp_path, capsys):
    img = tmp_path / "page.png"
    Image.new("RGB", (140, 196), "white").save(img)
    r = run(capsys, "parse-doc", img, "--max-tokens", 6)
    assert len(r["pages"]) == 1 and r["pages"][0]["resized_size"] == [140, 196]


# ---------------------------------------------------------------------------------------------- video
def test_video_plan_bounds_tokens_for_any_length():
    for duration in (2, 30, 600, 3600, 4 * 3600):
        total = int(duration * 25)
        plan = video_plan(duration, total, token_budget=16384)
        o = plan["options"]
        assert 4 <= plan["nframes"] <= 768 and plan["nframes"] % 2 == 0
        assert plan["tokens"] <= 16384 and o["min_pixels"] < o["max_pixels"] <= 768 * 784
        assert o["fps"] <= 2.0
    hour = video_plan(3600, 90000, 16384)
    assert hour["nframes"] == 768 and hour["options"]["fps"] == pytest.approx(768 / 3600)
    short = video_plan(10, 250, 16384)
    assert short["nframes"] == 20 and short["options"]["fps"] == 2.0 and short["options"]["max_pixels"] == 768 * 784
    small = video_plan(3600, 90000, 512)  # a small budget: fewer frames, each still MIN_PAIR_TOKENS tokens
    assert small["nframes"] == 32 and small["tokens"] <= 512
    with pytest.raises(InputError):
        video_plan(0, 0)


def test_video_injected_timestamps(tmp_path, capsys):
    clip = write_video(tmp_path / "clip.mp4", 10, 5)
    r = run(capsys, "video", clip, "When does the steak get seasoned?",
            "--answer", "The given query happens in 64.0 - 72.0 seconds.")
    assert r["duration_s"] == pytest.approx(10) and r["time_ranges"] == [[64.0, 72.0]]
    dense = ('```json\n[{"start_time": "00:00.00", "end_time": "00:21.80", "description": "slicing"},\n'
             ' {"start_time": "00:23.90", "end_time": "01:35.60", "description": "cooking"}]\n```')
    r = run(capsys, "video", clip, "Localize the events.", "--answer", dense)
    assert [(e["start"], e["end"], e["caption"]) for e in r["events"]] == [(0.0, 21.8, "slicing"),
                                                                          (23.9, 95.6, "cooking")]


def test_video_hour_long_on_the_tiny_model(tmp_path, capsys):
    """An hour-long file (1 fps) within a 512-token budget: 32 frames sampled by seeking, tokens bounded."""
    hour = write_video(tmp_path / "hour.mp4", 3600, 1)
    r = run(capsys, "video", hour, "What changes?", "--video-tokens", 512, "--max-tokens", 4)
    s = r["sampling"]
    assert r["duration_s"] == pytest.approx(3600) and s["frames"] == 32
    assert s["video_tokens"] <= 512 and s["sample_fps"] == pytest.approx(32 / 3600, rel=0.01)
    assert isinstance(r["answer"], str)


def test_video_hmsf_answer_uses_the_files_frame_rate(tmp_path, capsys):
    """hh:mm:ss:frames counts frames of the file's own rate (5 fps here): 00:00:01:02 = 1 s + 2/5 s = 1.4 s."""
    clip = write_video(tmp_path / "clip.mp4", 10, 5)
    r = run(capsys, "video", clip, "When?", "--answer", "The event happens in 00:00:01:02 - 00:00:03:00.")
    assert r["native_fps"] == 5 and r["time_ranges"] == [[pytest.approx(1.4), 3.0]]
    dense = '[{"start_time": "00:00:00:00", "end_time": "00:00:02:04", "description": "a"}]'
    r = run(capsys, "video", clip, "Events?", "--answer", dense)
    assert [(e["start"], e["end"], e["caption"]) for e in r["events"]] == [(0.0, pytest.approx(2.8), "a")]


def test_video_cookbook_prompts(tmp_path, capsys):
    clip = write_video(tmp_path / "clip.mp4", 4, 5)
    r = run(capsys, "video", clip, "--when", "the screen gets brighter", "--answer", "It happens in 1.0 - 2.5 seconds.")
    assert r["question"] == ("Give the query: 'the screen gets brighter', when does the described content occur in "
                             "the video?") and r["time_ranges"] == [[1.0, 2.5]]
    r = run(capsys, "video", clip, "--dense", "--answer", "00:00.0 - 00:02.5: fading in")
    assert r["question"].startswith("Localize a series of activity events in the video") and "'mm:ss.ff'" in r["question"]
    assert r["events"] == [{"start": 0.0, "end": 2.5, "caption": "fading in", "extra": {}}]
    assert main(["video", str(clip), "a question", "--dense", "--answer", "x"]) == 2
    assert "one of them" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- ground --count
def test_ground_count(tmp_path, capsys):
    img = tmp_path / "street.png"
    Image.new("RGB", (1000, 700), (128, 128, 128)).save(img)
    r = run(capsys, "ground", img, "red car", "--count", "--answer", BOXES + "\nThere are two red cars.")
    assert r["prompt"] == ("Please first output bbox coordinates and names of every red car in this image in JSON "
                           "format, and then answer how many red car are there in the image.")
    assert r["count"] == 2 and len(r["boxes"]) == 2
    assert run(capsys, "ground", img, "red car", "--count", "--answer", BOXES)["count"] == 2  # no number: the boxes
    assert "count" not in run(capsys, "ground", img, "red car", "--answer", BOXES)


# ---------------------------------------------------------------------------------------------- ocr
SPOTTED = ('```json\n[\n    {"bbox_2d": [504, 350, 1008, 700], "text_content": "TOTAL RM8.75",},\n'
           '    {"bbox_2d": [0, 0, 252, 70], "text_content": "UNIHAKKA",}\n]\n```')


def test_ocr_spotting_maps_lines_to_original_pixels(tmp_path, capsys):
    img = tmp_path / "receipt.png"
    Image.new("RGB", (1000, 700), "white").save(img)  # seen as 1008 x 700
    r = run(capsys, "ocr", img, "--spot", "--answer", SPOTTED)
    assert r["prompt"] == "Spotting all the text in the image with line-level, and output in JSON format."
    assert r["resized_size"] == [1008, 700]
    # x * 1000 / 1008: 504 -> 500, 1008 -> 1000, 252 -> 250; y unchanged (700 -> 700)
    assert r["lines"] == [{"bbox_2d": [500.0, 350.0, 1000.0, 700.0], "text_content": "TOTAL RM8.75"},
                          {"bbox_2d": [0.0, 0.0, 250.0, 70.0], "text_content": "UNIHAKKA"}]
    plain = run(capsys, "ocr", img, "--answer", "UNIHAKKA\nTOTAL RM8.75")
    assert plain["prompt"] == "Read all the text in the image." and plain["answer"] == "UNIHAKKA\nTOTAL RM8.75"


RECEIPT_SCHEMA = {"type": "object", "properties": {"company": {"type": "string"}, "total": {"type": "number"},
                                                   "date": {"type": "string"}},
                  "required": ["company", "total"]}


def test_ocr_kie_to_a_user_schema(tmp_path, capsys):
    img = tmp_path / "receipt.png"
    Image.new("RGB", (280, 280), "white").save(img)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(RECEIPT_SCHEMA))
    answer = 'Here it is:\n```json\n{"Company": "UNIHAKKA", "total": "8.75", "tax": 0}\n```'
    r = run(capsys, "ocr", img, "--kie", f"@{schema}", "--answer", answer)
    # the JSON Schema's properties become the cookbook's key template
    assert r["prompt"] == 'Extract the key-value information in the format:{"company": "", "total": "", "date": ""}'
    assert r["values"] == {"company": "UNIHAKKA", "total": "8.75", "date": None}
    assert r["missing"] == [] and r["extra"] == ["tax"]  # date is optional in the schema
    assert r["errors"] == ["$.total: expected number, got str"] and r["ok"] is False
    # a cookbook template (inline) asks for every key
    r = run(capsys, "ocr", img, "--kie", '{"company": "", "date": ""}', "--answer", answer)
    assert r["values"] == {"company": "UNIHAKKA", "date": None} and r["missing"] == ["date"]
    assert main(["ocr", str(img), "--kie", "{not json", "--answer", "x"]) == 2
    assert "--kie: not valid JSON" in capsys.readouterr().err


def test_ocr_kie_constrained_on_the_tiny_model(tmp_path, capsys):
    """The random model knows no JSON; constrained decoding alone makes its answer follow the user's schema
    (enum and boolean values only, so the answer must also end)."""
    img = tmp_path / "receipt.png"
    Image.new("RGB", (112, 112), "white").save(img)
    schema = {"type": "object", "properties": {"paid": {"type": "boolean"}, "currency": {"enum": ["RM", "USD"]}},
              "required": ["paid", "currency"], "additionalProperties": False}
    r = run(capsys, "ocr", img, "--kie", json.dumps(schema), "--max-tokens", 80)
    assert r["ok"] is True and r["errors"] == [] and r["missing"] == []
    assert isinstance(r["values"]["paid"], bool) and r["values"]["currency"] in ("RM", "USD")
    assert json.loads(r["answer"]) == r["values"]


# ---------------------------------------------------------------------------------------------- agent
def tool_call(arguments) -> str:
    return "Tap it.\n<tool_call>\n" + json.dumps({"name": "mobile_use", "arguments": arguments}) + "\n</tool_call>"


def test_agent_step_maps_the_action_to_the_screen(tmp_path, capsys):
    shot = tmp_path / "screen.png"
    Image.new("RGB", (540, 1200), "white").save(shot)  # seen as 532 x 1204 (19 x 43 patches of 28)
    history = json.dumps([{"name": "mobile_use", "arguments": {"action": "open", "text": "Settings"}}])
    r = run(capsys, "agent", shot, "Turn on wifi", "--history", history,
            "--answer", tool_call({"action": "click", "coordinate": [266, 602]}))
    assert r["screen_size"] == [540, 1200] and r["resized_size"] == [532, 1204]
    assert r["query"] == ('The user query: Turn on wifi\nTask progress (You have done the following operation on the '
                          'current device): Step 1: {"name": "mobile_use", "arguments": {"action": "open", '
                          '"text": "Settings"}}; ')
    assert r["tool_call"] == {"name": "mobile_use", "arguments": {"action": "click", "coordinate": [266, 602]}}
    # 266 * 540 / 532 = 270, 602 * 1200 / 1204 = 600
    assert r["action"] == {"type": "Click", "x": 270, "y": 600, "button": "left", "clicks": 1}
    assert r["action_resized"]["x"] == 266 and r["status"] == "continue" and r["error"] is None
    done = run(capsys, "agent", shot, "t", "--answer", tool_call({"action": "terminate", "status": "success"}))
    assert done["status"] == "success" and done["action"] == {"type": "Terminate", "status": "success"}
    bad = run(capsys, "agent", shot, "t", "--answer", "I am not sure.")
    assert bad["status"] == "error" and "no <tool_call>" in bad["error"] and bad["action"] is None
    # computer_use on the same screen: x 504 * 540 / 532 = 511.58 -> 512, y 350 * 1200 / 1204 = 348.84 -> 349
    r = run(capsys, "agent", shot, "t", "--tool", "computer_use", "--answer",
            tool_call({"action": "double_click", "coordinate": [504, 350]}).replace("mobile_use", "computer_use"))
    assert r["action"] == {"type": "Click", "x": 512, "y": 349, "button": "left", "clicks": 2}


def test_agent_step_on_the_tiny_model(tmp_path, capsys):
    shot = tmp_path / "screen.png"
    Image.new("RGB", (112, 224), "white").save(shot)
    r = run(capsys, "agent", shot, "Open the settings", "--tool", "computer_use", "--max-tokens", 6)
    assert r["resized_size"] == [112, 224] and isinstance(r["answer"], str)
    assert r["status"] in ("error", "continue", "success", "failure")  # random weights: most likely no tool call


# ---------------------------------------------------------------------------------------------- the Python API
def test_python_functions_print_what_the_cli_prints(tmp_path, capsys):
    from qwenvl.tasks import run as tasks_run

    img = tmp_path / "street.png"
    Image.new("RGB", (1000, 700), (128, 128, 128)).save(img)
    given = tasks_run.TaskModel(answer=BOXES)
    assert tasks_run.ground(given, str(img), "every red car") == run(capsys, "ground", img, "every red car",
                                                                     "--answer", BOXES)
    assert tasks_run.ocr(given, Image.open(img), spot=True)["resized_size"] == [1008, 700]  # a PIL image is fine too
    with pytest.raises(InputError, match="separate requests"):
        tasks_run.ocr(given, str(img), spot=True, schema=["a"])


def test_python_functions_take_an_llm(tmp_path):
    """The functions run a qwenvl.LLM given as is (the pipeline runs; the tiny model's answers are noise)."""
    from qwenvl.engine import LLM
    from qwenvl.hub import tiny_random_checkpoint
    from qwenvl.tasks import run as tasks_run

    llm = LLM(tiny_random_checkpoint(), kv_cache_bytes=16 << 20, max_num_seqs=4)
    img = tmp_path / "shot.png"
    Image.new("RGB", (112, 84), (10, 200, 10)).save(img)
    assert tasks_run.TaskModel(llm).llm is llm  # used as is
    r = tasks_run.ground(tasks_run.TaskModel(llm, max_tokens=8), str(img), "the green thing",
                         out=str(tmp_path / "o.png"))
    assert r["resized_size"] == [112, 84] and isinstance(r["answer"], str) and (tmp_path / "o.png").exists()
    step = tasks_run.agent_step(tasks_run.TaskModel(llm, max_tokens=4), str(img), "Open settings")
    assert step["resized_size"] == [112, 84] and step["status"] in ("error", "continue", "success", "failure")
