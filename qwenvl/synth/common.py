"""Pieces every generator shares: per-sample RNG, the train / held-out split, resized coordinates, fonts,
words, and the record layout.

Determinism: sample i of (task, split, seed) draws from its own `random.Random` seeded by a hash of those four
values, so it is the same bytes whatever `n` is and whichever other tasks run. Held-out samples differ from
training ones twice: other seeds (the split name is in the hash) and unseen combinations (`heldout_combo`: a
quarter of each task's attribute combinations, e.g. (colour, shape) of a grounding target, are reserved for the
held-out split and never drawn in training).

Coordinates in answers are absolute pixels of the *resized* image (preprocess.smart_resize with factor 28).
Every image is at most MAX_AREA pixels, so the resized size is the same for any min_pixels <= 3136 and any
max_pixels >= MAX_AREA (the processor defaults and the trainer's 1280*28*28 both qualify).
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image, ImageFont

from ..preprocess import smart_resize

MAX_AREA = 448 * 448  # 256 vision tokens at most

# ----------------------------------------------------------------------------- randomness and splits


def stable_hash(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def sample_rng(seed: int, split: str, task: str, index: int) -> random.Random:
    return random.Random(stable_hash("qwenvl-synth", seed, split, task, index))


def heldout_combo(task: str, *combo: Any) -> bool:
    """True for the quarter of `task`'s attribute combinations reserved for the held-out split."""
    return stable_hash("combo", task, *combo) % 4 == 0


def allowed(task: str, heldout: bool, *combo: Any) -> bool:
    return heldout_combo(task, *combo) == heldout


def draw_combo(rng: random.Random, task: str, heldout: bool, *choices: list) -> tuple:
    """A combination (one value from each list) on the right side of the split. If that side is empty (a
    machine with very few fonts) every combination is allowed: the split then differs by seed only."""
    combos = _product(choices)
    return rng.choice([c for c in combos if allowed(task, heldout, *c)] or combos)


def _product(choices: tuple) -> list[tuple]:
    out: list[tuple] = [()]
    for values in choices:
        out = [c + (v,) for c in out for v in values]
    return out


# ----------------------------------------------------------------------------- coordinates


def resized_hw(h: int, w: int) -> tuple[int, int]:
    """(height, width) the processor resizes an h x w image to (factor 28, default limits)."""
    return tuple(smart_resize(h, w, factor=28))


def to_resized_box(box, hw: tuple[int, int], rhw: tuple[int, int]) -> list[int]:
    """[x1, y1, x2, y2] in original pixels (x2, y2 exclusive) -> integers in resized-image pixels."""
    sx, sy = rhw[1] / hw[1], rhw[0] / hw[0]
    x1, y1, x2, y2 = box
    return [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]


def to_resized_point(xy, hw: tuple[int, int], rhw: tuple[int, int]) -> list[int]:
    return [round(xy[0] * rhw[1] / hw[1]), round(xy[1] * rhw[0] / hw[0])]


def image_size(rng: random.Random, lo: int = 224, hi: int = 448) -> tuple[int, int]:
    """(height, width) with both sides in [lo, hi], usually not multiples of 28, area <= MAX_AREA."""
    while True:
        w, h = rng.randint(lo, hi), rng.randint(lo, hi)
        if w * h <= MAX_AREA:
            return h, w


# ----------------------------------------------------------------------------- fonts and words

_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation", "/usr/share/fonts/TTF",
              "/Library/Fonts", "C:/Windows/Fonts")
_FONT_FILES = {"dejavu-sans": "DejaVuSans.ttf", "dejavu-serif": "DejaVuSerif.ttf", "dejavu-mono": "DejaVuSansMono.ttf",
               "liberation-sans": "LiberationSans-Regular.ttf", "liberation-serif": "LiberationSerif-Regular.ttf",
               "liberation-mono": "LiberationMono-Regular.ttf"}
_BOLD = {"dejavu-sans": "DejaVuSans-Bold.ttf", "dejavu-serif": "DejaVuSerif-Bold.ttf",
         "liberation-sans": "LiberationSans-Bold.ttf", "liberation-serif": "LiberationSerif-Bold.ttf"}
_font_cache: dict = {}


def _font_dirs() -> list[str]:
    """QWENVL_FONT_DIRS (os.pathsep-separated) first: a machine without the fonts (the GPU hosts have none, only
    Pillow's built-in font) gets them from a folder that travels with the job (bench/devcarry.sh)."""
    extra = [d for d in os.environ.get("QWENVL_FONT_DIRS", "").split(os.pathsep) if d]
    return extra + list(_FONT_DIRS)


def _find(filename: str) -> str | None:
    for d in _font_dirs():
        p = os.path.join(d, filename)
        if os.path.exists(p):
            return p
    return None


def font_names() -> list[str]:
    """Fonts found on this machine plus Pillow's built-in one (always there). Data made on machines with
    other fonts differs; the font used is in every record's meta."""
    names = ["pil-default"] + [n for n, f in _FONT_FILES.items() if _find(f)]
    only = [n for n in os.environ.get("QWENVL_SYNTH_FONTS", "").split(",") if n]
    if only:  # QWENVL_SYNTH_FONTS=pil-default: make here the data of a machine with only those fonts
        missing = [n for n in only if n not in names]
        if missing:
            raise ValueError(f"QWENVL_SYNTH_FONTS names fonts not found here: {missing} (found: {names})")
        names = [n for n in names if n in only]
    return names


def font_files() -> list[str]:
    """Paths of the font files found here (regular and bold): what bench/devcarry.sh copies for machines without."""
    return sorted({p for f in list(_FONT_FILES.values()) + list(_BOLD.values()) if (p := _find(f))})


def font(name: str, size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    key = (name, size, bold)
    if key not in _font_cache:
        path = _find(_BOLD[name]) if bold and name in _BOLD else None
        path = path or (_find(_FONT_FILES[name]) if name in _FONT_FILES else None)
        _font_cache[key] = ImageFont.truetype(path, size) if path else ImageFont.load_default(size)
    return _font_cache[key]


WORDS = """
able about account across action active address after again agent almost along amount animal answer apple april
area around art autumn baker balance bank base basket beach bird black blue board boat book border bottle box
bread bridge bright brown budget build butter button cable calm camera candle capital card carbon carpet case
castle cause center chair change chart cheese city clean clock cloud coffee cold color common copper corner cotton
count country course cover cream credit cross crystal cup current data date day deep delta design desk detail
dinner direct doctor door double dream driver early earth east edge energy engine evening event exact factor
family farm fast field figure final finger fire fish flat floor flower focus forest form frame fresh friend front
fruit garden gate glass gold good grain green ground group guide hammer harbor heavy height hello high hill home
honey hotel house hunter idea index island item jacket journal july june kettle key kitchen ladder lake lamp large
layer leaf letter level light limit line lion list local long machine magnet main map march market master meadow
metal middle minute mirror model moment money month morning motor mountain music narrow nature needle network night
noble north note number ocean office open orange order paper parent park party pencil pepper piano picture pilot
planet plant plate point pocket police pool power price print quick quiet radio rain range rapid record report
river road rock roof room round salt sample season second seed shadow shape silver simple sister small smooth
snow solid sound south space spring square stable star station steel stone storm street strong sugar summer
sun table target teacher thunder ticket timber total tower track trade train travel tree value valley velvet
village violet voice wagon water weather window winter wood world yellow young zebra""".split()


def words(rng: random.Random, k: int, capitalize: bool = False) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(k))
    return text[:1].upper() + text[1:] if capitalize else text


def sentence(rng: random.Random, lo: int = 5, hi: int = 12) -> str:
    return words(rng, rng.randint(lo, hi), capitalize=True) + "."


def wrap(text: str, fnt, width: float) -> list[str]:
    """Greedy word wrap to `width` pixels."""
    lines: list[str] = []
    cur = ""
    for w in text.split():
        trial = f"{cur} {w}".strip()
        if cur and fnt.getlength(trial) > width:
            lines.append(cur)
            cur = w
        else:
            cur = trial
    if cur:
        lines.append(cur)
    return lines


COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "orange": (245, 130, 20), "purple": (140, 60, 180), "pink": (240, 120, 190), "brown": (120, 70, 30),
          "black": (20, 20, 20), "cyan": (30, 190, 210)}
INKS = {"black": (20, 20, 20), "navy": (20, 30, 110), "dark red": (130, 20, 20), "dark green": (20, 90, 40)}


def light_background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(215, 250)
    return tuple(min(255, base + rng.randint(-6, 6)) for _ in range(3))


# ----------------------------------------------------------------------------- records


@dataclass
class Ctx:
    """What a generator gets for one sample: its RNG, which split, and where its media go."""
    rng: random.Random
    heldout: bool
    out_dir: str
    stem: str  # media path without extension, relative to out_dir
    index: int = 0  # the sample's index (for choices that must not consume `rng`, e.g. an eval variant's fps)

    def save_image(self, img: Image.Image) -> str:
        rel = self.stem + ".png"
        path = os.path.join(self.out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img.save(path, format="PNG", optimize=False)
        return rel

    def media_path(self, ext: str) -> tuple[str, str]:
        rel = self.stem + ext
        path = os.path.join(self.out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return rel, path


def image_record(image: str, prompt: str, answer: str, meta: dict, system: str | None = None,
                 image_options: dict | None = None) -> dict:
    """A one-turn conversation in DESIGN.md's message format: image first, then the prompt."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages += [{"role": "user", "content": [{"type": "image", "image": image, **(image_options or {})},
                                              {"type": "text", "text": prompt}]},
                 {"role": "assistant", "content": answer}]
    return {"messages": messages, "meta": meta}


Generator = Callable[[Ctx], dict]
