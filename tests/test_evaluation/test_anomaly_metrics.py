"""anomaly_metrics against scikit-learn (AUROC, average precision, ROC curve), with ties."""
import numpy as np
import pytest

from mmseg_proto.evaluation import anomaly_metrics


@pytest.mark.parametrize('seed,levels', [(0, None), (1, 7)])  # 7 levels: many ties
def test_matches_scikit_learn(seed, levels):
    metrics = pytest.importorskip('sklearn.metrics')
    rng = np.random.default_rng(seed)
    labels = rng.random(5000) < 0.1
    scores = rng.normal(size=5000) + 1.5 * labels
    if levels:
        scores = np.round(scores * levels / 4) / levels
    got = anomaly_metrics(scores, labels)
    assert got['auroc'] == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert got['aupr'] == pytest.approx(metrics.average_precision_score(labels, scores),
                                        abs=1e-12)
    fpr, tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
    assert got['fpr95'] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
    assert (got['positives'], got['negatives']) == (labels.sum(), (~labels).sum())


def test_perfect_and_inverted_detectors():
    labels = np.array([0, 0, 0, 1, 1], bool)
    perfect = anomaly_metrics(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), labels)
    assert (perfect['auroc'], perfect['aupr'], perfect['fpr95']) == (1.0, 1.0, 0.0)
    inverted = anomaly_metrics(np.array([0.9, 0.8, 0.7, 0.2, 0.1]), labels)
    assert inverted['auroc'] == 0.0 and inverted['fpr95'] == 1.0


def test_clear_errors():
    with pytest.raises(ValueError, match='needs both anomalous and normal'):
        anomaly_metrics(np.zeros(3), np.zeros(3, bool))
    with pytest.raises(ValueError, match='non-finite'):
        anomaly_metrics(np.array([0.0, np.nan]), np.array([True, False]))


@pytest.fixture
def near_random():
    rng = np.random.default_rng(3)
    labels = rng.random(2000) < 0.2
    return rng.normal(size=2000) + 0.05 * labels, labels


@pytest.mark.parametrize('tpr_level', [95, 95.0, 0, -0.5, 1.5, float('nan'), float('inf'),
                                       True, '0.95', None])
def test_a_tpr_level_that_is_not_a_fraction_is_refused(near_random, tpr_level):
    """Issue 28: tpr_level=95 (a percentage) returned fpr95 = 0.0 on a near-random score."""
    scores, labels = near_random
    with pytest.raises(ValueError, match=r'invalid tpr_level=.*fraction in \(0, 1\], e\.g\. '
                                         r'0\.95'):
        anomaly_metrics(scores, labels, tpr_level=tpr_level)


def test_tpr_levels_in_range_read_the_roc_curve(near_random):
    scores, labels = near_random
    # Independent: the smallest FPR among the thresholds whose TPR reaches the level.
    order = np.argsort(-scores)
    tp = np.cumsum(labels[order]) / labels.sum()
    fp = np.cumsum(~labels[order]) / (~labels).sum()
    for level in (0.5, 0.95, 1, np.float32(0.8)):
        assert anomaly_metrics(scores, labels, tpr_level=level)['fpr95'] == pytest.approx(
            fp[np.argmax(tp >= level)])
    assert anomaly_metrics(scores, labels, tpr_level=1)['fpr95'] > 0.9


def test_is_anomaly_must_be_a_mask_of_the_scores_shape():
    """Issue 28: label maps, float probabilities or transposed labels were cast or raveled
    silently."""
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(3, 4))
    mask = np.zeros((3, 4), bool)
    mask[0, :2] = True
    expected = anomaly_metrics(scores, mask)
    # 0/1 integers are a mask too.
    assert anomaly_metrics(scores, mask.astype(np.uint8)) == expected
    assert anomaly_metrics(scores, mask.astype(np.int64).tolist()) == expected
    with pytest.raises(ValueError, match=r'is_anomaly holds values other than 0 and 1 '
                                         r'\(\[8, 255\]\).*labels == anomaly_class'):
        anomaly_metrics(scores, np.where(mask, 8, 255).astype(np.uint8))  # a label map
    with pytest.raises(ValueError, match=r'is_anomaly must be boolean .*got float64'):
        anomaly_metrics(scores, mask * 0.9)  # probabilities
    with pytest.raises(ValueError, match=r'is_anomaly has shape \(4, 3\), the scores '
                                         r'\(3, 4\)'):
        anomaly_metrics(scores, mask.T.copy())  # transposed
    with pytest.raises(ValueError, match=r'is_anomaly has shape \(12,\)'):
        anomaly_metrics(scores, mask.ravel())
