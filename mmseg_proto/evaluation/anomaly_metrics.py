"""Threshold-free scores of a per-pixel anomaly detector: AUROC, AUPR, FPR at 95% TPR."""
from typing import Dict

import numpy as np


def anomaly_metrics(scores: np.ndarray, is_anomaly: np.ndarray,
                    tpr_level: float = 0.95) -> Dict[str, float]:
    """AUROC, AUPR and FPR at ``tpr_level`` TPR of ``scores`` (higher = more anomalous).

    Ties are handled as one threshold (as scikit-learn's ``roc_auc_score`` and
    ``average_precision_score`` do): AUROC is the trapezoidal area under the ROC curve, AUPR
    the average precision ``sum_n (R_n - R_{n-1}) P_n`` with anomalies as the positive class,
    and FPR95 the false-positive rate at the highest threshold whose true-positive rate
    reaches ``tpr_level``.

    Args:
        scores (np.ndarray): Anomaly scores, any shape.
        is_anomaly (np.ndarray): Bool, same shape: True for anomalous pixels.
        tpr_level (float): TPR at which the FPR is read. Default: 0.95.

    Returns:
        dict: ``auroc``, ``aupr``, ``fpr95`` (fractions in [0, 1]), ``positives``,
        ``negatives`` (counts).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(is_anomaly, dtype=bool).ravel()
    if scores.shape != positive.shape:
        raise ValueError(f'anomaly_metrics: {scores.size} scores for {positive.size} labels')
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError('anomaly_metrics: needs both anomalous and normal pixels, got '
                         f'{n_pos} anomalous and {n_neg} normal')
    if not np.isfinite(scores).all():
        raise ValueError('anomaly_metrics: non-finite scores')
    order = np.argsort(-scores, kind='stable')
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tp = np.cumsum(positive)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    tpr, fpr = np.r_[0.0, tp / n_pos], np.r_[0.0, fp / n_neg]
    precision = tp / (tp + fp)
    return dict(
        auroc=float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2),
        aupr=float(np.sum(np.diff(tpr) * precision)),
        fpr95=float(fpr[np.argmax(tpr >= tpr_level)]),
        positives=n_pos, negatives=n_neg)
