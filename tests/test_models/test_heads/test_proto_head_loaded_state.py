"""Prototypes loaded from a checkpoint are checked (issue 28, section 3): ProtoHead scores
pixels by their cosine with unit prototypes, so prototypes that are not unit vectors (NaN,
scaled, or averaged like weights by mmengine's ``EMAHook(update_buffers=True)``) are
refused with one message naming the key and what to do; honest ones (unit up to rounding,
in any floating dtype) load."""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_head
from mmengine.model import ExponentialMovingAverage


def state_with(prototypes):
    torch.manual_seed(1)
    state = make_head(num_classes=4, num_prototypes=3).state_dict()
    state['prototypes'] = prototypes
    return state


def assert_refused(prototypes, match):
    torch.manual_seed(0)
    head = make_head(num_classes=4, num_prototypes=3)
    before = head.prototypes.clone()
    with pytest.raises(RuntimeError, match=match):
        head.load_state_dict(state_with(prototypes))
    assert torch.equal(head.prototypes, before)  # refused: unchanged


@pytest.mark.parametrize('scale', [1.1, 0.9])
def test_scaled_prototypes_are_refused_with_what_to_do(scale):
    protos = F.normalize(torch.randn(4, 3, 8), dim=-1) * scale
    assert_refused(protos, r'holds prototypes that are not of unit length: 12 of 12 '
                           r'prototypes have norms from .*EMAHook\(update_buffers=False\).*'
                           r"normalize\(ckpt\['state_dict'\]\['prototypes'\], dim=-1\)")


def test_non_finite_prototypes_are_refused():
    protos = F.normalize(torch.randn(4, 3, 8), dim=-1)
    protos[1, 2, 0] = float('nan')
    assert_refused(protos, r'prototypes that hold 1 non-finite values \(in 1 of 12 '
                           r'prototypes\).*use an earlier checkpoint')


def test_integer_prototypes_are_refused():
    assert_refused(torch.ones(4, 3, 8, dtype=torch.int64),
                   r'prototypes that are of dtype torch.int64, not floating-point')


def test_prototypes_averaged_by_ema_with_update_buffers_are_refused():
    """What mmengine's EMAHook(update_buffers=True) does to them: its averaged model's
    state dict (what it validates and saves) holds averages of unit vectors."""
    torch.manual_seed(0)
    head = make_head(num_classes=4, num_prototypes=3)
    ema = ExponentialMovingAverage(head, momentum=0.5, update_buffers=True)
    ema.update_parameters(head)  # first call: a copy
    head.prototypes.copy_(F.normalize(torch.randn(4, 3, 8), dim=-1))  # training moves them
    ema.update_parameters(head)
    averaged = ema.module.state_dict()
    norms = averaged['prototypes'].norm(dim=-1)
    assert norms.max() < 0.999  # shorter than unit vectors
    target = make_head(num_classes=4, num_prototypes=3)
    with pytest.raises(RuntimeError, match=r'not of unit length.*EMAHook'):
        target.load_state_dict(averaged)
    # Without update_buffers mmengine keeps the buffers in sync: unit vectors, they load.
    ema = ExponentialMovingAverage(head, momentum=0.5, update_buffers=False)
    ema.update_parameters(head)
    head.prototypes.copy_(F.normalize(torch.randn(4, 3, 8), dim=-1))
    ema.update_parameters(head)
    target.load_state_dict(ema.module.state_dict())
    assert torch.equal(target.prototypes, head.prototypes)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64])
def test_unit_prototypes_in_any_floating_dtype_load(dtype):
    protos = F.normalize(torch.randn(4, 3, 8, dtype=torch.float64), dim=-1).to(dtype)
    head = make_head(num_classes=4, num_prototypes=3)
    head.load_state_dict(state_with(protos))
    assert torch.equal(head.prototypes, protos.float())
