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
    with pytest.raises(ValueError, match='0 correctly classified pixel'):
        stats.mean_std()
    values = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    stats.update(values, labels, labels)
    # Three pixels are too few for statistics at the default min_count.
    with pytest.raises(ValueError, match='3 correctly classified pixel.*fewer than '
                                         'min_count=30.*lower min_count'):
        stats.mean_std()
    out = stats.mean_std(min_count=1)
    # Class 2 has no pixel: it gets the pooled figures of the pixels seen (1, 3, 5).
    assert out['mean'].tolist() == pytest.approx([2.0, 5.0, 3.0])
    assert out['std'][2].item() == pytest.approx(np.std([1.0, 3.0, 5.0]), rel=1e-5)
    assert out['own'].tolist() == [True, True, False]
    assert out['count'].tolist() == [2, 1, 0]
    # Class 1 has one pixel: its std is the floor, never 0 (scores stay finite).
    assert out['std'][1].item() == pytest.approx(1e-3)
    with pytest.raises(ValueError, match='must be'):
        stats.update(values[:2], labels, labels)
    with pytest.raises(ValueError, match='num_classes'):
        ClassValueStatistics(True)
    for bad in (dict(min_count=0), dict(min_count=2.5), dict(min_std=0.0),
                dict(min_std=float('nan'))):
        with pytest.raises(ValueError, match=r'mean_std: min_\w+=.* must be'):
            stats.mean_std(**bad)


def one_class_values(n, value, rng):
    """(C=2, n) values whose true and predicted class is 0 at every pixel."""
    values = torch.from_numpy(np.stack([value, rng.normal(size=n)])).float()
    labels = torch.zeros(n, dtype=torch.long)
    return values, labels


def test_a_class_with_one_pixel_gets_the_pooled_statistics_not_a_zero_std():
    """Issue 28: one correctly classified pixel gave std 1e-6, so a pixel 0.1 below the class
    value scored 99,999.9."""
    rng = np.random.default_rng(0)
    common = rng.normal(2.0, 0.5, size=200)
    stats = ClassValueStatistics(2)
    values, labels = one_class_values(200, common, rng)
    stats.update(values, labels, labels)
    # Class 1: one pixel, value 4.0.
    stats.update(torch.tensor([[0.0], [4.0]]), torch.tensor([1]), torch.tensor([1]))
    with pytest.warns(UserWarning, match=r'classes \[1\] have fewer than min_count=30 '
                                         r'pixels \(\[1\]\).*pooled'):
        out = stats.mean_std()
    pooled = np.r_[values[0].double().numpy(), 4.0]
    assert out['own'].tolist() == [True, False]
    assert out['mean'][1].item() == pytest.approx(pooled.mean(), rel=1e-5)
    assert out['std'][1].item() == pytest.approx(pooled.std(), rel=1e-5)
    # A pixel of class 1 0.1 below its one training value: a small score, not 1e5.
    score = class_normalised_score(torch.tensor([[0.0], [3.9]]), out)
    assert score.item() == pytest.approx((pooled.mean() - 3.9) / pooled.std(), rel=1e-4)
    assert abs(score.item()) < 10


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_values_are_skipped_counted_and_warned(bad):
    """Issue 28: one NaN or inf logit made every class's mean and std NaN, unflagged."""
    rng = np.random.default_rng(1)
    v0 = rng.normal(1.0, 0.3, size=100)
    values, labels = one_class_values(100, v0, rng)
    values[0, 7] = bad
    values[1, 3] = bad  # not the true class's value: not used at all
    stats = ClassValueStatistics(2)
    stats.update(values[:, :60], labels[:60], labels[:60])
    stats.update(values[:, 60:], labels[60:], labels[60:])
    with pytest.warns(UserWarning, match=r'skipped 1 non-finite value\(s\).*classes \[0\]'):
        out = stats.mean_std()
    finite = np.delete(values[0].double().numpy(), 7)
    assert torch.isfinite(out['mean']).all() and torch.isfinite(out['std']).all()
    assert out['mean'][0].item() == pytest.approx(finite.mean(), rel=1e-5)
    assert out['std'][0].item() == pytest.approx(finite.std(), rel=1e-5)
    assert out['count'][0].item() == 99 and stats.nonfinite.tolist() == [1, 0]


def test_a_class_whose_values_are_all_equal_gets_min_std_and_finite_scores():
    """Pin (issue 28 section 7): std is exactly min_std; the score a hand computation."""
    rng = np.random.default_rng(2)
    values, labels = one_class_values(50, np.full(50, 0.7), rng)
    stats = ClassValueStatistics(2)
    stats.update(values, labels, labels)
    for min_std in (1e-3, 0.05):
        out = stats.mean_std(min_std=min_std)
        assert out['std'][0].item() == pytest.approx(min_std, rel=1e-6)
        score = class_normalised_score(torch.tensor([[0.6, 0.7], [-5.0, -5.0]]), out)
        assert torch.isfinite(score).all()
        assert score.tolist() == pytest.approx([(0.7 - 0.6) / min_std, 0.0], abs=1e-3)


@pytest.mark.parametrize('temperature', [0, 0.0, -0.1, float('nan'), float('inf'), True,
                                         '1', None])
def test_energy_temperatures_that_are_not_positive_finite_are_refused(logits, temperature):
    """Issue 28: energy_score(T=0) gave NaN, prototype_energy_score(T=-0.1) an inverted
    score."""
    with pytest.raises(ValueError, match=r'energy_score: invalid temperature=.*must be a '
                                         r'finite number > 0'):
        energy_score(logits, temperature)
    with pytest.raises(ValueError, match=r'prototype_energy_score: invalid temperature='):
        prototype_energy_score(logits, temperature)


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
