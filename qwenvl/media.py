"""Load and validate images and videos.

Everything a user can hand us (paths, ``file://`` and ``data:`` URLs, raw bytes, PIL images, video files) ends up
here, and every way it can be wrong (missing, corrupt, truncated, not an image, absurdly large) ends up as one
`MediaError` that names the source and the cause. Remote ``http(s)://`` URLs are only fetched through a
caller-provided ``fetch(url) -> bytes`` hook: whether and how to reach the network is the server's decision.

Decompression bombs: an image (or video frame) whose header announces more than ``max_image_pixels`` pixels is
refused before it is decoded. The default, ``DEFAULT_MAX_IMAGE_PIXELS`` = 16384 x 8192 = 128 Mpx (~400 MB as RGB),
passes any camera photo or large scan. PIL keeps its own process-wide guard (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 Mpx
by default): it warns above that and refuses above twice that (179 Mpx); its refusal is turned into a MediaError as
well, so raising our limit past 179 Mpx also needs PIL's global raised.

Videos are decoded with PyAV by seeking: one pass over the packets (no decoding) builds the frame-timestamp index,
then each requested frame is decoded from the nearest keyframe before it, and frames that were not requested are
dropped as soon as they are decoded. An hour-long file therefore never has more than the requested frames in memory.
Frame ``i`` is the i-th frame in presentation order, as in torchvision's ``read_video`` / decord / torchcodec.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import io
import os
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError, MediaError

DEFAULT_MAX_IMAGE_PIXELS = 16384 * 8192

Fetcher = Callable[[str], bytes]
ImageSource = Union[str, bytes, bytearray, memoryview, os.PathLike, Image.Image]


def describe_source(src) -> str:
    """A short printable name for a source: data URLs and byte strings can be megabytes long."""
    if isinstance(src, Image.Image):
        return f"<PIL image {src.mode} {src.width}x{src.height}>"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    text = os.fspath(src) if isinstance(src, os.PathLike) else str(src)
    if text.startswith("data:"):
        return text[: text.find(",") + 1 if "," in text else 30][:40] + f"... ({len(text)} chars)"
    return text if len(text) <= 120 else text[:80] + "..." + text[-30:]


def _decode_data_url(url: str, name: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(f"{name}: only base64 data URLs ('data:<type>;base64,<data>') are supported")
    payload = "".join(payload.split())  # line breaks are common in pasted base64
    payload += "=" * (-len(payload) % 4)  # tolerate stripped padding
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{name}: invalid base64 data ({e})") from None
    if not data:
        raise MediaError(f"{name}: the data URL holds no data")
    return data


def resolve_source(src, fetch: Fetcher | None = None, kind: str = "image") -> Union[str, bytes]:
    """Turn a path / URL / bytes source into a local path or the file's bytes (validating what can be validated)."""
    name = describe_source(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise MediaError(f"empty {kind} data: 0 bytes given")
        return bytes(src)
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    if not isinstance(src, str):
        raise MediaError(f"unsupported {kind} source of type {type(src).__name__}: {name}")
    if src == "":
        raise MediaError(f"empty {kind} source: an empty string was given")
    if src.startswith(("http://", "https://")):
        if fetch is None:
            raise MediaError(f"{name}: remote {kind} URLs are not fetched here (no fetcher configured)")
        try:
            data = fetch(src)
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(f"{name}: could not fetch the {kind} ({type(e).__name__}: {e})") from e
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MediaError(f"{name}: the fetcher returned {type(data).__name__}, not bytes")
        if not data:
            raise MediaError(f"{name}: the fetched {kind} is empty")
        return bytes(data)
    if src.startswith("data:"):
        return _decode_data_url(src, name)
    path = src[len("file://"):] if src.startswith("file://") else src
    if not os.path.isfile(path):
        raise MediaError(f"{kind} file not found: {name}")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{name}: the {kind} file is empty (0 bytes)")
    return path


def _check_pixels(width: int, height: int, limit: int, name: str, what: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"{name}: {what} has an empty size {width}x{height}")
    if width * height > limit:
        raise MediaError(
            f"{name}: {what} is {width}x{height} = {width * height} pixels, over the limit of {limit} pixels "
            "(decompression-bomb guard; raise max_image_pixels to allow it)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image` by the reference rule (qwen-vl-utils `to_rgb`): RGBA is composited onto white, every
    other mode is plain-converted. So a palette/LA image with transparency shows the colour stored under its
    transparent pixels, exactly as the official pipeline feeds the model; convert such an image to RGBA first
    to get white there."""
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        return white
    return image.convert("RGB")


def load_image(
    src: ImageSource, fetch: Fetcher | None = None, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Load `src` (path, file:// or data: URL, bytes, PIL image, or http(s) URL through `fetch`) as an RGB image."""
    name = describe_source(src)
    try:
        if isinstance(src, Image.Image):  # may still be lazy (Image.open), so decode under the same guards
            _check_pixels(src.width, src.height, max_image_pixels, name)
            src.load()
            return to_rgb(src)
        resolved = resolve_source(src, fetch, "image")
        with Image.open(io.BytesIO(resolved) if isinstance(resolved, bytes) else resolved) as image:
            _check_pixels(image.width, image.height, max_image_pixels, name)  # from the header, before decoding
            image.load()  # decode now so truncation errors surface here, not later
            return to_rgb(image)
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name}: refused by PIL's decompression-bomb guard ({e})") from None
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not an image file (unknown or unsupported format)") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for corrupt data
        raise MediaError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from e


class VideoReader:
    """Random access by frame index to one video file, holding no more than the frames asked for.

    Attributes: `total_frames`, `fps` (the stream's average frame rate, as torchvision/decord report it),
    `duration_s` (= total_frames / fps), `width`, `height`, and `frames_decoded` (frames decoded by the last
    `read`, to see the seeking at work).
    """

    def __init__(self, src, fetch: Fetcher | None = None, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.name = describe_source(src)
        self._source = resolve_source(src, fetch, "video")
        self.frames_decoded = 0
        self._container = None
        try:
            self._open()
            stream = self._stream
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
            _check_pixels(self.width, self.height, max_image_pixels, self.name, "video frame")
            self._index_packets()
        except MediaError:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise MediaError(f"{self.name}: not a readable video ({type(e).__name__}: {e})") from e
        if self.total_frames == 0:
            self.close()
            raise MediaError(f"{self.name}: the video stream has no frames")
        rate = stream.average_rate
        if rate:
            self.fps = float(rate)
        else:  # no declared rate: derive it from the stream duration
            seconds = float(stream.duration * stream.time_base) if stream.duration else 0.0
            if seconds <= 0:
                self.close()
                raise MediaError(f"{self.name}: the video declares neither a frame rate nor a duration")
            self.fps = self.total_frames / seconds
        self.duration_s = self.total_frames / self.fps

    def _open(self) -> None:
        import av  # imported on first video only: images (and the GPU bench) need no PyAV

        source = io.BytesIO(self._source) if isinstance(self._source, bytes) else self._source
        self._container = av.open(source)
        if not self._container.streams.video:
            raise MediaError(f"{self.name}: the file has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"

    def _index_packets(self) -> None:
        """One demux pass (no decoding): the presentation timestamps of all frames and of the keyframes."""
        frame_pts, keyframe_pts, count = [], [], 0
        for packet in self._container.demux(self._stream):
            if packet.size == 0:  # the end-of-stream flush packet
                continue
            count += 1
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is not None:
                frame_pts.append(ts)
                if packet.is_keyframe:
                    keyframe_pts.append(ts)
        self.total_frames = count
        self._frame_pts = sorted(frame_pts)
        self._keyframe_pts = sorted(keyframe_pts)
        # Seeking maps an index to a timestamp; without unique timestamps for every frame, decode in order instead.
        self._can_seek = len(frame_pts) == count and len(set(frame_pts)) == count

    def read(self, indices: Sequence[int], transform: Callable | None = None) -> list:
        """Frames at `indices` (any order, repeats allowed) as HxWx3 uint8 arrays, or `transform(array)` of each.

        `transform` runs as soon as a frame is decoded, so a caller that downsizes frames never holds full-size ones.
        """
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < self.total_frames:
                raise InputError(f"{self.name}: frame index {i} is outside the video's {self.total_frames} frames")
        wanted = sorted(set(indices))
        transform = transform or (lambda rgb: rgb)

        def convert(frame):  # PyAV's rgb24 conversion, the one torchvision's read_video uses (frame.to_rgb())
            return transform(frame.to_ndarray(format="rgb24"))

        self.frames_decoded = 0
        try:
            found = self._read_by_seeking(wanted, convert) if self._can_seek and wanted else None
            if found is None:  # no usable timestamps, or the demuxer did not land where asked
                found = self._read_in_order(wanted, convert)
        except (MediaError, InputError):
            raise
        except Exception as e:
            raise MediaError(f"{self.name}: failed while decoding frames ({type(e).__name__}: {e})") from e
        return [found[i] for i in indices]

    def _keyframe_before(self, pts: int) -> int | None:
        k = bisect.bisect_right(self._keyframe_pts, pts) - 1
        return self._keyframe_pts[k] if k >= 0 else None

    def _read_by_seeking(self, wanted: list[int], convert) -> dict | None:
        found, pos, back = {}, 0, 0
        while pos < len(wanted):
            target = self._frame_pts[wanted[pos]]
            # Seek to the keyframe before the target; step `back` keyframes further if a seek overshot.
            k = bisect.bisect_right(self._keyframe_pts, target) - 1 - back
            seek_pts = self._keyframe_pts[k] if k >= 0 else self._frame_pts[0]
            new_pos, overshot = self._decode_run(seek_pts, wanted, pos, found, convert)
            if overshot and new_pos == pos:
                if back >= 2 or k < 0:
                    return None
                back += 1
            else:
                back = 0
            pos = new_pos
        return found

    def _decode_run(self, seek_pts: int, wanted: list[int], pos: int, found: dict, convert) -> tuple[int, bool]:
        """Seek, then decode forward collecting wanted frames. Returns (new pos, whether the target was missed)."""
        self._container.seek(seek_pts, stream=self._stream, backward=True, any_frame=False)
        target = self._frame_pts[wanted[pos]]
        for frame in self._container.decode(self._stream):
            self.frames_decoded += 1
            if frame.pts is None or frame.pts > target:
                return pos, True
            if frame.pts < target:
                continue  # a frame between the keyframe and the target: dropped here
            found[wanted[pos]] = convert(frame)
            pos += 1
            if pos == len(wanted):
                return pos, False
            target = self._frame_pts[wanted[pos]]
            keyframe = self._keyframe_before(target)
            if keyframe is not None and keyframe > frame.pts:
                return pos, False  # a keyframe lies between here and the next target: seeking there is cheaper
        return pos, True  # the stream ended before the target

    def _read_in_order(self, wanted: list[int], convert) -> dict:
        """Fallback: decode from the start, counting frames; keeps only the wanted ones."""
        self._container.close()
        self._open()
        found, want = {}, set(wanted)
        last = wanted[-1] if wanted else -1
        index = -1
        for index, frame in enumerate(self._container.decode(self._stream)):
            self.frames_decoded += 1
            if index in want:
                found[index] = convert(frame)
            if index >= last:
                break
        if len(found) < len(want):
            missing = min(want - set(found))
            raise MediaError(f"{self.name}: frame {missing} could not be decoded (only {index + 1} frames decoded)")
        return found

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe_video(src, fetch: Fetcher | None = None) -> tuple[int, float, float]:
    """(total_frames, fps, duration_s) of a video, without decoding it."""
    with VideoReader(src, fetch) as reader:
        return reader.total_frames, reader.fps, reader.duration_s


def read_video_frames(
    src, indices: Sequence[int], transform: Callable | None = None, fetch: Fetcher | None = None
) -> list:
    """The frames at `indices` as HxWx3 uint8 arrays (or `transform` of each), decoded by seeking."""
    with VideoReader(src, fetch) as reader:
        return reader.read(indices, transform)
