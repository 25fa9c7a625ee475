"""Bad input: a clear Python error that names the argument."""

from __future__ import annotations

import pytest
import torch
from helpers import op_args

import memops


def _ok():
    return torch.randn(4, 3, 6), torch.randn(10, 6), torch.randint(0, 10, (4, 3))


CASES = [
    ("input's last dim", lambda x, w, t: (x[..., :5], w, t), {}),
    ("weight must be 2-D", lambda x, w, t: (x, w[None], t), {}),
    ("target shape", lambda x, w, t: (x, w, t[:, :2]), {}),
    ("probability target \\(a float target\\) must have shape", lambda x, w, t: (x, w, t.float()), {}),
    ("target must hold int64 or int32", lambda x, w, t: (x, w, t.to(torch.int16)), {}),
    ("weight dtype", lambda x, w, t: (x, w.double(), t), {}),
    ("input must be a float", lambda x, w, t: (x.long(), w, t), {}),
    ("target value 10 is out of range", lambda x, w, t: (x, w, torch.full_like(t, 10)), {}),
    ("target value -5 is out of range", lambda x, w, t: (x, w, torch.full_like(t, -5)), {}),
    ("softcap must be > 0", lambda x, w, t: (x, w, t), {"softcap": 0.0}),
    ("softcap must be > 0", lambda x, w, t: (x, w, t), {"softcap": -1.0}),
    ("softcap must be a finite", lambda x, w, t: (x, w, t), {"softcap": float("inf")}),
    ("reduction must be one of", lambda x, w, t: (x, w, t), {"reduction": "avg"}),
    ("label_smoothing must be in", lambda x, w, t: (x, w, t), {"label_smoothing": 1.5}),
    ("label_smoothing must be in", lambda x, w, t: (x, w, t), {"label_smoothing": -0.1}),
    ("z_loss must be a finite", lambda x, w, t: (x, w, t), {"z_loss": float("nan")}),
    ("logit_scale must be a finite", lambda x, w, t: (x, w, t), {"logit_scale": float("inf")}),
    ("chunk_size must be a positive int", lambda x, w, t: (x, w, t), {"chunk_size": 0}),
    ("num_items only applies", lambda x, w, t: (x, w, t), {"num_items": 3, "reduction": "sum"}),
    ("num_items must be an int or a 0-dim", lambda x, w, t: (x, w, t), {"num_items": torch.ones(2)}),
]


@pytest.mark.parametrize("match,make,kwargs", CASES, ids=[c[0] + str(i) for i, c in enumerate(CASES)])
def test_bad_arguments_raise_value_error(match, make, kwargs):
    x, w, t = make(*_ok())
    with pytest.raises(ValueError, match=match):
        memops.linear_cross_entropy(x, w, t, **kwargs)


def test_bad_bias():
    x, w, t = _ok()
    with pytest.raises(ValueError, match=r"bias must have shape \[V\]"):
        memops.linear_cross_entropy(x, w, t, torch.randn(9))
    with pytest.raises(ValueError, match="bias dtype"):
        memops.linear_cross_entropy(x, w, t, torch.randn(10, dtype=torch.float64))


def test_ignore_index_is_allowed_out_of_range():
    x, w, t = _ok()
    t[0, 0] = 7777
    loss = memops.linear_cross_entropy(x, w, t, ignore_index=7777)
    assert torch.isfinite(loss)


def test_direct_op_call_validates_too():
    x, w, t = _ok()
    with pytest.raises(ValueError, match="reduction must be one of"):
        torch.ops.memops.linear_ce(*op_args("linear_ce", input=x, weight=w, target=t, reduction="bogus"))
    with pytest.raises(ValueError, match="target value"):
        torch.ops.memops.linear_ce(*op_args("linear_ce", input=x, weight=w, target=t + 100))


def test_non_tensor_arguments():
    x, w, t = _ok()
    with pytest.raises(TypeError, match="weight must be a Tensor"):
        memops.linear_cross_entropy(x, w.tolist(), t)
    with pytest.raises(TypeError, match="num_items must be"):
        memops.linear_cross_entropy(x, w, t, num_items="3")


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="softcap"):
        memops.LinearCrossEntropy(softcap=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_different_devices():
    x, w, t = _ok()
    with pytest.raises(ValueError, match="weight is on"):
        memops.linear_cross_entropy(x, w.cuda(), t)
    with pytest.raises(ValueError, match="target is on"):
        memops.linear_cross_entropy(x.cuda(), w.cuda(), t)


def test_tensors_on_different_devices_meta():
    """Device mismatch without a GPU: a meta-device weight against a CPU input."""
    x, w, t = _ok()
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        memops.linear_cross_entropy(x, w.to("meta"), t)
    with pytest.raises(ValueError, match="target is on meta but input is on cpu"):
        memops.linear_cross_entropy(x, w, t.to("meta"))
