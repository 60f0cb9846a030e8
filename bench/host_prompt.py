"""Host time of the engine's prompt encoding for W2's request (one 1280x720 image as the processor hands it over,
uint8 frames, + 64 text tokens): token checks, content hash, MRoPE positions. CPU only, no model work.

    python bench/host_prompt.py [--n 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qwenvl  # noqa: E402
from qwenvl.engine import LLM  # noqa: E402
from qwenvl.model import Qwen25VL  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    a = ap.parse_args(argv)
    import bench  # bench/bench.py: W2's request and the engine's prompt for it

    cfg = qwenvl.preset("7b")  # ids and grid at the 7B shape; the engine below is tiny (encode_prompt runs no model)
    llm = LLM(Qwen25VL.random(qwenvl.preset("tiny"), seed=0), num_blocks=256, block_size=16, max_model_len=2048)
    prompts = [bench.frames_prompt(*bench.image_request(cfg, seed=seed, frames=True)[:2]) for seed in range(a.n + 1)]
    llm.encode_prompt(prompts[0])
    ms = []
    for p in prompts[1:]:  # a new VisionInput each: its hash is computed, as for a new request
        t0 = time.perf_counter()
        llm.encode_prompt(p)
        ms.append((time.perf_counter() - t0) * 1e3)
    print(f"encode_prompt, 1280x720 image + 64 text tokens ({len(prompts[0]['prompt_token_ids'])} ids): "
          f"median {statistics.median(ms):.2f} ms, min {min(ms):.2f} ms over {len(ms)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
