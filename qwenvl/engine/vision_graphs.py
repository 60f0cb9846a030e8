"""CUDA graphs of the vision tower, one per grid list (issue 3: W2, W3).

Eagerly the ViT is bound by the host launching its ~1000 kernels (H100, one 1280x720 image: 56 ms of CPU for
38 ms of GPU work); a graph replay launches them at once. A server sees the same few image sizes again and again,
so a grid list is captured the `min_uses`-th time it is encoded (the first time it runs eagerly: no capture
latency for a one-off size), at most `max_graphs` of them (least recently used dropped), only up to
`max_patches` patches (a graph keeps its activations' memory). All graphs share one memory pool: replays never
overlap, and each graph's static input and output stay allocated, so no capture reuses another's live memory.
A graph reads the ViT plan (window order, rotary tables, segments) through the addresses it captured, so the
entry holds that plan: the ViT's own plan cache may drop it, the graph keeps it alive.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import torch

from ..layers import flash_varlen_usable
from .fused import EXACT_CASTS

log = logging.getLogger(__name__)


def compile_vision_blocks(visual, device, backend: str = "inductor", tol: float = 5e-2) -> bool:
    """torch.compile each ViT block (dynamic shapes: one compile serves every patch count) so that its elementwise
    work (RMSNorms, the fp32 rotary, SiLU * up, residual adds) runs as a few fused kernels; the varlen attention stays
    eager (layers.varlen_attention). Compiled here, at engine start, on two small grids, and checked against the
    eager blocks: a compile failure or an error above `tol` puts the eager blocks back and returns False. Replayed
    from the engine's ViT graphs, the compiled kernels launch at once like the eager ones. Eagerly each block moves
    ~1.6 GB through memory for one 1280x720 image (7B: fp32 RMSNorms and rotary, SiLU * up, residual adds: ~15 ms of
    an H100 over 32 blocks, against ~9 ms of matmul FLOPs); fused, about a sixth of that."""
    c = visual.config
    g = torch.Generator(device=device).manual_seed(0)
    grids = ([(1, 8, 8)], [(1, 12, 16), (1, 8, 8)])  # two patch counts: the second call runs the dynamic graph
    inputs = [torch.randn(sum(t * h * w for t, h, w in gl), c.patch_dim, generator=g, device=device).to(visual.dtype)
              for gl in grids]
    if getattr(visual, "_engine_compiled", False):
        return True  # an earlier engine over the same model compiled and checked them
    with torch.inference_mode():
        want = [visual(x, gl).float() for x, gl in zip(inputs, grids)]
        for blk in visual.blocks:
            blk.compile(dynamic=True, backend=backend, options=EXACT_CASTS if backend == "inductor" else None)
        try:
            for x, gl, w in zip(inputs, grids, want):
                err = ((visual(x, gl).float() - w).norm() / w.norm().clamp_min(1e-12)).item()
                if not err <= tol:
                    raise RuntimeError(f"compiled ViT blocks differ from eager ({err:.3g})")
        except Exception as e:
            log.warning("compiled ViT blocks unusable (%s: %s); the blocks run eagerly", type(e).__name__, e)
            visual._engine_compiled = True
            uncompile_vision_blocks(visual)
            return False
    visual._engine_compiled = True
    return True


def uncompile_vision_blocks(visual) -> None:
    """Undo compile_vision_blocks (an engine built with QWENVL_COMPILE_VIT=0 over a model an earlier engine
    compiled); blocks compiled by anyone else are left alone."""
    if getattr(visual, "_engine_compiled", False):
        for blk in visual.blocks:
            blk._compiled_call_impl = None  # what nn.Module.compile set
        visual._engine_compiled = False


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inp: torch.Tensor  # static pixel_values
    out: torch.Tensor  # static features
    plan: object  # the ViT plan the graph reads (kept alive)


class VisionGraphs:
    def __init__(self, visual, max_graphs: int = 8, max_patches: int = 16384, min_uses: int = 2):
        self.visual = visual
        self.max_graphs, self.max_patches, self.min_uses = max_graphs, max_patches, min_uses
        self.graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self.uses: collections.Counter = collections.Counter()
        self.pool = None
        self.enabled = True  # off for good after a failed capture
        self.replays = 0  # statistics

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, grids) -> torch.Tensor:
        key = tuple(tuple(int(x) for x in g) for g in grids)
        entry = self.graphs.get(key)
        if entry is None:
            self.uses[key] += 1
            if (not self.enabled or not pixel_values.is_cuda or pixel_values.shape[0] > self.max_patches
                    or self.uses[key] < self.min_uses or torch.cuda.is_current_stream_capturing()):
                return self.visual(pixel_values, list(key))
            entry = self._capture(pixel_values, key)
            if entry is None:
                return self.visual(pixel_values, list(key))
        else:
            self.graphs.move_to_end(key)
        if pixel_values.dtype != entry.inp.dtype or pixel_values.shape != entry.inp.shape:
            return self.visual(pixel_values, list(key))  # another dtype than captured: eager
        entry.inp.copy_(pixel_values)
        entry.graph.replay()
        self.replays += 1
        return entry.out.clone()  # the static output is overwritten by the next replay

    def _capture(self, pixel_values: torch.Tensor, key: tuple) -> _Graph | None:
        dev = pixel_values.device
        grids = list(key)
        probe = torch.empty(1, 1, self.visual.config.head_dim, device=dev, dtype=self.visual.dtype)
        try:
            if not flash_varlen_usable(probe):  # fp32, or no varlen kernel: the padded path synchronises
                self.enabled = False
                return None
            inp = pixel_values.clone()
            plan = self.visual._plan(grids, dev)  # built (host work, copies) before capture, then held
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):  # warm-up: cuBLAS workspaces, lazy kernel loads
                self.visual(inp, grids)
            torch.cuda.current_stream(dev).wait_stream(stream)
            if not flash_varlen_usable(probe):  # the varlen kernel failed in the warm-up
                self.enabled = False
                return None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.visual(inp, grids)
            self.pool = graph.pool()
        except Exception as e:  # e.g. an op that synchronises: stay eager for every grid from now on
            log.warning("vision CUDA graph capture failed (%s: %s); the ViT runs eagerly", type(e).__name__, e)
            self.enabled = False
            self.graphs.clear()
            return None
        entry = self.graphs[key] = _Graph(graph, inp, out, plan)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return entry
