"""Tests of ProtoHead: values, losses, prototype update, checkpoints."""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_head, make_samples


def feats(b=2, c=8, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=g)]


def test_shapes_and_attributes(seeded):
    head = make_head(num_classes=4, num_prototypes=3)
    out = head(feats())
    assert out.shape == (2, 4, 6, 5)
    assert head.num_classes == 4 and head.out_channels == 4
    assert head.align_corners is False
    assert head.prototypes.shape == (4, 3, 8)
    assert not hasattr(head, 'conv_seg')
    names = [n for n, _ in head.named_parameters()]
    assert not any('prototypes' in n for n in names)
    assert not any('conv_seg' in n for n in names)
    assert 'prototypes' in head.state_dict()


def test_pixel_equal_to_prototype_gets_its_class(seeded):
    head = make_head(num_classes=4, num_prototypes=3).eval()
    x = feats()
    emb = head.embed(x)  # B, H, W, D
    with torch.no_grad():
        head.prototypes[2, 1] = emb[0, 3, 4]
        head.prototypes[0, 2] = emb[1, 0, 0]
    pred = head(x).argmax(1)
    assert pred[0, 3, 4] == 2
    assert pred[1, 0, 0] == 0


def test_class_score_is_max_over_prototypes_then_layernorm(seeded):
    head = make_head(num_classes=4, num_prototypes=3).eval()
    x = feats()
    emb = head.embed(x)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 6, 5))
    sims = torch.einsum('bhwd,ckd->bhwck', emb, head.prototypes)
    expected = F.layer_norm(sims.amax(-1), (4, ), head.mask_norm.weight,
                            head.mask_norm.bias).permute(0, 3, 1, 2)
    torch.testing.assert_close(head(x), expected)


def test_loss_keys_and_targets(seeded):
    head = make_head(num_classes=4, num_prototypes=3)
    labels = torch.randint(0, 4, (2, 12, 10))
    labels[0, :3] = 255
    losses = head.loss(feats(), make_samples(labels), None)
    assert {'loss_ce', 'loss_ppc', 'loss_ppd', 'acc_seg'} <= set(losses)
    for key in ('loss_ce', 'loss_ppc', 'loss_ppd'):
        assert torch.isfinite(losses[key]) and losses[key] > 0
    stats = head.take_statistics()
    sums, counts = stats.sums, stats.counts
    assert sums.shape == (12, 8) and counts.shape == (12, )


def test_gradients_never_reach_prototypes(seeded):
    head = make_head(num_classes=4, num_prototypes=3)
    labels = torch.randint(0, 4, (2, 6, 5))
    losses = head.loss(feats(), make_samples(labels), None)
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    assert not head.prototypes.requires_grad and head.prototypes.grad is None
    for name, p in head.named_parameters():
        assert p.grad is not None, f'unused parameter {name}'


def test_ema_update_hand_computed():
    head = make_head(num_classes=2, channels=2, num_prototypes=2, momentum=0.5)
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[[1., 0.], [0., 1.]],
                                            [[-1., 0.], [0., -1.]]]))
    before = head.prototypes.clone()
    sums = torch.zeros(4, 2)
    sums[0] = torch.tensor([0., 3.])  # mean direction (0, 1)
    counts = torch.tensor([3., 0., 0., 0.])
    updated = head.update_prototypes(sums, counts)
    assert updated.tolist() == [True, False, False, False]
    # 0.5 * (1, 0) + 0.5 * (0, 1), renormalised.
    s = 2**-0.5
    torch.testing.assert_close(head.prototypes[0, 0], torch.tensor([s, s]))
    # Untouched prototypes stay bit-identical.
    assert torch.equal(head.prototypes.view(4, 2)[1:],
                       before.view(4, 2)[1:])
    torch.testing.assert_close(head.prototypes.norm(dim=-1),
                               torch.ones(2, 2))


def test_only_correct_pixels_count():
    head = make_head(num_classes=2, channels=4, num_prototypes=1).eval()
    x = feats(b=1, c=4, h=4, w=4)
    pred = head(x).argmax(1)[0]
    labels = pred.clone()
    labels[0, :] = 1 - pred[0, :]  # first row: all wrong
    head.loss(x, make_samples(labels[None]), None)
    stats = head.take_statistics()
    sums, counts = stats.sums, stats.counts
    assert counts.sum() == 12
    emb = head.embed(x)[0]
    correct = labels == pred
    for c in range(2):
        sel = correct & (labels == c)
        torch.testing.assert_close(sums[c], emb[sel].sum(0))
        assert counts[c] == sel.sum()


def test_targets_beyond_255_are_used_not_ignored(seeded):
    # 30 classes x 10 prototypes: targets up to 299; class >= 26 -> >= 260.
    head = make_head(num_classes=30, num_prototypes=10)
    labels = torch.full((1, 6, 5), 29)
    labels[0, 0] = 27
    losses = head.loss(feats(b=1), make_samples(labels), None)
    assert losses['loss_ppc'] > 0 and losses['loss_ppd'] > 0
    stats = head.take_statistics()
    sums, counts = stats.sums, stats.counts
    # Pixels of classes 27 and 29 reach the statistics of their prototypes.
    head2 = make_head(num_classes=30, num_prototypes=10)
    head2.load_state_dict(head.state_dict())
    with torch.no_grad():
        head2.mask_norm.bias.zero_()
        head2.mask_norm.bias[29] = 100.0  # every pixel predicted as 29
    labels = torch.full((1, 6, 5), 29)
    head2.loss(feats(b=1), make_samples(labels), None)
    stats = head2.take_statistics()
    sums, counts = stats.sums, stats.counts
    assert counts[290:].sum() == 30 and counts[:290].sum() == 0


def test_missing_update_hook_is_an_error(seeded):
    head = make_head()
    labels = torch.randint(0, 4, (2, 6, 5))
    head.loss(feats(), make_samples(labels), None)
    with pytest.raises(RuntimeError, match="PrototypeUpdateHook"):
        head.loss(feats(), make_samples(labels), None)


def test_bad_labels_rejected_before_state_changes(seeded):
    head = make_head(num_classes=4)
    labels = torch.randint(0, 4, (2, 6, 5))
    labels[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r'label values \[7\]'):
        head.loss(feats(), make_samples(labels), None)
    assert head.take_statistics() is None


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_prototypes=0), 'num_prototypes'),
    (dict(momentum=1.5), 'momentum'),
    (dict(sinkhorn_epsilon=0.0), 'sinkhorn_epsilon'),
    (dict(sinkhorn_iters=0), 'sinkhorn_iters'),
    (dict(projection='conv3'), 'projection'),
    (dict(embed_dims=16), 'embed_dims=16'),
    (dict(decoder=dict(type='NoSuchHead')), 'NoSuchHead'),
    (dict(loss_decode=dict(type='PixelPrototypeContrastLoss')), 'pixel loss'),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises((ValueError, KeyError, TypeError), match=match):
        make_head(**kwargs)


@pytest.mark.parametrize('projection,params', [('none', 0), ('linear', 72),
                                               ('mlp', 72 + 72)])
def test_projection_options(projection, params):
    head = make_head(projection=projection, embed_dims=8)
    n = sum(p.numel() for n, p in head.named_parameters()
            if n.startswith('projection'))
    assert n == params
    assert head(feats()).shape == (2, 4, 6, 5)


def test_checkpoint_round_trip_and_shape_mismatch(tmp_path, seeded):
    head = make_head(num_classes=4, num_prototypes=3)
    with torch.no_grad():
        head.prototypes.copy_(F.normalize(torch.randn(4, 3, 8), dim=-1))
    path = tmp_path / 'head.pth'
    torch.save(head.state_dict(), path)
    other = make_head(num_classes=4, num_prototypes=3)
    other.load_state_dict(torch.load(path))
    assert torch.equal(other.prototypes, head.prototypes)
    for kwargs in (dict(num_classes=5), dict(num_prototypes=2)):
        wrong = make_head(**kwargs)
        with pytest.raises(RuntimeError, match='num_prototypes'):
            wrong.load_state_dict(torch.load(path), strict=False)


def test_inference_without_similarity_matrix_gives_identical_logits(seeded):
    head = make_head(num_classes=4, num_prototypes=3).eval()
    x = feats(b=3)
    with torch.no_grad():
        streamed = head(x)
    full = head._scores(x)[2]
    torch.testing.assert_close(streamed, full.detach())


def prototype_losses(temperature):
    """CE + PPC + PPD with non-default weights and the given temperature."""
    return [
        dict(type='CrossEntropyLoss', loss_weight=1.0),
        dict(type='PixelPrototypeContrastLoss', loss_weight=0.3,
             temperature=temperature),
        dict(type='PixelPrototypeDistanceLoss', loss_weight=0.2),
    ]


# 0.01: exp(s / T) would overflow unshifted, the fused path shifts.
@pytest.mark.parametrize('temperature', [1.0, 0.5, 0.1, 0.01])
def test_fused_losses_equal_unfused_values_and_gradients(temperature):
    losses_cfg = prototype_losses(temperature)
    heads = {}
    for fused in (True, False):
        torch.manual_seed(0)
        heads[fused] = make_head(num_classes=5, num_prototypes=3,
                                 fused_losses=fused, loss_decode=losses_cfg)
    assert heads[True].fused_losses and not heads[False].fused_losses
    heads[False].load_state_dict(heads[True].state_dict())
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (2, 12, 10), generator=g)
    labels[1, :4] = 255
    out = {}
    for fused, head in heads.items():
        x = [t.clone().requires_grad_() for t in feats()]
        losses = head.loss(x, make_samples(labels), None)
        total = sum(v for n, v in losses.items() if n.startswith('loss'))
        total.backward()
        out[fused] = (losses, x[0].grad, head.take_statistics())
    for key in ('loss_ce', 'loss_ppc', 'loss_ppd', 'acc_seg'):
        torch.testing.assert_close(out[True][0][key], out[False][0][key])
    torch.testing.assert_close(out[True][1], out[False][1])
    torch.testing.assert_close(out[True][2].sums, out[False][2].sums)
    torch.testing.assert_close(out[True][2].counts, out[False][2].counts)


def test_fused_class_score_ties_share_the_gradient():
    from mmseg_proto.models.utils import FusedPrototypeScores
    c, k = 3, 2
    protos = F.normalize(torch.randn(k * c, 4), dim=1)
    protos[c:] = protos[:c]  # prototype 1 of every class duplicates 0
    emb = F.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    sims = (emb @ protos.T).detach()
    scores, _, _ = FusedPrototypeScores.apply(emb, sims.clone(), protos,
                                              torch.full((5, ), -1), c, k,
                                              1.0)
    scores.sum().backward()
    # A tied max passes on the max's gradient once (whichever copy takes
    # it), not once per tied copy.
    torch.testing.assert_close(emb.grad, protos[:c].sum(0).expand(5, 4))
    torch.testing.assert_close(scores, sims[:, :c])


@pytest.mark.parametrize('temperature', [0.1, 0.005])
def test_fused_scores_match_autograd_reference(temperature):
    # T = 0.005: exp(s / T) = exp(200) overflows fp32 unless shifted.
    from mmseg_proto.models.utils import FusedPrototypeScores
    torch.manual_seed(0)
    c, k, n = 4, 3, 40
    protos = F.normalize(torch.randn(k * c, 6, dtype=torch.float64), dim=1)
    emb = F.normalize(torch.randn(n, 6, dtype=torch.float64), dim=1)
    emb[:k * c] = protos  # similarities of exactly 1
    targets = torch.randint(0, k * c, (n, ))
    targets[::5] = -1
    weights = torch.rand(3, n, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        x = emb.clone().float().requires_grad_()
        p = protos.float()
        if fused:
            scaled_p = p / temperature
            scaled = (x @ scaled_p.T).detach()
            scores, ppc, ppd = FusedPrototypeScores.apply(
                x, scaled, scaled_p, targets, c, k, 1.0 / temperature)
        else:
            sims = x @ p.T
            scores = sims.view(n, k, c).max(dim=1).values
            valid = targets >= 0
            ppc = F.cross_entropy(sims / temperature, targets.clamp(min=0),
                                  reduction='none') * valid
            target_sim = sims.gather(1, targets.clamp(min=0)[:, None])[:, 0]
            ppd = (1 - target_sim)**2 * valid
        assert torch.isfinite(ppc).all()
        total = sum((w.float()[:, None] * t if t.dim() == 2 else
                     w.float() * t).sum()
                    for w, t in zip(weights, (scores, ppc, ppd)))
        total.backward()
        grads.append((scores, ppc, ppd, x.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_backward_twice_is_refused():
    head = make_head(num_classes=4, num_prototypes=3)
    x = [t.requires_grad_() for t in feats()]
    labels = torch.randint(0, 4, (2, 6, 5))
    losses = head.loss(x, make_samples(labels), None)
    losses['loss_ppc'].backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='fused_losses=False'):
        losses['loss_ppc'].backward()


def test_fused_losses_all_ignored_batch_is_finite():
    head = make_head(num_classes=4, num_prototypes=3)
    x = [t.requires_grad_() for t in feats()]
    labels = torch.full((2, 6, 5), 255)
    losses = head.loss(x, make_samples(labels), None)
    total = sum(v for n, v in losses.items() if n.startswith('loss'))
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(x[0].grad).all()
    assert losses['loss_ppc'] == 0 and losses['loss_ppd'] == 0


@pytest.mark.parametrize('temperature', [1.0, 0.5])
def test_streamed_similarities_equal_fused_values_and_gradients(temperature):
    losses_cfg = prototype_losses(temperature)
    heads = {}
    for chunk in (None, 7):  # 7 pixels per block: many blocks, a ragged end
        torch.manual_seed(0)
        heads[chunk] = make_head(num_classes=5, num_prototypes=3,
                                 similarity_chunk=chunk,
                                 loss_decode=losses_cfg)
    heads[7].load_state_dict(heads[None].state_dict())
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 5, (2, 12, 10), generator=g)
    labels[0, :3] = 255
    out = {}
    for chunk, head in heads.items():
        x = [t.clone().requires_grad_() for t in feats()]
        losses = head.loss(x, make_samples(labels), None)
        sum(v for n, v in losses.items() if n.startswith('loss')).backward()
        out[chunk] = (losses, x[0].grad, head.take_statistics())
    for key in ('loss_ce', 'loss_ppc', 'loss_ppd', 'acc_seg'):
        torch.testing.assert_close(out[7][0][key], out[None][0][key])
    torch.testing.assert_close(out[7][1], out[None][1])
    torch.testing.assert_close(out[7][2].sums, out[None][2].sums)
    torch.testing.assert_close(out[7][2].counts, out[None][2].counts)


def test_similarity_chunk_needs_standard_losses():
    with pytest.raises(ValueError, match='similarity_chunk'):
        make_head(similarity_chunk=0)
    with pytest.raises(ValueError, match='similarity_chunk'):
        make_head(similarity_chunk=64, loss_decode=[
            dict(type='CrossEntropyLoss'),
            dict(type='PixelPrototypeContrastLoss'),
            dict(type='PixelPrototypeContrastLoss', loss_name='loss_ppc2')])
