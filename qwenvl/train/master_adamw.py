"""AdamW over low-precision working weights with fp32 master weights (TrainConfig.param_dtype=bf16).

The model's parameters are bf16: forward and backward read them without autocast's casts, and their gradients come
out bf16. The optimizer keeps, per trainable parameter, an fp32 `master` copy and fp32 moments; each step applies
torch.optim.AdamW's math (decoupled decay `master *= 1 - lr * wd`, bias-corrected moments) to the master with the
gradient upcast to fp32 and divided by `grad_scale` (the trainer's folded clipping, as torch's fused AdamW takes it),
then writes the parameter as the master rounded to nearest bf16.

On CUDA the per-parameter update is one torch.compile'd elementwise kernel: dynamic shapes, and the step's
hyperparameters in one small fp32 tensor per group (Python floats would cost dynamo ~60 us more per call, and
addcdiv's `value=` would recompile the graph every step), so one graph serves every parameter, group and step.
Eager on the CPU.
"""

from __future__ import annotations

import functools

import torch

from ..layers import to_device

FP32_STATE = ("master", "exp_avg", "exp_avg_sq")


def adamw_update(param, grad, master, exp_avg, exp_avg_sq, grad_scale, hyper) -> None:
    """One AdamW step on flat tensors, in place: torch.optim.AdamW's single-tensor arithmetic on the fp32 master, then
    param = master rounded to param's dtype. hyper: fp32 [1 - lr * wd, 1 - beta1, beta2, 1 - beta2, lr / bias
    correction 1, sqrt(bias correction 2), eps]."""
    decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps = hyper.unbind()
    g = grad.float() / grad_scale
    master.mul_(decay)
    exp_avg.lerp_(g, one_minus_beta1)
    exp_avg_sq.mul_(beta2).add_(one_minus_beta2 * g * g)
    master.sub_(exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps) * step_size)
    param.copy_(master)


@functools.cache
def compiled_adamw_update():
    return torch.compile(adamw_update, dynamic=True, fullgraph=True)


class MasterAdamW(torch.optim.Optimizer):
    """AdamW with an fp32 master copy of each parameter; state per parameter: master, exp_avg, exp_avg_sq (fp32) and
    step (an int). `grad_scale` (a 0-d tensor or None): when set, the step divides
    every gradient by it. The gradient is p.grad, or the fp32 sum that accumulate_grads gathered (`grad(p)`).
    `compiled`: use the torch.compile'd update (default: for CUDA parameters)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, compiled: bool | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.grad_scale: torch.Tensor | None = None
        self.compiled = compiled
        self._grad_sums: dict[torch.Tensor, torch.Tensor] = {}  # fp32 gradient sums of this step (accumulate_grads)

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Moves each parameter's bf16 gradient into an fp32 running sum and frees it. Called after every micro-batch's
        backward when a step has several (grad_accum > 1): autograd would add them in the parameter's dtype, bf16,
        rounding each sum to 8 bits of mantissa. `grad()` and the step read the sums."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                total = self._grad_sums.get(p)
                if total is None:
                    self._grad_sums[p] = p.grad.to(torch.float32, copy=True)
                else:
                    total.add_(p.grad)
                p.grad = None

    def grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """p's gradient for this step: its fp32 sum when accumulate_grads gathered one, else p.grad."""
        total = self._grad_sums.get(p)
        if total is None:
            return p.grad
        if p.grad is not None:  # a backward after the last accumulate_grads
            total.add_(p.grad)
            p.grad = None
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_sums.clear()
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scales = {}  # per device: grad_scale, or 1
        for group in self.param_groups:
            lr, (beta1, beta2), hypers = group["lr"], group["betas"], {}
            compiled = self.compiled if self.compiled is not None else group["params"][0].is_cuda
            update = compiled_adamw_update() if compiled else adamw_update
            for p in group["params"]:
                grad = self.grad(p)
                if grad is None:
                    continue
                state, device = self.state[p], p.device
                if not state:
                    master = p.detach().to(torch.float32, copy=True)
                    state.update(step=0, master=master, exp_avg=torch.zeros_like(master),
                                 exp_avg_sq=torch.zeros_like(master))
                state["step"] = step = state["step"] + 1
                if (step, device) not in hypers:  # computed in double on the host, as torch's AdamW does
                    hypers[step, device] = to_device(torch.tensor(
                        [1 - lr * group["weight_decay"], 1 - beta1, beta2, 1 - beta2, lr / (1 - beta1 ** step),
                         (1 - beta2 ** step) ** 0.5, group["eps"]], dtype=torch.float32), device)
                if device not in scales:
                    scales[device] = torch.ones((), device=device) if self.grad_scale is None \
                        else self.grad_scale.to(device)
                # flat aliases that are no autograd views (a view input costs the compiled call ~40 us of aliasing checks)
                update(*(t.view(-1).detach() for t in (p, grad, state["master"], state["exp_avg"], state["exp_avg_sq"])),
                       scales[device], hypers[step, device])
        self._grad_sums.clear()
        return loss

    def master(self, p: torch.Tensor) -> torch.Tensor | None:
        """p's fp32 master copy; None before p's first step or for a parameter this optimizer does not train."""
        state = self.state.get(p)  # (self.state[p] would add an entry)
        return state["master"] if state else None

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load casts every floating state tensor to its parameter's dtype (bf16 here): load the rest through
        it and put the fp32 tensors in afterwards, unrounded."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {i: {k: v for k, v in s.items() if k not in FP32_STATE}
                                                         for i, s in saved.items()}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for k in FP32_STATE:
                if k in saved.get(i, {}):
                    self.state[p][k] = saved[i][k].to(device=p.device, dtype=torch.float32, copy=True)
