"""The server's media policy: which image/video sources a request may use, and how much of them.

`prepare_messages` walks the (normalised) messages of a request before anything reaches the engine and
replaces every media source by something the processor can read without further decisions:
  * ``data:`` URLs -> their bytes (bad base64 is refused here);
  * ``http(s)://`` -> the fetched bytes, only with ``allow_remote`` (size and time limits, private/loopback
    addresses refused at connect time, so a DNS answer cannot point us inside);
  * ``file://`` and plain paths -> the path, only when it lies under one of ``allowed_dirs``.
Each image is opened far enough to read its size (corrupt data is refused here), each video is probed for
its duration, and the request's totals are checked against the limits. Item options are checked too, so a
request cannot ask for a 100000x100000 resize.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass, field

from ..errors import InputError, MediaError

# per-item options a request may set (qwen-vl-utils keys), with the largest value accepted
_PIXEL_OPTIONS = ("min_pixels", "max_pixels", "total_pixels")
_OPTIONS = {"min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width", "fps", "nframes",
            "min_frames", "max_frames", "video_start", "video_end", "sample_fps"}


@dataclass
class MediaLimits:
    allowed_dirs: list[str] = field(default_factory=list)
    allow_remote: bool = False
    remote_max_bytes: int = 20 << 20
    remote_timeout: float = 10.0
    max_images: int = 16  # images + frames of frame-list videos, per request
    max_videos: int = 4
    max_video_seconds: float = 3600.0  # total duration of the request's videos
    max_image_pixels: int = 40_000_000  # one decoded image (decompression-bomb guard)
    max_request_pixels: int = 100_000_000  # all images of a request together
    max_item_pixels: int = 16384 * 28 * 28  # the largest per-item max_pixels / resize a request may ask for
    allow_private_remote: bool = False  # tests only: lets the fetcher reach 127.0.0.1


def prepare_messages(messages: list[dict], limits: MediaLimits) -> dict:
    """Resolve and check every media item in place (messages from chat.normalize_messages).

    Returns {"images": n, "videos": n, "video_seconds": s, "pixels": p}. Raises MediaError / InputError.
    """
    from PIL import Image

    totals = {"images": 0, "videos": 0, "video_seconds": 0.0, "pixels": 0}
    for i, message in enumerate(messages):
        for j, item in enumerate(message["content"]):
            if item["type"] not in ("image", "video"):
                continue
            where = f"messages[{i}].content[{j}]"
            _check_options(where, item, limits)
            kind = item["type"]
            if kind == "video" and isinstance(item["video"], (list, tuple)):  # a list of frames
                item["video"] = [_resolve(f"{where}.video[{k}]", f, limits) for k, f in enumerate(item["video"])]
                frames = item["video"]
                totals["images"] += len(frames)
                totals["videos"] += 1
                totals["video_seconds"] += len(frames) / float(item.get("sample_fps", item.get("fps", 2.0)))
                for k, f in enumerate(frames):
                    totals["pixels"] += _image_pixels(f"{where}.video[{k}]", f, limits, Image)
            elif kind == "video":
                item["video"] = src = _resolve(where, item["video"], limits)
                totals["videos"] += 1
                totals["video_seconds"] += _video_seconds(where, src, limits)
            else:
                item["image"] = src = _resolve(where, item["image"], limits)
                totals["images"] += 1
                totals["pixels"] += _image_pixels(where, src, limits, Image)
            if totals["images"] > limits.max_images:
                raise MediaError(f"{where}: more than {limits.max_images} images (video frames included) in one "
                                 "request")
            if totals["videos"] > limits.max_videos:
                raise MediaError(f"{where}: more than {limits.max_videos} videos in one request")
            if totals["video_seconds"] > limits.max_video_seconds:
                raise MediaError(f"{where}: the request's videos last {totals['video_seconds']:.1f} s, over the "
                                 f"limit of {limits.max_video_seconds:g} s")
            if totals["pixels"] > limits.max_request_pixels:
                raise MediaError(f"{where}: the request's images have {totals['pixels']} pixels in all, over the "
                                 f"limit of {limits.max_request_pixels}")
    return totals


def _check_options(where: str, item: dict, limits: MediaLimits) -> None:
    for key, value in item.items():
        if key in ("type", "image", "video"):
            continue
        if key not in _OPTIONS:
            raise InputError(f"{where}: unknown option {key!r} (accepted: {', '.join(sorted(_OPTIONS))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise InputError(f"{where}: option {key!r} must be a non-negative number, got {value!r}")
    for key in _PIXEL_OPTIONS:
        cap = limits.max_item_pixels if key != "total_pixels" else 128000 * 28 * 28
        if item.get(key, 0) > cap:
            raise InputError(f"{where}: {key}={item[key]} is over the server's limit of {cap}")
    if "resized_height" in item or "resized_width" in item:
        area = item.get("resized_height", 0) * item.get("resized_width", 0)
        if area == 0 or area > limits.max_item_pixels:
            raise InputError(f"{where}: resized_height x resized_width must both be given and their product at "
                             f"most {limits.max_item_pixels}")
    if item.get("nframes", 0) > 768 or item.get("max_frames", 0) > 768 or item.get("fps", 0) > 60:
        raise InputError(f"{where}: at most 768 frames and 60 fps per video")


def _resolve(where: str, src, limits: MediaLimits):
    """A source -> bytes (data URL, remote) or an allowed local path."""
    from ..media import _decode_data_url, describe_source

    if not isinstance(src, str) or not src:
        raise InputError(f"{where}: a media source must be a non-empty string (data: URL, path or URL)")
    if src.startswith("data:"):
        return _decode_data_url(src, f"{where} ({describe_source(src)})")
    scheme = urllib.parse.urlsplit(src).scheme.lower() if "://" in src else ""
    if scheme in ("http", "https"):
        if not limits.allow_remote:
            raise MediaError(f"{where}: remote media URLs are disabled on this server (start it with "
                             "--allow-remote-media); send the image as a data: URL instead")
        return fetch_url(src, limits.remote_max_bytes, limits.remote_timeout, limits.allow_private_remote)
    if scheme not in ("", "file"):
        raise MediaError(f"{where}: unsupported URL scheme {scheme!r} (use data:, http(s): or file:)")
    path = urllib.parse.unquote(src[len("file://"):]) if scheme == "file" else src
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, d]) == d for d in map(os.path.realpath, limits.allowed_dirs)):
        raise MediaError(f"{where}: local files are only readable under --allowed-media-dir"
                         + (f" ({', '.join(limits.allowed_dirs)})" if limits.allowed_dirs else " (none set)"))
    if not os.path.isfile(real):
        raise MediaError(f"{where}: file not found: {path}")
    return real


def _image_pixels(where: str, src, limits: MediaLimits, Image) -> int:
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            w, h = im.size
    except Exception as e:
        raise MediaError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    if w * h > limits.max_image_pixels:
        raise MediaError(f"{where}: image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_image_pixels}")
    return w * h


def _video_seconds(where: str, src, limits: MediaLimits) -> float:
    from ..media import VideoReader

    try:
        with VideoReader(src, max_image_pixels=limits.max_image_pixels) as reader:
            return reader.duration_s
    except MediaError as e:
        raise MediaError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------- remote fetch
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(ip) -> bool:
    """Globally routable unicast, including what an IPv6 address carries inside it: ::ffff:10.0.0.1 (IPv4-mapped),
    64:ff9b::7f00:1 (NAT64) and 2002:7f00:1:: (6to4) are as private as the IPv4 address they embed."""
    ip = ipaddress.ip_address(ip)
    if ip.version == 6:
        inner = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if inner is not None:
            return is_public_address(inner)
    return ip.is_global and not ip.is_multicast


def _public_ip(host: str, port: int, allow_private: bool) -> tuple:
    """The first address of host that is public (not private, loopback, link-local, reserved...)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MediaError(f"cannot resolve {host!r} ({e})") from None
    for family, _, _, _, addr in infos:
        if allow_private or is_public_address(addr[0].split("%")[0]):
            return family, addr
    raise MediaError(f"{host!r} resolves to a private, loopback or reserved address: refused")


def fetch_url(url: str, max_bytes: int, timeout: float, allow_private: bool = False, redirects: int = 3) -> bytes:
    """GET url with a size cap and an overall deadline; connects only to public addresses (checked on the
    address actually connected to), follows up to `redirects` redirects (each checked the same way).

    The deadline holds against a server that trickles its answer: every socket operation gets only the time
    left, and the body is read in whatever pieces arrive (read1), so no single read waits for a full buffer."""
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MediaError(f"{url[:100]}: download took longer than {timeout:g} s")
        return remaining

    for _ in range(redirects + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MediaError(f"{url[:100]}: not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname, port, timeout=max(0.1, deadline - time.monotonic()))
        socks = []  # ours to re-arm: the connection drops its own reference once a closing response arrives

        def connect(address, timeout=None, source_address=None, *a, _host=parts.hostname, _port=port, **k):
            family, addr = _public_ip(_host, _port, allow_private)
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.settimeout(timeout)
            sock.connect(addr)
            return sock

        conn._create_connection = connect
        try:
            path = parts.path or "/"
            conn.timeout = left()
            conn.request("GET", path + (f"?{parts.query}" if parts.query else ""),
                         headers={"User-Agent": "qwenvl-server", "Accept": "image/*,video/*"})
            conn.sock.settimeout(left())  # the TLS socket when https (it wraps ours)
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                url = urllib.parse.urljoin(url, resp.getheader("Location"))
                continue
            if resp.status != 200:
                raise MediaError(f"{url[:100]}: the server answered HTTP {resp.status}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise MediaError(f"{url[:100]}: {length} bytes, over the limit of {max_bytes}")
            chunks, size = [], 0
            while True:
                (conn.sock or socks[-1]).settimeout(left())
                chunk = resp.read1(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise MediaError(f"{url[:100]}: more than {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        except MediaError:
            raise
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, (socket.timeout, TimeoutError)) and time.monotonic() >= deadline - 0.05:
                raise MediaError(f"{url[:100]}: download took longer than {timeout:g} s") from None
            raise MediaError(f"{url[:100]}: download failed ({type(e).__name__}: {e})") from None
        finally:
            conn.close()
    raise MediaError(f"{url[:100]}: more than {redirects} redirects")
