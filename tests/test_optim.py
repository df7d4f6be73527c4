"""LAMB (bertfast.train.optim.Lamb) against a per-tensor float64 transcription of You et al. 2019 / NVIDIA's BERT:
one step and several, with weight decay, trust ratio and global gradient pre-normalisation per the param
groups; the trust ratio's invariants; AdamW where the trust ratio is off; exact continuation through state_dict;
float32 master weights for a bfloat16 model."""
from __future__ import annotations

import io
import math

import pytest
import torch

from bertfast.train.optim import Lamb

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------- the reference
def reference_lamb(params, grads_per_step, groups, *, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=None):
    """The paper's algorithm, one tensor at a time, in float64. params: list of tensors; grads_per_step: a list
    (one per step) of gradient lists; groups: per tensor (lr, weight_decay, trust: bool). Returns the params."""
    b1, b2 = betas
    w = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    for t, grads in enumerate(grads_per_step, start=1):
        g = [x.double() for x in grads]
        if max_grad_norm is not None:  # NVIDIA: divide by ||G|| / max when ||G|| > max
            total = math.sqrt(sum(float((x * x).sum()) for x in g))
            g = [x / max(total / max_grad_norm, 1.0) for x in g]
        for i in range(len(w)):
            lr, wd, trust = groups[i]
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
            m_hat = m[i] / (1 - b1 ** t)
            v_hat = v[i] / (1 - b2 ** t)
            update = m_hat / (v_hat.sqrt() + eps) + wd * w[i]
            ratio = 1.0
            if trust:
                w_norm, u_norm = float(w[i].norm()), float(update.norm())
                ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            w[i] = w[i] - lr * ratio * update
    return w


def bert_like_params(dtype=torch.float64, device="cpu"):
    """The shapes of a BERT layer, small and odd: embedding, dense weight, bias, LayerNorm weight and bias."""
    shapes = [(37, 19), (23, 19), (23,), (19,), (19,)]
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device) * 0.5) for s in shapes]


def trainer_groups(params, wd):
    """As bertfast.train.trainer.param_groups: decay on the >= 2-d tensors, none on the 1-d ones."""
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def random_grads(params, n_steps, scale=1.0):
    return [[torch.randn_like(p) * scale for p in params] for _ in range(n_steps)]


def run_lamb(opt, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


# ---------------------------------------------------------------------------------------------- against the paper
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_steps", [1, 7])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_matches_the_paper_float64(device, n_steps, max_grad_norm):
    params = bert_like_params(device=device)
    lr, wd = 0.01, 0.01
    opt = Lamb(trainer_groups(params, wd), lr=lr, max_grad_norm=max_grad_norm)
    grads = random_grads(params, n_steps, scale=3.0)  # global norm ~ 3 * sqrt(1400): pre-normalisation is active
    groups = [(lr, wd if p.ndim >= 2 else 0.0, p.ndim >= 2) for p in params]
    ref = reference_lamb([p.cpu() for p in params], [[g.cpu() for g in gs] for gs in grads], groups,
                         max_grad_norm=max_grad_norm)
    run_lamb(opt, params, grads)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().cpu(), r, rtol=1e-12, atol=1e-14)
    if max_grad_norm is not None:
        total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads[-1]))
        assert abs(float(opt.last_grad_norm) - total) <= 1e-9 * total


@pytest.mark.parametrize("device", DEVICES)
def test_float32_params_are_close_to_the_float64_paper(device):
    params = bert_like_params(torch.float32, device)
    opt = Lamb(trainer_groups(params, 0.01), lr=2e-3, max_grad_norm=1.0)
    grads = random_grads(params, 5)
    ref = reference_lamb([p.cpu() for p in params], [[g.cpu() for g in gs] for gs in grads],
                         [(2e-3, 0.01 if p.ndim >= 2 else 0.0, p.ndim >= 2) for p in params], max_grad_norm=1.0)
    run_lamb(opt, params, grads)
    for p, r in zip(params, ref):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.detach().cpu().double(), r, rtol=1e-5, atol=1e-6)


def test_trust_ratio_moves_each_tensor_by_lr_times_its_norm():
    """The defining property: with the trust ratio on, ||w_new - w_old|| = lr ||w_old||, whatever the gradient's
    scale; the 1-d tensors (trust ratio off by default) take plain Adam-sized steps instead."""
    params = bert_like_params()
    before = [p.detach().clone() for p in params]
    lr = 0.01
    opt = Lamb(trainer_groups(params, 0.01), lr=lr)
    grads = random_grads(params, 1, scale=1e-3)  # small gradients: the matrices still move by lr ||w||
    run_lamb(opt, params, grads)
    for p, w0, g in zip(params, before, grads[0]):
        moved = float((p.detach() - w0).norm())
        if p.ndim >= 2:
            assert abs(moved - lr * float(w0.norm())) <= 1e-12 * moved
        else:  # Adam's first step: lr g / (|g| + eps) per element, about lr * sqrt(numel) for these tiny g
            adam = lr * float((g / (g.abs() + 1e-6)).norm())
            assert abs(moved - adam) <= 1e-12 * moved
            assert abs(moved - lr * float(w0.norm())) > 0.1 * moved  # not the trust-ratio step


def test_trust_ratio_is_one_when_a_norm_is_zero():
    w_zero = torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))  # ||w|| = 0: plain Adam step
    still = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))  # ||u|| = 0: no gradient, no decay
    opt = Lamb([w_zero, still], lr=0.1, weight_decay=0.0)
    g = torch.randn(5, 3, dtype=torch.float64)
    w_zero.grad, still.grad = g.clone(), torch.zeros(4, 3, dtype=torch.float64)
    before = still.detach().clone()
    opt.step()
    ref = reference_lamb([torch.zeros(5, 3, dtype=torch.float64)], [[g]], [(0.1, 0.0, True)])[0]
    torch.testing.assert_close(w_zero.detach(), ref, rtol=1e-12, atol=0)
    assert torch.isfinite(w_zero).all() and float(w_zero.detach().abs().max()) > 0.09
    assert torch.equal(still.detach(), before)


def test_without_trust_ratio_it_is_adamw():
    """A group with trust_ratio=False steps exactly as torch.optim.AdamW (same eps placement and decay)."""
    a = bert_like_params()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    grads = random_grads(a, 6)
    run_lamb(Lamb(a, lr=0.01, weight_decay=0.05, eps=1e-6, trust_ratio=False), a, grads)
    run_lamb(torch.optim.AdamW(b, lr=0.01, weight_decay=0.05, eps=1e-6, foreach=False), b, grads)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_group_options_decide_decay_and_trust_ratio():
    params = bert_like_params()
    groups = [{"params": params[:2], "weight_decay": 0.1},  # default: trust ratio on these matrices
              {"params": [params[2]], "weight_decay": 0.0, "trust_ratio": True},  # forced on a bias
              {"params": params[3:], "weight_decay": 0.02, "trust_ratio": False, "lr": 0.05}]
    grads = random_grads(params, 3)
    ref = reference_lamb(params, grads, [(0.01, 0.1, True), (0.01, 0.1, True), (0.01, 0.0, True),
                                         (0.05, 0.02, False), (0.05, 0.02, False)])
    run_lamb(Lamb(groups, lr=0.01), params, grads)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)


def test_gradients_are_left_alone_and_params_without_grad_are_skipped():
    params = bert_like_params()
    opt = Lamb(params, lr=0.01, max_grad_norm=0.1)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params[:-1], grads):
        p.grad = g.clone()
    last = params[-1].detach().clone()
    opt.step()
    for p, g in zip(params[:-1], grads):
        assert torch.equal(p.grad, g)  # pre-normalisation works on copies
    assert torch.equal(params[-1].detach(), last) and not opt.state[params[-1]]
    # the global norm is over the gradients that exist
    total = math.sqrt(sum(float((g ** 2).sum()) for g in grads[:-1]))
    assert abs(float(opt.last_grad_norm) - total) <= 1e-9 * total


# ---------------------------------------------------------------------------------------------- checkpointing
def test_state_dict_round_trip_continues_exactly():
    """Save after 3 steps, reload into a fresh optimizer (through torch.save bytes, as a checkpoint does): the next
    4 steps give bit-identical parameters to the uninterrupted run."""
    torch.manual_seed(1)
    params = bert_like_params(torch.float32)
    grads = random_grads(params, 7)
    straight = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Lamb(trainer_groups(straight, 0.01), lr=3e-3, max_grad_norm=1.0)
    run_lamb(opt, straight, grads)

    first = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt1 = Lamb(trainer_groups(first, 0.01), lr=3e-3, max_grad_norm=1.0)
    run_lamb(opt1, first, grads[:3])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = Lamb(trainer_groups(resumed, 0.01), lr=3e-3, max_grad_norm=1.0)
    opt2.load_state_dict(saved["optimizer"])
    assert all(float(opt2.state[p]["step"]) == 3 for p in resumed)
    run_lamb(opt2, resumed, grads[3:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_float32_master_weights_for_a_bfloat16_model():
    """Mixed precision with master weights: a bfloat16 model computes the gradients, LAMB updates float32 masters
    (moments float32) which are copied back. The masters follow the float64 paper on the same gradients."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 5))
    model = model.to(torch.bfloat16)
    masters = [torch.nn.Parameter(p.detach().float().clone()) for p in model.parameters()]
    start = [m.detach().double().clone() for m in masters]
    opt = Lamb(trainer_groups(masters, 0.01), lr=5e-3, max_grad_norm=1.0)
    used = []
    for _ in range(4):
        x = torch.randn(8, 24, dtype=torch.bfloat16)
        model.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        grads = [p.grad.float() for p in model.parameters()]
        used.append([g.clone() for g in grads])
        for m, g in zip(masters, grads):
            m.grad = g
        opt.step()
        with torch.no_grad():
            for p, m in zip(model.parameters(), masters):
                p.copy_(m)
    for m in masters:
        st = opt.state[m]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
    groups = [(5e-3, 0.01 if m.ndim >= 2 else 0.0, m.ndim >= 2) for m in masters]
    ref = reference_lamb(start, used, groups, max_grad_norm=1.0)
    for m, r in zip(masters, ref):
        torch.testing.assert_close(m.detach().double(), r, rtol=1e-5, atol=1e-6)
    for p, m in zip(model.parameters(), masters):
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kw, word", [({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"),
                                      ({"eps": -1e-8}, "eps"), ({"weight_decay": -0.1}, "weight_decay"),
                                      ({"trust_ratio": "yes"}, "trust_ratio"),
                                      ({"max_grad_norm": 0.0}, "max_grad_norm"), ({"lr": float("nan")}, "lr")])
def test_bad_arguments_name_themselves(kw, word):
    with pytest.raises(ValueError, match=f"Lamb: {word} must"):
        Lamb(bert_like_params(), **kw)


def test_bad_group_option_names_itself():
    with pytest.raises(ValueError, match="Lamb: weight_decay must"):
        Lamb([{"params": bert_like_params(), "weight_decay": -1.0}])


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        Lamb(emb.parameters()).step()


def test_trainer_param_groups_give_nvidias_recipe():
    """With bertfast.train.trainer.param_groups on the real model, every 1-d tensor (biases, LayerNorm) is in the
    no-decay group and gets no trust ratio; every matrix / embedding gets both."""
    from bertfast import BertConfig, BertForPreTraining
    from bertfast.train.optim import _trust_ratio_tensors
    from bertfast.train.trainer import param_groups

    model = BertForPreTraining(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, max_len=16))
    opt = Lamb(param_groups(model, 0.01), lr=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(_trust_ratio_tensors(decay["trust_ratio"], decay["params"])) == len(decay["params"])
    assert _trust_ratio_tensors(no_decay["trust_ratio"], no_decay["params"]) == []
    assert no_decay["params"] and all(p.ndim == 1 for p in no_decay["params"])
