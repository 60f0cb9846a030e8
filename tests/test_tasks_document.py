"""QwenVL HTML parsing / Markdown, text spotting and key-value extraction on cookbook-style answers."""
import json

from qwenvl.tasks import document as d

# Shaped like the document_parsing cookbook's recorded 72B answer (1014x1532 page, resized 1008x1540),
# extended with the other element kinds of the paper's QwenVL HTML spec.
PAGE = """```html
<html><body>
<h2 data-bbox="310 94 658 132">Qwen2.5 Technical Report</h2>
 <p data-bbox="427 154 542 182">Qwen Team</p>
 <div class="image" data-bbox="262 195 708 272"><img data-bbox="262 195 708 272"/></div>
 <h2 data-bbox="436 289 533 317">Abstract</h2>
 <p data-bbox="99 339 869 565">In this report, we introduce Qwen2.5, a comprehensive
    series of large language models &amp; more.<br/>Second line.</p>
<style>table0{border:1px solid}</style><table data-bbox="99 600 869 700" class="table0"><tr><th colspan="2">Model</th><th>Score</th></tr><tr><td rowspan="2">Qwen</td><td>7B</td><td>84.9</td></tr><tr><td>72B</td><td>a|b</td></tr></table>
<div class="formula.machine_printed" data-bbox="200 720 600 760"> <img data-bbox="200 720 600 760" /> <div> E = mc^2 </div></div>
<div class="image caption" data-bbox="100 780 900 1200"><img data-bbox="100 780 900 1150"/><p>Figure 1: Overview.</p></div>
<div class="chemical formula" format="smile" data-bbox="1 2 3 4"> <img data-bbox="1 2 3 4" /> <div>CCO</div></div>
</body></html>
```"""


def test_parse_html_elements():
    els = d.parse_html(PAGE)
    assert [e.type for e in els] == ["heading", "paragraph", "image", "heading", "paragraph", "table",
                                     "formula", "image_caption", "chemical_formula"]
    assert els[0].bbox == (310, 94, 658, 132) and els[0].level == 2 and els[0].text == "Qwen2.5 Technical Report"
    assert els[4].text == ("In this report, we introduce Qwen2.5, a comprehensive series of large language "
                           "models & more.\nSecond line.")
    assert els[2].text == "" and els[2].bbox == (262, 195, 708, 272)
    assert els[6].text == "E = mc^2"
    assert els[7].text == "Figure 1: Overview." and els[7].bbox == (100, 780, 900, 1200)
    assert els[7].attrs["img-bbox"] == "100 780 900 1150"
    assert els[8].attrs["format"] == "smile" and els[8].text == "CCO"


def test_table_cells_expand_colspan_and_rowspan():
    table = d.parse_html(PAGE)[5]
    assert table.bbox == (99, 600, 869, 700)
    assert table.rows == [["Model", "", "Score"], ["Qwen", "7B", "84.9"], ["", "72B", "a|b"]]


def test_to_markdown():
    md = d.to_markdown(PAGE)
    assert md == (
        "## Qwen2.5 Technical Report\n\n"
        "Qwen Team\n\n"
        "![]()\n\n"
        "## Abstract\n\n"
        "In this report, we introduce Qwen2.5, a comprehensive series of large language models & more.\n"
        "Second line.\n\n"
        "| Model |  | Score |\n|---|---|---|\n| Qwen | 7B | 84.9 |\n|  | 72B | a\\|b |\n\n"
        "$$\nE = mc^2\n$$\n\n"
        "![Figure 1: Overview.]()\n\n"
        "```smiles\nCCO\n```\n")


def test_broken_html_unclosed_and_truncated():
    text = ('<html><body><p data-bbox="1 1 2 2">first para\n<p data-bbox="3 3 4 4">second <b>bold</b> para'
            '<h3 data-bbox="5 5 6 6">Head</h1><table><tr><td>a</td><td>b')
    els = d.parse_html(text)
    assert [(e.type, e.bbox, e.text) for e in els[:3]] == [
        ("paragraph", (1, 1, 2, 2), "first para"), ("paragraph", (3, 3, 4, 4), "second bold para"),
        ("heading", (5, 5, 6, 6), "Head")]
    assert els[3].type == "table" and els[3].rows == [["a", "b"]] and els[3].bbox is None


def test_truncated_inside_a_tag_and_garbage():
    els = d.parse_html('<p data-bbox="1 2 3 4">ok</p><p data-bbox="12 3')
    assert [(e.type, e.text) for e in els] == [("paragraph", "ok")]
    els = d.parse_html("no markup here </div></p>")
    assert [(e.type, e.bbox, e.text) for e in els] == [("paragraph", None, "no markup here")]
    assert d.parse_html("") == []
    assert d.parse_html('<p data-bbox="1 2 three">x</p>')[0].bbox is None  # malformed bbox


def test_chart_div_with_inner_table():
    text = ('<div class="chart" data-bbox="10 10 500 400"><img data-bbox="10 10 500 400"/>'
            '<table><tr><th>Year</th><th>Sales</th></tr><tr><td>2023</td><td>12</td></tr></table></div>')
    (chart,) = d.parse_html(text)
    assert chart.type == "chart" and chart.rows == [["Year", "Sales"], ["2023", "12"]]
    assert d.to_markdown([chart]) == "| Year | Sales |\n|---|---|\n| 2023 | 12 |\n"


# ------------------------------------------------------------------ text spotting

# The OCR cookbook's recorded spotting answer has trailing commas inside each object (not valid JSON).
SPOTTING = """```json
[
    {"bbox_2d": [125, 169, 754, 208], "text_content": "UNIHAKKA INTERNATIONAL SDN BHD",},
    {"bbox_2d": [325, 210, 549, 238], "text_content": "01 Jun 2018 18:41",},
    {"bbox_2d": [88, 250, 300, 271], "text_content": "TOTAL RM8.7"""


def test_text_spotting_trailing_commas_and_truncation():
    spots = d.parse_text_spotting(SPOTTING)
    assert [(s.xyxy, s.label) for s in spots] == [((125, 169, 754, 208), "UNIHAKKA INTERNATIONAL SDN BHD"),
                                                   ((325, 210, 549, 238), "01 Jun 2018 18:41")]
    assert spots[0].extra == {}


# ------------------------------------------------------------------ key-value extraction

SCHEMA = {"company": "", "date": "", "address": "", "total": ""}


def test_kie_prompt_matches_cookbook():
    assert d.kie_prompt(SCHEMA) == ('Extract the key-value information in the format:'
                                    '{"company": "", "date": "", "address": "", "total": ""}')
    assert d.kie_prompt(["发票代码", "票价"]) == 'Extract the key-value information in the format:{"发票代码": "", "票价": ""}'


def test_parse_kie_complete_answer_with_prose():
    answer = ("Here is the extracted key-value information in the requested format:\n\n```json\n"
              + json.dumps({"company": "UNIHAKKA INTERNATIONAL SDN BHD", "date": "01 Jun 2018",
                            "address": "12, JALAN TAMPOI 7/4", "total": "RM8.75"}) + "\n```")
    res = d.parse_kie(answer, SCHEMA)
    assert res.values == {"company": "UNIHAKKA INTERNATIONAL SDN BHD", "date": "01 Jun 2018",
                          "address": "12, JALAN TAMPOI 7/4", "total": "RM8.75"}
    assert res.ok and res.missing == [] and res.extra == []


def test_parse_kie_missing_extra_and_case_insensitive_keys():
    answer = '```json\n{"Company": "ACME", "total": "RM1.00", "tax": "0",}\n```'
    res = d.parse_kie(answer, SCHEMA)
    assert res.values == {"company": "ACME", "date": None, "address": None, "total": "RM1.00"}
    assert res.missing == ["date", "address"] and res.extra == ["tax"]
    assert res.parsed and not res.ok


def test_parse_kie_nested_schema_and_garbage():
    schema = {"seller": {"name": "", "phone": ""}, "total": ""}
    res = d.parse_kie('{"seller": {"name": "Bob"}, "total": 5}', schema)
    assert res.values == {"seller": {"name": "Bob", "phone": None}, "total": 5}
    assert res.missing == ["seller.phone"]
    res = d.parse_kie("Sorry, I can't read this receipt.", ["a", "b"])
    assert res.values == {"a": None, "b": None} and res.missing == ["a", "b"] and not res.parsed


def test_plain_html_without_boxes_and_bare_wrapper_div():
    # the "parse the image into html" prompt gives ordinary HTML, sometimes wrapped in a bare <div>
    text = "<div><h1>Menu</h1><ul><li>Tea</li><li>Coffee</li></ul><p>Open daily</p></div>"
    els = d.parse_html(text)
    assert [(e.type, e.bbox, e.text) for e in els] == [
        ("heading", None, "Menu"), ("list_item", None, "Tea"), ("list_item", None, "Coffee"),
        ("paragraph", None, "Open daily")]
    assert d.to_markdown(els) == "# Menu\n\n- Tea\n\n- Coffee\n\nOpen daily\n"


# ------------------------------------------------------------------ KIE to a user's JSON Schema

INVOICE = {"type": "object",
           "properties": {"company": {"type": "string"}, "total": {"type": "number", "minimum": 0},
                          "currency": {"enum": ["RM", "USD"]}, "date": {"type": "string"},
                          "seller": {"$ref": "#/$defs/party"},
                          "items": {"type": "array", "items": {"type": "object",
                                                                "properties": {"name": {"type": "string"},
                                                                               "price": {"type": "number"}}}}},
           "required": ["company", "total", "seller"],
           "$defs": {"party": {"type": "object", "properties": {"name": {"type": "string"},
                                                                "phone": {"type": "string"}},
                               "required": ["name", "phone"]}}}


def test_kie_json_schema_becomes_the_cookbook_template():
    assert d.is_json_schema(INVOICE) and not d.is_json_schema(SCHEMA)
    assert not d.is_json_schema({"type": "", "amount": ""})  # a template that happens to have a "type" key
    assert d.schema_template(INVOICE) == {"company": "", "total": "", "currency": "", "date": "",
                                          "seller": {"name": "", "phone": ""}, "items": [{"name": "", "price": ""}]}
    assert d.kie_prompt(INVOICE) == (
        'Extract the key-value information in the format:{"company": "", "total": "", "currency": "", "date": "", '
        '"seller": {"name": "", "phone": ""}, "items": [{"name": "", "price": ""}]}')


def test_kie_json_schema_answer_checked_against_the_schema():
    answer = ('Here is the information:\n```json\n{"Company": "ACME", "total": 12.5, "currency": "EUR", '
              '"seller": {"name": "Bob"}, "items": [{"name": "tea", "price": "cheap"}], "note": "x",}\n```')
    res = d.parse_kie(answer, INVOICE)
    assert res.values == {"company": "ACME", "total": 12.5, "currency": "EUR", "date": None,
                          "seller": {"name": "Bob", "phone": None}, "items": [{"name": "tea", "price": "cheap"}]}
    # only required keys count as missing (date is optional; seller.phone is required by $defs/party)
    assert res.missing == ["seller.phone"] and res.extra == ["note"]
    assert sorted(res.errors) == ["$.currency: 'EUR' not in ['RM', 'USD']", "$.items[0].price: expected number, got str"]
    assert res.parsed and not res.ok
    good = d.parse_kie('{"company": "ACME", "total": 3, "seller": {"name": "Bob", "phone": "123"}}', INVOICE)
    assert good.ok and good.missing == [] and good.errors == [] and good.values["date"] is None
    nothing = d.parse_kie("I cannot read this.", INVOICE)
    assert not nothing.parsed and nothing.missing == ["company", "total", "seller"] and not nothing.ok
    negative = d.parse_kie('{"company": "A", "total": -1, "seller": {"name": "B", "phone": "1"}}', INVOICE)
    assert negative.errors == ["$.total: -1 outside [0, inf]"]
