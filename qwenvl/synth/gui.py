"""GUI screenshots (dialogs with buttons, fields, checkboxes, links; desktops with icons) -> one `computer_use`
tool call in the cookbook format, coordinates in the resized screenshot (the size the tool description states).

A typing task on a field that does not have focus is answered with the click that focuses it (the step an agent
must take first). Held out: (widget kind, label) combinations, which training screens never show; for keyboard
shortcuts, whose keys no screen shows, (shortcut, font) pairs instead, so every shortcut is trained.
"""
from __future__ import annotations

import json
import random

from PIL import Image, ImageDraw

from ..tasks.agent import computer_use_tool, tools_system_prompt, user_query
from .common import (Ctx, allowed, font, font_names, image_size, resized_hw, to_resized_box,
                     to_resized_point, words)

LABELS = {
    "button": ["OK", "Cancel", "Save", "Submit", "Next", "Back", "Apply", "Delete", "Search", "Login", "Sign up",
               "Close", "Send", "Upload", "Download", "Reset"],
    "field": ["Name", "Email", "Password", "Username", "Phone", "City", "Address", "Title", "Comment", "Code"],
    "checkbox": ["Remember me", "Subscribe", "I agree", "Dark mode", "Notifications", "Auto save", "Show hidden"],
    "link": ["Forgot password?", "Help", "Privacy policy", "Learn more", "Terms of use", "Contact us", "Details"],
    "icon": ["Documents", "Trash", "Browser", "Terminal", "Photos", "Music", "Settings", "Mail", "Calendar", "Notes"],
    "key": ["undo", "copy", "paste", "save", "select all"],
}
KEYS = {"undo": ("Undo the last change.", ["ctrl", "z"]), "copy": ("Copy the selected text.", ["ctrl", "c"]),
        "paste": ("Paste the clipboard here.", ["ctrl", "v"]), "save": ("Save the file with the keyboard.", ["ctrl", "s"]),
        "select all": ("Select all the text.", ["ctrl", "a"])}
COMBO_TASK = "gui"


def _pool(kind: str, heldout: bool) -> list[str]:
    return [lab for lab in LABELS[kind] if allowed(COMBO_TASK, heldout, kind, lab)]


def key_combos(heldout: bool, fonts: list[str]) -> list[tuple[str, str]]:
    """(shortcut, font) pairs on one side of the split. A shortcut is knowledge, not something the screenshot shows,
    so every shortcut is trained and what is held out is its pairing with a font; a shortcut whose every font on this
    machine falls on the held-out side is trained in all of them and held out in none (with only Pillow's built-in
    font, "select all" was never trained and was 19 of 100 held-out GUI samples, until synth VERSION 6; "undo" the
    same way until VERSION 5). If the held-out side is then empty, every pair is allowed there (split by seed)."""
    trained = {k for k in LABELS["key"] if any(allowed("gui-key", False, k, f) for f in fonts)}
    combos = [(k, f) for k in LABELS["key"] for f in fonts
              if (allowed("gui-key", heldout, k, f) if k in trained else not heldout)]
    return combos or [(k, f) for k in LABELS["key"] for f in fonts]


def _dialog(rng: random.Random, d: ImageDraw.ImageDraw, w: int, h: int, fname: str, target: tuple):
    """Draw a dialog; returns widgets [{kind, label, box, click, ...}] with the target among them."""
    fnt = font(fname, rng.randint(12, 15))
    d.rectangle([0, 0, w - 1, 22], fill=rng.choice([(60, 90, 160), (70, 70, 80), (40, 120, 110)]))
    d.text((8, 4), words(rng, rng.randint(1, 2), capitalize=True), font=font(fname, 13), fill=(255, 255, 255))
    kinds = ["field", "field", "checkbox", "link"]
    rng.shuffle(kinds)
    kinds = kinds[:rng.randint(1, 4)]
    if target[0] in ("field", "checkbox", "link") and target[0] not in kinds:
        kinds.append(target[0])
    widgets, used = [], {target}
    y, x = 34, rng.randint(12, 30)

    placed = []

    def label_for(kind):
        if kind == target[0] and not placed:  # the target is the first widget of its kind
            placed.append(target)
            return target[1]
        choices = [lab for lab in _pool(kind, False) if (kind, lab) not in used]
        lab = rng.choice(choices)
        used.add((kind, lab))
        return lab

    asc, desc = fnt.getmetrics()
    for kind in kinds:
        lab = label_for(kind)
        if kind == "field":
            d.text((x, y), lab, font=fnt, fill=(30, 30, 30))
            bx = x + 90
            box = (bx, y - 4, min(w - 12, bx + rng.randint(120, 220)), y + asc + desc + 4)
            focused = rng.random() < 0.5
            d.rectangle(box, fill=(255, 255, 255), outline=(40, 110, 230) if focused else (150, 150, 150),
                        width=2 if focused else 1)
            if focused:
                d.line([(box[0] + 5, box[1] + 4), (box[0] + 5, box[3] - 4)], fill=(0, 0, 0))
            widgets.append({"kind": kind, "label": lab, "box": box, "focused": focused})
        elif kind == "checkbox":
            s = asc
            box = (x, y, x + s, y + s)
            checked = rng.random() < 0.5
            d.rectangle(box, fill=(255, 255, 255), outline=(80, 80, 80))
            if checked:
                d.line([(x + 2, y + s // 2), (x + s // 2 - 1, y + s - 3), (x + s - 2, y + 2)], fill=(20, 120, 40), width=2)
            d.text((x + s + 6, y - 1), lab, font=fnt, fill=(30, 30, 30))
            widgets.append({"kind": kind, "label": lab, "box": box, "checked": checked})
        else:
            box = d.textbbox((x, y), lab, font=fnt)
            d.text((x, y), lab, font=fnt, fill=(20, 70, 200))
            d.line([(box[0], box[3] + 1), (box[2], box[3] + 1)], fill=(20, 70, 200))
            widgets.append({"kind": kind, "label": lab, "box": box})
        y += asc + desc + rng.randint(14, 24)
    n_buttons = rng.randint(1, 3)
    labels = [label_for("button") for _ in range(n_buttons)]
    rng.shuffle(labels)
    bx = x
    by = min(h - asc - desc - 20, y + 6)
    for lab in labels:
        bw = int(fnt.getlength(lab)) + 24
        box = (bx, by, bx + bw, by + asc + desc + 10)
        primary = rng.random() < 0.4
        d.rounded_rectangle(box, radius=5, fill=(40, 110, 230) if primary else (225, 225, 230), outline=(120, 120, 130))
        d.text((bx + 12, by + 5), lab, font=fnt, fill=(255, 255, 255) if primary else (20, 20, 20))
        widgets.append({"kind": "button", "label": lab, "box": box})
        bx = box[2] + rng.randint(8, 16)
    return widgets


def _desktop(rng: random.Random, d: ImageDraw.ImageDraw, w: int, h: int, fname: str, target: tuple):
    fnt = font(fname, 11)
    labels = rng.sample([lab for lab in _pool("icon", False) if lab != target[1]], rng.randint(2, 5))
    if target[0] == "icon":
        labels[rng.randrange(len(labels))] = target[1]
    widgets, x, y = [], 16, 16
    for lab in labels:
        tile = (x + 8, y, x + 48, y + 40)
        d.rounded_rectangle(tile, radius=6, fill=tuple(rng.randint(40, 200) for _ in range(3)))
        tb = d.textbbox((0, 0), lab, font=fnt)
        d.text((x + 28 - (tb[2] - tb[0]) / 2, y + 44), lab, font=fnt, fill=(255, 255, 255))
        widgets.append({"kind": "icon", "label": lab, "box": (x, y, x + 56, y + 60)})
        y += 76
        if y + 60 > h:
            x, y = x + 80, 16
    return widgets


def gen_gui(ctx: Ctx) -> dict:
    rng = ctx.rng
    kinds = [k for k in ("button", "button", "field", "field", "checkbox", "link", "icon", "key")
             if k == "key" or _pool(k, ctx.heldout)]
    kind = rng.choice(kinds)
    if kind == "key":
        label, fname = rng.choice(key_combos(ctx.heldout, font_names()))
        target, combo = (kind, label), [kind, label, fname]
    else:
        target = (kind, rng.choice(_pool(kind, ctx.heldout)))
        fname, combo = rng.choice(font_names()), list(target)
    h, w = image_size(rng, 320, 448)
    desktop = kind == "icon" or (kind == "key" and rng.random() < 0.3)
    img = Image.new("RGB", (w, h), (rng.randint(20, 60), rng.randint(60, 110), rng.randint(110, 160)) if desktop
                    else (rng.randint(236, 250),) * 3)
    d = ImageDraw.Draw(img)
    widgets = (_desktop if desktop else _dialog)(rng, d, w, h, fname, target)
    rhw = resized_hw(h, w)
    tw = next((wd for wd in widgets if (wd["kind"], wd["label"]) == target), None)
    box = None if tw is None else to_resized_box(tw["box"], (h, w), rhw)
    center = None if tw is None else to_resized_point(((tw["box"][0] + tw["box"][2]) / 2, (tw["box"][1] + tw["box"][3]) / 2),
                                                      (h, w), rhw)
    label = target[1]
    if kind == "key":
        task, keys = KEYS[label]
        args = {"action": "key", "keys": keys}
    elif kind == "button":
        task, args = f"Click the '{label}' button.", {"action": "left_click", "coordinate": center}
    elif kind == "link":
        task, args = f"Open the '{label}' link.", {"action": "left_click", "coordinate": center}
    elif kind == "checkbox":
        task = f"{'Untick' if tw['checked'] else 'Tick'} the '{label}' checkbox."
        args = {"action": "left_click", "coordinate": center}
    elif kind == "icon":
        task, args = f"Open {label} from the desktop.", {"action": "double_click", "coordinate": center}
    else:
        text = words(rng, rng.randint(1, 3)) if label not in ("Email", "Phone") else \
            (f"{words(rng, 1)}@{words(rng, 1)}.com" if label == "Email" else str(rng.randint(10**6, 10**7 - 1)))
        task = f"Type '{text}' into the {label} field."
        args = {"action": "type", "text": text} if tw["focused"] else {"action": "left_click", "coordinate": center}
    rel = ctx.save_image(img)
    rh, rw = rhw
    answer = "<tool_call>\n" + json.dumps({"name": "computer_use", "arguments": args}) + "\n</tool_call>"
    messages = [{"role": "system", "content": tools_system_prompt([computer_use_tool(rw, rh)])},
                {"role": "user", "content": [{"type": "text", "text": user_query(task)}, {"type": "image", "image": rel}]},
                {"role": "assistant", "content": answer}]
    meta = {"image_hw": [h, w], "resized_hw": list(rhw), "combo": combo, "font": fname, "task": task,
            "action": args, "box": box if args.get("coordinate") else None,
            "widgets": [{**wd, "box": list(wd["box"]), "bbox_2d": to_resized_box(wd["box"], (h, w), rhw)} for wd in widgets]}
    return {"messages": messages, "meta": meta}
