"""qwenvl.media + qwenvl.preprocess against the references: qwen-vl-utils 0.0.14 then transformers' slow
Qwen2VLImageProcessor (min/max pixels as the Hub preprocessor_config.json sets them).

Every image and video is generated here. qwen-vl-utils imports torchvision at module level only to read and resize
videos; torchvision is not installed (and must not be), so it is imported against a stand-in whose two functions are
written from torchvision's own code: `read_video` (PyAV, `frame.to_rgb().to_ndarray()`, fps = stream.average_rate)
and v1 `transforms.functional.resize` on uint8 (identity at equal size, else float32 bicubic-antialias interpolate,
clamp, round). The video reference otherwise runs qwen-vl-utils' real `fetch_video` (frame counts, indices, pixel
budget, sample fps), through its decord path (stood in for by the same PyAV reader) so `video_start`/`video_end`
count. The resize stand-in is also checked against an independent float64 implementation of the kernel.
"""

from __future__ import annotations

import base64
import enum
import importlib
import io
import os
import random
import struct
import sys
import tracemalloc
import types
import warnings
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from qwenvl import media, preprocess
from qwenvl.errors import InputError, MediaError
from qwenvl.media import VideoReader, load_image, probe_video, read_video_frames
from qwenvl.preprocess import num_vision_tokens, process_image, process_video, smart_nframes, smart_resize

HF_PROCESSOR = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)  # the slow (PIL) class, Hub limits
TOLERANCE = 1e-6


# ------------------------------------------------------------------------------------- reference plumbing
def reference_decode_all(path) -> tuple[list[np.ndarray], float]:
    """Every frame in presentation order, as torchvision's read_video decodes them (PyAV, to_rgb)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_rgb().to_ndarray() for frame in container.decode(stream)]
        return frames, float(stream.average_rate)


def torchvision_resize(img, size, interpolation=None, antialias=True):
    """torchvision v1 functional.resize -> _functional_tensor.resize, for uint8 tensors and bicubic."""
    if list(img.shape[-2:]) == list(size):
        return img
    x = img.to(torch.float32)
    x = F.interpolate(x, size=list(size), mode="bicubic", align_corners=False, antialias=antialias)
    return torch.round(x.clamp(min=0, max=255)).to(torch.uint8)


def torchvision_read_video(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
    frames, fps = reference_decode_all(path)
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    return video, torch.empty(0), {"video_fps": fps}


class FakeDecordReader:
    def __init__(self, path):
        self.frames, self.fps = reference_decode_all(path)

    def __len__(self):
        return len(self.frames)

    def get_avg_fps(self):
        return self.fps

    def get_batch(self, indices):
        return types.SimpleNamespace(asnumpy=lambda: np.stack([self.frames[i] for i in indices]))


def import_qwen_vl_utils():
    try:
        import torchvision  # noqa: F401  (a real one, if some environment has it)
        return importlib.import_module("qwen_vl_utils.vision_process")
    except ImportError:
        pass
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.23.0"
    tv.io = types.ModuleType("torchvision.io")
    tv.io.read_video = torchvision_read_video
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.functional = types.SimpleNamespace(resize=torchvision_resize)
    tv.transforms.InterpolationMode = enum.Enum("InterpolationMode", {"BICUBIC": "bicubic"})
    stand_ins = {"torchvision": tv, "torchvision.io": tv.io, "torchvision.transforms": tv.transforms}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("qwen_vl_utils.vision_process")
    finally:  # only qwen-vl-utils keeps them: nothing else in the process may think torchvision exists
        for name in stand_ins:
            sys.modules.pop(name, None)


qvu = import_qwen_vl_utils()


@pytest.fixture
def qvu_video(monkeypatch):
    """qwen-vl-utils with its decord video path, decord being the PyAV reader above."""
    monkeypatch.setitem(sys.modules, "decord", types.SimpleNamespace(VideoReader=FakeDecordReader))
    monkeypatch.setattr(qvu, "get_video_reader_backend", lambda: "decord")
    monkeypatch.setattr(qvu.logger, "warning", lambda *a, **k: None)
    return qvu


def reference_image(item: dict):
    out = HF_PROCESSOR(images=[qvu.fetch_image(item)], return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"][0]


def reference_video(item: dict):
    video, sample_fps = qvu.fetch_video(item, return_video_sample_fps=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = HF_PROCESSOR(images=None, videos=[video], return_tensors="np")
    return out["pixel_values_videos"], out["video_grid_thw"][0], 2 / sample_fps  # the 4.57 processor's formula


def assert_matches(ours_values, ours_grid, ref_values, ref_grid):
    assert ours_grid.tolist() == [int(v) for v in ref_grid]
    assert ours_values.dtype == torch.float32 and tuple(ours_values.shape) == ref_values.shape
    assert np.abs(ours_values.numpy() - ref_values).max() <= TOLERANCE


# ------------------------------------------------------------------------------------- media generators
def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: enough high and low frequencies to make every resize filter visible."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width, 1) * 255, y / max(height, 1) * 255, (x + y) % 97 * 2.6], axis=-1)
    return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return str(path)


def palette_with_transparency(path, transparent_color):
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 8, (90, 120), dtype=np.uint8), mode="P")
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0, 0, 255, 255, 255, 0, 255, 40, 40, 40]
    image.putpalette(palette + list(transparent_color))  # index 7 is the transparent one
    return save(image, path, transparency=7)


IMAGE_CASES = {
    # name: (builder(tmp_path) -> path, per-item options)
    "extreme_1x150": (lambda d: save(Image.fromarray(photo_like(20, 3000, 1)), d / "wide.png"), {}),
    "tiny_20x20": (lambda d: save(Image.fromarray(photo_like(20, 20, 2)), d / "tiny.png"), {}),
    "grayscale": (lambda d: save(Image.fromarray(photo_like(300, 200, 3)[..., 0]), d / "gray.png"), {}),
    "palette_transparent_red_key": (lambda d: palette_with_transparency(d / "pal.png", (255, 0, 0)), {}),
    "rgba": (lambda d: save(Image.fromarray(np.dstack([photo_like(150, 100, 4), photo_like(150, 100, 9)[..., 0]])),
                            d / "rgba.png"), {}),
    "photo_4000x3000": (lambda d: save(Image.fromarray(photo_like(3000, 4000, 6)), d / "big.jpg", quality=90), {}),
    "photo_375x500": (lambda d: save(Image.fromarray(photo_like(375, 500, 7)), d / "a.jpg"), {}),
    "photo_1080x1920": (lambda d: save(Image.fromarray(photo_like(1080, 1920, 8)), d / "hd.png"), {}),
    "photo_333x777": (lambda d: save(Image.fromarray(photo_like(333, 777, 10)), d / "odd.jpg"), {}),
    "max_pixels_option": (lambda d: save(Image.fromarray(photo_like(1080, 1920, 11)), d / "m.png"),
                          {"max_pixels": 256 * 28 * 28}),
    "min_pixels_option": (lambda d: save(Image.fromarray(photo_like(40, 60, 12)), d / "s.png"),
                          {"min_pixels": 64 * 28 * 28}),
    "resized_option": (lambda d: save(Image.fromarray(photo_like(333, 777, 13)), d / "r.png"),
                       {"resized_height": 200, "resized_width": 300}),
    # per-item limits outside the processor's range: the processor resizes a second time
    "item_limits_below_processor": (lambda d: save(Image.fromarray(photo_like(30, 30, 14)), d / "p.png"),
                                    {"min_pixels": 28 * 28, "max_pixels": 28 * 28}),
}


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_image_matches_reference(tmp_path, name):
    build, options = IMAGE_CASES[name]
    item = {"type": "image", "image": build(tmp_path), **options}
    pixel_values, grid = process_image(item)
    assert_matches(pixel_values, grid, *reference_image(item))
    assert pixel_values.shape == (int(grid.prod()), 1176)


def test_reference_sizes_from_the_notes(tmp_path):
    for (height, width), expected in {(375, 500): [1, 26, 36], (1080, 1920): [1, 78, 138],
                                      (3000, 4000): [1, 214, 286], (20, 3000): [1, 2, 214]}.items():
        _, grid = process_image(Image.new("RGB", (width, height)))
        assert grid.tolist() == expected
    assert num_vision_tokens([1, 26, 36]) == 234
    assert num_vision_tokens(torch.tensor([[1, 26, 36], [3, 4, 6]])) == [234, 18]


def test_every_source_form_gives_the_same_pixels(tmp_path):
    path = save(Image.fromarray(photo_like(60, 90, 20)), tmp_path / "x y.png")
    data = open(path, "rb").read()
    sources = [path, "file://" + path, data, Image.open(path),
               "data:image/png;base64," + base64.b64encode(data).decode(), "https://example.com/x.png"]
    expected, grid = process_image(path)
    for src in sources:
        values, g = process_image({"type": "image", "image": src}, fetch=lambda url: data)
        assert torch.equal(values, expected) and torch.equal(g, grid), describe(src)
    values, _ = process_image({"type": "image_url", "image_url": {"url": path}})
    assert torch.equal(values, expected)


def test_pixel_values_from_frames_is_the_host_path_bit_for_bit():
    """The one function the engine runs on its device, against patchify(normalize(...)): every byte value of every
    channel, images (contiguous and channels-last, as PIL gives them), even and odd frame counts, chunked videos."""
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 3, 56, 84), (1, 3, 28, 28), (2, 3, 28, 56), (4, 3, 56, 56), (3, 3, 28, 84)]:
        frames = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        frames[0, :, 0, :] = torch.arange(shape[3]).remainder(256)  # all 256 values in every channel
        frames[0, :, 1, :] = torch.arange(shape[3]).remainder(256).flip(0)
        frames[0, :, 2:10, :] = torch.arange(8 * shape[3]).view(8, -1).remainder(256)
        expected = preprocess.patchify(preprocess.normalize(frames))[0]
        channels_last = frames.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        for f, chunk in ((frames, 1 << 24), (channels_last, 1 << 24), (frames, 1)):
            got = preprocess.pixel_values_from_frames(f, max_chunk_values=chunk)
            assert got.dtype == torch.float32 and got.shape == expected.shape
            assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (shape, f.stride(), chunk)
    for bad in (torch.zeros(1, 3, 28, 28), torch.zeros(1, 1, 28, 28, dtype=torch.uint8),
                torch.zeros(1, 3, 28, 30, dtype=torch.uint8)):
        with pytest.raises(InputError):
            preprocess.pixel_values_from_frames(bad)


def test_prepare_image_keeps_the_resized_image_and_a_content_key(tmp_path):
    """prepare_image: the uint8 image the model sees (a view of PIL's bytes), the same pixel_values as the float
    path of before, and a key equal for equal images and different for a one-pixel change or another size."""
    array = photo_like(60, 90, 21)
    item = {"image": Image.fromarray(array), "max_pixels": 28 * 28 * 6}  # 60x90 -> 56x84
    image = preprocess.prepare_image(item)
    resized = np.asarray(preprocess.fetch_image(item))
    assert image.kind == "image" and image.grid_thw.tolist() == [1, resized.shape[0] // 14, resized.shape[1] // 14]
    assert image.frames.is_contiguous(memory_format=torch.channels_last)  # no transposing copy
    assert torch.equal(image.frames[0].permute(1, 2, 0), torch.from_numpy(resized))
    before = preprocess.patchify(preprocess.normalize(torch.from_numpy(resized).permute(2, 0, 1)[None]))[0]
    pix, grid = image  # unpacks as process_image's tuple
    assert torch.equal(pix, before) and torch.equal(grid, image.grid_thw)
    assert torch.equal(process_image(item)[0], before)
    again = preprocess.prepare_image({**item, "image": Image.fromarray(array.copy())})
    assert again.content_hash() == image.content_hash() and len(image.content_hash()) == 32
    changed = array.copy()
    changed[30, 45, 1] ^= 1
    assert preprocess.prepare_image({**item, "image": Image.fromarray(changed)}).content_hash() != image.content_hash()
    bigger = preprocess.prepare_image({**item, "resized_height": 84, "resized_width": 112})
    assert bigger.grid_thw.tolist() != image.grid_thw.tolist() and bigger.content_hash() != image.content_hash()
    # a video of the same two frames is another input (its kind, frame count and timing are in the key)
    video = preprocess.VisionInput("video", image.frames.expand(2, -1, -1, -1).contiguous(), 1.0)
    assert torch.equal(video.pixel_values, pix) and video.content_hash() != image.content_hash()
    assert video.content_hash() != preprocess.VisionInput("video", video.frames, 0.5).content_hash()
    with pytest.raises(InputError):
        preprocess.VisionInput("image", video.frames)



def test_content_digest_is_blake3_of_the_length_prefixed_header_and_bytes():
    """With the `blake3` package (a dependency): BLAKE3(8-byte little-endian header length | header | bytes),
    computed here by hand, on one thread below BLAKE3_THREADS_FROM and on BLAKE3's pool above (the same digest);
    the header's length prefix keeps (header, data) splits of the same bytes apart; copy_to copies the bytes."""
    blake3 = pytest.importorskip("blake3")
    assert preprocess._blake3 is blake3
    rng = np.random.default_rng(1)
    for n in (0, 1000, preprocess.BLAKE3_THREADS_FROM + 7):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        want = blake3.blake3(len(b"h|").to_bytes(8, "little") + b"h|" + data.tobytes()).digest()
        assert preprocess.content_digest(b"h|", data) == want and len(want) == 32
        dst = np.zeros_like(data)
        assert preprocess.content_digest(b"h|", data, copy_to=dst) == want and np.array_equal(dst, data)
    assert preprocess.content_digest(b"ab", np.frombuffer(b"c", np.uint8)) != \
        preprocess.content_digest(b"a", np.frombuffer(b"bc", np.uint8))


def test_content_digest_without_blake3_is_sha256_of_the_pieces_digests(monkeypatch):
    """Without `blake3` (e.g. the GPU image): plain SHA-256 of header + bytes up to two pieces; beyond, SHA-256 over
    the header, the piece count and each piece's SHA-256, computed here by hand; any changed byte changes it."""
    import hashlib

    monkeypatch.setattr(preprocess, "_blake3", None)
    P = preprocess.HASH_PIECE_BYTES
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, 2 * P - 3, dtype=np.uint8)
    assert preprocess.content_digest(b"h|", small) == hashlib.sha256(b"h|" + small.tobytes()).digest()
    big = rng.integers(0, 256, 3 * P + 5, dtype=np.uint8)
    pieces = [big[i * P:(i + 1) * P].tobytes() for i in range(4)]
    want = hashlib.sha256(b"h|" + b"|4 pieces|" + b"".join(hashlib.sha256(p).digest() for p in pieces)).digest()
    assert preprocess.content_digest(b"h|", big) == want
    big[-1] ^= 1
    assert preprocess.content_digest(b"h|", big) != want
    assert preprocess.content_digest(b"g|", big) != preprocess.content_digest(b"h|", big)
    # copy_to (the engine's pinned staging, made by the hashing threads): the same digest, the bytes copied
    for data in (small, big):
        dst = np.zeros_like(data)
        assert preprocess.content_digest(b"h|", data, copy_to=dst) == preprocess.content_digest(b"h|", data)
        assert np.array_equal(dst, data)
    with pytest.raises(ValueError, match="bytes"):
        preprocess.content_digest(b"h|", big, copy_to=np.zeros(big.size - 1, dtype=np.uint8))


def test_content_hash_with_staging_is_the_same_key(monkeypatch):
    """VisionInput.content_hash(stage=True) (the engine on CUDA): the same key as without; the staged copy holds the
    dense frames' bytes, is handed over once, and counts against STAGE_BUDGET_BYTES until it is freed. Pinned
    memory needs CUDA, so here torch.empty's pin_memory is let through as plain memory."""
    import gc

    real_empty = torch.empty
    monkeypatch.setattr(preprocess.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(preprocess.torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    rng = np.random.default_rng(1)
    hwc = torch.from_numpy(rng.integers(0, 256, (728, 1288, 3), dtype=np.uint8))
    frames = hwc.permute(2, 0, 1)[None]  # channels-last, as from PIL
    plain = preprocess.VisionInput("image", frames).content_hash()
    vin = preprocess.VisionInput("image", frames)
    before = preprocess._staged_bytes
    assert vin.content_hash(stage=True) == plain and preprocess._staged_bytes == before + hwc.numel()
    staged = vin.take_staged()
    assert vin.take_staged() is None and torch.equal(staged, preprocess.dense_frames(frames)[0])
    del staged
    gc.collect()
    assert preprocess._staged_bytes == before
    monkeypatch.setattr(preprocess, "STAGE_BUDGET_BYTES", before + hwc.numel() - 1)  # over budget: no staging
    vin = preprocess.VisionInput("image", frames)
    assert vin.content_hash(stage=True) == plain and vin.take_staged() is None

def describe(src):
    return media.describe_source(src)


def test_transparency_follows_the_reference_rule(tmp_path):
    # A palette image whose transparent entry is red: qwen-vl-utils composites only RGBA onto white and
    # plain-converts palette images, so the red under the transparent pixels reaches the model. We match it.
    path = palette_with_transparency(tmp_path / "red_key.png", (255, 0, 0))
    ours, grid = process_image(path)
    ref_values, ref_grid = reference_image({"image": path})
    assert_matches(ours, grid, ref_values, ref_grid)
    rgb = np.asarray(load_image(path))
    transparent = np.asarray(Image.open(path)) == 7
    assert transparent.any() and (rgb[transparent] == (255, 0, 0)).all()
    # RGBA: composited onto white, as the reference
    rgba = Image.open(path).convert("RGBA")
    assert np.array_equal(np.asarray(load_image(rgba)), np.asarray(qvu.to_rgb(rgba)))
    assert (np.asarray(load_image(rgba))[transparent] == 255).all()
    # LA (grey + alpha): plain-converted, as the reference
    la = Image.fromarray(np.dstack([photo_like(40, 40, 1)[..., 0], np.tile(np.arange(40, dtype=np.uint8) * 6, (40, 1))]),
                         mode="LA")
    assert np.array_equal(np.asarray(load_image(la)), np.asarray(qvu.to_rgb(la)))


# ------------------------------------------------------------------------------------- sizes and counts
def test_smart_resize_matches_both_references():
    rng = random.Random(0)
    limits = [(3136, 12845056), (100352, 602112), (256 * 28 * 28, 1280 * 28 * 28), (784, 784 * 2)]
    cases = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(3000)]
    cases += [(70, 70), (42, 98), (14, 14), (13, 2000), (2000, 13), (1, 200), (28, 5600), (10, 10), (15, 3000)]
    for height, width in cases:
        if max(height, width) / min(height, width) > 200:
            continue
        for min_pixels, max_pixels in limits:
            hf = hf_smart_resize(height, width, 28, min_pixels, max_pixels)
            assert smart_resize(height, width, 28, min_pixels, max_pixels) == hf
            ref = qvu.smart_resize(height, width, 28, min_pixels, max_pixels)
            if min(ref) > 0:  # where qwen-vl-utils returns a zero side (and PIL would fail), we keep one factor
                assert smart_resize(height, width, 28, min_pixels, max_pixels, variant="qwen_vl_utils") == ref
    assert smart_resize(70, 70) == (56, 56)  # round(2.5) == 2: banker's rounding, as in both references
    assert smart_resize(13, 2000) == (28, 700) and smart_resize(13, 2000, variant="qwen_vl_utils") == (28, 1988)


def test_aspect_ratio_and_pixel_limits(tmp_path):
    path = save(Image.fromarray(photo_like(10, 2500, 3)), tmp_path / "thin.png")  # 1:250
    with pytest.raises(MediaError, match=r"10x2500.*250\.0.*limit of 200"):
        process_image(path)
    with pytest.raises(MediaError, match="limit of 200"):
        smart_resize(2500, 10)
    with pytest.raises(InputError, match="min_pixels"):
        process_image({"image": path, "min_pixels": 5000, "max_pixels": 4000})
    with pytest.raises(MediaError, match="over the limit of 1000 pixels"):
        load_image(save(Image.new("RGB", (40, 40)), tmp_path / "s.png"), max_image_pixels=1000)


def test_smart_nframes_matches_reference():
    items = [{}, {"fps": 1.0}, {"fps": 4.0}, {"fps": 0.5, "min_frames": 5}, {"fps": 30, "max_frames": 9},
             {"nframes": 7}, {"nframes": 10}, {"nframes": 5}, {"fps": 2, "min_frames": 3, "max_frames": 1000}]
    for total, video_fps in [(90, 29.97002997), (300, 30.0), (1800, 30.0), (24, 24.0), (9, 25.0), (100000, 59.94)]:
        for item in items:
            try:
                expected = qvu.smart_nframes(item, total, video_fps)
            except ValueError:
                with pytest.raises(MediaError, match="frames"):
                    smart_nframes(item, total, video_fps)
                continue
            assert smart_nframes(item, total, video_fps) == expected, (item, total)
    with pytest.raises(InputError, match="not both"):
        smart_nframes({"fps": 1, "nframes": 4}, 100, 30)
    for item in [{}, {"video_start": 0.5}, {"video_end": 2.0}, {"video_start": 1.1, "video_end": 2.9}]:
        assert preprocess.video_frame_range(item, 90, 29.97) == qvu.calculate_video_frame_range(item, 90, 29.97)


def numpy_antialias_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Independent float64 model of the antialiased bicubic kernel (PIL's: a = -0.5, support widened by the
    downscale factor), separable, to check the torch path is that filter."""
    def cubic(x):
        x = np.abs(x)
        return np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0))

    def weights(n_in, n_out):
        scale = n_in / n_out
        support = 2 * max(scale, 1.0)
        matrix = np.zeros((n_out, n_in))
        for i in range(n_out):
            center = (i + 0.5) * scale
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
            w = cubic((np.arange(lo, hi) - center + 0.5) / max(scale, 1.0))
            matrix[i, lo:hi] = w / w.sum()
        return matrix

    rows, cols = weights(image.shape[0], height), weights(image.shape[1], width)
    out = np.einsum("oh,hwc->owc", rows, image.astype(np.float64))
    return np.clip(np.round(np.einsum("pw,owc->opc", cols, out)), 0, 255)


def test_video_resize_is_the_antialiased_bicubic_filter():
    frame = photo_like(64, 96, 30)
    for height, width in [(252, 392), (28, 56), (56, 84), (64, 96)]:
        ours = preprocess.resize_like_torchvision(torch.from_numpy(frame).permute(2, 0, 1), height, width)
        assert torch.equal(ours, torchvision_resize(torch.from_numpy(frame).permute(2, 0, 1)[None], [height, width])[0])
        model = numpy_antialias_bicubic(frame, height, width)
        diff = np.abs(ours.permute(1, 2, 0).numpy().astype(np.float64) - model)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float32 vs float64 only flips rounding ties


# ------------------------------------------------------------------------------------- videos
def encode_video(path, n_frames, rate, height, width, codec="libx264", gop=12, options=None):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        if options:
            stream.options = options
        base = photo_like(height, width + n_frames, 40)
        for i in range(n_frames):
            frame = base[:, i:i + width].copy()
            frame[: height // 4, : width // 4] = (i * 7) % 256  # a per-frame marker
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def clip_2997(tmp_path_factory):
    """3 s at 29.97 fps, H.264 with B-frames (presentation order != decode order)."""
    return encode_video(tmp_path_factory.mktemp("v") / "clip.mp4", 90, Fraction(30000, 1001), 64, 96)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """60 s at 30 fps, a keyframe every second."""
    return encode_video(tmp_path_factory.mktemp("v") / "long.mp4", 1800, 30, 120, 160, gop=30,
                        options={"preset": "ultrafast"})


VIDEO_OPTIONS = [{}, {"fps": 1.0}, {"nframes": 10}, {"nframes": 7}, {"fps": 4.0, "max_frames": 8},
                 {"min_pixels": 3136, "max_pixels": 64 * 28 * 28}, {"total_pixels": 20 * 100352},
                 {"resized_height": 100, "resized_width": 150}, {"video_start": 0.5, "video_end": 2.5, "nframes": 4}]


@pytest.mark.parametrize("options", VIDEO_OPTIONS, ids=[str(o) for o in VIDEO_OPTIONS])
def test_video_file_matches_reference(qvu_video, clip_2997, options):
    item = {"type": "video", "video": clip_2997, **options}
    values, grid, seconds_per_grid = process_video(item)
    ref_values, ref_grid, ref_seconds = reference_video(item)
    assert_matches(values, grid, ref_values, ref_grid)
    assert isinstance(seconds_per_grid, float) and seconds_per_grid == ref_seconds


def test_video_numbers_29_97(clip_2997):
    total, fps, duration = probe_video(clip_2997)
    assert (total, fps) == (90, 30000 / 1001) and duration == pytest.approx(3.003)
    _, grid, seconds_per_grid = process_video({"video": clip_2997})
    # 90 frames / 29.97 fps * 2 fps = 6.006 -> 6 frames; sample fps 6/90*29.97 = 1.998;
    # 64x96 is below min_pixels 100352: beta = sqrt(100352/6144) = 4.04 -> ceil(9.24)*28 x ceil(13.86)*28 = 280x392
    assert grid.tolist() == [3, 20, 28] and seconds_per_grid == 2 / (6 / 90 * (30000 / 1001))
    assert num_vision_tokens(grid) == 3 * 20 * 28 // 4 == 420


FRAME_LIST_OPTIONS = [{}, {"sample_fps": 1.0}, {"min_pixels": 3136, "max_pixels": 40 * 28 * 28}]


@pytest.fixture
def qvu_frame_list_fixed(monkeypatch):
    """qwen-vl-utils 0.0.14 passes `image_factor` (28) as fetch_image's `image_patch_size`, so frame-list frames
    are snapped to multiples of 56 with 4*56^2..16384*56^2 pixels. 0.0.10 (shipped with Qwen2.5-VL) used 28; we do
    too, and compare with 0.0.14 where only that argument is corrected."""
    fetch_image = qvu.fetch_image
    monkeypatch.setattr(qvu, "fetch_image", lambda ele, image_patch_size=14: fetch_image(ele, 14))


@pytest.mark.parametrize("options", FRAME_LIST_OPTIONS, ids=[str(o) for o in FRAME_LIST_OPTIONS])
def test_frame_list_video_matches_reference(tmp_path, qvu_frame_list_fixed, options):
    frames = [Image.fromarray(photo_like(80, 100, 50 + i)) for i in range(5)]  # odd: the last frame is repeated
    frames[1] = save(frames[1], tmp_path / "f1.png")  # paths and PIL images may be mixed
    item = {"type": "video", "video": frames, **options}
    values, grid, seconds_per_grid = process_video(item)
    ref_values, ref_grid, ref_seconds = reference_video(item)
    assert_matches(values, grid, ref_values, ref_grid)
    assert seconds_per_grid == ref_seconds and grid[0] == 3


def test_frame_list_factor_bug_of_qwen_vl_utils_0_0_14():
    frames = [Image.fromarray(photo_like(80, 100, i)) for i in range(2)]
    item = {"video": frames, "min_pixels": 3136, "max_pixels": 40 * 28 * 28}
    assert process_video(item)[1].tolist() == [1, 6, 8]  # 80x100 -> 84x112 (factor 28)
    assert reference_video(item)[1].tolist() == [1, 4, 8]  # 80x100 -> 56x112 (factor 56)


def test_frame_list_fps_key(tmp_path):
    frames = [Image.fromarray(photo_like(56, 56, i)) for i in range(4)]
    assert process_video({"video": frames})[2] == 1.0  # default 2 fps
    assert process_video({"video": frames, "fps": 1.0})[2] == 2.0  # 0.0.10's key (0.0.14 ignores it)
    assert process_video({"video": frames, "sample_fps": 4.0})[2] == 0.5  # 0.0.14's key
    frames[2] = Image.new("RGB", (300, 56))
    with pytest.raises(MediaError, match="different sizes"):
        process_video({"video": frames})


@pytest.mark.parametrize("codec,suffix", [("libx264", "mp4"), ("mpeg4", "avi"), ("libvpx", "webm")])
def test_seeking_reader_returns_the_same_frames_as_decoding_everything(tmp_path, codec, suffix):
    path = encode_video(tmp_path / f"c.{suffix}", 40, 25, 48, 64, codec=codec, gop=8)
    frames, fps = reference_decode_all(path)
    with VideoReader(path) as reader:
        assert (reader.total_frames, reader.fps) == (len(frames), fps)
        every = reader.read(range(reader.total_frames))
        assert all(np.array_equal(a, b) for a, b in zip(every, frames))
        picks = [39, 3, 17, 3, 0, 25, 8]  # unsorted, repeated
        assert all(np.array_equal(a, frames[i]) for a, i in zip(reader.read(picks), picks))
        reader._can_seek = False  # the fallback for files without usable timestamps: decode in order
        assert all(np.array_equal(a, frames[i]) for a, i in zip(reader.read(picks), picks))
        assert reader.frames_decoded == 40


def test_long_video_holds_only_requested_frames(long_video):
    indices = [0, 250, 599, 600, 1111, 1500, 1799, 42]
    frame_bytes = 120 * 160 * 3
    with VideoReader(long_video) as reader:
        assert (reader.total_frames, reader.fps, reader.duration_s) == (1800, 30.0, 60.0)
        tracemalloc.start()
        frames = reader.read(indices)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(frames) == len(indices) and all(f.shape == (120, 160, 3) for f in frames)
        assert peak < 3 * len(indices) * frame_bytes  # holding all 1800 frames would be 100 MB
        assert reader.frames_decoded <= len(indices) * 31  # at most one GOP per requested frame, not 1800
    wanted = {i: None for i in indices}
    with av.open(long_video) as container:  # the same frames by plain sequential decoding
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                wanted[i] = frame.to_rgb().to_ndarray()
    assert all(np.array_equal(f, wanted[i]) for f, i in zip(frames, indices))
    assert all(np.array_equal(a, b) for a, b in zip(read_video_frames(long_video, [1799, 0]), [wanted[1799], wanted[0]]))
    values, grid, seconds_per_grid = process_video({"video": long_video, "nframes": 4, "max_pixels": 3136 * 4,
                                                    "min_pixels": 3136})
    assert grid.tolist() == [2, 6, 8] and seconds_per_grid == 2 / (4 / 1800 * 30)


# ------------------------------------------------------------------------------------- broken input
def png_with_header_size(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])  # "IHDR" + fields
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_broken_images_raise_media_error(tmp_path):
    good_png = io.BytesIO()
    Image.fromarray(photo_like(200, 200, 1)).save(good_png, format="PNG")
    good_jpg = io.BytesIO()
    Image.fromarray(photo_like(200, 200, 1)).save(good_jpg, format="JPEG")
    (tmp_path / "notes.jpg").write_text("this is not an image\n" * 20)
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp_path / "cut.png").write_bytes(good_png.getvalue()[: len(good_png.getvalue()) // 2])
    (tmp_path / "cut.jpg").write_bytes(good_jpg.getvalue()[: len(good_jpg.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {
        str(tmp_path / "notes.jpg"): "not an image file",
        str(tmp_path / "random.png"): "not an image file",
        str(tmp_path / "cut.png"): "corrupt or truncated",
        str(tmp_path / "cut.jpg"): "corrupt or truncated",
        str(tmp_path / "empty.png"): "empty",
        str(tmp_path / "missing.png"): "not found",
        b"": "empty image data",
        "": "empty image source",
        "data:image/png;base64,@@@not-base64!!": "invalid base64",
        "data:image/png;base64,": "no data",
        "data:image/png,rawtext": "only base64",
        "http://example.com/a.png": "no fetcher",
        png_with_header_size(100_000, 100_000): "decompression-bomb",  # PIL's own guard, converted
        png_with_header_size(12_000, 12_000): "over the limit of 134217728",  # ours
        12345: "unsupported image source",
    }
    for src, message in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with pytest.raises(MediaError, match=message) as error:
                process_image({"type": "image", "image": src})
        assert len(str(error.value)) < 400  # short, even for long sources
    with pytest.raises(MediaError, match="corrupt or truncated"):
        process_image(Image.open(tmp_path / "cut.png"))  # a lazily opened PIL image is decoded under the guards
    with pytest.raises(MediaError, match="not bytes"):
        load_image("https://example.com/a.png", fetch=lambda url: "text")
    with pytest.raises(MediaError, match="could not fetch"):
        load_image("https://example.com/a.png", fetch=lambda url: 1 / 0)
    with pytest.raises(InputError, match="no 'image'"):
        process_image({"type": "image"})


def test_broken_videos_raise_media_error(tmp_path, clip_2997):
    data = open(clip_2997, "rb").read()
    (tmp_path / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    (tmp_path / "notes.mp4").write_text("not a video\n" * 100)
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.mp4").write_bytes(b"")
    for name in ["random.mp4", "notes.mp4", "cut.mp4", "empty.mp4", "missing.mp4"]:
        with pytest.raises(MediaError, match=name):
            process_video({"type": "video", "video": str(tmp_path / name)})
    with pytest.raises(MediaError, match="cannot sample 100 frames"):
        process_video({"video": clip_2997, "nframes": 100})
    with pytest.raises(MediaError, match="no fetcher"):
        probe_video("https://example.com/v.mp4")
    assert probe_video("https://example.com/v.mp4", fetch=lambda url: data)[0] == 90
    with pytest.raises(MediaError, match="frame list is empty"):
        process_video({"video": []})
    with pytest.raises(InputError, match="outside"):
        read_video_frames(clip_2997, [90])


# VmHWM (peak RSS of this process image): unlike ru_maxrss it starts afresh at exec, so the pytest parent's
# memory (inherited at fork) does not count.
_PEAK_RSS = """
import sys
from qwenvl.preprocess import process_video
values, grid, _ = process_video({"video": sys.argv[1], "nframes": 16, "max_pixels": 3136 * 16, "min_pixels": 3136})
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(hwm, tuple(grid.tolist()))
"""


def test_video_memory_does_not_grow_with_length(tmp_path):
    """1 vs 10 minutes (same size, same 16 sampled frames): the peak RSS of a fresh process processing each is the
    same within noise, because frames are decoded by seeking and only the sampled ones are kept."""
    import subprocess

    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak RSS is read from /proc (Linux)")
    peaks, grids = {}, {}
    for minutes in (1, 10):
        path = encode_video(tmp_path / f"{minutes}min.mp4", minutes * 60 * 5, 5, 240, 320, gop=10,
                            options={"preset": "ultrafast"})
        out = subprocess.run([sys.executable, "-c", _PEAK_RSS, path], capture_output=True, text=True, check=True)
        rss_kib, grid = out.stdout.split(maxsplit=1)
        peaks[minutes] = int(rss_kib) / 1024
        grids[minutes] = grid.strip()
    assert grids[1] == grids[10] and grids[1].startswith("(8,")  # 16 frames, 2 per temporal patch
    # 10 minutes of 240x320 frames are 690 MB decoded; the sampled frames, a few MB
    print("peak RSS MiB", peaks)
    assert peaks[10] < peaks[1] * 1.05 + 10, peaks
