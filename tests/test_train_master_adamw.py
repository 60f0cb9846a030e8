"""MasterAdamW (param_dtype=bf16): bf16 parameters, fp32 master weights and moments. Its step is torch's AdamW on the
master (with the trainer's clipping folded in through grad_scale), its state survives a state_dict round trip bit for
bit, and its compiled update (one graph for every shape, group and step) gives the eager update."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from qwenvl.train.master_adamw import MasterAdamW
from qwenvl.train.trainer import _clip, fused_adam_scales_grads

SHAPES = [(64, 32), (32,), (7, 5, 3), (48, 16)]


def _setup(device="cpu", compiled=None, seed=0):
    """bf16 parameters in two groups (matrices with weight decay, the rest without) and their MasterAdamW."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, torch.bfloat16)) for s in SHAPES]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1, "name": "decay"},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "name": "no_decay"}]
    return params, MasterAdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, compiled=compiled)


def _grads(steps, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=g) * 3).to(device, torch.bfloat16) for s in SHAPES] for _ in range(steps)]


def _close(a, b, tol=1e-6) -> bool:
    """a equals b up to tol relative to b's size (norm and largest element)."""
    return bool((a - b).norm() <= tol * b.norm() and (a - b).abs().max() <= tol * b.abs().max())


def _run(params, opt, grads, max_norm=0.5, lrs=None):
    """Steps as the trainer takes them: bf16 gradients, clipping folded into the step, a changing lr."""
    norms = []
    for i, step_grads in enumerate(grads):
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        assert fused_adam_scales_grads(opt, params)  # the trainer folds its clipping into this step
        for group in opt.param_groups:
            group["lr"] = (lrs or [1e-2] * len(grads))[i]
        norms.append(float(_clip(params, max_norm, opt)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return norms


def test_step_is_torch_adamw_on_the_fp32_master_with_folded_clipping():
    params, opt = _setup()
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]  # the masters start at the bf16 values
    by_id = {id(p): r for p, r in zip(params, ref)}
    ref_opt = torch.optim.AdamW([{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in opt.param_groups],
                                lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    grads, lrs = _grads(5), [1e-2, 8e-3, 5e-3, 5e-3, 2e-3]
    # clipped at 0.5 (every step: the norms are ~40), then the last two steps unclipped (max_norm 0)
    norms = _run(params, opt, grads[:3], 0.5, lrs[:3]) + _run(params, opt, grads[3:], 0.0, lrs[3:])
    ref_norms = []
    for i, step_grads in enumerate(grads):
        for r, gr in zip(ref, step_grads):
            r.grad = gr.float()  # the same bf16 gradients, upcast
        for group in ref_opt.param_groups:
            group["lr"] = lrs[i]
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref, 0.5 if i < 3 else float("inf"))))
        ref_opt.step()
    assert norms == pytest.approx(ref_norms, rel=1e-6) and min(norms) > 10
    for p, r, init in zip(params, ref, _setup()[0]):
        state = opt.state[p]
        master = state["master"]
        assert master.dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        assert state["step"] == 5
        assert _close(master, r)
        assert torch.equal(p.detach(), master.to(torch.bfloat16))  # the parameter is the master rounded
        assert (master - init.float()).abs().max().item() > 1e-2  # the steps moved it
    # decay only where the group has it: a parameter of the decay group differs from an undecayed run
    nd_params, nd_opt = _setup()
    for group in nd_opt.param_groups:
        group["weight_decay"] = 0.0
    _run(nd_params, nd_opt, grads[:3], 0.5, lrs[:3])
    _run(nd_params, nd_opt, grads[3:], 0.0, lrs[3:])
    for p, q in zip(params, nd_params):
        same = torch.equal(opt.state[p]["master"], nd_opt.state[q]["master"])
        assert same == (p.ndim < 2), p.shape


def test_state_dict_round_trip_continues_bit_identically():
    grads = _grads(6)
    params, opt = _setup()
    _run(params, opt, grads)  # uninterrupted: 6 steps

    params_a, opt_a = _setup()
    _run(params_a, opt_a, grads[:3])
    buf = io.BytesIO()  # as a checkpoint: through torch.save / torch.load
    torch.save({"params": [p.detach().float() for p in params_a], "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    params_b, opt_b = _setup(seed=5)  # other starting values: everything comes from the saved state
    with torch.no_grad():
        for p, v in zip(params_b, saved["params"]):
            p.copy_(v)
    opt_b.load_state_dict(copy.deepcopy(saved["opt"]))
    for p in params_b:  # loaded unrounded (torch's load would cast the state to the bf16 parameter dtype)
        assert all(opt_b.state[p][k].dtype == torch.float32 for k in ("master", "exp_avg", "exp_avg_sq"))
        assert opt_b.state[p]["step"] == 3
    assert [g["name"] for g in opt_b.param_groups] == ["decay", "no_decay"]
    _run(params_b, opt_b, grads[3:])
    for p, q in zip(params, params_b):
        assert torch.equal(p, q)
        for k in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], opt_b.state[q][k]), k


def test_master_is_the_fp32_copy_once_a_parameter_has_stepped():
    params, opt = _setup()
    frozen = torch.nn.Parameter(torch.randn(3, 3).bfloat16(), requires_grad=False)
    assert opt.master(params[0]) is None  # no step yet
    _run(params, opt, _grads(1))
    assert opt.master(params[0]) is opt.state[params[0]]["master"]
    assert opt.master(frozen) is None and frozen not in opt.state


def test_micro_batch_gradients_are_summed_in_fp32():
    """grad_accum > 1: accumulate_grads moves each micro-batch's bf16 gradient into an fp32 sum (autograd would add
    them in bf16); clipping and the step use the sums, and the step equals torch's AdamW on them."""
    params, opt = _setup()
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]
    by_id = {id(p): r for p, r in zip(params, ref)}
    ref_opt = torch.optim.AdamW([{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in opt.param_groups],
                                lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    micro = [_grads(1, seed=s)[0] for s in (1, 2, 3)]
    for i, step_grads in enumerate(micro):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        if i < 2:
            opt.accumulate_grads()  # the last one stays in p.grad: grad() folds it in
            assert all(p.grad is None for p in params)
    exact = [sum(g[i].double() for g in micro) for i in range(len(params))]
    in_bf16 = [micro[0][i] + micro[1][i] + micro[2][i] for i in range(len(params))]  # what autograd would keep
    for p, e, b in zip(params, exact, in_bf16):
        got = opt.grad(p)
        assert got.dtype == torch.float32 and p.grad is None
        err, err_bf16 = (got.double() - e).abs().max(), (b.double() - e).abs().max()
        assert err <= 1e-6 * e.abs().max() and err_bf16 > 100 * err
    norm = _clip(params, 0.5, opt)
    assert abs(float(norm) - float(torch.cat([e.flatten() for e in exact]).norm())) <= 1e-6 * float(norm)
    opt.step()
    for r, e in zip(ref, exact):
        r.grad = e.float()
    torch.nn.utils.clip_grad_norm_(ref, 0.5)
    ref_opt.step()
    for p, r in zip(params, ref):
        assert _close(opt.state[p]["master"], r)
        assert opt.grad(p) is None  # the sums are the step's only
    opt.zero_grad(set_to_none=True)


def test_unfolded_clipping_takes_the_norm_of_bf16_gradients_in_fp32(monkeypatch):
    """QWENVL_FUSED_CLIP=0 (the A/B switch) clips in a separate pass; with bf16 gradients its norm is still the fp32
    norm (clip_grad_norm_ would round it to bf16, ~1e-3 off) and every gradient is scaled by max_norm / norm."""
    monkeypatch.setenv("QWENVL_FUSED_CLIP", "0")
    params, opt = _setup()
    grads = _grads(1)[0]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    assert not fused_adam_scales_grads(opt, params)
    norm = _clip(params, 0.5, opt)
    exact = torch.cat([g.double().flatten() for g in grads]).norm()
    assert norm.dtype == torch.float32 and abs(float(norm) - float(exact)) <= 1e-6 * float(exact)
    coef = 0.5 / (float(exact) + 1e-6)
    for p, gr in zip(params, grads):
        assert p.grad.dtype == torch.bfloat16
        want = gr.double() * coef  # at most two bf16 roundings (the coefficient's, as torch casts it, and the product)
        assert ((p.grad.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-30).all()
    assert opt.grad_scale is None  # nothing folded into the step
    # max_norm 0: measured, not scaled
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    assert abs(float(_clip(params, 0.0, opt)) - float(exact)) <= 1e-6 * float(exact)
    assert all(torch.equal(p.grad, gr) for p, gr in zip(params, grads))


def _compiled_matches_eager(device):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    grads, lrs = _grads(4, device), [1e-2, 7e-3, 3e-3, 1e-3]
    eager_params, eager = _setup(device, compiled=False)
    compiled_params, compiled = _setup(device, compiled=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for params, opt in ((eager_params, eager), (compiled_params, compiled)):
            _run(params, opt, grads[:2], 0.5, lrs[:2])
            _run(params, opt, grads[2:], 0.0, lrs[2:])  # grad_scale None from here: the same graph
    # one graph for every shape, both groups, every step (lr, bias corrections) and with or without grad_scale
    assert counters["stats"]["unique_graphs"] == 1
    for e, c in zip(eager_params, compiled_params):
        me, mc = eager.state[e]["master"], compiled.state[c]["master"]
        assert _close(mc, me)
        assert torch.equal(c.detach(), mc.to(torch.bfloat16)) and torch.equal(e.detach(), me.to(torch.bfloat16))
        for k in ("exp_avg", "exp_avg_sq"):
            assert _close(compiled.state[c][k], eager.state[e][k]), k


def test_compiled_update_is_one_graph_and_matches_eager_on_cpu():
    """The compiled update as CUDA runs it (inductor), here on the CPU: no recompile across shapes, groups and
    steps."""
    _compiled_matches_eager("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_update_matches_eager_on_cuda():
    params, opt = _setup("cuda")
    assert opt.compiled is None  # compiled by default for CUDA parameters
    _compiled_matches_eager("cuda")
