"""The server's media policy without a server: which sources a request may use (allowed dirs, traversal and
symlinks, remote addresses) and the per-request totals (pixels, videos), plus the remote fetcher's deadline
against a server that trickles its answer. Expected values are worked out from the limits set here."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time

import pytest
from PIL import Image

from qwenvl.chat import normalize_messages
from qwenvl.errors import InputError, MediaError
from qwenvl.serve.media import MediaLimits, fetch_url, is_public_address, prepare_messages


def png(w=56, h=56) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def request(*items) -> list[dict]:
    return normalize_messages([{"role": "user", "content": [*items, {"type": "text", "text": "?"}]}])


def image(src) -> dict:
    return {"type": "image_url", "image_url": {"url": src}}


@pytest.fixture
def dirs(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(png())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png())
    os.symlink(outside / "secret.png", allowed / "link.png")  # inside by name, outside in fact
    os.symlink(outside, allowed / "linkdir")
    return allowed, outside


def test_local_paths_only_under_the_allowed_dir(dirs):
    allowed, outside = dirs
    limits = MediaLimits(allowed_dirs=[str(allowed)])
    msgs = request(image(str(allowed / "ok.png")), image(f"file://{allowed}/ok.png"))
    assert prepare_messages(msgs, limits)["images"] == 2
    # the resolved source is the real path the processor will read
    assert msgs[-1]["content"][0]["image"] == os.path.realpath(allowed / "ok.png")
    refused = [str(outside / "secret.png"), f"{allowed}/../outside/secret.png", f"file://{allowed}/../outside/secret.png",
               str(allowed / "link.png"), str(allowed / "linkdir" / "secret.png"),
               str(allowed) + "-evil/x.png",  # a sibling whose name starts with the allowed dir's
               "/etc/hostname"]
    for src in refused:
        with pytest.raises(MediaError, match="only readable under --allowed-media-dir"):
            prepare_messages(request(image(src)), limits)
    with pytest.raises(MediaError, match=r"\(none set\)"):  # no dir given: no local file at all
        prepare_messages(request(image(str(allowed / "ok.png"))), MediaLimits())
    with pytest.raises(MediaError, match="unsupported URL scheme 'ftp'"):
        prepare_messages(request(image("ftp://example.com/a.png")), limits)
    with pytest.raises(MediaError, match="file not found"):
        prepare_messages(request(image(str(allowed / "missing.png"))), limits)


def test_request_totals_pixels_and_videos():
    # three 100x100 images = 30000 pixels: fine under 30000, refused under 29999 (at the third image)
    three = [image(data_url(png(100, 100)))] * 3
    assert prepare_messages(request(*three), MediaLimits(max_request_pixels=30000))["pixels"] == 30000
    with pytest.raises(MediaError, match=r"messages\[0\]\.content\[2\].*30000 pixels in all, over the limit of 29999"):
        prepare_messages(request(*three), MediaLimits(max_request_pixels=29999))
    # one decoded image over max_image_pixels (101 x 100 = 10100 > 10000)
    with pytest.raises(MediaError, match="101x100 = 10100 pixels, over the limit of 10000"):
        prepare_messages(request(image(data_url(png(101, 100)))), MediaLimits(max_image_pixels=10000))
    # videos given as frame lists count as videos (and their frames as images): 2 allowed, the third refused
    clip = {"type": "video", "video": [data_url(png())] * 2}
    totals = prepare_messages(request(clip, clip), MediaLimits(max_videos=2))
    assert (totals["videos"], totals["images"], totals["video_seconds"]) == (2, 4, 2.0)  # 2 frames at 2 fps = 1 s
    with pytest.raises(MediaError, match="more than 2 videos"):
        prepare_messages(request(clip, clip, clip), MediaLimits(max_videos=2))
    with pytest.raises(InputError, match="unknown option 'zoom'"):
        prepare_messages(request({"type": "image", "image": data_url(png()), "zoom": 2}), MediaLimits())


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False),  # cloud metadata
    ("100.64.0.1", False),  # carrier-grade NAT
    ("0.0.0.0", False), ("224.0.0.1", False), ("::1", False), ("fe80::1", False), ("fc00::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),  # IPv4-mapped
    ("64:ff9b::7f00:1", False), ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 127.0.0.1 / 169.254.169.254
    ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
])
def test_public_address_rules(address, public):
    assert is_public_address(address) is public


class _Trickle(http.server.BaseHTTPRequestHandler):
    body = b"x" * 200

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.path == "/trickle":  # a byte every 50 ms: 10 s for the body, each byte well inside any per-read timeout
            for b in self.body:
                try:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.05)
        elif self.path == "/stall":
            time.sleep(5)
        else:
            self.wfile.write(self.body)

    def log_message(self, *a):
        pass


def test_fetch_deadline_holds_against_a_trickling_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}"
    try:
        assert fetch_url(url + "/fast", 1000, 5, allow_private=True) == _Trickle.body
        for path in ("/trickle", "/stall"):
            start = time.monotonic()
            with pytest.raises(MediaError, match="longer than 1 s"):
                fetch_url(url + path, 1000, 1.0, allow_private=True)
            assert time.monotonic() - start < 2.5, path  # the 1 s limit, not the 10 s the body takes
    finally:
        srv.shutdown()
