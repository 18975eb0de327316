"""The custom autograd functions of models/utils/autograd_functions.py: L2Normalize here against
F.normalize; FusedPrototypeScores and ChunkedPrototypeScores against the loss modules' reference
terms in test_prototype_scorer.py (the fused and streamed training paths)."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_proto.models.utils import l2_normalize


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_l2_normalize_equals_f_normalize_values_and_gradients(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=dtype)
    x[0, 0] = 0  # a zero row: divided by eps, gradient g / eps
    x[0, 1] = 1e-14  # below eps
    g = torch.randn_like(x)
    out = []
    for fn in (l2_normalize, lambda t: F.normalize(t, dim=-1)):
        xx = x.clone().requires_grad_()
        y = fn(xx)
        y.backward(g)
        out.append((y, xx.grad))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])


def test_l2_normalize_gradcheck():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(l2_normalize, (x, ))
