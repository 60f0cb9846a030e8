"""Documents: QwenVL HTML parsing and Markdown, text spotting, key-value extraction.

QwenVL HTML (paper §2.2.1, document_parsing cookbook) is ordinary HTML in reading order where each
layout element carries `data-bbox="x1 y1 x2 y2"` in resized-image pixels: `<h1..6>`, `<p>`,
`<table>`, and `<div class="...">` for image / image caption / image ocr / chart / formula /
music sheet / chemical formula. Parsing uses only `html.parser`, which never raises on broken or
truncated markup; we close whatever is still open at the end.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from ._json import find_objects, find_value
from .grounding import Box, parse_boxes

# ----------------------------------------------------------------------------- prompts (cookbooks)

DOC_PARSE_SYSTEM = (
    "You are an AI specialized in recognizing and extracting text from images. Your mission is to analyze "
    "the image document and generate the result in QwenVL Document Parser HTML format using specified tags "
    "while maintaining user privacy and data integrity.")
DOC_PARSE_PROMPT = "QwenVL HTML"  # the trigger is the user prompt; the cookbook passes "QwenVL HTML "
OCR_PROMPT = "Read all the text in the image."
SPOTTING_PROMPT = "Spotting all the text in the image with line-level, and output in JSON format."


def kie_prompt(schema: Any) -> str:
    """Key-information-extraction prompt (OCR cookbook): `schema` is a dict of key -> "" (or an
    example / nested dict), a list of keys, or a JSON Schema of an object (its properties become the
    key template). The JSON is written as the cookbook writes it."""
    return "Extract the key-value information in the format:" + json.dumps(_as_schema(schema), ensure_ascii=False)


def is_json_schema(schema: Any) -> bool:
    """A JSON Schema of an object ({"type": "object", "properties": {...}}), as opposed to a cookbook key
    template ({"company": "", ...}, where a "type" key would hold an example value, not "object")."""
    return isinstance(schema, dict) and schema.get("type") == "object" and isinstance(schema.get("properties"), dict)


def schema_template(schema: dict) -> Any:
    """The cookbook key template a JSON Schema describes: objects -> {key: template}, arrays of objects ->
    [template], anything else -> "" (local $refs followed)."""
    def resolve(s, depth=0):
        while isinstance(s, dict) and isinstance(s.get("$ref"), str) and s["$ref"].startswith("#/") and depth < 32:
            target = schema
            for part in s["$ref"][2:].split("/"):
                target = target.get(part, {}) if isinstance(target, dict) else {}
            s, depth = target, depth + 1
        return s

    def build(s, depth=0):
        s = resolve(s)
        if not isinstance(s, dict) or depth > 32:
            return ""
        if isinstance(s.get("properties"), dict):
            return {k: build(v, depth + 1) for k, v in s["properties"].items()}
        if s.get("type") == "array" and isinstance(resolve(s.get("items")), dict) and \
                isinstance(resolve(s.get("items")).get("properties"), dict):
            return [build(s["items"], depth + 1)]
        return ""

    return build(schema)


# ----------------------------------------------------------------------------- QwenVL HTML

@dataclass
class Element:
    """One layout element in reading order.

    type: heading, paragraph, table, image, image_caption, image_ocr, chart, formula, music_sheet,
          chemical_formula, list_item (or the tag / class name for anything else).
    bbox: (x1, y1, x2, y2) from data-bbox, resized-image pixels; None when absent or malformed.
    text: whitespace-collapsed text (caption, formula source, paragraph...); <br> kept as newline.
    rows: table / chart cells, one list per row, colspan/rowspan expanded with "" fillers.
    level: 1..6 for headings. attrs: the element's raw attributes (class, format, ...).
    """
    type: str
    bbox: tuple[float, float, float, float] | None = None
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)
    level: int | None = None
    attrs: dict = field(default_factory=dict)


_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_BLOCK_TAGS = {"p", "table", "div", "img", "li", "pre", "blockquote", *_HEADINGS}  # not ul/ol: each <li> is one element
_TEXT_BLOCKS = {"p", "li", "pre", "blockquote", *_HEADINGS}  # can't contain another block: a new one closes them
_VOID = {"img", "br", "hr", "meta", "link", "input", "col", "area", "base", "wbr", "source"}
_SKIP_CONTENT = {"style", "script", "head", "title"}


def parse_bbox(value: str | None) -> tuple[float, float, float, float] | None:
    """'x1 y1 x2 y2' (spaces or commas) -> 4 floats, else None."""
    nums = re.findall(r"-?\d+(?:\.\d+)?", value or "")
    return tuple(float(n) for n in nums) if len(nums) == 4 else None


def _element_type(tag: str, attrs: dict) -> str:
    if tag in _HEADINGS:
        return "heading"
    if tag == "p":
        return "paragraph"
    if tag in ("li", "pre", "blockquote"):
        return {"li": "list_item", "pre": "code", "blockquote": "quote"}[tag]
    if tag == "img":
        return "image"
    cls = (attrs.get("class") or "").strip().lower()
    if tag == "table" or cls.startswith("table"):  # <table class="table0">
        return "table"
    # "formula.machine_printed" / "formula.handwritten" -> formula (as the cookbook's cleaner does)
    cls = cls.split(".")[0]
    return re.sub(r"\s+", "_", cls) if cls else tag


class _Table:
    """Builds a cell grid, expanding colspan/rowspan with "" fillers."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.pending: dict[int, int] = {}  # column -> rows still covered by a rowspan from above
        self.cell: list[str] | None = None
        self.cell_span = (1, 1)

    def start_row(self) -> None:
        self.end_cell()
        row: list[str] = []
        self.rows.append(row)
        self._fill_spans(row)

    def _fill_spans(self, row: list[str]) -> None:
        while self.pending.get(len(row), 0) > 0:
            self.pending[len(row)] -= 1
            row.append("")

    def start_cell(self, attrs: dict) -> None:
        self.end_cell()
        if not self.rows:
            self.start_row()
        self.cell = []
        self.cell_span = (_int(attrs.get("colspan")), _int(attrs.get("rowspan")))

    def text(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)

    def end_cell(self) -> None:
        if self.cell is None:
            return
        row = self.rows[-1]
        self._fill_spans(row)
        colspan, rowspan = self.cell_span
        row.append(_collapse("".join(self.cell)))
        for k in range(colspan):
            if k:
                row.append("")
            if rowspan > 1:
                self.pending[len(row) - 1] = rowspan - 1
        self.cell = None
        self._fill_spans(row)


def _int(value: Any) -> int:
    try:
        return max(1, int(str(value).strip()))
    except (TypeError, ValueError):
        return 1


def _collapse(text: str) -> str:
    """Collapse whitespace runs to one space per line; keep the newlines that <br> produced."""
    return "\n".join(" ".join(line.split()) for line in text.split("\n")).strip()


class _QwenHTMLParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.block: Element | None = None  # the outermost open layout element
        self.stack: list[str] = []  # open tags inside the block, to match end tags
        self.text: list[str] = []
        self.table: _Table | None = None
        self.skip = 0  # inside <style>/<script>
        self.stray: list[str] = []  # text outside any element

    # -- block lifecycle
    def _open_block(self, tag: str, attrs: dict) -> None:
        self._flush_stray()
        self.block = Element(type=_element_type(tag, attrs), bbox=parse_bbox(attrs.get("data-bbox")),
                             level=_HEADINGS.get(tag), attrs=attrs)
        self.stack = [tag]
        self.text = []
        self.table = _Table() if tag == "table" else None

    def _close_block(self) -> None:
        if self.block is None:
            return
        if self.table is not None:
            self.table.end_cell()
            self.block.rows = [r for r in self.table.rows if r]
        self.block.text = _collapse("".join(self.text))
        self.elements.append(self.block)
        self.block, self.stack, self.text, self.table = None, [], [], None

    def _flush_stray(self) -> None:
        text = _collapse("".join(self.stray))
        self.stray = []
        if text:
            self.elements.append(Element(type="paragraph", text=text))

    # -- HTMLParser callbacks
    def handle_starttag(self, tag: str, attr_list: list) -> None:
        attrs = {k: (v if v is not None else "") for k, v in attr_list}
        if tag in _SKIP_CONTENT:
            self.skip += tag not in _VOID
            return
        if self.block is None:
            # a bare <div> (no class, no box) is just a wrapper: its children are the elements
            bare_div = tag == "div" and not attrs.get("class") and "data-bbox" not in attrs
            if (tag in _BLOCK_TAGS and not bare_div) or "data-bbox" in attrs:
                self._open_block(tag, attrs)
                if tag in _VOID:
                    self._close_block()
            elif tag == "br":
                self.stray.append("\n")
            return
        if self.stack[0] in _TEXT_BLOCKS and (tag in _TEXT_BLOCKS or tag in ("table", "div")):
            self._close_block()  # <p>a<p>b: HTML closes the first paragraph implicitly
            self.handle_starttag(tag, attr_list)
            return
        if tag == "br":
            self.text.append("\n")
        elif tag == "img" and self.block.attrs.get("img-bbox") is None and "data-bbox" in attrs:
            self.block.attrs["img-bbox"] = attrs["data-bbox"]  # the picture inside a caption/chart/formula div
        elif tag == "table":
            self.table = self.table or _Table()
        elif tag == "tr" and self.table is not None:
            self.table.start_row()
        elif tag in ("td", "th") and self.table is not None:
            self.table.start_cell(attrs)
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attr_list: list) -> None:
        self.handle_starttag(tag, attr_list)
        if tag not in _VOID and self.block is not None and self.stack and self.stack[-1] == tag:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_CONTENT:
            self.skip = max(0, self.skip - 1)
            return
        if self.block is None or tag not in self.stack:
            return  # </body>, </html>, or an end tag for something never opened
        while self.stack:
            open_tag = self.stack.pop()
            if open_tag in ("td", "th") and self.table is not None:
                self.table.end_cell()
            if open_tag in _BLOCK_TAGS or open_tag in ("td", "th", "tr"):
                self.text.append(" ")  # keep words of adjacent blocks/cells apart
            if open_tag == tag:
                break
        if not self.stack:
            self._close_block()

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        data = re.sub(r"\s+", " ", data)  # source newlines are just spaces in HTML; only <br> breaks a line
        if self.block is None:
            self.stray.append(data)
            return
        self.text.append(data)
        if self.table is not None:
            self.table.text(data)

    def finish(self) -> list[Element]:
        self.close()
        self._close_block()  # truncated output: keep the element that was being written
        self._flush_stray()
        return self.elements


def parse_html(text: str) -> list[Element]:
    """QwenVL HTML (fenced or not, broken or truncated) -> layout elements in reading order."""
    m = re.search(r"```(?:html)?\s*\n?(.*?)(?:```|$)", text, re.S)
    if m and "<" in m.group(1):
        text = m.group(1)
    text = re.sub(r"<[^<>]*$", "", text)  # a tag cut off mid-attribute would otherwise come back as text
    parser = _QwenHTMLParser()
    parser.feed(text)
    return parser.finish()


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def table_to_markdown(rows: list[list[str]]) -> str:
    """A GitHub-style Markdown table; the first row is the header, short rows are padded."""
    if not rows:
        return ""
    ncols = max(len(r) for r in rows)
    padded = [[_md_cell(c) for c in r] + [""] * (ncols - len(r)) for r in rows]
    lines = ["| " + " | ".join(padded[0]) + " |", "|" + "---|" * ncols]
    lines += ["| " + " | ".join(r) + " |" for r in padded[1:]]
    return "\n".join(lines)


def to_markdown(elements: list[Element] | str) -> str:
    """Elements (or QwenVL HTML text) -> Markdown, one block per element."""
    if isinstance(elements, str):
        elements = parse_html(elements)
    blocks = []
    for el in elements:
        if el.type == "heading":
            blocks.append("#" * (el.level or 1) + " " + el.text.replace("\n", " "))
        elif el.rows:
            blocks.append(table_to_markdown(el.rows))
        elif el.type == "formula":
            blocks.append(f"$$\n{el.text}\n$$" if el.text else "")
        elif el.type in ("image", "image_caption", "image_ocr", "chart"):
            blocks.append(f"![{el.text}]()" if el.type != "image_ocr" else f"![image]()\n\n{el.text}")
        elif el.type in ("music_sheet", "chemical_formula", "code"):
            lang = {"abc notation": "abc", "smile": "smiles"}.get(el.attrs.get("format", ""), el.attrs.get("format", ""))
            blocks.append(f"```{lang}\n{el.text}\n```")
        elif el.type == "list_item":
            blocks.append("- " + el.text)
        else:
            blocks.append(el.text)
    return "\n\n".join(b for b in blocks if b) + "\n"


# ----------------------------------------------------------------------------- text spotting

def parse_text_spotting(text: str) -> list[Box]:
    """Spotting answers `[{"bbox_2d": [...], "text_content": "..."},]` (the cookbook's own output has
    trailing commas) -> boxes whose label is the text content."""
    spots = []
    for box in parse_boxes(text):
        content = box.extra.pop("text_content", None)
        if content is not None or box.label is not None:
            box.label = str(content) if content is not None else box.label
            spots.append(box)
    return spots


# ----------------------------------------------------------------------------- key-value extraction

@dataclass
class KIEResult:
    """values: one entry per schema key (nested dicts follow nested schemas); missing keys are None.
    missing / extra: dotted key paths absent from the answer / present but not asked for.
    errors: with a JSON Schema, where the found values break it (types, enums, required...; "$.key: ...").
    ok: an answer was found, no key is missing and the values follow the schema."""
    values: dict
    missing: list[str]
    extra: list[str]
    parsed: bool
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.parsed and not self.missing and not self.errors


def _as_schema(schema: Any) -> dict:
    if is_json_schema(schema):
        return schema_template(schema)
    if isinstance(schema, dict):
        return schema
    if isinstance(schema, (list, tuple)):
        return {str(k): "" for k in schema}
    raise TypeError(f"schema must be a dict or a list of keys, got {type(schema).__name__}")


def _match(schema: dict, answer: dict, prefix: str, missing: list, extra: list) -> dict:
    lookup = {str(k).strip().lower(): k for k in answer}  # tolerate "Company" for "company"
    values = {}
    used = set()
    for key, sub in schema.items():
        found = key if key in answer else lookup.get(str(key).strip().lower())
        path = prefix + str(key)
        if found is None:
            missing.append(path)
            values[key] = None
            continue
        used.add(found)
        value = answer[found]
        if isinstance(sub, dict) and sub and isinstance(value, dict):
            value = _match(sub, value, path + ".", missing, extra)
        values[key] = value
    extra += [prefix + str(k) for k in answer if k not in used]
    return values


def parse_kie(text: str, schema: Any) -> KIEResult:
    """Read a key-value answer (prose + fenced JSON, as the cookbook shows) against the schema the
    prompt asked for (a key template, a list of keys or a JSON Schema; with a JSON Schema the values are
    also validated against it). Never raises on model output."""
    template = _as_schema(schema)
    value = find_value(text)
    if isinstance(value, list):  # some answers wrap the dict in a list
        value = next((v for v in value if isinstance(v, dict)), None)
    if not isinstance(value, dict):
        objects = find_objects(text)
        value = objects[0] if objects else None
    missing: list[str] = []
    extra: list[str] = []
    values = _match(template, value if isinstance(value, dict) else {}, "", missing, extra)
    errors: list[str] = []
    if is_json_schema(schema):
        from ..serve.protocol import validate_schema  # lazy: the serve package is not needed otherwise

        # the values as matched (keys in the schema's spelling), absent keys left out; with a JSON Schema only
        # its *required* keys count as missing (optional ones stay None in `values`)
        missing = []
        for e in validate_schema(_present(values), schema):
            m = _MISSING.match(e)
            if m:
                missing.append((m.group(1) + "." if m.group(1) else "") + m.group(3))
            else:
                errors.append(e)
    return KIEResult(values=values, missing=missing, extra=extra, parsed=isinstance(value, dict), errors=errors)


_MISSING = re.compile(r"^\$\.?(.*?): missing (['\"])(.*)\2$")


def _present(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _present(v) for k, v in values.items() if v is not None}
    return values
