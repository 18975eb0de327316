"""Tests of ProtoHead: values, losses, the statistics it hands its bank, checkpoints."""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_head, make_samples, take_statistics


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
    # The bank's buffer, saved once under the key of every ProtoSeg checkpoint.
    assert [n for n, _ in head.named_buffers()] == ['bank.prototypes']
    assert list(head.state_dict())[0] == 'prototypes'
    assert 'bank.prototypes' not in head.state_dict()


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
    stats = take_statistics(head)
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


def test_only_correct_pixels_count():
    head = make_head(num_classes=2, channels=4, num_prototypes=1).eval()
    x = feats(b=1, c=4, h=4, w=4)
    pred = head(x).argmax(1)[0]
    labels = pred.clone()
    labels[0, :] = 1 - pred[0, :]  # first row: all wrong
    head.loss(x, make_samples(labels[None]), None)
    stats = take_statistics(head)
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
    stats = take_statistics(head)
    sums, counts = stats.sums, stats.counts
    # Pixels of classes 27 and 29 reach the statistics of their prototypes.
    head2 = make_head(num_classes=30, num_prototypes=10)
    head2.load_state_dict(head.state_dict())
    with torch.no_grad():
        head2.mask_norm.bias.zero_()
        head2.mask_norm.bias[29] = 100.0  # every pixel predicted as 29
    labels = torch.full((1, 6, 5), 29)
    head2.loss(feats(b=1), make_samples(labels), None)
    stats = take_statistics(head2)
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
    assert not head.bank.accumulate()  # nothing collected


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
    full = head(x)  # with autograd: from the whole (pixels x C*K) similarity matrix
    assert full.requires_grad
    torch.testing.assert_close(streamed, full.detach())
