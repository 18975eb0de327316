"""Per-pixel anomaly scores from what a segmentation model outputs (higher = more anomalous).

Every function takes class-first tensors, ``(C, ...)`` (one image's logits ``(C, H, W)``, or
``(C, N)`` pixels), and returns the score with the class axis removed. The parametric scores
need only logits; the prototype scores need ProtoSeg's cosines, either per class (the max over
each class's K prototypes, ``(C, ...)``) or of every prototype (``(C * K, ...)``).

Scores that use statistics of the training set (``class_normalised_*``) take a
:class:`ClassValueStatistics`, gathered in one pass over labelled training pixels: for each
class, the mean and standard deviation of the class's own value (its logit, or its cosine to
its nearest prototype) at the pixels of that class that the model classifies correctly.

``benchmarks/camvid_anomaly.py`` compares all of them on CamVid with classes held out of
training (``docs/anomaly_maps.md``).
"""
import math
import warnings
from typing import Callable, Dict, Optional

import torch
from torch import Tensor


def _check_temperature(owner: str, temperature: float) -> float:
    """``temperature`` if it is a finite number > 0, else a ValueError naming ``owner``: T = 0
    divides by zero (NaN scores) and T < 0 turns the score around (inliers score high)."""
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    try:
        ok = ok and math.isfinite(temperature) and temperature > 0
    except OverflowError:
        ok = False
    if not ok:
        raise ValueError(f'{owner}: invalid temperature={temperature!r} (must be a finite '
                         'number > 0; 0 gives NaN scores and a negative T inverts the score)')
    return float(temperature)


def max_softmax_score(logits: Tensor) -> Tensor:
    """``1 - max_c softmax(logits)_c`` (Hendrycks & Gimpel, 2017)."""
    return 1.0 - logits.float().softmax(dim=0).amax(dim=0)


def max_logit_score(logits: Tensor) -> Tensor:
    """``-max_c logit_c`` (Hendrycks et al., 2022)."""
    return -logits.float().amax(dim=0)


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy ``-T logsumexp_c(logit_c / T)`` (Liu et al., 2020).

    Args:
        logits (Tensor): ``(C, ...)`` logits.
        temperature (float): T, a finite number > 0. Default: 1.0.
    """
    temperature = _check_temperature('energy_score', temperature)
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=0)


def prototype_score(class_cosines: Tensor) -> Tensor:
    """``1 - max cosine`` to any prototype of any class: ``ProtoEncoderDecoder``'s map."""
    return 1.0 - class_cosines.float().amax(dim=0)


def prototype_energy_score(cosines: Tensor, temperature: float = 0.1) -> Tensor:
    """Energy over every prototype's cosine: ``-T logsumexp_{c,k}(cos_{c,k} / T)``.

    A soft version of :func:`prototype_score` (``T -> 0`` gives ``-max cos``): a pixel close to
    several prototypes scores lower than one close to a single prototype.

    Args:
        cosines (Tensor): ``(C * K, ...)`` cosines to every prototype.
        temperature (float): T, a finite number > 0. Default: 0.1, the paper's PPC
            temperature.
    """
    temperature = _check_temperature('prototype_energy_score', temperature)
    return -temperature * torch.logsumexp(cosines.float() / temperature, dim=0)


class ClassValueStatistics:
    """Running mean and standard deviation, per class, of a per-class value at the correctly
    classified pixels of that class (e.g. the logit of the true class, or its cosine to the
    nearest prototype of the true class).

    The running figures are merged batch by batch (Chan et al.'s parallel variance), so equal
    values give a variance of exactly 0. Non-finite values (a NaN or inf logit) are skipped
    and counted in :attr:`nonfinite`; :meth:`mean_std` warns about them. A class with fewer
    than ``min_count`` pixels gets no statistics of its own (see :meth:`mean_std`).

    Args:
        num_classes (int): C.
    """

    def __init__(self, num_classes: int) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f'ClassValueStatistics: num_classes={num_classes!r} must be a '
                             'positive int')
        self.num_classes = num_classes
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.mean = torch.zeros(num_classes, dtype=torch.float64)
        # Sum of squared differences from the class mean.
        self.m2 = torch.zeros(num_classes, dtype=torch.float64)
        #: Non-finite values skipped, per class.
        self.nonfinite = torch.zeros(num_classes, dtype=torch.float64)

    @torch.no_grad()
    def update(self, values: Tensor, predicted: Tensor, labels: Tensor) -> None:
        """Add the pixels whose label is a class and whose prediction equals it.

        Args:
            values (Tensor): ``(C, ...)`` per-class values.
            predicted (Tensor): ``(...)`` predicted class of each pixel.
            labels (Tensor): ``(...)`` true class of each pixel; values outside ``[0, C)``
                (the ignore index, held-out classes mapped to it) are skipped.
        """
        if values.shape[0] != self.num_classes or values.shape[1:] != labels.shape \
                or predicted.shape != labels.shape:
            raise ValueError(
                f'ClassValueStatistics.update: values {tuple(values.shape)} must be '
                f'({self.num_classes}, *labels.shape) and predicted {tuple(predicted.shape)} '
                f'the shape of labels {tuple(labels.shape)}')
        labels = labels.reshape(-1).long()
        keep = (labels >= 0) & (labels < self.num_classes) & (predicted.reshape(-1) == labels)
        cls = labels[keep]
        own = values.reshape(self.num_classes, -1)[:, keep].double()
        own = own.gather(0, cls[None]).squeeze(0).cpu()
        cls = cls.cpu()
        finite = torch.isfinite(own)
        self.nonfinite += torch.bincount(cls[~finite], minlength=self.num_classes).double()
        self._merge(cls[finite], own[finite])

    def _merge(self, cls: Tensor, own: Tensor) -> None:
        """Merge one batch's per-class count, mean and squared deviations into the totals."""
        count = torch.bincount(cls, minlength=self.num_classes).double()
        mean = torch.zeros_like(self.mean).index_add_(0, cls, own) / count.clamp(min=1)
        m2 = torch.zeros_like(self.m2).index_add_(0, cls, (own - mean[cls]) ** 2)
        total = self.count + count
        delta = mean - self.mean
        share = count / total.clamp(min=1)
        self.mean += delta * share
        self.m2 += m2 + delta ** 2 * self.count * share
        self.count = total

    def mean_std(self, min_std: float = 1e-3, min_count: int = 30) -> Dict[str, Tensor]:
        """Per-class ``mean`` and ``std`` (float32), with ``count`` (pixels added) and
        ``own`` (bool: the class has statistics of its own).

        A class with at least ``min_count`` pixels gets its own mean and standard deviation.
        A class with fewer (none: a class held out of training; a few: a standard deviation
        from a handful of pixels means nothing, and one pixel has none) gets the mean and
        standard deviation of every pixel added, all classes pooled, so its score stays
        defined and on a wide scale; ``own`` is False for it, and a warning names the classes
        with some but too few pixels. Every standard deviation is at least ``min_std``.

        Args:
            min_std (float): Floor of the standard deviations, in the values' units (a class
                whose values are all equal gets it). Default: 1e-3, a thousandth of a cosine's
                half range.
            min_count (int): Fewest pixels a class needs for its own statistics. Default: 30.

        Returns:
            dict: ``mean``, ``std`` (float32), ``count`` (float64) and ``own`` (bool), each
            ``(C,)``.
        """
        if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
            raise ValueError(f'ClassValueStatistics.mean_std: min_count={min_count!r} must be '
                             'an integer >= 1')
        if not isinstance(min_std, (int, float)) or isinstance(min_std, bool) \
                or not math.isfinite(min_std) or min_std <= 0:
            raise ValueError(f'ClassValueStatistics.mean_std: min_std={min_std!r} must be a '
                             'finite number > 0')
        self._warn_nonfinite()
        total = self.count.sum()
        if total < min_count:
            raise ValueError(
                f'ClassValueStatistics: {int(total)} correctly classified pixel(s) with a '
                f'finite value were added, fewer than min_count={min_count}: add more '
                'pixels (more images), or lower min_count')
        pooled_mean = (self.count * self.mean).sum() / total
        pooled_var = (self.m2 + self.count * (self.mean - pooled_mean) ** 2).sum() / total
        own = self.count >= min_count
        few = ((self.count > 0) & ~own).nonzero().flatten().tolist()
        if few:
            warnings.warn(
                f'ClassValueStatistics: classes {few} have fewer than min_count={min_count} '
                f'pixels ({[int(self.count[c]) for c in few]}): they get the pooled mean and '
                'standard deviation of all classes, not their own', UserWarning, stacklevel=2)
        mean = torch.where(own, self.mean, pooled_mean)
        var = torch.where(own, self.m2 / self.count.clamp(min=1), pooled_var)
        std = var.clamp(min=0).sqrt().clamp(min=min_std)
        return dict(mean=mean.float(), std=std.float(), count=self.count.clone(), own=own)

    def _warn_nonfinite(self) -> None:
        """Warn about the non-finite values :meth:`update` skipped."""
        bad = self.nonfinite.nonzero().flatten().tolist()
        if bad:
            warnings.warn(
                f'ClassValueStatistics: skipped {int(self.nonfinite.sum())} non-finite '
                f'value(s) (NaN or inf) of correctly classified pixels, classes {bad} '
                f'({[int(self.nonfinite[c]) for c in bad]} each); the statistics use the '
                'finite ones. Non-finite logits or cosines mean the model is broken '
                '(check its checkpoint)', UserWarning, stacklevel=3)


def class_normalised_score(values: Tensor, statistics: Dict[str, Tensor],
                           predicted: Optional[Tensor] = None) -> Tensor:
    """How far below its class's typical value a pixel's predicted-class value lies:
    ``(mean_c - value_c) / std_c`` for the predicted class ``c``.

    With ``values`` the logits this is a class-conditional max logit; with ProtoSeg's class
    cosines, the cosine to the nearest prototype of the predicted class measured against how
    close that class's training pixels come to their prototypes.

    Args:
        values (Tensor): ``(C, ...)`` per-class values (logits or class cosines).
        statistics (dict): ``mean`` and ``std``, each ``(C,)``, of
            :meth:`ClassValueStatistics.mean_std`.
        predicted (Tensor, optional): ``(...)`` predicted class; default ``values.argmax(0)``.
    """
    values = values.float()
    if predicted is None:
        predicted = values.argmax(dim=0)
    mean = statistics['mean'].to(values.device)[predicted]
    std = statistics['std'].to(values.device)[predicted]
    own = values.gather(0, predicted[None].long()).squeeze(0)
    return (mean - own) / std


# name -> (inputs it needs, function of them); 'logits', 'class_cosines', 'cosines' are
# tensors, 'logit_statistics' / 'cosine_statistics' mean/std dicts.
ScoreFn = Callable[[Dict[str, object]], Tensor]
SCORES: Dict[str, ScoreFn] = {
    'max softmax': lambda x: max_softmax_score(x['logits']),
    'max logit': lambda x: max_logit_score(x['logits']),
    'energy': lambda x: energy_score(x['logits']),
    'class-normalised logit': lambda x: class_normalised_score(
        x['logits'], x['logit_statistics']),
    'prototype': lambda x: prototype_score(x['class_cosines']),
    'prototype energy': lambda x: prototype_energy_score(x['cosines']),
    'class-normalised prototype': lambda x: class_normalised_score(
        x['class_cosines'], x['cosine_statistics'], x['logits'].argmax(dim=0)),
    'class-normalised prototype + logit': lambda x: 0.5 * (
        class_normalised_score(x['class_cosines'], x['cosine_statistics'],
                               x['logits'].argmax(dim=0))
        + class_normalised_score(x['logits'], x['logit_statistics'])),
}
PARAMETRIC_SCORES = ('max softmax', 'max logit', 'energy', 'class-normalised logit')
PROTOTYPE_SCORES = tuple(SCORES)
