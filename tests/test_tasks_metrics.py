"""Metrics against values worked out by hand (each expected number has its arithmetic beside it)."""
import math

import pytest

from qwenvl.tasks import metrics as m
from qwenvl.tasks.agent import Click, Key, LongPress, Scroll, Terminate, Type
from qwenvl.tasks.grounding import Box, Point


# ------------------------------------------------------------------ grounding

@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 10, 10], [5, 5, 15, 15], 25 / 175),  # inter 5*5 = 25, union 100 + 100 - 25 = 175
    ([0, 0, 4, 4], [0, 0, 2, 4], 8 / 16),  # inter 2*4 = 8, union 16
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
    ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),  # disjoint
    ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # sharing an edge only
    ([5, 5, 5, 5], [5, 5, 5, 5], 0.0),  # two zero-area boxes: no union, 0 by definition
    ([5, 5, 5, 9], [0, 0, 10, 10], 0.0),  # zero-area inside a box: inter 0
    (None, [0, 0, 1, 1], 0.0),
])
def test_iou(a, b, expected):
    assert m.iou(a, b) == pytest.approx(expected)
    assert m.iou(b, a) == pytest.approx(expected)


def test_iou_accepts_box_objects():
    assert m.iou(Box(0, 0, 10, 10, "a"), [5, 5, 15, 15]) == pytest.approx(1 / 7)


def test_acc_at_iou():
    gts = [[0, 0, 4, 4]] * 4
    preds = [[0, 0, 4, 4],  # IoU 1
             [0, 0, 2, 4],  # IoU 0.5 exactly: counts (>=)
             [0, 0, 1, 4],  # IoU 4/16 = 0.25
             None]  # parse failure
    assert m.acc_at_iou(preds, gts) == 0.5  # 2 of 4
    assert m.acc_at_iou(preds, gts, threshold=0.2) == 0.75
    assert m.acc_at_iou([], []) == 0.0
    with pytest.raises(ValueError):
        m.acc_at_iou([None], [])


def test_point_in_box_and_accuracy():
    box = [10, 10, 20, 20]
    assert m.point_in_box((10, 20), box)  # edges count
    assert m.point_in_box(Point(15, 15), Box(10, 10, 20, 20))
    assert not m.point_in_box((20.01, 15), box)
    assert not m.point_in_box(None, box)
    assert m.point_accuracy([(15, 15), (0, 0), None], [box] * 3) == pytest.approx(1 / 3)


# ------------------------------------------------------------------ text

def test_levenshtein():
    assert m.levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert m.levenshtein("", "abc") == 3
    assert m.levenshtein("flaw", "lawn") == 2
    assert m.levenshtein("same", "same") == 0


def test_levenshtein_matches_the_dp_table_on_random_sequences():
    """The bit-parallel distance equals the textbook DP table, on strings of small and large alphabets (many
    repeats / few), across the 64-bit word boundary, and on lists of words."""
    import random

    def table(a, b):
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]

    rng = random.Random(0)
    for _ in range(600):
        alphabet = rng.choice(["ab", "abc", "abcdefghij", ["the", "cat", "sat", "on"]])
        a = [rng.choice(alphabet) for _ in range(rng.randint(0, 150))]
        b = [rng.choice(alphabet) for _ in range(rng.randint(0, 150))]
        if isinstance(alphabet, str):
            a, b = "".join(a), "".join(b)
        assert m.levenshtein(a, b) == m.levenshtein(b, a) == table(a, b), (a, b)


@pytest.mark.parametrize("pred, answers, expected", [
    ("Hello", ["hello"], 1.0),  # lowercased
    ("  New   York ", "new york", 1.0),  # whitespace collapsed
    ("kitten", ["sitting"], 1 - 3 / 7),  # NL = 3/7 = 0.43 < 0.5 -> 4/7
    ("abd", ["xyz", "abc"], 1 - 1 / 3),  # max over answers: "abc" gives NL 1/3
    ("ab", ["ac"], 0.0),  # NL = 1/2 = threshold -> 0 (DocVQA: NL < 0.5 to score)
    ("ab", ["cd"], 0.0),
    ("", ["abc"], 0.0),  # empty prediction
    ("", [""], 1.0),
    (None, ["abc"], 0.0),
])
def test_anls(pred, answers, expected):
    assert m.anls(pred, answers) == pytest.approx(expected)


def test_mean_anls():
    # (1 + 4/7 + 0) / 3
    assert m.mean_anls(["hello", "kitten", "x"], [["Hello"], ["sitting"], ["abc"]]) == pytest.approx((1 + 4 / 7) / 3)


@pytest.mark.parametrize("pred, target, expected", [
    ("10.4", "10", True),  # |10.4 - 10| / 10 = 0.04 <= 0.05
    ("10.6", "10", False),  # 0.06
    ("1,050", "1000", True),  # 50 / 1000 = 0.05, boundary included
    ("5%", "0.05", True),  # 5% -> 0.05
    ("12%", "12", False),  # 0.12 vs 12
    ("Yes", "yes", True),  # strings: case-insensitive exact match
    ("Yes.", "yes", False),
    ("0", "0", True),  # zero target: exact string match
    ("0.01", "0", False),
    (None, "3", False),
])
def test_relaxed_correctness(pred, target, expected):
    assert m.relaxed_correctness(pred, target) is expected


def test_relaxed_accuracy():
    assert m.relaxed_accuracy(["10.4", "10.6", "Yes", None], ["10", "10", "yes", "1"]) == 0.5


@pytest.mark.parametrize("pred, target, expected", [
    ("kitten", "sitting", 1 - 3 / 7),  # CER = 3/7
    ("sitting", "sitting", 1.0),
    ("", "abc", 0.0),  # CER 1
    ("abcdef", "ab", 0.0),  # CER 4/2 = 2 -> floored at 0
    ("", "", 1.0),
    ("x", "", 0.0),
    (None, "ab", 0.0),
])
def test_char_accuracy(pred, target, expected):
    assert m.char_accuracy(pred, target) == pytest.approx(expected)


# ------------------------------------------------------------------ video

@pytest.mark.parametrize("pred, gt, expected", [
    ((0, 10), (5, 15), 5 / 15),  # overlap 5, hull 15
    ((10, 0), (5, 15), 5 / 15),  # reversed prediction is reordered
    ((0, 10), (20, 30), 0.0),
    ((64.0, 72.0), (64.0, 72.0), 1.0),
    ((5, 5), (5, 5), 0.0),  # zero-length spans
    ((5, 5), (0, 10), 0.0),
    (None, (0, 10), 0.0),
])
def test_temporal_iou(pred, gt, expected):
    assert m.temporal_iou(pred, gt) == pytest.approx(expected)


def test_miou_and_recall():
    gts = [(5, 15)] * 3
    preds = [(0, 10), (5, 15), None]  # IoUs 1/3, 1, 0
    assert m.mean_iou(preds, gts) == pytest.approx(4 / 9)
    assert m.recall_at_k(preds, gts, 1, 0.3) == pytest.approx(2 / 3)  # 1/3 >= 0.3 and 1
    assert m.recall_at_k(preds, gts, 1, 0.5) == pytest.approx(1 / 3)
    scores = m.temporal_grounding_scores(preds, gts)
    assert scores == pytest.approx({"mIoU": 4 / 9, "R@1,IoU=0.3": 2 / 3, "R@1,IoU=0.5": 1 / 3, "R@1,IoU=0.7": 1 / 3})


def test_recall_at_k_ranked_lists():
    gts = [(0, 10), (0, 10)]
    preds = [[(20, 30), (0, 9)], [(20, 30), (30, 40), (0, 10)]]  # hit at rank 2 (IoU 0.9), at rank 3
    assert m.recall_at_k(preds, gts, k=1, threshold=0.5) == 0.0
    assert m.recall_at_k(preds, gts, k=2, threshold=0.5) == 0.5
    assert m.recall_at_k(preds, gts, k=3, threshold=0.5) == 1.0
    # top-1 of each ranked list for mIoU: both (20, 30) -> 0
    assert m.temporal_grounding_scores(preds, gts)["mIoU"] == 0.0


# ------------------------------------------------------------------ agents

def test_action_match():
    assert m.action_match(Click(10, 10), Click(10, 10))
    assert not m.action_match(Click(12, 11), Click(10, 10))
    assert m.action_match(Click(12, 11), Click(10, 10), coord_tolerance=3)  # distance sqrt(5) = 2.24
    assert not m.action_match(Click(12, 11), Click(10, 10), coord_tolerance=2)
    assert not m.action_match(Click(10, 10, "right"), Click(10, 10))
    assert not m.action_match(LongPress(10, 10, 1.0), Click(10, 10))
    assert m.action_match(Type("Hello  world "), Type("hello world"))
    assert m.action_match(Key(("Ctrl", "C")), Key(("ctrl", "c")))
    assert not m.action_match(Scroll(-300), Scroll(-200))
    assert m.action_match(Terminate("success"), Terminate("success"))
    assert not m.action_match(None, Terminate("success"))
    assert not m.action_match(Click(None, None), Click(1, 1))


def test_action_accuracy():
    gts = [Click(100, 200), Type("abc"), Terminate("success"), Click(5, 5)]
    preds = [Click(103, 204), Type("ABC"), Terminate("failure"), None]  # click off by 5 px (3-4-5 triangle)
    assert m.action_accuracy(preds, gts) == 0.25
    assert m.action_accuracy(preds, gts, coord_tolerance=5) == 0.5
    assert math.isclose(m.action_accuracy(preds, gts, coord_tolerance=4.99), 0.25)
