"""Temporal grounding and dense-caption parsing on cookbook-style answers."""
import pytest

from qwenvl.errors import InputError
from qwenvl.tasks import video as v


@pytest.mark.parametrize("text, expected", [
    ("The given query happens in 64.0 - 72.0 seconds.", (64.0, 72.0)),  # cookbook answer, verbatim
    ("The event happens in the 24.3 - 30.4 seconds.", (24.3, 30.4)),  # lmms-eval Charades example
    ("It happens from 1:04 to 1:12.", (64.0, 72.0)),
    ("From 01:04.50 – 01:12.25", (64.5, 72.25)),  # mm:ss.ff, en dash
    ("between 3 and 5.5 seconds", (3.0, 5.5)),
    ("00:01:04 — 01:00:00", (64.0, 3600.0)),  # hh:mm:ss, em dash
    ("64s-72s", (64.0, 72.0)),
    ("roughly 1 - 2 minutes in", (60.0, 120.0)),  # a trailing unit applies to both ends
    ("The query happens in 72.0 - 64.0 seconds.", (64.0, 72.0)),  # reversed: ordered
])
def test_parse_time_range(text, expected):
    assert v.parse_time_range(text) == pytest.approx(expected)


def test_parse_time_range_hmsf_needs_fps():
    # hmsf: 00:01:04 + 12 frames at 24 fps = 64.5 s; 00:01:10:00 = 70 s
    assert v.parse_time_range("00:01:04:12 - 00:01:10:00", fps=24) == pytest.approx((64.5, 70.0))
    with pytest.raises(InputError, match="fps"):
        v.parse_time_range("00:01:04:12 - 00:01:10:00")


@pytest.mark.parametrize("text", ["", "I don't know when it happens.", "There are 2 people and 3 dogs.",
                                  "The event happens at 12.5 seconds."])
def test_parse_time_range_none(text):
    assert v.parse_time_range(text) is None


def test_parse_time_ranges_all():
    text = "The person opens the door in 2.0 - 5.5 seconds and again from 0:40 to 0:47."
    assert v.parse_time_ranges(text) == [(2.0, 5.5), (40.0, 47.0)]


@pytest.mark.parametrize("value, expected", [
    (12, 12.0), (12.5, 12.5), ("64.0", 64.0), ("64.0s", 64.0), ("64 seconds", 64.0), ("1:04", 64.0),
    ("00:21.80", 21.8), ("01:35.60", 95.6), ("01:02:03", 3723.0), ("1:02:03.5", 3723.5), ("2 min", 120.0),
    ("abc", None), (None, None), (True, None), ("", None),
])
def test_parse_time(value, expected):
    got = v.parse_time(value)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_parse_time_hmsf():
    assert v.parse_time("00:01:04:12", fps=24) == pytest.approx(64.5)
    assert v.parse_time("01:00:00:15", fps=30) == pytest.approx(3600.5)


@pytest.mark.parametrize("seconds, style, expected", [
    (64.0, "seconds", "64.0"), (95.6, "mm:ss.ff", "01:35.60"), (21.8, "mm:ss.ff", "00:21.80"),
    (3723.4, "hh:mm:ss", "01:02:03"), (64.5, "hmsf", "00:01:04:12"),
])
def test_format_time_round_trip(seconds, style, expected):
    s = v.format_time(seconds, style, fps=24)
    assert s == expected
    if style != "hh:mm:ss":  # hh:mm:ss drops the fraction
        assert v.parse_time(s, fps=24) == pytest.approx(seconds)


# The cookbook's dense captioning answer: fenced JSON with 'mm:ss.ff' strings and "description".
DENSE = """```json
[
    {"start_time": "00:00.00", "end_time": "00:21.80", "description": "A person is slicing meat on a cutting board."},
    {"start_time": "00:23.90", "end_time": "01:35.60", "description": "The person seasons the steak with salt and pepper."},
    {"start_time": "01:36.00", "end_time": "02:"""


def test_parse_events_cookbook_truncated():
    events = v.parse_events(DENSE)
    assert [(e.start, e.end) for e in events] == [(0.0, pytest.approx(21.8)), (pytest.approx(23.9), pytest.approx(95.6))]
    assert events[1].caption == "The person seasons the steak with salt and pepper."


def test_parse_events_numbers_caption_key_and_timestamp_pairs():
    text = ('[{"start_time": 0, "end_time": 12.5, "caption": "intro", "speaker": "A"},'
            ' {"timestamp": ["12.5s", "30s"], "caption": "cooking",},'
            ' {"start_time": "soon", "end_time": 3, "caption": "bad time, skipped"}]')
    events = v.parse_events(text)
    assert [(e.start, e.end, e.caption) for e in events] == [(0.0, 12.5, "intro"), (12.5, 30.0, "cooking")]
    assert events[0].extra == {"speaker": "A"}


def test_parse_events_plain_lines_fallback_and_garbage():
    text = ("00:00.0 - 00:21.8: A person slices meat.\n00:23.9 - 01:35.6: The person seasons the steak.\n"
            "- 12:30 to 13:00, The person eats.\n3. [800 - 812.5] Credits.")
    events = v.parse_events(text)
    assert [(e.start, e.end, e.caption) for e in events] == [
        (0.0, 21.8, "A person slices meat."), (23.9, 95.6, "The person seasons the steak."),
        (750.0, 780.0, "The person eats."), (800.0, 812.5, "Credits.")]
    assert v.parse_events("no events here {]") == []


def test_prompts():
    assert v.grounding_prompt("seasoning the steak") == \
        "Give the query: 'seasoning the steak', when does the described content occur in the video?"
    assert v.dense_caption_prompt() == (
        "Localize a series of activity events in the video, output the start and end timestamp for each event, "
        "and describe each event with sentences. Provide the result in json format with 'mm:ss.ff' format for "
        "time depiction.")
    assert "person turn a light on" in v.charades_prompt("a man opens a door")
