"""Threshold-free scores of a per-pixel anomaly detector: AUROC, AUPR, FPR at 95% TPR."""
from typing import Dict

import numpy as np


def _check_tpr_level(tpr_level: float) -> float:
    """``tpr_level`` if it is a fraction in (0, 1]; 95 (a percentage) would read the FPR at
    the first threshold, 0 with any score."""
    ok = isinstance(tpr_level, (int, float, np.integer, np.floating)) \
        and not isinstance(tpr_level, bool)
    if not (ok and 0 < tpr_level <= 1):  # NaN and inf fail the comparison
        raise ValueError(f'anomaly_metrics: invalid tpr_level={tpr_level!r} (must be a '
                         'fraction in (0, 1], e.g. 0.95 for 95% TPR, not a percentage)')
    return float(tpr_level)


def _check_is_anomaly(is_anomaly: np.ndarray, shape: tuple) -> np.ndarray:
    """``is_anomaly`` as a bool array if it is one (or holds integers 0 and 1 only) of
    exactly ``shape``; a label map, probabilities or transposed labels are refused."""
    labels = np.asarray(is_anomaly)
    if labels.shape != shape:
        raise ValueError(f'anomaly_metrics: is_anomaly has shape {labels.shape}, the scores '
                         f'{shape}: pass one flag per score, in the same layout')
    if labels.dtype == bool:
        return labels
    if labels.dtype.kind in 'ui':
        extra = np.setdiff1d(np.unique(labels), [0, 1])
        if extra.size == 0:
            return labels.astype(bool)
        raise ValueError(f'anomaly_metrics: is_anomaly holds values other than 0 and 1 '
                         f'({extra[:5].tolist()}): it looks like a label map; pass a boolean '
                         'mask, e.g. labels == anomaly_class')
    raise ValueError(f'anomaly_metrics: is_anomaly must be boolean (or integers 0/1), got '
                     f'{labels.dtype}: threshold probabilities or compare labels yourself, '
                     'e.g. labels == anomaly_class')


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
        is_anomaly (np.ndarray): Bool (or integers 0 and 1), the scores' shape exactly: True
            for anomalous pixels.
        tpr_level (float): TPR at which the FPR is read, a fraction in (0, 1].
            Default: 0.95.

    Returns:
        dict: ``auroc``, ``aupr``, ``fpr95`` (fractions in [0, 1]), ``positives``,
        ``negatives`` (counts).
    """
    tpr_level = _check_tpr_level(tpr_level)
    scores = np.asarray(scores, dtype=np.float64)
    positive = _check_is_anomaly(is_anomaly, scores.shape).ravel()
    scores = scores.ravel()
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
