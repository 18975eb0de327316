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
