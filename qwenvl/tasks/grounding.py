"""Grounding: cookbook prompts, box/point parsing, coordinate mapping, drawing, counting.

Qwen2.5-VL answers in absolute pixels of the *smart-resized* image it saw (not 0-1000, not the
original image): `[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]`, `{"point_2d": [x, y], ...}` or
Molmo-style `<points x1=".." y1=".." alt="..">phrase</points>`. `to_original` maps those back to
the caller's image; it needs the resized size, which `resized_hw` recomputes with the same
min/max_pixels the processor used (a mismatch there is the classic "boxes are shifted" bug).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from ..errors import InputError
from ._json import find_objects, walk_dicts

DEFAULT_MIN_PIXELS = 4 * 28 * 28  # 3136, preprocessor_config.json
DEFAULT_MAX_PIXELS = 16384 * 28 * 28  # 12845056


# ----------------------------------------------------------------------------- prompts (cookbook)

def detect_prompt(category: str) -> str:
    """All instances of a category, as boxes (spatial_understanding cookbook)."""
    return f"Outline the position of each {category} and output all the coordinates in JSON format."


def describe_prompt(category: str) -> str:
    """All instances plus a description of each in the label."""
    return f"locate every {category} and describe their features, output the bbox coordinates in JSON format."


def locate_prompt(description: str) -> str:
    """One referred object (referring expression comprehension)."""
    return f"Locate the {description}, output its bbox coordinates using JSON format."


def point_prompt(description: str) -> str:
    """Point to an object, XML answer `<points x1 y1 alt>phrase</points>`."""
    return f"point to the {description}, output its coordinates in XML format <points x y>object</points>"


def point_json_prompt(description: str) -> str:
    """Point to every instance, JSON answer `{"point_2d": [x, y], "label": ...}`."""
    return (f"Locate every {description} with points, report their point coordinates in JSON format "
            'like this: {"point_2d": [x, y], "label": "' + description + '"}')


def count_prompt(category: str | None = None) -> str:
    """"Detect then count" (the prompt style behind the CountBench result)."""
    if category is None:
        return ("Please first output bbox coordinates and names of every item in this image in JSON format, "
                "and then answer how many items are there in the image.")
    return (f"Please first output bbox coordinates and names of every {category} in this image in JSON format, "
            f"and then answer how many {category} are there in the image.")


# ----------------------------------------------------------------------------- results

@dataclass
class Box:
    """An axis-aligned box, x1 <= x2 and y1 <= y2, plus the object's label and any other keys."""
    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2)

    def rounded(self) -> "Box":
        return replace(self, x1=round(self.x1), y1=round(self.y1), x2=round(self.x2), y2=round(self.y2))


@dataclass
class Point:
    x: float
    y: float
    label: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def xy(self) -> tuple[float, float]:
        return (self.x, self.y)

    def rounded(self) -> "Point":
        return replace(self, x=round(self.x), y=round(self.y))


# ----------------------------------------------------------------------------- parsing

_NUM = r"-?\d+(?:\.\d+)?"
# legacy Qwen-VL tokens, still in the tokenizer: <|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>
_LEGACY_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(.*?)<\|object_ref_end\|>\s*)?<\|box_start\|>\s*\(\s*(" + _NUM + r")\s*,\s*("
    + _NUM + r")\s*\)\s*,\s*\(\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\)\s*<\|box_end\|>", re.S)
# plain text "x1,y1,x2,y2 label" lines (the cookbook's custom-system-prompt example) or a bare [x1, y1, x2, y2]
_PLAIN_BOX = re.compile(r"^\s*\[?\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*("
                        + _NUM + r")\s*\]?[ \t]*([^\n]*)$", re.M)
_POINT_TAG = re.compile(r"<(points?)\b([^<>]*)>(.*?)(?:</\1\s*>|(?=<points?\b)|$)", re.S)
_ATTR = re.compile(r"""([\w-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")


def _floats(value: Any, n: int) -> list[float] | None:
    """`value` as n floats (numbers or numeric strings), else None."""
    if isinstance(value, str):  # "[1, 2, 3, 4]" or "1 2 3 4" as a string
        value = re.findall(_NUM, value)
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _box(coords: Sequence[float], label: Any = None, extra: dict | None = None) -> Box:
    x1, y1, x2, y2 = coords
    # the model occasionally swaps corners; a box is the same region either way
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2),
               None if label is None else str(label), extra or {})


def parse_boxes(text: str, key: str = "bbox_2d") -> list[Box]:
    """Every box in a model answer. Reads the cookbook JSON (fenced or not, trailing commas,
    single quotes, prose around it, truncated lists keep their complete objects); falls back to
    the legacy `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` tokens, then to plain `x1,y1,x2,y2 label`
    lines or a bare `[x1, y1, x2, y2]`. Coordinates stay in the resized image's pixels."""
    boxes = []
    for obj in find_objects(text):
        for d in walk_dicts(obj):
            value = d.get(key)
            # one box, or several under one label: "bbox_2d": [[..], [..]]
            many = value if isinstance(value, list) and value and isinstance(value[0], list) else [value]
            for coords in filter(None, (_floats(v, 4) for v in many)):
                extra = {k: v for k, v in d.items() if k not in (key, "label")}
                boxes.append(_box(coords, d.get("label"), extra))
    if boxes:
        return boxes
    for m in _LEGACY_BOX.finditer(text):
        boxes.append(_box([float(g) for g in m.group(2, 3, 4, 5)], m.group(1)))
    if boxes:
        return boxes
    for m in _PLAIN_BOX.finditer(text):
        label = m.group(5).strip().strip(",;:").strip() or None
        boxes.append(_box([float(g) for g in m.group(1, 2, 3, 4)], label))
    return boxes


def parse_points(text: str, key: str = "point_2d") -> list[Point]:
    """Every point in a model answer: XML `<points x1=".." y1=".." x2=.. alt="..">phrase</points>`
    (one Point per x_i/y_i pair; also `<point x y>`) and JSON `{"point_2d": [x, y], "label": ..}`.
    A tag cut off before its closing `>` is dropped; one cut off after it keeps its points."""
    points: list[Point] = []
    for m in _POINT_TAG.finditer(text):
        attrs = {a.group(1).lower(): a.group(2) if a.group(2) is not None else a.group(3)
                 for a in _ATTR.finditer(m.group(2))}
        label = m.group(3).strip() or attrs.get("alt")
        extra = {"alt": attrs["alt"]} if "alt" in attrs else {}
        suffixes = sorted({k[1:] for k in attrs if k.startswith("x") and "y" + k[1:] in attrs},
                          key=lambda s: (len(s), s))
        for s in suffixes:
            try:
                points.append(Point(float(attrs["x" + s]), float(attrs["y" + s]), label, dict(extra)))
            except ValueError:
                continue
    for obj in find_objects(text):
        for d in walk_dicts(obj):
            xy = _floats(d.get(key), 2)
            if xy is not None:
                extra = {k: v for k, v in d.items() if k not in (key, "label")}
                label = d.get("label")
                points.append(Point(xy[0], xy[1], None if label is None else str(label), extra))
    return points


_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_COUNT_TOKEN = re.compile(r"\b(\d+|" + "|".join(_NUMBER_WORDS) + r")\b", re.I)


def count(text: str) -> int | None:
    """The count a "detect then count" answer states in its prose (the last number, digits or
    zero..twenty in words, outside the JSON); else the number of boxes or points it lists; None
    when it gives neither."""
    prose = re.sub(r"```.*?(?:```|$)", " ", text, flags=re.S)
    prose = re.sub(r"\[[^\[\]]*\]|\{[^{}]*\}", " ", prose)  # inner JSON first...
    prose = re.sub(r"\[[^\[\]]*\]|\{[^{}]*\}", " ", prose)  # ...then the list that held it
    prose = re.sub(r"<points?\b.*?(?:</points?>|$)", " ", prose, flags=re.S)
    found = _COUNT_TOKEN.findall(prose)
    if found:
        token = found[-1].lower()
        return int(token) if token.isdigit() else _NUMBER_WORDS[token]
    n = len(parse_boxes(text)) or len(parse_points(text))
    return n or None


# ----------------------------------------------------------------------------- coordinate mapping

def _clamp(v: float, hi: float) -> float:
    return min(max(v, 0.0), float(hi))


def _scale(item: Any, sx: float, sy: float, w: float, h: float) -> Any:
    if isinstance(item, Box):
        return replace(item, x1=_clamp(item.x1 * sx, w), y1=_clamp(item.y1 * sy, h),
                       x2=_clamp(item.x2 * sx, w), y2=_clamp(item.y2 * sy, h))
    if isinstance(item, Point):
        return replace(item, x=_clamp(item.x * sx, w), y=_clamp(item.y * sy, h))
    if isinstance(item, (list, tuple)):
        return [_scale(i, sx, sy, w, h) for i in item]
    raise InputError(f"can only map Box, Point or a list of them, got {type(item).__name__}")


def _check_hw(name: str, hw: Sequence[int]) -> tuple[int, int]:
    if len(hw) != 2 or hw[0] <= 0 or hw[1] <= 0:
        raise InputError(f"{name} must be (height, width) with both > 0, got {tuple(hw)}")
    return int(hw[0]), int(hw[1])


def to_original(item: Any, resized_hw: Sequence[int], original_hw: Sequence[int]) -> Any:
    """Box/Point (or a list) from resized-image pixels to original-image pixels, clamped to the
    image. Both sizes are (height, width)."""
    (rh, rw), (oh, ow) = _check_hw("resized_hw", resized_hw), _check_hw("original_hw", original_hw)
    return _scale(item, ow / rw, oh / rh, ow, oh)


def to_resized(item: Any, resized_hw: Sequence[int], original_hw: Sequence[int]) -> Any:
    """The inverse of `to_original`: original pixels to the resized image the model sees (what a
    training target must use). Call `.rounded()` for the integer coordinates the model emits."""
    (rh, rw), (oh, ow) = _check_hw("resized_hw", resized_hw), _check_hw("original_hw", original_hw)
    return _scale(item, rw / ow, rh / oh, rw, rh)


def _hw_of(image_or_hw: Any) -> tuple[int, int]:
    if hasattr(image_or_hw, "size") and hasattr(image_or_hw, "mode"):  # PIL image: size is (w, h)
        return image_or_hw.size[1], image_or_hw.size[0]
    return _check_hw("original_hw", image_or_hw)


def resized_hw(image_or_hw: Any, min_pixels: int = DEFAULT_MIN_PIXELS,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) the processor resizes an image (PIL or (h, w)) to: preprocess.smart_resize
    with factor 28. Pass the min/max_pixels the request used."""
    from ..preprocess import smart_resize  # lazy: preprocess pulls in heavier deps
    h, w = _hw_of(image_or_hw)
    return tuple(smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels))


def to_original_image(item: Any, image_or_hw: Any, min_pixels: int = DEFAULT_MIN_PIXELS,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """`to_original` with the resized size recomputed from the original image and min/max_pixels."""
    return to_original(item, resized_hw(image_or_hw, min_pixels, max_pixels), _hw_of(image_or_hw))


# ----------------------------------------------------------------------------- drawing

_COLORS = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple", "pink", "brown"]


def draw(image: Any, boxes: Iterable[Box] = (), points: Iterable[Point] = (), out_path: Any = None,
         line_width: int | None = None) -> Any:
    """Draw labelled boxes and points on a copy of `image` (PIL image or path); save it as PNG when
    `out_path` is given and return it. Coordinates must already be in this image's pixels
    (`to_original` first for model output)."""
    from PIL import Image, ImageDraw

    img = (Image.open(image) if not hasattr(image, "mode") else image).convert("RGB")
    canvas = ImageDraw.Draw(img)
    lw = line_width or max(2, round(min(img.size) / 200))
    for i, box in enumerate(boxes):
        color = _COLORS[i % len(_COLORS)]
        canvas.rectangle([box.x1, box.y1, box.x2, box.y2], outline=color, width=lw)
        if box.label:
            canvas.text((box.x1 + lw + 2, box.y1 + lw + 2), box.label, fill=color)
    r = lw * 2
    for i, pt in enumerate(points):
        color = _COLORS[i % len(_COLORS)]
        canvas.ellipse([pt.x - r, pt.y - r, pt.x + r, pt.y + r], fill=color, outline="white")
        if pt.label:
            canvas.text((pt.x + r + 2, pt.y - r), pt.label, fill=color)
    if out_path is not None:
        img.save(out_path, format="PNG")
    return img
