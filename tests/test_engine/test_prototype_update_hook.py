"""PrototypeUpdateHook: the momentum update computed by hand, once per optimizer step."""
from types import SimpleNamespace

import torch
from conftest import make_head, make_samples
from mmengine.logging import MMLogger, MessageHub
from mmengine.optim import OptimWrapper

from mmseg_proto.engine.hooks import PrototypeUpdateHook


def hand_ema(protos, sums, counts, momentum):
    """p <- normalise(mu * p + (1 - mu) * normalise(sum)) where count > 0, by hand."""
    c, k, d = protos.shape
    out = protos.reshape(c * k, d).clone()
    for i in range(c * k):
        if counts[i] > 0:
            mean = sums[i] / sums[i].norm()
            new = momentum * out[i] + (1 - momentum) * mean
            out[i] = new / new.norm()
    return out.view(c, k, d)


def test_ema_direction_at_momentum_0_9():
    head = make_head(num_classes=2, channels=2, num_prototypes=2, momentum=0.9)
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[[1., 0.], [0., 1.]], [[-1., 0.], [0., -1.]]]))
    sums = torch.zeros(4, 2)
    sums[0] = torch.tensor([0., 3.])
    head.update_prototypes(sums, torch.tensor([3., 0., 0., 0.]))
    # 0.9 * (1, 0) + 0.1 * (0, 1), renormalised: the old prototype dominates.
    expected = torch.tensor([0.9, 0.1]) / (0.82**0.5)
    torch.testing.assert_close(head.prototypes[0, 0], expected)


def fake_runner(head, accumulative_counts):
    model = torch.nn.Module()
    model.decode_head = head
    param = torch.nn.Parameter(torch.zeros(1))
    wrapper = OptimWrapper(torch.optim.SGD([param], lr=0.1),
                           accumulative_counts=accumulative_counts)
    wrapper.initialize_count_status(model, 0, 100)
    runner = SimpleNamespace(model=model, optim_wrapper=wrapper, iter=0,
                             message_hub=MessageHub.get_instance('hook_test'),
                             logger=MMLogger.get_instance('hook_test'))
    return runner, param


def test_accumulated_iterations_give_one_update_from_their_summed_statistics():
    torch.manual_seed(0)
    head = make_head(num_classes=3, channels=8, num_prototypes=2, momentum=0.8)
    hook = PrototypeUpdateHook(log_interval=0)
    runner, param = fake_runner(head, accumulative_counts=2)
    hook.before_train(runner)
    start = head.prototypes.clone()
    g = torch.Generator().manual_seed(0)
    stats = []
    for it in range(2):
        x = [torch.randn(2, 8, 6, 5, generator=g)]
        # Classes 0 and 1 in the first iteration, 0 and 2 in the second: the
        # step's update needs the statistics (sums and counts) of both.
        labels = torch.randint(0, 2, (2, 6, 5), generator=g) * (1 + it)
        losses = head.loss(x, make_samples(labels), None)
        stats.append((head._statistics.sums.clone(), head._statistics.counts.clone()))
        runner.iter = it
        runner.optim_wrapper.update_params(
            sum(v for k, v in losses.items() if k.startswith('loss')) + param.sum())
        hook.after_train_iter(runner, it)
        if it == 0:  # the optimizer did not step: neither may the prototypes
            assert torch.equal(head.prototypes, start)
    sums = stats[0][0] + stats[1][0]
    counts = stats[0][1] + stats[1][1]
    assert stats[0][1][2:4].sum() > 0 and stats[1][1][4:].sum() > 0
    assert stats[0][1][:2].sum() > 0 and stats[1][1][:2].sum() > 0
    expected = hand_ema(start, sums, counts, 0.8)
    torch.testing.assert_close(head.prototypes, expected)
    # Not two updates, one from each half.
    twice = hand_ema(hand_ema(start, *stats[0], 0.8), *stats[1], 0.8)
    assert not torch.allclose(head.prototypes, twice)


def test_without_accumulation_every_iteration_updates():
    torch.manual_seed(0)
    head = make_head(num_classes=3, channels=8, num_prototypes=2, momentum=0.7)
    hook = PrototypeUpdateHook(log_interval=0)
    runner, param = fake_runner(head, accumulative_counts=1)
    hook.before_train(runner)
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 8, 6, 5, generator=g)]
    labels = torch.randint(0, 3, (2, 6, 5), generator=g)
    start = head.prototypes.clone()
    losses = head.loss(x, make_samples(labels), None)
    sums, counts = (head._statistics.sums.clone(), head._statistics.counts.clone())
    runner.optim_wrapper.update_params(losses['loss_ce'] + param.sum())
    hook.after_train_iter(runner, 0)
    torch.testing.assert_close(head.prototypes, hand_ema(start, sums, counts, 0.7))
    assert counts.sum() > 0


def test_reseed_moves_the_least_used_prototype_onto_the_outliers_only():
    head = make_head(num_classes=2, channels=4, num_prototypes=3)
    start = head.prototypes.clone()
    # Class 0: prototype 2 never nearest; class 1: all used (>= 1%).
    nearest = torch.tensor([60., 40., 0., 30., 30., 40.])
    outlier_sums = torch.tensor([[0., 3., 4., 0.], [1., 1., 1., 1.]])
    reseeded = head.reseed_prototypes(nearest, outlier_sums, torch.tensor([5., 5.]), 0.01)
    assert reseeded == [(0, 2)]
    torch.testing.assert_close(head.prototypes[0, 2], torch.tensor([0., 0.6, 0.8, 0.]))
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 2] = False
    assert torch.equal(head.prototypes[mask], start[mask])  # the others bit-identical
    # No outliers or no pixels of the class: nothing to re-seed from.
    assert head.reseed_prototypes(nearest, outlier_sums, torch.tensor([0., 5.]), 0.5) == [(1, 0)]
    assert head.reseed_prototypes(torch.zeros(6), outlier_sums, torch.ones(2), 0.5) == []


def test_usage_statistics_count_nearest_prototypes_and_weigh_by_distance():
    from mmseg_proto.models.utils.prototype_statistics import usage_statistics
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


def test_hook_reseeds_every_interval_and_logs_it():
    torch.manual_seed(0)
    head = make_head(num_classes=3, channels=8, num_prototypes=4, momentum=1.0)
    hook = PrototypeUpdateHook(log_interval=0, reseed_interval=2, reseed_min_share=0.3)
    runner, param = fake_runner(head, accumulative_counts=1)
    runner.train_dataloader = None
    hook.before_train(runner)
    assert head.collect_usage
    g = torch.Generator().manual_seed(0)
    start = head.prototypes.clone()  # momentum 1: the update itself moves nothing
    for it in range(2):
        x = [torch.randn(2, 8, 6, 5, generator=g)]
        labels = torch.randint(0, 3, (2, 6, 5), generator=g)
        losses = head.loss(x, make_samples(labels), None)
        runner.iter = it
        runner.optim_wrapper.update_params(losses['loss_ce'] + param.sum())
        hook.after_train_iter(runner, it)
        if it == 0:
            # mid-window: nothing re-seeded (momentum 1: only renormalisation rounding)
            torch.testing.assert_close(head.prototypes, start)
    moved = (head.prototypes - start).abs().amax(dim=-1) > 1e-3
    reseeded = runner.message_hub.get_scalar('train/proto_reseeded').current()
    assert reseeded == moved.sum() >= 1
    assert (moved.sum(dim=1) <= 1).all()  # at most one per class per window
    assert hook._window == {} and hook._window_updates == 0


def test_reseed_options_are_checked():
    import pytest
    with pytest.raises(ValueError, match='reseed_interval must be an integer >= 0'):
        PrototypeUpdateHook(reseed_interval=-1)
    with pytest.raises(ValueError, match='reseed_min_share must be in'):
        PrototypeUpdateHook(reseed_min_share=0)


def test_no_reseeding_in_the_last_window():
    torch.manual_seed(0)
    head = make_head(num_classes=3, channels=8, num_prototypes=4, momentum=1.0)
    hook = PrototypeUpdateHook(log_interval=0, reseed_interval=1, reseed_min_share=1.0)
    runner, param = fake_runner(head, accumulative_counts=1)
    runner.train_dataloader, runner.max_iters = None, 2
    hook.before_train(runner)
    g = torch.Generator().manual_seed(0)
    for it in range(2):
        start = head.prototypes.clone()
        x = [torch.randn(2, 8, 6, 5, generator=g)]
        losses = head.loss(x, make_samples(torch.randint(0, 3, (2, 6, 5), generator=g)), None)
        runner.iter = it
        runner.optim_wrapper.update_params(losses['loss_ce'] + param.sum())
        hook.after_train_iter(runner, it)
        moved = ((head.prototypes - start).abs().amax(dim=-1) > 1e-3).sum()
        assert (moved > 0) == (it == 0)  # re-seeded after iteration 1 of 2, not after 2
