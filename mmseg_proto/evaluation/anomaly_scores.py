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
from typing import Callable, Dict, Optional

import torch
from torch import Tensor


def max_softmax_score(logits: Tensor) -> Tensor:
    """``1 - max_c softmax(logits)_c`` (Hendrycks & Gimpel, 2017)."""
    return 1.0 - logits.float().softmax(dim=0).amax(dim=0)


def max_logit_score(logits: Tensor) -> Tensor:
    """``-max_c logit_c`` (Hendrycks et al., 2022)."""
    return -logits.float().amax(dim=0)


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy ``-T logsumexp_c(logit_c / T)`` (Liu et al., 2020)."""
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
        temperature (float): T > 0. Default: 0.1, the paper's PPC temperature.
    """
    return -temperature * torch.logsumexp(cosines.float() / temperature, dim=0)


class ClassValueStatistics:
    """Running mean and standard deviation, per class, of a per-class value at the correctly
    classified pixels of that class (e.g. the logit of the true class, or its cosine to the
    nearest prototype of the true class).

    Args:
        num_classes (int): C.
    """

    def __init__(self, num_classes: int) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f'ClassValueStatistics: num_classes={num_classes!r} must be a '
                             'positive int')
        self.num_classes = num_classes
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.total = torch.zeros(num_classes, dtype=torch.float64)
        self.total_sq = torch.zeros(num_classes, dtype=torch.float64)

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
        own = own.gather(0, cls[None]).squeeze(0)
        self.count += torch.bincount(cls, minlength=self.num_classes).double().cpu()
        self.total += torch.zeros_like(self.total).index_add_(0, cls.cpu(), own.cpu())
        self.total_sq += torch.zeros_like(self.total).index_add_(0, cls.cpu(), own.cpu() ** 2)

    def mean_std(self, min_std: float = 1e-6) -> Dict[str, Tensor]:
        """Per-class ``mean`` and ``std`` (float32). A class with no pixel gets the mean and
        standard deviation of all pixels pooled (so its score stays defined)."""
        if self.count.sum() == 0:
            raise ValueError('ClassValueStatistics: no correctly classified pixel was added')
        pooled_mean = self.total.sum() / self.count.sum()
        pooled_var = self.total_sq.sum() / self.count.sum() - pooled_mean ** 2
        seen = self.count > 0
        mean = torch.where(seen, self.total / self.count.clamp(min=1), pooled_mean)
        var = torch.where(seen, self.total_sq / self.count.clamp(min=1) - mean ** 2, pooled_var)
        std = var.clamp(min=0).sqrt().clamp(min=min_std)
        return dict(mean=mean.float(), std=std.float())


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
