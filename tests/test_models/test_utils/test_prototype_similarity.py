"""The distance option: the similarity of each measure, and ProtoHead using it consistently
in training (class scores, clustering, losses) and inference."""
import math

import pytest
import torch
from conftest import make_head, make_samples

from mmseg_proto.models.utils.prototype_similarity import similarity_from_cosine


def test_similarities_of_unit_vectors():
    cos = torch.tensor([1.0, 0.0, -1.0])  # d = 0, sqrt(2), 2
    torch.testing.assert_close(similarity_from_cosine(cos, 'cosine'), cos)
    torch.testing.assert_close(similarity_from_cosine(cos, 'standard'),
                               torch.tensor([1.0 - 1e-3, 1 - math.sqrt(2), -1.0]))
    # Huber, delta 1: quadratic d^2 / 2 up to d = 1 (cos = 0.5), linear d - 1/2 beyond.
    torch.testing.assert_close(
        similarity_from_cosine(torch.tensor([0.5, 0.0]), 'huberized'),
        torch.tensor([0.5, 1 - (math.sqrt(2) - 0.5)]))
    x = torch.linspace(-1, 1, 101, dtype=torch.float64, requires_grad=True)
    for distance in ('standard', 'huberized'):
        s = similarity_from_cosine(x, distance)
        assert (s.diff() > 0).all()  # monotone in the cosine: same nearest prototype
        (g, ) = torch.autograd.grad(s.sum(), x)
        assert torch.isfinite(g).all()
    with pytest.raises(ValueError, match='unknown distance'):
        similarity_from_cosine(x, 'manhattan')


@pytest.mark.parametrize('distance', ['standard', 'huberized'])
def test_head_uses_the_distance_in_training_and_inference(distance, seeded):
    head = make_head(num_classes=3, channels=8, num_prototypes=2, distance=distance)
    cosine = make_head(num_classes=3, channels=8, num_prototypes=2)
    cosine.load_state_dict(head.state_dict())
    assert head.scorer.path == 'eager'
    x = [torch.randn(2, 8, 6, 5)]
    labels = torch.randint(0, 3, (2, 6, 5))
    losses = head.loss(x, make_samples(labels), None)
    base = cosine.loss(x, make_samples(labels), None)
    for name in ('loss_ce', 'loss_ppc', 'loss_ppd'):
        assert torch.isfinite(losses[name]) and losses[name] != base[name], name
    sum(losses.values()).backward()
    head.bank.discard(), cosine.bank.discard()
    # Inference (no grad, slab loop) gives the training forward's logits.
    train_logits = head(x)
    with torch.no_grad():
        infer_logits = head(x)
        cosine_logits = cosine(x)
    torch.testing.assert_close(infer_logits, train_logits.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(infer_logits, cosine_logits)
    # Monotone in the cosine: the same predicted class as the cosine head.
    assert torch.equal(infer_logits.argmax(1), cosine_logits.argmax(1))


@pytest.mark.parametrize('distance', ['cosine', 'standard', 'huberized'])
def test_table_5d_configs(distance):
    import os.path as osp

    from conftest import REPO
    from mmengine.config import Config
    from mmseg.registry import MODELS
    cfg = Config.fromfile(osp.join(
        REPO, 'configs', 'protoseg', 'ade20k', 'ablations',
        f'protoseg_segformer_mit-b2_distance-{distance}_8xb2-160k_ade20k-512x512.py'))
    head = MODELS.build(cfg.model.decode_head)
    assert head.scorer.distance == distance and head.num_classes == 150
    assert head.scorer.path == ('fused' if distance == 'cosine' else 'eager')


def huber_similarity_by_hand(cos, delta):
    """1 - Huber(d), d the Euclidean distance of unit vectors with this cosine, written out."""
    d = (2.0 - 2.0 * cos).clamp(min=1e-6).sqrt()
    return 1.0 - torch.where(d <= delta, d ** 2 / (2 * delta), d - delta / 2)


def test_huberized_with_delta_half_against_a_hand_computation():
    # Unit vectors at distance d have cos = 1 - d^2 / 2. Delta 0.5:
    #   d = 0.3 (quadratic): f = 0.3^2 / (2 * 0.5) = 0.09,  s = 0.91,  cos = 0.955
    #   d = 0.8 (linear):    f = 0.8 - 0.5 / 2    = 0.55,  s = 0.45,  cos = 0.68
    #   d = 1.5 (linear):    f = 1.5 - 0.25       = 1.25,  s = -0.25, cos = -0.125
    #   d = 0.5 (= delta):   f = 0.25 / 1 = 0.5 - 0.25 = 0.25, s = 0.75, cos = 0.875
    cos = torch.tensor([0.955, 0.68, -0.125, 0.875], dtype=torch.float64)
    torch.testing.assert_close(similarity_from_cosine(cos, 'huberized', 0.5),
                               torch.tensor([0.91, 0.45, -0.25, 0.75], dtype=torch.float64))
    # Delta 2: d <= 2 always, the quadratic d^2 / 4 = (1 - cos) / 2 everywhere.
    torch.testing.assert_close(similarity_from_cosine(cos, 'huberized', 2.0), (1 + cos) / 2)


@pytest.mark.parametrize('delta', [0.5, 0.3, 1.2])
def test_huberized_is_continuous_with_a_continuous_slope_at_delta(delta):
    eps = 1e-6
    d = torch.tensor([delta - eps, delta, delta + eps], dtype=torch.float64,
                     requires_grad=True)
    s = similarity_from_cosine(1.0 - d * d / 2, 'huberized', delta)
    # Both pieces meet at 1 - delta / 2 ...
    torch.testing.assert_close(s.detach(), torch.full((3, ), 1.0 - delta / 2, dtype=d.dtype),
                               atol=2 * eps, rtol=0)
    # ... with the same slope ds/dd = -d / delta = -1 (the Huber function is C^1).
    (grad, ) = torch.autograd.grad(s.sum(), d)
    torch.testing.assert_close(grad, torch.full((3, ), -1.0, dtype=d.dtype), atol=1e-5, rtol=0)


@pytest.mark.parametrize('grad', [False, True], ids=['inference', 'training'])
def test_head_passes_its_huber_delta(grad, seeded):
    """A head with huber_delta=0.5 scores each class with that delta's similarity: the logits
    are the LayerNorm over classes of the hand-computed similarity (a shift common to all
    classes, all a linear-branch delta changes, would cancel in it: pixels near a prototype,
    on the quadratic branch, tell the deltas apart)."""
    head = make_head(num_classes=3, channels=8, num_prototypes=2, distance='huberized',
                     huber_delta=0.5)
    x = [torch.randn(2, 8, 6, 5)]
    with torch.no_grad():
        emb = head.embed(x)  # (B, H, W, D), unit vectors
        # Prototypes near some pixels' embeddings, so both Huber branches occur.
        picks = emb.reshape(-1, emb.shape[-1])[:6] + 0.15 * torch.randn(6, emb.shape[-1])
        head.prototypes.copy_(torch.nn.functional.normalize(picks, dim=-1).view(3, 2, -1))
        cos = torch.einsum('bhwd,ckd->bhwck', emb, head.prototypes).amax(-1)
        d = (2 - 2 * cos).clamp(min=1e-6).sqrt()
        assert (d < 0.5).any() and (d > 0.5).any()
        expected = head.mask_norm(huber_similarity_by_hand(cos, 0.5)).permute(0, 3, 1, 2)
        other = head.mask_norm(huber_similarity_by_hand(cos, 1.0)).permute(0, 3, 1, 2)
    assert not torch.allclose(expected, other, atol=1e-3)
    with torch.set_grad_enabled(grad):
        logits = head(x)
    torch.testing.assert_close(logits.detach(), expected, atol=1e-5, rtol=1e-5)
