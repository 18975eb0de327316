"""Anomaly scores against independent (numpy) computations."""
import numpy as np
import pytest
import torch

from mmseg_proto.evaluation.anomaly_scores import (PARAMETRIC_SCORES, SCORES,
                                                   ClassValueStatistics,
                                                   class_normalised_score, energy_score,
                                                   max_logit_score, max_softmax_score,
                                                   prototype_energy_score, prototype_score)


@pytest.fixture
def logits():
    return torch.tensor([[2.0, -1.0, 0.5], [1.0, 3.0, 0.5], [-2.0, 0.0, 0.5]])  # (C=3, N=3)


def test_logit_scores(logits):
    x = logits.numpy().astype(np.float64)
    softmax = np.exp(x) / np.exp(x).sum(0)
    np.testing.assert_allclose(max_softmax_score(logits), 1 - softmax.max(0), rtol=1e-6)
    np.testing.assert_allclose(max_logit_score(logits), -x.max(0))
    np.testing.assert_allclose(energy_score(logits), -np.log(np.exp(x).sum(0)), rtol=1e-6)
    np.testing.assert_allclose(energy_score(logits, 2.0),
                               -2 * np.log(np.exp(x / 2).sum(0)), rtol=1e-6)
    # Uniform logits: the most uncertain softmax, 1 - 1/C.
    assert max_softmax_score(logits)[2] == pytest.approx(2 / 3)


def test_prototype_scores():
    cos = torch.tensor([[0.9, 0.1], [0.2, -0.5], [0.3, -0.2], [0.8, -0.4]])  # (C*K=4, N=2)
    assert prototype_score(cos).tolist() == pytest.approx([0.1, 0.9])
    c = cos.numpy().astype(np.float64)
    np.testing.assert_allclose(prototype_energy_score(cos),
                               -0.1 * np.log(np.exp(c / 0.1).sum(0)), rtol=1e-6)
    # T -> 0: minus the largest cosine; a pixel near two prototypes scores lower (less
    # anomalous) than one near only one of them at the same max cosine.
    np.testing.assert_allclose(prototype_energy_score(cos, 1e-3), -c.max(0), atol=1e-3)
    two = torch.tensor([[0.9], [0.9]])
    one = torch.tensor([[0.9], [-0.9]])
    assert prototype_energy_score(two) < prototype_energy_score(one)


def test_class_value_statistics_against_numpy():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(4, 500, generator=gen)
    labels = torch.randint(0, 4, (500,), generator=gen)
    labels[:20] = 255  # ignored
    predicted = torch.randint(0, 4, (500,), generator=gen)
    predicted[20:300] = labels[20:300]  # enough correct pixels in every class
    stats = ClassValueStatistics(4)
    stats.update(values[:, :250], predicted[:250], labels[:250])  # two batches
    stats.update(values[:, 250:], predicted[250:], labels[250:])
    out = stats.mean_std()
    v, l, p = values.numpy(), labels.numpy(), predicted.numpy()
    for c in range(4):
        own = v[c][(l == c) & (p == c)]
        assert out['mean'][c].item() == pytest.approx(own.mean(), abs=1e-5)
        assert out['std'][c].item() == pytest.approx(own.std(), abs=1e-5)


def test_class_value_statistics_unseen_class_and_errors():
    stats = ClassValueStatistics(3)
    with pytest.raises(ValueError, match='no correctly classified pixel'):
        stats.mean_std()
    values = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    stats.update(values, labels, labels)
    out = stats.mean_std()
    # Class 2 has no pixel: it gets the pooled figures of the pixels seen (1, 3, 5).
    assert out['mean'].tolist() == pytest.approx([2.0, 5.0, 3.0])
    assert out['std'][2].item() == pytest.approx(np.std([1.0, 3.0, 5.0]), rel=1e-5)
    # Class 1 has one pixel: its std is clamped, never 0 (scores stay finite).
    assert out['std'][1].item() > 0
    with pytest.raises(ValueError, match='must be'):
        stats.update(values[:2], labels, labels)
    with pytest.raises(ValueError, match='num_classes'):
        ClassValueStatistics(True)


def test_class_normalised_score(logits):
    stats = dict(mean=torch.tensor([1.0, 2.0, 0.0]), std=torch.tensor([0.5, 2.0, 1.0]))
    # argmax per pixel: 0, 1, 0 (ties go to the first class); own logits 2, 3, 0.5.
    expected = [(1.0 - 2.0) / 0.5, (2.0 - 3.0) / 2.0, (1.0 - 0.5) / 0.5]
    assert class_normalised_score(logits, stats).tolist() == pytest.approx(expected)
    # An explicit predicted class is used as given.
    predicted = torch.tensor([2, 2, 2])
    assert class_normalised_score(logits, stats, predicted).tolist() == pytest.approx(
        [2.0, 0.0, -0.5])


def test_score_table_shapes_and_parametric_subset(logits):
    inputs = dict(logits=logits, class_cosines=torch.rand(3, 3), cosines=torch.rand(6, 3),
                  logit_statistics=dict(mean=torch.zeros(3), std=torch.ones(3)),
                  cosine_statistics=dict(mean=torch.ones(3), std=torch.ones(3)))
    for name, fn in SCORES.items():
        assert fn(inputs).shape == (3,), name
    assert set(PARAMETRIC_SCORES) <= set(SCORES)
    # The parametric scores need nothing but logits.
    for name in PARAMETRIC_SCORES:
        SCORES[name](dict(logits=logits, logit_statistics=inputs['logit_statistics']))
