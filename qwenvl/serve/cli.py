"""`qwenvl serve`: the OpenAI-compatible server (see app.py) on uvicorn."""

from __future__ import annotations

import argparse
import os
import sys



def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (+ a web page at /)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir; default: the embedded model")
    p.add_argument("--served-model-name", action="append", default=None,
                   help="name(s) clients use in 'model' (repeatable); default: the model dir's name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("QWENVL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $QWENVL_API_KEY)")
    g = p.add_argument_group("engine")
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None, help="bfloat16, float16 or float32")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-mb", type=int, default=None, help="KV cache size (default: CPU 1 GiB, CUDA by "
                   "--gpu-memory-utilization)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the decoder is split over: this "
                   "process is rank 0 (the HTTP server) and starts the other ranks; each reads only its slices of "
                   "the checkpoint")
    g.add_argument("--quantization", default=None, choices=["fp8"], help="fp8: e4m3 weights with per-channel "
                   "scales for the decoder linears (an FP8 checkpoint is FP8 without the flag)")
    g.add_argument("--batch-invariant", action="store_true", default=None, help="every request's output the same "
                   "bits whatever it is batched with (CUDA, one GPU, bf16/fp16; slower; default: "
                   "$QWENVL_BATCH_INVARIANT)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-request-bytes", type=int, default=64 << 20)
    g.add_argument("--max-concurrent", type=int, default=256, help="requests in flight; more get HTTP 429")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument("--default-max-tokens", type=int, default=2048, help="max_tokens when a request sets none")
    g.add_argument("--max-images", type=int, default=16, help="images (and video frames given as images) per "
                   "request")
    g.add_argument("--max-videos", type=int, default=4)
    g.add_argument("--max-video-seconds", type=float, default=3600.0, help="total video duration per request")
    g.add_argument("--max-image-pixels", type=int, default=40_000_000, help="pixels of one decoded image")
    g.add_argument("--max-request-pixels", type=int, default=100_000_000, help="pixels of all images together")
    g = p.add_argument_group("media sources")
    g.add_argument("--allowed-media-dir", action="append", default=[],
                   help="file:// URLs and paths are read only under these dirs (repeatable; default: none)")
    g.add_argument("--allow-remote-media", action="store_true",
                   help="fetch http(s) image/video URLs (public addresses only, with the limits below)")
    g.add_argument("--remote-max-bytes", type=int, default=20 << 20)
    g.add_argument("--remote-timeout", type=float, default=10.0)
    p.set_defaults(fn=run)
    return p


def engine_kwargs(args) -> dict:
    """qwenvl.LLM keyword arguments of parsed args."""
    import torch

    kw = dict(max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
              max_model_len=args.max_model_len, device=args.device,
              dtype=getattr(torch, args.dtype) if args.dtype else None,
              tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
              batch_invariant=getattr(args, "batch_invariant", None))
    if args.kv_cache_mb:
        kw["kv_cache_bytes"] = args.kv_cache_mb << 20
    return kw


def build(args) -> tuple:
    """(app, backend) for parsed args."""
    from ..hub import resolve_model
    from .app import ServerConfig, create_app
    from .backend import EngineBackend
    from .media import MediaLimits

    path = resolve_model(args.model)
    backend = EngineBackend.from_path(path, **engine_kwargs(args))
    names = args.served_model_name or [os.path.basename(os.path.normpath(path))]
    limits = MediaLimits(allowed_dirs=[os.path.abspath(d) for d in args.allowed_media_dir],
                         allow_remote=args.allow_remote_media, remote_max_bytes=args.remote_max_bytes,
                         remote_timeout=args.remote_timeout, max_images=args.max_images,
                         max_videos=args.max_videos, max_video_seconds=args.max_video_seconds,
                         max_image_pixels=args.max_image_pixels, max_request_pixels=args.max_request_pixels)
    config = ServerConfig(model_names=names, api_key=args.api_key or None, max_request_bytes=args.max_request_bytes,
                          max_concurrent=args.max_concurrent, request_timeout=args.request_timeout,
                          default_max_tokens=args.default_max_tokens, limits=limits)
    return create_app(backend, config), backend


def run(args) -> int:
    import uvicorn

    if int(os.environ.get("RANK", 0)) > 0 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # under torchrun (--tensor-parallel-size = the world size): rank 0 serves, the others follow it
        from ..engine import LLM
        from ..hub import resolve_model

        LLM(resolve_model(args.model), **engine_kwargs(args)).follow()
        return 0
    app, backend = build(args)
    names = app.state.server.config.model_names
    print(f"qwenvl serve: model {names[0]!r} at http://{args.host}:{args.port}/v1 (web page at /)", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        backend.shutdown()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qwenvl")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)
