"""The distance option: the similarity of each measure, and ProtoHead using it consistently
in training (class scores, clustering, losses) and inference."""
import math

import pytest
import torch
from conftest import make_head, make_samples

from mmseg_proto.models.utils.prototype_distance import similarity_from_cosine


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
    assert head.scores_path == 'eager'
    x = [torch.randn(2, 8, 6, 5)]
    labels = torch.randint(0, 3, (2, 6, 5))
    losses = head.loss(x, make_samples(labels), None)
    base = cosine.loss(x, make_samples(labels), None)
    for name in ('loss_ce', 'loss_ppc', 'loss_ppd'):
        assert torch.isfinite(losses[name]) and losses[name] != base[name], name
    sum(losses.values()).backward()
    head.take_statistics(), cosine.take_statistics()
    # Inference (no grad, slab loop) gives the training forward's logits.
    train_logits = head(x)
    with torch.no_grad():
        infer_logits = head(x)
        cosine_logits = cosine(x)
    torch.testing.assert_close(infer_logits, train_logits.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(infer_logits, cosine_logits)
    # Monotone in the cosine: the same predicted class as the cosine head.
    assert torch.equal(infer_logits.argmax(1), cosine_logits.argmax(1))


def test_distance_options_are_checked():
    with pytest.raises(ValueError, match=r"distance='l1' \(must be one of"):
        make_head(distance='l1')
    with pytest.raises(ValueError, match='huber_delta=0'):
        make_head(distance='huberized', huber_delta=0)
    with pytest.raises(ValueError, match="needs distance='cosine'"):
        make_head(distance='standard', similarity_chunk=64)


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
    assert head.distance == distance and head.num_classes == 150
    assert head.scores_path == ('fused' if distance == 'cosine' else 'eager')
