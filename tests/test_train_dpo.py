"""DPO: loss and gradients on packed pairs equal a direct computation of the formula on separate sequences."""

from __future__ import annotations

import math

import pytest
import torch

from PIL import Image

import qwenvl
from qwenvl.model import Qwen25VL
from qwenvl.train.data import IGNORE, ChatEncoder
from qwenvl.train.dpo import dpo_loss, dpo_loss_sum, sequence_logps
from qwenvl.train.packing import collate

RECORDS = [
    {"messages": [{"role": "user", "content": "Name a colour."}], "chosen": "Blue.", "rejected": "A cat, probably."},
    {"prompt": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "22"}]},
    {"conversations": [{"from": "human", "value": "Capital of Italy?"}], "chosen": "Rome.", "rejected": "Milan is."},
]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    g = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (56, 84, 3), generator=g, dtype=torch.uint8).numpy()).save(d / "x.png")
    enc = ChatEncoder()
    image_pair = {"images": ["x.png"], "messages": [{"role": "user", "content": "<image>What is it?"}],
                  "chosen": "Noise.", "rejected": "A dog."}
    return [enc.encode_pair(r, str(d)) for r in RECORDS] + [enc.encode_pair(image_pair, str(d))]


def test_pair_labels_cover_only_the_response(pairs):
    enc = ChatEncoder()
    for (c, r), rec in zip(pairs[:3], RECORDS):
        text = enc.tokenizer.decode([t for t in c.labels if t != IGNORE])
        want = rec["chosen"] if isinstance(rec["chosen"], str) else rec["chosen"][0]["content"]
        assert text == want + "<|im_end|>"
        assert len(enc.encode_pair(rec)[1]) == len(r)


def direct_logp(model, s):
    """Sum of log p(label) over the response, from the full logits of the sequence alone."""
    kw = {}
    if s.pixel_values is not None:
        kw = dict(pixel_values=s.pixel_values, image_grid_thw=torch.tensor(s.image_grid_thw))
    logits = model(torch.tensor([s.input_ids]), **kw)[0, :-1].float()
    labels = torch.tensor(s.labels[1:])
    keep = labels != IGNORE
    return logits.log_softmax(-1)[keep].gather(1, labels[keep][:, None]).sum()


def test_dpo_loss_and_gradients_match_the_formula(pairs):
    cfg = qwenvl.preset("tiny")
    policy = Qwen25VL.random(cfg, seed=0)
    ref_model = Qwen25VL.random(cfg, seed=1).requires_grad_(False)
    beta, eps = 0.3, 0.1
    batch = collate([s for pair in pairs for s in pair])  # [c1, r1, c2, r2, ...]

    loss_sum, n, metrics = dpo_loss_sum(policy, batch, lambda b: sequence_logps(ref_model, b), beta, eps)
    # the image pair's chosen and rejected each carry the image (uint8 frames, made into pixel values in the loss)
    assert n == 4 and batch["frames"].numel() == 2 * pairs[-1][0].images[0].frames.numel()
    (loss_sum / n).backward()
    ours = {k: p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad()

    losses = []
    with torch.no_grad():
        refs = [(direct_logp(ref_model, c), direct_logp(ref_model, r)) for c, r in pairs]
    for (c, r), (rc, rr) in zip(pairs, refs):
        h = beta * ((direct_logp(policy, c) - rc) - (direct_logp(policy, r) - rr))
        losses.append(-(1 - eps) * torch.log(torch.sigmoid(h)) - eps * torch.log(torch.sigmoid(-h)))
    direct = torch.stack(losses).mean()
    direct.backward()
    assert abs(loss_sum.item() / n - direct.item()) < 1e-5
    for k, p in policy.named_parameters():
        assert (ours[k] - p.grad).abs().max().item() < 1e-5, k
    assert len(ours) == len(list(policy.parameters()))

    # Precomputed reference log-probs in the records give the same loss without a reference model.
    for (c, r), (rc, rr) in zip(pairs, refs):
        c.ref_logp, r.ref_logp = rc.item(), rr.item()
    pre = collate([s for pair in pairs for s in pair])
    with torch.no_grad():
        loss_pre, _, _ = dpo_loss_sum(policy, pre, None, beta, eps)
    assert abs(loss_pre.item() - loss_sum.item()) < 1e-4


def test_dpo_sft_weight_adds_the_chosen_mean_token_nll(pairs):
    """dpo_sft_weight alpha: each pair's loss + alpha * (the chosen answer's NLL / its response tokens), loss and
    gradients against the direct computation on separate sequences."""
    cfg = qwenvl.preset("tiny")
    policy = Qwen25VL.random(cfg, seed=0)
    ref_model = Qwen25VL.random(cfg, seed=1).requires_grad_(False)
    beta, alpha = 0.2, 0.7
    batch = collate([s for pair in pairs for s in pair])
    loss_sum, n, metrics = dpo_loss_sum(policy, batch, lambda b: sequence_logps(ref_model, b), beta, 0.0, alpha)
    (loss_sum / n).backward()
    ours = {k: p.grad.clone() for k, p in policy.named_parameters()}
    policy.zero_grad()
    losses, nlls = [], []
    for c, r in pairs:
        with torch.no_grad():
            rc, rr = direct_logp(ref_model, c), direct_logp(ref_model, r)
        pc = direct_logp(policy, c)
        h = beta * ((pc - rc) - (direct_logp(policy, r) - rr))
        tokens = sum(t != IGNORE for t in c.labels[1:])
        nlls.append(-pc / tokens)
        losses.append(-torch.log(torch.sigmoid(h)) + alpha * nlls[-1])
    direct = torch.stack(losses).mean()
    direct.backward()
    assert abs(loss_sum.item() / n - direct.item()) < 1e-5
    assert abs(metrics["nll_chosen"].item() - sum(x.item() for x in nlls)) < 1e-4
    for k, p in policy.named_parameters():
        assert (ours[k] - p.grad).abs().max().item() < 1e-5, k
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(*(torch.zeros(1) for _ in range(4)), sft_weight=1.0)


def test_dpo_loss_scalar_values():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.0))
    losses, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    h = 0.5 * ((-3 + 4) - (-5 + 4))
    assert math.isclose(losses.item(), math.log1p(math.exp(-h)), rel_tol=1e-6)
    assert m["reward_accuracy"] == 1.0 and math.isclose(m["reward_chosen"], 0.5)
