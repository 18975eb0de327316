"""PrototypeBank on its own: the statistics it collects, their accumulation over an optimizer
step, the momentum update against a hand computation, re-seeding, the load policy and the
state exact resume needs."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import hand_ema, tensor_values

from mmseg_proto.models.utils import PrototypeBank
from mmseg_proto.models.utils.prototype_statistics import PrototypeBatch, usage_statistics


def square_bank(momentum=0.5, **kwargs):
    """C = 2 classes, K = 2 prototypes in 2-D: class 0 at (1, 0), (0, 1), class 1 opposite."""
    bank = PrototypeBank(2, 2, 2, momentum=momentum, **kwargs)
    bank.prototypes.copy_(torch.tensor([[[1., 0.], [0., 1.]], [[-1., 0.], [0., -1.]]]))
    return bank


def batch(emb, labels, assign, pred=None, own=None):
    """collect()'s PrototypeBatch for a batch whose pixels are all labelled."""
    emb, labels, assign = torch.tensor(emb), torch.tensor(labels), torch.tensor(assign)
    pred = labels if pred is None else torch.tensor(pred)
    own = torch.zeros(len(labels), 2) if own is None else own
    return PrototypeBatch.from_labelled(emb, torch.arange(len(labels)), labels, pred, assign,
                                        own, None)


def step(bank, *batches, diagnostics=False):
    """What PrototypeUpdateHook does for one optimizer step over these batches."""
    for args in batches:
        bank.collect(args)
        assert bank.accumulate()
    return bank.apply(diagnostics=diagnostics)


# ----------------------------------------------------------------- basics --

def test_initial_prototypes_are_unit_vectors_kept_out_of_its_state_dict():
    torch.manual_seed(0)
    bank = PrototypeBank(4, 3, 8)
    assert bank.prototypes.shape == (4, 3, 8)
    torch.testing.assert_close(bank.prototypes.norm(dim=-1), torch.ones(4, 3))
    assert dict(bank.named_buffers()).keys() == {'prototypes'}
    assert bank.state_dict() == {}  # ProtoHead saves it under its own 'prototypes' key
    assert bank.to(torch.float64).prototypes.dtype == torch.float64


def test_a_second_batch_without_accumulate_is_refused():
    bank = square_bank()
    bank.collect(batch([[0., 3.]], [0], [0]))
    with pytest.raises(RuntimeError, match="custom_hooks = \\[dict\\(type='PrototypeUpdateHook'\\)"):
        bank.collect(batch([[0., 3.]], [0], [0]))
    assert bank.accumulate() and not bank.accumulate()  # taken once
    bank.discard()
    assert bank.batch is None and bank.apply() == {}


# ------------------------------------------------------ the momentum update --

@pytest.mark.parametrize('momentum', [0.5, 0.9])
def test_ema_of_one_step_against_a_hand_computation(momentum):
    bank = square_bank(momentum)
    before = bank.prototypes.clone()
    # Two pixels of class 0 on its prototype 0, one of class 1 on its prototype 1; the
    # third pixel is misclassified: it does not count.
    args = batch([[0., 3.], [0., 1.], [5., 5.], [1., -1.]], [0, 0, 1, 1], [0, 0, 1, 1],
                 pred=[0, 0, 0, 1])
    out = step(bank, args, diagnostics=True)
    sums = torch.tensor([[0., 4.], [0., 0.], [0., 0.], [1., -1.]])
    expected = hand_ema(before, sums, torch.tensor([2., 0., 0., 1.]), momentum)
    torch.testing.assert_close(bank.prototypes, expected)
    # e.g. prototype (0, 0): mu * (1, 0) + (1 - mu) * (0, 1), renormalised.
    torch.testing.assert_close(bank.prototypes[0, 0],
                               torch.tensor([momentum, 1 - momentum])
                               / math.hypot(momentum, 1 - momentum))
    assert torch.equal(bank.prototypes[0, 1], before[0, 1])  # untouched: bit-identical
    assert torch.equal(bank.prototypes[1, 0], before[1, 0])
    assert out['updated'] == 0.5
    shift = torch.rad2deg(torch.acos((before * bank.prototypes).sum(-1))).mean()
    assert out['shift_deg'] == pytest.approx(float(shift))


def test_statistics_of_the_wrong_shape_change_nothing():
    bank = PrototypeBank(4, 3, 8)
    before = bank.prototypes.clone()
    with pytest.raises(ValueError, match='do not fit prototypes'):
        bank.update(torch.ones(11, 8), torch.ones(11))
    with pytest.raises(ValueError, match='do not fit prototypes'):
        bank.update(torch.ones(12, 7), torch.ones(12))
    assert torch.equal(bank.prototypes, before)


def test_the_iterations_of_one_step_give_one_update_from_their_summed_statistics():
    bank = square_bank(0.8)
    before = bank.prototypes.clone()
    first = batch([[0., 3.], [2., 1.]], [0, 1], [0, 0])
    second = batch([[0., 1.], [-1., 2.]], [0, 1], [0, 1])
    bank.collect(first)
    assert bank.accumulate()
    assert torch.equal(bank.prototypes, before)  # accumulating: nothing moves
    assert step(bank, second) == {}
    sums = torch.tensor([[0., 4.], [0., 0.], [2., 1.], [-1., 2.]])
    torch.testing.assert_close(bank.prototypes,
                               hand_ema(before, sums, torch.tensor([2., 0., 1., 1.]), 0.8))
    # The step is spent: the next one starts from nothing.
    assert bank.resume_state()['pending'] is None and bank.apply() == {}


def test_non_finite_statistics_skip_the_update():
    bank = square_bank()
    bank.schedule_reseeding(10)
    before = bank.prototypes.clone()
    own = torch.tensor([[0.5, float('nan')]])  # a non-finite pixel spoils its class
    assert step(bank, batch([[0., 3.]], [0], [0], own=own)) is None
    assert torch.equal(bank.prototypes, before)
    assert bank.resume_state() == dict(window=None, pending=None)


# ------------------------------------------------------------- re-seeding --

def test_usage_statistics_count_nearest_prototypes_and_weigh_by_distance():
    labels = torch.tensor([0, 0, 0, 1])
    own = torch.tensor([[0.9, 0.1], [0.75, 0.25], [0.25, 0.5], [0.5, 0.4]])
    correct = torch.tensor([True, True, True, False])
    emb = torch.tensor([[1., 0.], [2., 0.], [0., 4.]])
    usage = usage_statistics(labels, own, correct, emb, 2, 2)
    assert usage['nearest'].tolist() == [2., 1., 1., 0.]  # class 0: #0 twice, #1 once
    # Weights 1 - best similarity: 0.1, 0.25, 0.5; class 1 has no correct pixel.
    torch.testing.assert_close(usage['outlier_sums'], torch.tensor([[0.6, 2.0], [0., 0.]]))
    torch.testing.assert_close(usage['outlier_weights'], torch.tensor([0.85, 0.]))
    # Sums: two halves of the batch add up to the whole (split-independent).
    halves = [usage_statistics(labels[i], own[i], correct[i], emb[j], 2, 2)
              for i, j in ((slice(0, 2), slice(0, 2)), (slice(2, 4), slice(2, 3)))]
    for key in usage:
        torch.testing.assert_close(halves[0][key] + halves[1][key], usage[key])


def window(nearest, outlier_sums, outlier_weights):
    return dict(nearest=torch.tensor(nearest), outlier_sums=torch.tensor(outlier_sums),
                outlier_weights=torch.tensor(outlier_weights))


def test_reseed_moves_the_least_used_prototype_onto_the_outliers_only():
    bank = PrototypeBank(2, 3, 4)
    start = bank.prototypes.clone()
    # Class 0: prototype 2 never nearest; class 1: all used (>= 1%).
    sums = [[0., 3., 4., 0.], [1., 1., 1., 1.]]
    bank.restore(window([60., 40., 0., 30., 30., 40.], sums, [5., 5.]))
    assert bank.reseed(0.01) == [(0, 2)]
    torch.testing.assert_close(bank.prototypes[0, 2], torch.tensor([0., 0.6, 0.8, 0.]))
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 2] = False
    assert torch.equal(bank.prototypes[mask], start[mask])  # the others bit-identical
    assert bank.reseed(0.01) is None  # the window is spent
    # No outliers or no pixels of the class: nothing to re-seed from.
    bank.restore(window([60., 40., 0., 30., 30., 40.], sums, [0., 5.]))
    assert bank.reseed(0.5) == [(1, 0)]
    bank.restore(window([0.] * 6, sums, [1., 1.]))
    assert bank.reseed(0.5) == []
    bank.restore(window([0.] * 6, sums, [1., 1.]))
    bank.clear_window()
    assert bank.reseed(0.5) is None


def test_window_sums_the_usage_of_every_applied_step():
    bank = square_bank()
    bank.schedule_reseeding(10)
    own = torch.tensor([[0.9, 0.1], [0.2, 0.6]])
    args = batch([[1., 0.], [0., 2.]], [0, 0], [0, 1], own=own)
    step(bank, args)
    once = bank.resume_state()['window']
    step(bank, args)
    twice = bank.resume_state()['window']
    assert once['nearest'].tolist() == [1., 1., 0., 0.]
    for key in once:
        torch.testing.assert_close(twice[key], 2 * once[key])
    bank.schedule_reseeding(0)  # no re-seeding: no window, no usage collected
    step(bank, args)
    assert bank.resume_state()['window'] is None and bank.window_steps == 0


# ------------------------------------------------------------ load policy --

def test_load_takes_refuses_or_keeps_as_configured(caplog):
    source = F.normalize(torch.randn(2, 2, 2), dim=-1)
    bank = square_bank()
    bank.load(source.double())
    assert torch.equal(bank.prototypes, source) and bank.prototypes.dtype == torch.float32
    with pytest.raises(RuntimeError, match=r'decode_head.prototypes of shape \(3, 2, 2\) '
                                           r'\(num_classes=3, num_prototypes=2, embed_dims=2'):
        bank.load(torch.zeros(3, 2, 2), 'decode_head.prototypes')
    with pytest.raises(RuntimeError, match=r'shape \(4, 2\).*load_prototypes=False'):
        bank.load(torch.zeros(4, 2))
    with pytest.raises(RuntimeError, match=r'shape \(\)'):
        bank.load('not a tensor')
    assert torch.equal(bank.prototypes, source)  # refused: unchanged
    keeping = square_bank(load_prototypes=False)
    kept = keeping.prototypes.clone()
    keeping.load(torch.zeros(5, 3, 2))  # any shape: not loaded
    assert torch.equal(keeping.prototypes, kept)


# ---------------------------------------------------------- resume state --

def test_state_round_trip_through_a_weights_only_checkpoint():
    bank = square_bank()
    bank.schedule_reseeding(10)
    own = torch.tensor([[0.9, 0.1], [0.2, 0.6]])
    args = batch([[1., 1.], [-2., 1.]], [0, 1], [0, 1], own=own)
    step(bank, args)  # a window
    bank.collect(args)
    bank.accumulate()  # and a step still accumulating
    buffer = io.BytesIO()
    torch.save(bank.resume_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = square_bank()
    other.prototypes.copy_(bank.prototypes)  # what the checkpoint's state dict brings
    other.schedule_reseeding(10)
    other.restore(state['window'], state['pending'])
    assert tensor_values(bank.resume_state()) == tensor_values(other.resume_state())
    # Both finish the step identically.
    for one in (bank, other):
        one.collect(args)
        one.accumulate()
        one.apply()
    assert torch.equal(bank.prototypes, other.prototypes)
    assert not torch.equal(bank.prototypes, square_bank().prototypes)
    # Without re-seeding, a pending step's usage is dropped.
    plain = square_bank()
    plain.restore(pending=state['pending'])
    assert plain.resume_state()['pending']['usage'] is None


def test_restore_refuses_state_of_another_shape():
    bank = square_bank()
    with pytest.raises(ValueError, match=r're-seeding window .*, which needs'):
        bank.restore(window(([1.] * 6), [[0., 0.]] * 3, [1.] * 3))
    with pytest.raises(ValueError, match=r're-seeding window'):
        bank.restore(window=[1, 2])
    with pytest.raises(ValueError, match=r'pending statistics of shape \(6, 2\)/\(6,\)'):
        bank.restore(pending=dict(sums=torch.zeros(6, 2), counts=torch.zeros(6), usage=None))
    with pytest.raises(ValueError, match='a saved state must be a dict'):
        bank.restore(pending=dict(sums=1))
    assert bank.resume_state() == dict(window=None, pending=None)
