"""Grounding parsers on cookbook-style answers (clean and broken), coordinate mapping, drawing, counting."""
import pytest
from PIL import Image

from qwenvl.errors import InputError
from qwenvl.tasks import grounding as g
from qwenvl.tasks.grounding import Box, Point

# Recorded-style answer of the spatial_understanding cookbook (7B, cakes.png): fenced JSON, tab indent.
CAKES = """```json
[
\t{"bbox_2d": [43, 571, 209, 753], "label": "cupcake with white frosting and colorful sprinkles"},
\t{"bbox_2d": [68, 408, 214, 596], "label": "cupcake with red frosting and sprinkles"},
\t{"bbox_2d": [240, 418, 396, 612], "label": "cupcake with pink frosting"}
]
```"""


def test_parse_boxes_cookbook_fenced_json():
    boxes = g.parse_boxes(CAKES)
    assert [b.xyxy for b in boxes] == [(43, 571, 209, 753), (68, 408, 214, 596), (240, 418, 396, 612)]
    assert boxes[0].label == "cupcake with white frosting and colorful sprinkles"
    assert boxes[2].label == "cupcake with pink frosting"


def test_parse_boxes_truncated_keeps_complete_objects():
    # generation hit max_tokens in the middle of the third object
    text = CAKES[: CAKES.index('[240, 418') + 9]
    boxes = g.parse_boxes(text)
    assert [b.label for b in boxes] == ["cupcake with white frosting and colorful sprinkles",
                                       "cupcake with red frosting and sprinkles"]


def test_parse_boxes_trailing_commas_single_quotes_and_prose():
    text = ("Sure! Here's what I found in the picture:\n"
            "[{'bbox_2d': [10, 20, 30, 40], 'label': 'the man\\'s hat',}, {\"bbox_2d\": [1, 2, 3, 4], \"label\": \"sun\",},]\n"
            "Let me know if you need anything else.")
    boxes = g.parse_boxes(text)
    assert [(b.xyxy, b.label) for b in boxes] == [((10, 20, 30, 40), "the man's hat"), ((1, 2, 3, 4), "sun")]


def test_parse_boxes_single_object_extra_keys_and_swapped_corners():
    text = '```json\n{"bbox_2d": [300, 400, 100, 200], "label": "umbrella", "color": "red"}\n```'
    (box,) = g.parse_boxes(text)
    assert box.xyxy == (100, 200, 300, 400)  # corners put back in order
    assert box.extra == {"color": "red"}


def test_parse_boxes_one_object_per_line_and_nested_wrapper():
    jsonl = '{"bbox_2d": [1, 1, 5, 5], "label": "a"}\n{"bbox_2d": [6, 6, 9, 9], "label": "b"}'
    assert [b.label for b in g.parse_boxes(jsonl)] == ["a", "b"]
    wrapped = '{"objects": [{"bbox_2d": [1, 2, 3, 4], "label": "x"}]}'
    assert [b.xyxy for b in g.parse_boxes(wrapped)] == [(1, 2, 3, 4)]
    several = '{"bbox_2d": [[1, 2, 3, 4], [5, 6, 7, 8]], "label": "cake"}'
    assert [(b.xyxy, b.label) for b in g.parse_boxes(several)] == [((1, 2, 3, 4), "cake"), ((5, 6, 7, 8), "cake")]


def test_parse_boxes_fallback_formats():
    legacy = "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>"
    assert [(b.xyxy, b.label) for b in g.parse_boxes(legacy)] == [((10, 20, 30, 40), "dog")]
    # the cookbook's custom system prompt asks for plain 'x1,y1,x2,y2 object' lines
    plain = "12,34,56,78 cake\n100,200,300,400 plate"
    assert [(b.xyxy, b.label) for b in g.parse_boxes(plain)] == [((12, 34, 56, 78), "cake"),
                                                                  ((100, 200, 300, 400), "plate")]
    assert [b.xyxy for b in g.parse_boxes("[135, 114, 1016, 672]")] == [(135, 114, 1016, 672)]


@pytest.mark.parametrize("text", ["", "I could not find any cake in this image.", "}}]] {{ [[ garbage",
                                  '```json\n[\n\t{"bbox_2d": [43, 5', '[{"bbox_2d": [1, 2, 3], "label": "bad"}]'])
def test_parse_boxes_nothing_usable(text):
    assert g.parse_boxes(text) == []


def test_parse_points_xml_multi_and_single():
    text = '<points x1="10.5" y1="20" x2="30" y2="40" alt="rolling pin">rolling pin</points>'
    assert g.parse_points(text) == [Point(10.5, 20, "rolling pin", {"alt": "rolling pin"}),
                                    Point(30, 40, "rolling pin", {"alt": "rolling pin"})]
    # Molmo single-point tag, no alt; a tag cut off before '>' is dropped
    text = '<point x="5" y="6">the cup</point> and <points x1="1" y1'
    assert g.parse_points(text) == [Point(5, 6, "the cup", {})]


def test_parse_points_xml_unclosed_keeps_points_and_uses_alt_when_empty():
    text = '<points x1="61.5" y1="40.6" alt="rolling pin">'
    assert g.parse_points(text) == [Point(61.5, 40.6, "rolling pin", {"alt": "rolling pin"})]


def test_parse_points_json():
    text = ('```json\n[\n  {"point_2d": [120, 340], "label": "person", "role": "player", "shirt_color": "red"},\n'
            '  {"point_2d": [500, 330], "label": "person", "role": "referee", "shirt_color": "black"},\n  {"point_2d": [7')
    points = g.parse_points(text)
    assert [p.xy for p in points] == [(120, 340), (500, 330)]
    assert points[1].extra == {"role": "referee", "shirt_color": "black"}


def test_count_stated_and_fallback():
    text = CAKES + "\nThere are 3 cupcakes in the image."
    assert g.count(text) == 3
    # stated in words, label digits ("cake 12") must not be read as the count
    text = '[{"bbox_2d": [1,2,3,4], "label": "cake 12"}, {"bbox_2d": [5,6,7,8], "label": "cake 13"}]\nThere are two cakes.'
    assert g.count(text) == 2
    assert g.count(CAKES) == 3  # no stated number: number of boxes
    assert g.count('<points x1="1" y1="2" x2="3" y2="4" alt="x">x</points>') == 2
    assert g.count("I cannot tell.") is None


# ------------------------------------------------------------------ coordinate mapping
# 1000x750 (w x h) with the default pixel limits: smart_resize gives h = round(750/28)*28 = 27*28 = 756,
# w = round(1000/28)*28 = 36*28 = 1008 (762,048 pixels, inside [3136, 12845056]); worked by hand.
ORIG_HW = (750, 1000)
RESIZED_HW = (756, 1008)


def test_to_original_exact_values():
    box = Box(504, 378, 1008, 756, "right half, bottom half")
    out = g.to_original(box, RESIZED_HW, ORIG_HW)
    assert out.xyxy == pytest.approx((500.0, 375.0, 1000.0, 750.0))
    assert out.label == "right half, bottom half"
    pt = g.to_original(Point(252, 189), RESIZED_HW, ORIG_HW)
    assert pt.xy == pytest.approx((250.0, 187.5))


def test_to_original_clamps_to_image():
    out = g.to_original(Box(-5, 10, 2000, 800), RESIZED_HW, ORIG_HW)
    # x1 -> 0, y1 = 10 * 750 / 756, x2 -> 1000 (width), y2 -> 750 (height)
    assert out.xyxy == pytest.approx((0.0, 10 * 750 / 756, 1000.0, 750.0))


def test_round_trip_original_resized_original():
    boxes = [Box(100, 200, 500, 600, "a"), Box(0, 0, 1000, 750, "all"), Box(333.3, 1.5, 334.7, 749.0)]
    resized = g.to_resized(boxes, RESIZED_HW, ORIG_HW)
    assert resized[0].xyxy == pytest.approx((100.8, 201.6, 504.0, 604.8))
    back = g.to_original(resized, RESIZED_HW, ORIG_HW)
    for b, r in zip(boxes, back):
        assert r.xyxy == pytest.approx(b.xyxy, abs=1e-9)
    # through the integers the model would emit: error at most half a resized pixel scaled back
    back_int = g.to_original([b.rounded() for b in resized], RESIZED_HW, ORIG_HW)
    for b, r in zip(boxes, back_int):
        assert all(abs(u - v) <= 0.5 * 1000 / 1008 + 1e-9 for u, v in zip(b.xyxy, r.xyxy))


def test_mapping_rejects_bad_sizes():
    with pytest.raises(InputError):
        g.to_original(Box(1, 2, 3, 4), (0, 100), ORIG_HW)
    with pytest.raises(InputError):
        g.to_original("not a box", RESIZED_HW, ORIG_HW)


def test_resized_hw_uses_smart_resize():
    pytest.importorskip("qwenvl.preprocess")
    assert tuple(g.resized_hw((750, 1000))) == RESIZED_HW
    img = Image.new("RGB", (1000, 750))
    assert tuple(g.resized_hw(img)) == RESIZED_HW
    # max_pixels = 256*28*28 = 200704 < 750*1000: beta = sqrt(750000/200704) = 1.9331;
    # h = floor(750/1.9331/28)*28 = 13*28 = 364, w = floor(1000/1.9331/28)*28 = 18*28 = 504
    assert tuple(g.resized_hw((750, 1000), max_pixels=256 * 28 * 28)) == (364, 504)
    out = g.to_original_image(Box(252, 182, 504, 364), img, max_pixels=256 * 28 * 28)
    assert out.xyxy == pytest.approx((500.0, 375.0, 1000.0, 750.0))


# ------------------------------------------------------------------ drawing

def test_draw_changes_pixels_at_box_edges_and_points(tmp_path):
    img = Image.new("RGB", (200, 160), "white")
    out_path = tmp_path / "boxes.png"
    out = g.draw(img, [Box(20, 30, 120, 110, "cake")], [Point(160, 40, "pin")], out_path, line_width=3)
    assert out_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = Image.open(out_path).convert("RGB")
    white = (255, 255, 255)
    for xy in [(20, 70), (120, 70), (70, 30), (70, 110)]:  # middle of each edge
        assert saved.getpixel(xy) != white, xy
    assert saved.getpixel((70, 70)) == white  # inside the box stays untouched
    assert saved.getpixel((160, 40)) != white  # the point
    assert saved.getpixel((5, 150)) == white  # far corner
    assert img.getpixel((20, 70)) == white  # the input image is not modified
    assert out.size == (200, 160)


def test_draw_accepts_path(tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (50, 50), "black").save(src)
    out = g.draw(src, [Box(5, 5, 45, 45)])
    assert out.getpixel((5, 25)) != (0, 0, 0)


def test_prompts_match_cookbook():
    assert g.detect_prompt("small cake") == \
        "Outline the position of each small cake and output all the coordinates in JSON format."
    assert g.locate_prompt("top right brown cake") == \
        "Locate the top right brown cake, output its bbox coordinates using JSON format."
    assert g.point_prompt("rolling pin on the far side of the table") == (
        "point to the rolling pin on the far side of the table, output its coordinates in XML format "
        "<points x y>object</points>")
    assert g.count_prompt() == ("Please first output bbox coordinates and names of every item in this image in "
                                "JSON format, and then answer how many items are there in the image.")
