"""Document pages as images: an image file is one page; a PDF's pages are rendered with pypdfium2, one at a
time, so a long PDF never has more than one page in memory."""

from __future__ import annotations

from ..errors import InputError


MAX_PAGE_PIXELS = 40_000_000  # a poster-size page is rendered at a lower dpi rather than as a 1 GB bitmap


def is_pdf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(5) == b"%PDF-"
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def _page_numbers(spec: str | None, n: int) -> list[int]:
    if not spec:
        return list(range(1, n + 1))
    pages = []
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise InputError(f"--pages {spec!r}: expected numbers and ranges like 1-3,5") from None
        if not 1 <= lo <= hi <= n:
            raise InputError(f"--pages {spec!r}: the document has pages 1..{n}")
        pages += range(lo, hi + 1)
    return pages


def iter_pages(path: str, pages: str | None = None, dpi: float = 144.0, max_pixels: int = MAX_PAGE_PIXELS):
    """(page number, PIL image) of an image file (page 1) or of a PDF's pages (numbers like "1-3,5"), each
    rendered at `dpi` (lower if the page would exceed max_pixels) when it is reached."""
    if not is_pdf(path):
        from ..media import load_image

        yield 1, load_image(path)
        return
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(path)
    except pdfium.PdfiumError as e:
        raise InputError(f"{path}: not a readable PDF ({e})") from None
    try:
        for n in _page_numbers(pages, len(doc)):
            page = doc[n - 1]
            try:
                w, h = page.get_size()  # points (1/72 inch)
                scale = min(dpi / 72, (max_pixels / max(w * h, 1)) ** 0.5)
                yield n, page.render(scale=scale).to_pil().convert("RGB")
            finally:
                page.close()
    finally:
        doc.close()
