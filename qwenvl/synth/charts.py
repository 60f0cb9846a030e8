"""Bar and line charts -> values (ChartQA-style questions: a category's value, the largest, the smallest).

Rendered with matplotlib (Agg, fixed size, no PNG metadata) when it is installed, else drawn with PIL; the
renderer is in each record's meta. Held out: (chart kind, colour) combinations.
"""
from __future__ import annotations

import io

from PIL import Image, ImageDraw

from .common import COLORS, Ctx, draw_combo, font, image_record, resized_hw, words

CATEGORY_SETS = [
    "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(),
    "Mon Tue Wed Thu Fri Sat Sun".split(),
    [str(y) for y in range(2012, 2025)],
    "North South East West Central".split(),
    "Apples Pears Grapes Plums Cherries Lemons Mangoes".split(),
    "Q1 Q2 Q3 Q4".split(),
]
KINDS = ("bar", "line")
CHART_COLORS = ["red", "green", "blue", "orange", "purple", "brown", "black", "cyan"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


def render_matplotlib(kind, cats, values, color, title, w, h, labels) -> Image.Image:
    from matplotlib.figure import Figure  # no pyplot: no backend switch, no global state

    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_subplot()
    rgb = tuple(c / 255 for c in COLORS[color])
    if kind == "bar":
        bars = ax.bar(cats, values, color=rgb)
        if labels:
            ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7)
    else:
        ax.plot(cats, values, color=rgb, marker="o")
        if labels:
            for x, v in zip(cats, values):
                ax.annotate(_fmt(v), (x, v), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.set_ylim(0, max(values) * 1.15)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return Image.open(buf).convert("RGB")


def render_pil(kind, cats, values, color, title, w, h, labels) -> Image.Image:
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    small, big = font("pil-default", 10), font("pil-default", 13)
    d.text(((w - big.getlength(title)) / 2, 6), title, font=big, fill=(0, 0, 0))
    x0, y0, x1, y1 = 40, 30, w - 12, h - 24  # plot area
    top = max(values) * 1.15
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=(0, 0, 0))
    for frac in (0, 0.5, 1):
        tick = top * frac
        y = y1 - (y1 - y0) * frac
        d.line([(x0 - 3, y), (x0, y)], fill=(0, 0, 0))
        d.text((x0 - 5 - small.getlength(_fmt(round(tick))), y - 5), _fmt(round(tick)), font=small, fill=(0, 0, 0))
    step = (x1 - x0) / len(cats)
    pts = []
    for i, (c, v) in enumerate(zip(cats, values)):
        cx = x0 + step * (i + 0.5)
        y = y1 - (y1 - y0) * v / top
        if kind == "bar":
            d.rectangle([cx - step * 0.35, y, cx + step * 0.35, y1], fill=COLORS[color])
        pts.append((cx, y))
        d.text((cx - small.getlength(c) / 2, y1 + 4), c, font=small, fill=(0, 0, 0))
        if labels:
            d.text((cx - small.getlength(_fmt(v)) / 2, y - 13), _fmt(v), font=small, fill=(0, 0, 0))
    if kind == "line":
        d.line(pts, fill=COLORS[color], width=2)
        for cx, y in pts:
            d.ellipse([cx - 3, y - 3, cx + 3, y + 3], fill=COLORS[color])
    return img


def gen_chart(ctx: Ctx, renderer: str | None = None) -> dict:
    rng = ctx.rng
    kind, color = draw_combo(rng, "chart", ctx.heldout, list(KINDS), CHART_COLORS)
    pool = rng.choice(CATEGORY_SETS)
    start = rng.randint(0, len(pool) - min(3, len(pool)))
    cats = pool[start:start + rng.randint(3, min(7, len(pool) - start))]
    decimals = rng.random() < 0.3
    hi = rng.choice([10, 50, 100, 500, 1000])
    while True:
        values = [round(rng.uniform(hi * 0.05, hi), 1) if decimals else rng.randint(max(1, hi // 20), hi) for _ in cats]
        if len(set(values)) == len(values):  # a unique largest and smallest
            break
    title = f"{words(rng, rng.randint(1, 2), capitalize=True)} by {rng.choice(['month', 'day', 'year', 'region', 'item', 'quarter'])}"
    w, h = rng.randint(320, 448), rng.randint(240, 400)
    labels = rng.random() < 0.5
    renderer = renderer or ("matplotlib" if have_matplotlib() else "pil")
    draw = render_matplotlib if renderer == "matplotlib" else render_pil
    img = draw(kind, cats, values, color, title, w, h, labels)
    q = rng.choice(["value", "value", "max", "min"])
    if q == "value":
        i = rng.randrange(len(cats))
        prompt, answer = f"What is the value for {cats[i]} in the chart? Answer with a number.", _fmt(values[i])
    elif q == "max":
        prompt, answer = "Which category has the highest value in the chart?", cats[values.index(max(values))]
    else:
        prompt, answer = "Which category has the lowest value in the chart?", cats[values.index(min(values))]
    meta = {"image_hw": [h, w], "resized_hw": list(resized_hw(h, w)), "kind": kind, "color": color, "combo": [kind, color], "renderer": renderer,
            "categories": cats, "values": values, "question": q, "value_labels": labels}
    return image_record(ctx.save_image(img), prompt, answer, meta)
