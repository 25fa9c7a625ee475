"""Matmul work: the three projection-sized matmuls of the unfused baseline, and nothing nobody needs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import MatmulFlops, projection_flops

import memops

N, D, V = 96, 16, 50


def _count(fn):
    with MatmulFlops() as m:
        fn()
    return m.flops


def _inputs(needs=(True, True, True), bias=True):
    x = torch.randn(N, D, requires_grad=needs[0])
    w = torch.randn(V, D, requires_grad=needs[1])
    b = torch.randn(V, requires_grad=needs[2]) if bias else None
    t = torch.randint(0, V, (N,))
    return x, w, b, t


def _train(needs, reduction="mean", bias=True, **kw):
    x, w, b, t = _inputs(needs, bias)

    def step():
        loss = memops.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=17, **kw)
        if reduction == "none":
            loss = (loss * torch.randn_like(loss)).sum()
        loss.backward()

    return _count(step)


def test_baseline_costs_three_projections():
    x, w, b, t = _inputs()

    def step():
        F.cross_entropy(F.linear(x, w, b).float(), t).backward()

    assert _count(step) == 3 * projection_flops(N, V, D)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("opts", [{}, {"softcap": 4.0, "label_smoothing": 0.1, "z_loss": 1e-4}])
def test_scalar_loss_training_costs_three_projections(reduction, opts):
    assert _train((True, True, True), reduction, **opts) == 3 * projection_flops(N, V, D)


def test_frozen_weight_skips_weight_gradient_matmul():
    assert _train((True, False, False)) == 2 * projection_flops(N, V, D)


def test_frozen_input_skips_input_gradient_matmul():
    assert _train((False, True, True)) == 2 * projection_flops(N, V, D)


def test_bias_only_needs_no_gradient_matmul():
    assert _train((False, False, True)) == projection_flops(N, V, D)


def test_no_grad_is_forward_only():
    x, w, b, t = _inputs()
    with torch.no_grad():
        flops = _count(lambda: memops.linear_cross_entropy(x, w, t, b, chunk_size=17))
    assert flops == projection_flops(N, V, D)


def test_per_token_loss_recomputes_in_backward():
    # forward logits, then backward: logits again, input grad, weight grad
    assert _train((True, True, True), "none") == 4 * projection_flops(N, V, D)


def _ignored_inputs(k=30):
    x, w, b, t = _inputs()
    t[torch.randperm(N)[:k]] = -100
    return x, w, b, t, N - k


@pytest.mark.usefixtures("plan_small_calls")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ignored_tokens_cost_no_matmul_work(reduction):
    x, w, b, t, live = _ignored_inputs()

    def step():
        loss = memops.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=17)
        (loss if reduction == "mean" else (loss * torch.randn_like(loss)).sum()).backward()

    passes = 3 if reduction == "mean" else 4
    assert _count(step) == passes * projection_flops(live, V, D)
    with torch.no_grad():
        assert _count(lambda: memops.linear_cross_entropy(x, w, t, b, chunk_size=17)) == projection_flops(live, V, D)


@pytest.mark.usefixtures("plan_small_calls")
def test_transform_skips_ignored_tokens():
    x, w, b, t, live = _ignored_inputs()
    step = lambda: memops.linear_loss(x, w, t, "focal", b, gamma=2.0, chunk_size=17).backward()  # noqa: E731
    assert _count(step) == 3 * projection_flops(live, V, D)


def test_return_lse_computes_every_token():
    # the logsumexp of ignored tokens is returned too, so their logits are computed
    x, w, b, t, _ = _ignored_inputs()
    step = lambda: memops.linear_cross_entropy(x, w, t, b, chunk_size=17, return_lse=True)[0].backward()  # noqa: E731
    assert _count(step) == 3 * projection_flops(N, V, D)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e37])
def test_non_finite_or_overflowing_ignored_rows_are_computed(bad):
    # such rows make the reference's gradients NaN, so they cannot be skipped
    x, w, b, t, _ = _ignored_inputs()
    with torch.no_grad():
        x[(t == -100).nonzero()[0, 0], 0] = bad
    assert _train_on(x, w, b, t) == 3 * projection_flops(N, V, D)


def _train_on(x, w, b, t):
    return _count(lambda: memops.linear_cross_entropy(x, w, t, b, chunk_size=17).backward())
