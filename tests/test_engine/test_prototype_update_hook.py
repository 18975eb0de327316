"""PrototypeUpdateHook: when the banks update (once per optimizer step, from the statistics of
all its iterations, summed over processes), re-seeding windows, and the resume state it saves
and restores. The bank's own arithmetic is tested in test_models/test_utils/test_prototype_bank.py."""
import re
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import hand_ema, make_head, make_samples, tensor_values
from mmengine.logging import MMLogger, MessageHub
from mmengine.optim import OptimWrapper

from mmengine.runner.checkpoint import get_state_dict, load_state_dict

from mmseg_proto.engine.hooks import PrototypeUpdateHook


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
        stats.append((head.bank.batch.sums.clone(), head.bank.batch.counts.clone()))
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
    sums, counts = (head.bank.batch.sums.clone(), head.bank.batch.counts.clone())
    runner.optim_wrapper.update_params(losses['loss_ce'] + param.sum())
    hook.after_train_iter(runner, 0)
    torch.testing.assert_close(head.prototypes, hand_ema(start, sums, counts, 0.7))
    assert counts.sum() > 0


def test_hook_reseeds_every_interval_and_logs_it():
    torch.manual_seed(0)
    head = make_head(num_classes=3, channels=8, num_prototypes=4, momentum=1.0)
    hook = PrototypeUpdateHook(log_interval=0, reseed_interval=2, reseed_min_share=0.3)
    runner, param = fake_runner(head, accumulative_counts=1)
    runner.train_dataloader = None
    hook.before_train(runner)
    g = torch.Generator().manual_seed(0)
    start = head.prototypes.clone()  # momentum 1: the update itself moves nothing
    for it in range(2):
        x = [torch.randn(2, 8, 6, 5, generator=g)]
        labels = torch.randint(0, 3, (2, 6, 5), generator=g)
        losses = head.loss(x, make_samples(labels), None)
        assert head.bank.batch.usage is not None  # the hook asked for the usage
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
    assert head.bank.resume_state()['window'] is None and head.bank.window_steps == 0


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


# ------------------------------------------------ gradient accumulation --

def run_iterations(head, hook, runner, param, labels_per_iter, g):
    """Train ``head`` one iteration per label map; returns the statistics of
    each iteration and the prototypes after each."""
    stats, protos = [], []
    for it, labels in enumerate(labels_per_iter):
        x = [torch.randn(2, 8, 6, 5, generator=g)]
        losses = head.loss(x, make_samples(labels), None)
        stats.append((head.bank.batch.sums.clone(), head.bank.batch.counts.clone()))
        runner.iter = it
        runner.optim_wrapper.update_params(losses['loss_ce'] + param.sum())
        hook.after_train_iter(runner, it)
        protos.append(head.prototypes.clone())
    return stats, protos


def test_second_accumulated_step_is_the_ema_of_its_own_iterations_only():
    torch.manual_seed(0)
    head = make_head(num_classes=3, channels=8, num_prototypes=2, momentum=0.8)
    hook = PrototypeUpdateHook(log_interval=0)
    runner, param = fake_runner(head, accumulative_counts=2)
    hook.before_train(runner)
    start = head.prototypes.clone()
    g = torch.Generator().manual_seed(1)
    # Step 1 (iterations 0, 1) sees classes 0 and 1, step 2 (2, 3) classes 0
    # and 2: a leak of step 1's statistics into step 2 moves class 1 again.
    labels = [torch.randint(0, 2, (2, 6, 5), generator=g) * m
              for m in (1, 1, 2, 2)]
    stats, protos = run_iterations(head, hook, runner, param, labels, g)
    first = hand_ema(start, stats[0][0] + stats[1][0],
                     stats[0][1] + stats[1][1], 0.8)
    torch.testing.assert_close(protos[1], first)
    assert torch.equal(protos[2], protos[1])  # accumulating: no update
    second = hand_ema(protos[1], stats[2][0] + stats[3][0],
                      stats[2][1] + stats[3][1], 0.8)
    torch.testing.assert_close(protos[3], second)
    assert torch.equal(protos[3][1], protos[1][1])  # class 1 not in step 2
    leaked = hand_ema(protos[1], sum(s for s, _ in stats),
                      sum(c for _, c in stats), 0.8)
    assert not torch.allclose(protos[3], leaked, atol=1e-3)
    assert head.bank.resume_state()['pending'] is None


def reseed_run(max_iters, iters):
    """Re-seeding every 2 optimizer steps with accumulative_counts=2
    (momentum 1: only re-seeding moves prototypes); the iterations after
    which prototypes moved."""
    torch.manual_seed(0)
    head = make_head(num_classes=3, channels=8, num_prototypes=4, momentum=1.0)
    hook = PrototypeUpdateHook(log_interval=0, reseed_interval=2,
                               reseed_min_share=1.0)
    runner, param = fake_runner(head, accumulative_counts=2)
    runner.optim_wrapper.initialize_count_status(runner.model, 0, max_iters)
    runner.train_dataloader, runner.max_iters = None, max_iters
    hook.before_train(runner)
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 3, (2, 6, 5), generator=g) for _ in range(iters)]
    before = head.prototypes.clone()
    _, protos = run_iterations(head, hook, runner, param, labels, g)
    moved = []
    for it, after in enumerate(protos):
        if ((after - before).abs().amax(dim=-1) > 1e-3).any():
            moved.append(it)
        before = after
    return moved


def test_reseeding_window_counts_optimizer_steps_not_iterations():
    # Steps end at iterations 1, 3, 5, 7 (0-based); a window of 2 steps ends
    # at 3 and 7; 7 is the last window (no step left): not re-seeded.
    assert reseed_run(max_iters=8, iters=8) == [3]
    # With 6 iterations, only 1 step is left after iteration 3: a prototype
    # re-seeded there would be trained for less than a window.
    assert reseed_run(max_iters=6, iters=6) == []


# ------------------------------ non-finite statistics on one process only --

class ThreadAllReduce:
    """``all_reduce(sum)`` between threads standing for processes: each call
    waits for the other ranks' matching call (a rank that skips one makes
    the others time out), and every rank gets the same sum."""

    def __init__(self, world_size):
        self.barrier = threading.Barrier(world_size, timeout=5)
        self.slots = [None] * world_size
        self.calls = [0] * world_size
        self.local = threading.local()

    def __call__(self, tensor, op='sum'):
        assert op == 'sum'
        rank = self.local.rank
        self.slots[rank] = tensor.clone()
        self.calls[rank] += 1
        self.barrier.wait()
        total = self.slots[0]
        for other in self.slots[1:]:
            total = total + other
        self.barrier.wait()
        tensor.copy_(total)


class ListLogger:
    def __init__(self):
        self.warnings, self.infos = [], []

    def warning(self, msg):
        self.warnings.append(msg)

    def info(self, msg):
        self.infos.append(msg)


def rank_statistics(g, c, k, d, nan=False):
    from mmseg_proto.models.utils.prototype_statistics import \
        PrototypeStatistics
    sums = torch.randn(c * k, d, generator=g)
    if nan:  # what ProtoHead hands over after non-finite embeddings
        sums = torch.full_like(sums, float('nan'))
    usage = dict(nearest=torch.randperm(c * k, generator=g).float(),
                 outlier_sums=torch.randn(c, d, generator=g),
                 outlier_weights=torch.rand(c, generator=g) + 0.1)
    if nan:
        usage['outlier_sums'] = torch.full_like(usage['outlier_sums'],
                                                float('nan'))
    return PrototypeStatistics(sums, torch.arange(c * k).float() % 3, None,
                               usage)


def test_non_finite_statistics_on_another_process_skip_the_update_everywhere(
        monkeypatch):
    import mmseg_proto.models.utils.prototype_statistics as module
    c, k, d, world = 3, 2, 4, 2
    reduce = ThreadAllReduce(world)
    monkeypatch.setattr(module, 'all_reduce', reduce)
    monkeypatch.setattr(module, 'get_world_size', lambda: world)
    g = torch.Generator().manual_seed(0)
    # Iteration 0: rank 1's batch overflowed; iteration 1: both clean.
    stats = [[rank_statistics(g, c, k, d, nan=(it == 0 and r == 1))
              for r in range(world)] for it in range(2)]
    heads, hooks, runners = [], [], []
    for r in range(world):
        head = make_head(num_classes=c, channels=d, num_prototypes=k,
                         momentum=0.9)
        if heads:
            head.prototypes.copy_(heads[0].prototypes)
        model = torch.nn.Module()
        model.decode_head = head
        heads.append(head)
        hooks.append(PrototypeUpdateHook(log_interval=0, reseed_interval=2,
                                         reseed_min_share=1.0))
        runners.append(SimpleNamespace(
            model=model, optim_wrapper=None, iter=0, max_iters=100,
            train_dataloader=None, logger=ListLogger(),
            message_hub=MessageHub.get_instance(f'nonfinite_rank{r}')))
    start = heads[0].prototypes.clone()
    after = [[None] * world for _ in range(2)]
    errors = []

    def rank_main(r):
        reduce.local.rank = r
        try:
            hooks[r].before_train(runners[r])
            for it in range(2):
                runners[r].iter = it
                heads[r].bank._batch = stats[it][r]  # what its loss would collect
                hooks[r].after_train_iter(runners[r], it)
                after[it][r] = heads[r].prototypes.clone()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append((r, repr(e)))
            reduce.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r, ))
               for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert reduce.calls[0] == reduce.calls[1] > 0  # in step
    for r in range(world):  # the clean rank 0 skipped too, with the warning
        assert torch.equal(after[0][r], start), r
        assert runners[r].logger.warnings == [
            'PrototypeUpdateHook: non-finite embeddings at iteration 1; '
            'prototype update skipped.'], r
    # Iteration 1: the same update on both, from iteration 1 only, then the
    # window (iteration 1's usage only: iteration 0's was skipped) re-seeds
    # each class's least used prototype.
    assert torch.equal(after[1][0], after[1][1])
    clean = stats[1]
    expected = hand_ema(start, clean[0].sums + clean[1].sums,
                        clean[0].counts + clean[1].counts, 0.9)
    nearest = (clean[0].usage['nearest'] + clean[1].usage['nearest']).view(c, k)
    outliers = clean[0].usage['outlier_sums'] + clean[1].usage['outlier_sums']
    for cls in range(c):
        expected[cls, nearest[cls].argmin()] = \
            outliers[cls] / outliers[cls].norm()
    torch.testing.assert_close(after[1][0], expected)
    assert all(h.bank.window_steps == 0 for h in heads)
    assert all(h.bank.resume_state()['window'] is None for h in heads)


# ------------------------------------------------------- resume state --

def half_done_run():
    """3 iterations with accumulative_counts=2 and windows of 3 steps: at the
    checkpoint after iteration 3 the window has 1 update and the second step
    has 1 iteration pending (statistics and gradients)."""
    torch.manual_seed(0)
    head = make_head(num_classes=3, channels=8, num_prototypes=2)
    hook = PrototypeUpdateHook(log_interval=0, reseed_interval=3)
    runner, param = fake_runner(head, accumulative_counts=2)
    runner.train_dataloader = None
    hook.before_train(runner)
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 3, (2, 6, 5), generator=g) for _ in range(3)]
    run_iterations(head, hook, runner, param, labels, g)
    return head, hook, runner, save_checkpoint(runner, hook)


def save_checkpoint(runner, hook, iteration=3):
    """What mmengine's runner saves: the state dict, then the hook's entry."""
    import copy
    checkpoint = {'meta': {'iter': iteration},
                  'state_dict': copy.deepcopy(get_state_dict(runner.model))}
    hook.before_save_checkpoint(runner, checkpoint)
    return checkpoint


BANK_KEY = 'decode_head.bank._extra_state'


def bank_state(checkpoint):
    """The decode head's bank's training state in a checkpoint's state dict."""
    return checkpoint['state_dict'][BANK_KEY]


def as_version_1(checkpoint):
    """The checkpoint as the code before issue 30 wrote it: the bank's state in the hook's
    entry (version 1), none in the state dict."""
    import copy
    old = copy.deepcopy(checkpoint)
    state = old['state_dict'].pop(BANK_KEY)
    old['prototype_update_hook'].update(
        version=1, window_updates=state['window_steps'], window={0: state['window']},
        pending={0: state['pending']} if state['pending'] is not None else {})
    return old


def resumed_hook(checkpoint, iteration=3, accumulate=2, num_classes=3):
    """Resume ``checkpoint`` the way mmengine's runner does: before_run, the hook's
    after_load_checkpoint, the state dict, before_train."""
    head = make_head(num_classes=num_classes, channels=8, num_prototypes=2)
    hook = PrototypeUpdateHook(log_interval=0, reseed_interval=3)
    runner, _ = fake_runner(head, accumulative_counts=accumulate)
    runner.logger = ListLogger()
    runner.iter = iteration
    runner._resume = iteration > 0
    hook.before_run(runner)
    hook.after_load_checkpoint(runner, checkpoint)
    if 'state_dict' in checkpoint:
        load_state_dict(runner.model, checkpoint['state_dict'])
    hook.before_train(runner)
    return head, hook, runner


@pytest.mark.parametrize('version', [2, 1])
def test_checkpoint_holds_window_pending_statistics_and_gradients(version):
    """Version 2: the bank's state in the state dict, the gradients in the hook's entry;
    version 1 (before issue 30): all in the hook's entry. Both restore the same."""
    import io
    head, hook, runner, checkpoint = half_done_run()
    assert set(checkpoint['prototype_update_hook']) == {'version', 'iter', 'gradients'}
    assert bank_state(checkpoint)['window_steps'] == 1
    if version == 1:
        checkpoint = as_version_1(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)  # weights-only loadable: plain dicts, ints and tensors
    loaded = torch.load(buffer, weights_only=True)
    assert loaded['prototype_update_hook']['iter'] == 3
    assert loaded['prototype_update_hook']['version'] == version
    head2, hook2, runner2 = resumed_hook(loaded)
    assert head2.bank.window_steps == head.bank.window_steps == 1
    state, state2 = head.bank.resume_state(), head2.bank.resume_state()
    assert state['window'] is not None and state['pending']['usage'] is not None
    assert tensor_values(state2) == tensor_values(state)
    grads = {n: p.grad for n, p in runner.model.named_parameters()}
    grads2 = {n: p.grad for n, p in runner2.model.named_parameters()}
    assert grads.keys() == grads2.keys()
    assert all(grads[n] is not None and torch.equal(grads[n], grads2[n])
               for n in grads)
    assert 'restored the gradients' in runner2.logger.infos[0]


def test_old_checkpoints_and_load_from_restore_nothing():
    _, _, _, checkpoint = half_done_run()
    # A checkpoint written before the hook saved its state: defaults, said.
    old = {k: v for k, v in checkpoint.items() if k != 'prototype_update_hook'}
    old['state_dict'] = {k: v for k, v in old['state_dict'].items() if k != BANK_KEY}
    head, hook, runner = resumed_hook(old)
    assert head.bank.resume_state() == dict(window=None, pending=None)
    assert head.bank.window_steps == 0
    assert 'holds no re-seeding window' in runner.logger.infos[0]
    # load_from without resume (iteration 0): a new run, nothing restored.
    head, hook, runner = resumed_hook(checkpoint, iteration=0)
    assert head.bank.resume_state() == dict(window=None, pending=None)
    assert all(p.grad is None for p in runner.model.parameters())


@pytest.mark.parametrize('version', [2, 1])
def test_pending_step_is_dropped_where_the_resumed_run_ends_a_step(version):
    _, _, _, checkpoint = half_done_run()
    if version == 1:
        checkpoint = as_version_1(checkpoint)
    head, hook, runner = resumed_hook(checkpoint, accumulate=3)
    state = head.bank.resume_state()
    assert state['pending'] is None and state['window'] is not None
    assert head.bank.window_steps == 1
    assert all(p.grad is None for p in runner.model.parameters())
    assert 'dropped' in runner.logger.warnings[0]


def test_state_that_does_not_fit_the_model_is_refused():
    _, _, _, checkpoint = half_done_run()
    with pytest.raises(RuntimeError, match=r'--resume continues the run that wrote'):
        resumed_hook(checkpoint, num_classes=4)  # the prototypes say it first
    with pytest.raises(ValueError, match=r'saved at iteration 3 but the run '
                       r'resumes at iteration 5'):
        resumed_hook(checkpoint, iteration=5)
    old = as_version_1(checkpoint)
    old['prototype_update_hook']['window'][0]['nearest'] = torch.ones(8)
    with pytest.raises(ValueError, match=r"cannot restore ProtoHead 0's state from the "
                       r"resumed checkpoint's 'prototype_update_hook' entry: re-seeding "
                       r"window 'nearest' of shape \(8,\), which needs \(6,\)"):
        resumed_hook(old)
    bank_state(checkpoint)['version'] = 98
    refused(checkpoint, 'version 98')
    bank_state(checkpoint)['version'] = 1
    checkpoint['prototype_update_hook']['version'] = 99
    refused(checkpoint, 'version 99', entry='prototype_update_hook')


def test_several_processes_save_no_gradients_mid_step_and_say_so(monkeypatch):
    import mmseg_proto.engine.hooks.optimizer_steps as module
    head, hook, runner, _ = half_done_run()
    monkeypatch.setattr(module, 'get_world_size', lambda: 2)
    runner.logger = ListLogger()
    checkpoint = save_checkpoint(runner, hook)
    assert checkpoint['prototype_update_hook']['gradients'] is None
    assert bank_state(checkpoint)['pending']
    assert 'gradients accumulated on each are not saved' in \
        runner.logger.warnings[0]


# ------------------------------------- loaded hook state is checked (issue 28, 3) --

def refused(checkpoint, match, entry=BANK_KEY, **kwargs):
    """Resuming ``checkpoint`` is refused with one message matching ``match`` that names
    the entry and says what to do."""
    with pytest.raises(ValueError, match=match) as info:
        resumed_hook(checkpoint, **kwargs)
    message = str(info.value)
    assert f"'{entry}' entry" in message and 'to resume without it' in message, message


def test_pending_statistics_with_negative_counts_are_refused():
    _, _, _, checkpoint = half_done_run()
    bank_state(checkpoint)['pending']['counts'][0] = -3.0
    refused(checkpoint, r"bank's training state .*pending statistics 'counts' holds negative "
                        r'values \(min -3\)')


@pytest.mark.parametrize('shape', [(1, ), (2, 3, 2)])
def test_pending_usage_of_another_shape_is_refused(shape):
    # (1,) used to broadcast into the window silently, (2, 3, 2) to crash mid-training.
    _, _, _, checkpoint = half_done_run()
    bank_state(checkpoint)['pending']['usage']['nearest'] = torch.ones(shape)
    refused(checkpoint, rf"pending statistics usage\['nearest'\] of shape "
                        rf'{re.escape(str(shape))}, which needs \(6,\)')


@pytest.mark.parametrize('entry', ['nearest', 'outlier_sums', 'outlier_weights'])
def test_non_finite_or_negative_reseeding_window_is_refused(entry):
    _, _, _, checkpoint = half_done_run()
    window = bank_state(checkpoint)['window']
    window[entry].view(-1)[0] = float('nan')
    refused(checkpoint, rf"re-seeding window '{entry}' holds non-finite values")
    if entry != 'outlier_sums':  # sums of embeddings may be negative
        window[entry].view(-1)[0] = -1.0
        refused(checkpoint, rf"re-seeding window '{entry}' holds negative values")


def test_reseeding_window_of_another_dtype_is_refused():
    _, _, _, checkpoint = half_done_run()
    window = bank_state(checkpoint)['window']
    window['nearest'] = window['nearest'].long()
    refused(checkpoint, r"re-seeding window 'nearest' of dtype torch.int64, which needs "
                        r'torch.float32')


def test_non_finite_saved_gradients_are_refused():
    _, _, _, checkpoint = half_done_run()
    grads = checkpoint['prototype_update_hook']['gradients']
    name = next(iter(grads))
    grads[name].view(-1)[0] = float('nan')
    hook_entry = 'prototype_update_hook'
    refused(checkpoint, rf"accumulated gradients hold non-finite values in '{name}'",
            entry=hook_entry)
    grads[name] = grads[name].long()
    refused(checkpoint, rf"accumulated gradients hold '{name}' of dtype torch.int64",
            entry=hook_entry)


def test_pending_step_with_non_finite_embeddings_resumes_and_is_skipped():
    """What an honest checkpoint holds when the unfinished step's batch had non-finite
    embeddings (all sums NaN, the usage too): accepted; that step skips the update, as
    the run that wrote it did."""
    _, _, _, checkpoint = half_done_run()
    pending = bank_state(checkpoint)['pending']
    pending['sums'].fill_(float('nan'))
    pending['usage']['outlier_sums'].fill_(float('nan'))
    head, hook, runner = resumed_hook(checkpoint)
    runner.optim_wrapper.initialize_count_status(runner.model, 3, 100)
    before = head.prototypes.clone()
    g = torch.Generator().manual_seed(5)
    losses = head.loss([torch.randn(2, 8, 6, 5, generator=g)],
                       make_samples(torch.randint(0, 3, (2, 6, 5), generator=g)), None)
    runner.optim_wrapper.update_params(losses['loss_ce'])  # iteration 4 ends the step
    hook.after_train_iter(runner, 3)
    assert torch.equal(head.prototypes, before)
    assert runner.logger.warnings == ['PrototypeUpdateHook: non-finite embeddings at '
                                      'iteration 4; prototype update skipped.']


# ------------------------------- --resume never drops the prototypes (issue 28, 3) --

def test_resume_takes_the_prototypes_whatever_load_prototypes_says():
    """The hook tells the banks before mmengine's resume loads the state dict."""
    torch.manual_seed(0)
    trained = make_head(num_classes=3, channels=8, num_prototypes=2)
    model = torch.nn.Module()
    model.decode_head = make_head(num_classes=3, channels=8, num_prototypes=2,
                                  load_prototypes=False)
    fresh = model.decode_head.prototypes.clone()
    assert not torch.equal(fresh, trained.prototypes)
    hook = PrototypeUpdateHook(log_interval=0)
    for resume in (False, True):
        runner = SimpleNamespace(model=model, _resume=resume)
        hook.after_load_checkpoint(runner, {'meta': {'iter': 2}})
        model.decode_head.load_state_dict(trained.state_dict())
        expected = trained.prototypes if resume else fresh
        assert torch.equal(model.decode_head.prototypes, expected), resume


def test_resume_of_prototypes_of_another_shape_says_resume_with_that_config():
    model = torch.nn.Module()
    model.decode_head = make_head(num_classes=3, channels=8, num_prototypes=2,
                                  load_prototypes=False)
    hook = PrototypeUpdateHook(log_interval=0)
    hook.after_load_checkpoint(SimpleNamespace(model=model, _resume=True), {})
    other = make_head(num_classes=3, channels=8, num_prototypes=4)
    with pytest.raises(RuntimeError, match=r"--resume continues the run that wrote the "
                       r"checkpoint: resume with that run's config.*load_from=CKPT "
                       r'without --resume'):
        model.decode_head.load_state_dict(other.state_dict())


def test_ema_hook_averaging_buffers_is_refused_before_training():
    from mmengine.hooks import EMAHook
    head = make_head(num_classes=3, channels=8, num_prototypes=2)
    runner, _ = fake_runner(head, accumulative_counts=1)
    runner.hooks = [EMAHook(update_buffers=True)]
    with pytest.raises(ValueError, match=r'EMAHook\(update_buffers=True\) averages every '
                       r"buffer.*set update_buffers=False in the EMAHook entry"):
        PrototypeUpdateHook(log_interval=0).before_train(runner)
    runner.hooks = [EMAHook()]  # update_buffers=False: the prototypes are kept in sync
    PrototypeUpdateHook(log_interval=0).before_train(runner)


# ------------------------------------------------ pins (issue 28, section 7) --

def test_logged_entropy_averages_over_the_classes_in_the_batch_only():
    torch.manual_seed(0)
    head = make_head(num_classes=4, channels=8, num_prototypes=3)
    hook = PrototypeUpdateHook(log_interval=1, per_class_entropy=False)
    runner, param = fake_runner(head, accumulative_counts=1)
    runner.message_hub = MessageHub.get_instance('entropy_pin')
    hook.before_train(runner)
    hook.before_train_iter(runner, 0)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (2, 6, 5), generator=g) * 2  # classes 0 and 2 only
    losses = head.loss([torch.randn(2, 8, 6, 5, generator=g)], make_samples(labels), None)
    stats = head.bank.batch.assignments
    runner.optim_wrapper.update_params(losses['loss_ce'] + param.sum())
    hook.after_train_iter(runner, 0)
    # By hand: per class present, the summed normalised entropy over its pixels.
    per_class = [stats['entropy_sum'][c].item() / (labels == c).sum().item() for c in (0, 2)]
    assert stats['pixels'].tolist() == [(labels == c).sum().item() for c in range(4)]
    assert min(per_class) > 0
    logged = runner.message_hub.get_scalar('train/proto_entropy').current()
    assert logged == pytest.approx(sum(per_class) / 2, rel=1e-6)


def test_decode_and_auxiliary_heads_reseed_every_interval_not_every_step():
    torch.manual_seed(0)
    heads = [make_head(num_classes=3, channels=8, num_prototypes=4, momentum=1.0)
             for _ in range(2)]
    hook = PrototypeUpdateHook(log_interval=0, reseed_interval=2, reseed_min_share=1.0)
    runner, param = fake_runner(heads[0], accumulative_counts=1)
    runner.model.auxiliary_head = heads[1]
    runner.train_dataloader = None
    hook.before_train(runner)
    assert [b.prototypes.shape for b in hook.banks] == [h.prototypes.shape for h in heads]
    g = torch.Generator().manual_seed(0)
    moved = []
    for it in range(6):
        before = [h.prototypes.clone() for h in heads]
        x = [torch.randn(2, 8, 6, 5, generator=g)]
        labels = torch.randint(0, 3, (2, 6, 5), generator=g)
        loss = sum(h.loss(x, make_samples(labels), None)['loss_ce'] for h in heads)
        runner.iter = it
        runner.optim_wrapper.update_params(loss + param.sum())
        hook.after_train_iter(runner, it)
        moved.append([bool(((h.prototypes - b).abs().amax(dim=-1) > 1e-3).any())
                      for h, b in zip(heads, before)])
    # momentum 1: only re-seeding moves prototypes; min_share 1: every window re-seeds.
    assert moved == [[False, False], [True, True]] * 3


def test_version_1_state_of_a_proto_head_the_model_no_longer_has_is_refused():
    # (Version 2 keeps each bank's state under its own module's key: a head the model no
    # longer has is an unexpected key of the state dict, like its weights.)
    _, _, _, checkpoint = half_done_run()
    checkpoint = as_version_1(checkpoint)
    state = checkpoint['prototype_update_hook']
    # Written by a model with an auxiliary ProtoHead (index 1); this one has one head.
    state['window'][1] = state['window'][0]
    entry = 'prototype_update_hook'
    refused(checkpoint, r'window must map ProtoHead indices below 1 \(the model has 1 '
                        r'ProtoHead\(s\)\)', entry=entry)
    del state['window'][1]
    state['pending'][1] = state['pending'][0]
    refused(checkpoint, r'pending must map ProtoHead indices below 1', entry=entry)


def test_reseeding_happens_after_iteration_4_when_max_iters_is_not_a_multiple():
    # accumulative_counts 2, 7 iterations: steps end at iterations 2, 4, 6 and 7 (the
    # last, partial one); the first window (2 steps) ends at 4 with 2 steps left: a full
    # window, so it re-seeds; the second ends at 7, the last: not.
    assert reseed_run(max_iters=7, iters=7) == [3]  # 0-based: after iteration 4
