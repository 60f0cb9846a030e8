"""Packed training rows on CUDA: FlashAttention varlen (causal per sample) against each sample run alone, and
against the padded-SDPA path; forward and gradients, under bf16 autocast as the trainer runs.
Run on a GPU through the device tool: `pytest -m gpu tests/test_train_cuda.py`."""

from __future__ import annotations

import pytest
import torch

import qwenvl
from qwenvl import layers
from qwenvl.model import Qwen25VL

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(x, y):
    return ((x.float() - y.float()).norm() / y.float().norm()).item()


def _packed_and_alone(model, lens):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 1000, (1, n), generator=g).cuda() for n in lens]
    weight = torch.randn(sum(lens), model.config.text.hidden_size, generator=g).cuda()
    out = {}
    for name in ("packed", "alone"):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if name == "packed":
                h = model.hidden_states(torch.cat(rows, 1), seq_lens=list(lens))[0]
            else:
                h = torch.cat([model.hidden_states(r)[0] for r in rows])
        (h.float() * weight).sum().backward()
        out[name] = (h.detach().float(), model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    return out


def test_packed_rows_use_flash_varlen_and_match_samples_alone():
    model = Qwen25VL.random(qwenvl.preset("tiny"), torch.float32, device="cuda", seed=0)
    q = torch.empty(1, 1, model.config.text.head_dim, device="cuda", dtype=torch.bfloat16)
    assert layers.flash_varlen_usable(q)
    lens = (37, 64, 15, 100)
    flash = _packed_and_alone(model, lens)
    saved, layers._flash_varlen = layers._flash_varlen, None
    try:
        padded = _packed_and_alone(model, lens)  # the padded-SDPA path with a causal mask per segment
    finally:
        layers._flash_varlen = saved
    # bf16 noise between two kernels is ~1e-2; a leak across samples or a missing causal mask is O(1)
    for out in (flash, padded):
        assert rel(out["packed"][0], out["alone"][0]) < 2e-2
        assert rel(out["packed"][1], out["alone"][1]) < 5e-2
    assert rel(flash["packed"][0], padded["packed"][0]) < 2e-2


def test_compiled_blocks_match_eager_on_packed_rows():
    """TrainConfig.compile on CUDA: inductor-compiled decoder layers / ViT blocks (flash varlen inside) give the
    eager forward and gradients of a packed row under bf16 autocast, also for a second, differently packed row
    (dynamic shapes: no stale graph)."""
    from qwenvl.train.trainer import compile_blocks

    eager = Qwen25VL.random(qwenvl.preset("tiny"), torch.float32, device="cuda", seed=0)
    compiled = Qwen25VL.random(qwenvl.preset("tiny"), torch.float32, device="cuda", seed=0)
    compile_blocks(compiled)
    for lens in ([40, 70, 18], [100, 9, 33, 50]):
        e, c = _packed_and_alone(eager, lens)["packed"], _packed_and_alone(compiled, lens)["packed"]
        assert rel(c[0], e[0]) < 2e-2 and rel(c[1], e[1]) < 5e-2


def test_step_numbers_copied_to_the_host_asynchronously_read_back_as_the_values():
    from qwenvl.train.trainer import _read_host, _to_host_async

    x = torch.randn(1000, 1000, device="cuda")
    pending = _to_host_async([(x @ x).sum(), torch.tensor(3.0, device="cuda"), 2.5])
    assert _read_host(pending) == pytest.approx([float((x @ x).sum()), 3.0, 2.5], rel=1e-6)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_linear_nll_sum_compiled_matches_fp32_cross_entropy(weight_dtype):
    """The SFT loss's head on CUDA: compiled softmax-gradient chunks, gradients made in the forward, the weight's
    gradient accumulated in place (bf16 weights) or in fp32 (autocast over fp32 weights), against fp32 autograd."""
    import torch.nn.functional as F

    from qwenvl.train.loss import linear_nll_sum
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(256, 151936, bias=False).cuda().to(weight_dtype)
    with torch.no_grad():
        head.weight.normal_(0, 0.02)
    h = torch.randn(5000, 256, generator=g).cuda().to(weight_dtype).requires_grad_()
    t = torch.randint(0, 151936, (5000,), generator=g).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_nll_sum(h, head, t)
    (loss / 5000).backward()
    hf, wf = h.detach().float().requires_grad_(), head.weight.detach().float().requires_grad_()
    ref = F.cross_entropy(hf.bfloat16().float() @ wf.bfloat16().float().t(), t, reduction="sum")
    (ref / 5000).backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-3
    assert rel(h.grad, hf.grad) < 1e-2 and rel(head.weight.grad, wf.grad) < 1e-2
