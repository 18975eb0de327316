"""Reliability of ProtoHead together with its update hook.

Bad labels and checkpoints fail early and clearly without changing state; degenerate batches
(all ignored, tiny classes, nothing correct, non-finite embeddings) neither
produce NaN nor poison the prototypes; bf16 autocast on CPU trains with fp32
clustering; a seeded fuzz over shapes, classes, K, ignore fractions and
dtypes never yields NaN or out-of-range targets.

The hook is driven by a minimal runner stand-in (``model``, ``logger``,
``message_hub``, ``visualizer``, ``iter``): that is all ``PrototypeUpdateHook`` reads.
"""
import types
from unittest import mock

import pytest
import torch
from conftest import PROTO_CFG, make_head, make_samples, take_statistics
from mmengine.logging import MessageHub

from mmseg_proto.engine.hooks.prototype_update_hook import PrototypeUpdateHook
from mmseg_proto.models.utils.sinkhorn import sinkhorn_knopp


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU, OpenMP threads
    spin-waiting for each other make model runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def feats(b=2, c=8, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=g)]


def fake_runner(model, it=0):
    """What PrototypeUpdateHook uses of a Runner."""
    return types.SimpleNamespace(
        model=model, logger=mock.Mock(), iter=it, visualizer=mock.Mock(),
        message_hub=MessageHub.get_instance('test_robustness'))


def run_hook(runner, it, hook=None):
    """What the Runner calls of PrototypeUpdateHook for one iteration."""
    hook = hook or PrototypeUpdateHook(log_interval=1)
    hook.before_train(runner)
    hook.after_train_iter(runner, it)


def step(head, inputs, labels, hook=None, it=0):
    """One head loss + hook update; returns (losses, runner stand-in)."""
    losses = head.loss(inputs, make_samples(labels), None)
    runner = fake_runner(head, it)
    run_hook(runner, it, hook)
    return losses, runner


def assert_finite_losses(losses):
    for name, value in losses.items():
        if name.startswith('loss'):
            assert torch.isfinite(value).all(), name


# ----------------------------------------------------------- bad inputs --

@pytest.mark.parametrize('bad', [-1, 4, 254])
def test_bad_labels_change_nothing_and_training_goes_on(bad, seeded):
    head = make_head(num_classes=4)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    labels = torch.randint(0, 4, (2, 6, 5))
    labels[1, 2, 3] = bad
    with pytest.raises(ValueError, match=rf'label values \[{bad}\]'):
        head.loss(feats(), make_samples(labels), None)
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k
    # Not left half-way: the next (valid) batch is accepted and updates.
    labels[1, 2, 3] = 0
    losses, _ = step(head, feats(), labels)
    assert_finite_losses(losses)
    assert not torch.equal(head.prototypes, before['prototypes'])


def test_wrong_checkpoint_leaves_prototypes_untouched(seeded):
    head = make_head(num_classes=4, num_prototypes=3)
    before = head.prototypes.clone()
    state = make_head(num_classes=4, num_prototypes=5).state_dict()
    with pytest.raises(RuntimeError, match='num_prototypes=5'):
        head.load_state_dict(state)
    assert torch.equal(head.prototypes, before)
    # A 2-D tensor (e.g. a classifier weight under the wrong key) too.
    state['prototypes'] = torch.zeros(12, 8)
    with pytest.raises(RuntimeError, match=r'shape \(12, 8\)'):
        head.load_state_dict(state)
    assert torch.equal(head.prototypes, before)


def test_hook_without_proto_head_warns():
    runner = fake_runner(torch.nn.Linear(2, 2))
    PrototypeUpdateHook().before_train(runner)
    assert 'no ProtoHead' in runner.logger.warning.call_args[0][0]



# ---------------------------------------------------- degenerate batches --

def test_all_ignore_batch(seeded):
    head = make_head(num_classes=4)
    before = head.prototypes.clone()
    labels = torch.full((2, 6, 5), 255)
    losses = head.loss(feats(), make_samples(labels), None)
    assert_finite_losses(losses)
    total = sum(v for k, v in losses.items() if k.startswith('loss'))
    total.backward()  # a graph exists, gradients are finite (zero or not)
    for name, p in head.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    runner = fake_runner(head)
    run_hook(runner, 0)
    runner.logger.warning.assert_not_called()
    assert torch.equal(head.prototypes, before)  # bit-identical


def test_class_with_fewer_pixels_than_prototypes(seeded):
    head = make_head(num_classes=3, num_prototypes=5)
    labels = torch.zeros(2, 6, 5, dtype=torch.long)
    labels[0, 0, 0] = 1  # one pixel of class 1
    labels[1, 0, :2] = 2  # two pixels of class 2
    losses = head.loss(feats(), make_samples(labels), None)
    assert_finite_losses(losses)
    stats = take_statistics(head)
    sums, counts = stats.sums, stats.counts
    assert counts.view(3, 5)[1].sum() <= 1 and counts.view(3, 5)[2].sum() <= 2
    head.bank.update(sums, counts)
    assert torch.isfinite(head.prototypes).all()
    torch.testing.assert_close(head.prototypes.norm(dim=-1),
                               torch.ones(3, 5))


def test_nothing_classified_correctly_means_no_update(seeded):
    head = make_head(num_classes=4)
    with torch.no_grad():
        head.mask_norm.bias.copy_(torch.tensor([100.0, 0, 0, 0]))
    before = head.prototypes.clone()
    labels = torch.randint(1, 4, (2, 6, 5))  # never class 0, always predicted
    losses, runner = step(head, feats(), labels)
    assert_finite_losses(losses)
    assert torch.equal(head.prototypes, before)
    hub = runner.message_hub
    assert hub.get_scalar('train/proto_updated').current() == 0.0
    runner.logger.warning.assert_not_called()


@pytest.mark.parametrize('label_of_bad_pixel', [0, 2])
@pytest.mark.parametrize('bad_value', [float('nan'), float('inf')])
def test_non_finite_embeddings_skip_the_update(label_of_bad_pixel, bad_value,
                                               seeded):
    """One non-finite pixel: update skipped with a warning, whether or not
    that pixel counts as correctly classified (NaN logits argmax to 0)."""
    head = make_head(num_classes=4)
    before = head.prototypes.clone()
    inputs = feats()
    inputs[0][0, :, 1, 1] = bad_value
    labels = torch.randint(0, 4, (2, 6, 5))
    labels[0, 1, 1] = label_of_bad_pixel
    _, runner = step(head, inputs, labels)
    runner.logger.warning.assert_called_once()
    assert 'non-finite' in runner.logger.warning.call_args[0][0]
    assert torch.equal(head.prototypes, before)
    # The next, clean batch updates normally.
    _, runner = step(head, feats(seed=1), labels, it=1)
    runner.logger.warning.assert_not_called()
    assert not torch.equal(head.prototypes, before)
    assert torch.isfinite(head.prototypes).all()


# ------------------------------------------------------------------ AMP --

def test_mmengine_amp_wrapper_refuses_cpu():
    """Why CPU mixed precision is tested with autocast below."""
    from mmengine.optim import AmpOptimWrapper
    if torch.cuda.is_available():
        pytest.skip('CPU-only behaviour')
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(AssertionError, match='only available'):
        AmpOptimWrapper(dtype='bfloat16', optimizer=opt)


def test_bf16_autocast_head_training_steps(seeded):
    """bf16 autocast on CPU: finite losses, unit-norm finite prototypes,
    statistics and Sinkhorn in fp32."""
    head = make_head(num_classes=5, channels=16, num_prototypes=4)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    start = head.prototypes.clone()
    calls = []
    real = sinkhorn_knopp

    def spy(sims, *args, **kwargs):
        assign, transport = real(sims, *args, **kwargs)
        calls.append((sims.dtype, transport.dtype,
                      torch.is_autocast_enabled('cpu')))
        return assign, transport

    with mock.patch('mmseg_proto.models.decode_heads.proto_head.'
                    'sinkhorn_knopp', spy):
        for it in range(5):
            labels = torch.randint(0, 5, (2, 12, 10))
            labels[:, :2] = 255
            opt.zero_grad()
            with torch.autocast('cpu', dtype=torch.bfloat16):
                losses = head.loss(feats(c=16, h=12, w=10, seed=it),
                                   make_samples(labels), None)
            assert_finite_losses(losses)
            sum(v for k, v in losses.items() if 'loss' in k).backward()
            opt.step()
            assert head.bank.batch.sums.dtype == torch.float32
            run_hook(fake_runner(head, it), it)
    assert calls and all(s == torch.bfloat16 and t == torch.float32
                         for s, t, _ in calls)
    assert head.prototypes.dtype == torch.float32
    assert torch.isfinite(head.prototypes).all()
    torch.testing.assert_close(head.prototypes.norm(dim=-1),
                               torch.ones(5, 4))
    assert not torch.equal(head.prototypes, start)
    for p in head.parameters():
        assert torch.isfinite(p).all()


def test_bf16_autocast_full_model_from_config(seeded):
    """The shipped CamVid model (MiT-B0 + SegformerHead + ProtoHead) under
    bf16 autocast: finite losses and a finite, unit-norm update."""
    from mmengine.config import Config
    from mmseg.registry import MODELS
    cfg = Config.fromfile(PROTO_CFG)
    model = MODELS.build(cfg.model)
    model.train()
    labels = torch.randint(0, 11, (2, 64, 64))
    labels[:, :4] = 255
    samples = make_samples(labels)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model.loss(torch.randn(2, 3, 64, 64), samples)
    assert_finite_losses(losses)
    loss, _ = model.parse_losses(losses)
    loss.backward()
    runner = fake_runner(model)
    run_hook(runner, 0)
    runner.logger.warning.assert_not_called()
    protos = model.decode_head.prototypes
    assert protos.dtype == torch.float32 and torch.isfinite(protos).all()
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(11, 10))


# ----------------------------------------------------------------- fuzz --



@pytest.mark.parametrize('seed', range(12))
def test_fuzz_head_loss_and_update(seed):
    g = torch.Generator().manual_seed(100 + seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi, (1, ), generator=g))

    c, k, d = randint(2, 30), randint(1, 8), randint(2, 24)
    b, h, w = randint(1, 3), randint(1, 9), randint(1, 9)
    torch.manual_seed(seed)
    head = make_head(num_classes=c, channels=d, num_prototypes=k,
                     momentum=float(torch.rand(1, generator=g)))
    labels = torch.randint(0, c, (b, h, w), generator=g)
    labels[torch.rand(b, h, w, generator=g) <
           float(torch.rand(1, generator=g))] = 255
    inputs = [torch.randn(b, d, h, w, generator=g) *
              (10.0**randint(-3, 4))]
    autocast = seed % 3 == 0
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        losses = head.loss(inputs, make_samples(labels), None)
    assert_finite_losses(losses)
    runner = fake_runner(head, seed)
    run_hook(runner, seed)
    runner.logger.warning.assert_not_called()
    assert torch.isfinite(head.prototypes).all()
    torch.testing.assert_close(head.prototypes.norm(dim=-1),
                               torch.ones(c, k))
