"""Pixel-prototype similarity from the cosine, for the head's ``distance`` option.

The paper's Table 5(d) compares three distance measures (standard 45.7, huberized 45.2, cosine
46.4 mIoU on ADE20K) without defining the first two, and the authors' released code has only
the cosine; the definitions below are ours. Embeddings and prototypes stay unit vectors for all
three (the prototype update, Sinkhorn's bounded inputs and the anomaly score keep their
meaning), so the Euclidean distance is ``d = ||x - p|| = sqrt(2 - 2 cos)`` and every measure is
a similarity ``s = 1 - f(d)`` decreasing in ``d``, used everywhere a similarity is used (class
scores, Sinkhorn clustering, PPC logits, PPD = ``(1 - s)^2 = f(d)^2``):

- ``'cosine'``: ``f(d) = d^2 / 2``, i.e. ``s = cos`` (the paper's choice; the default);
- ``'standard'``: ``f(d) = d``, the plain Euclidean distance;
- ``'huberized'``: the Huber function of ``d``, ``f(d) = d^2 / (2 delta)`` for ``d <= delta``,
  ``d - delta / 2`` beyond (quadratic near the prototype, linear far from it).

On unit vectors all three are monotone in the cosine, so the nearest prototype, and hence the
prediction rule, is the same; what changes is the geometry the losses and the clustering see.
"""
import torch
from torch import Tensor

DISTANCES = ('cosine', 'standard', 'huberized')
# Smallest squared distance under the square root: keeps d(s)/d(cos) finite at d = 0.
_MIN_SQUARED_DISTANCE = 1e-6


def similarity_from_cosine(cos: Tensor, distance: str, huber_delta: float = 1.0) -> Tensor:
    """``1 - f(d)`` of unit vectors with cosine ``cos`` (see the module doc); differentiable."""
    if distance == 'cosine':
        return cos
    d = torch.sqrt((2.0 - 2.0 * cos).clamp(min=_MIN_SQUARED_DISTANCE))
    if distance == 'standard':
        return 1.0 - d
    if distance == 'huberized':
        return 1.0 - torch.where(d <= huber_delta, d * d / (2.0 * huber_delta),
                                 d - huber_delta / 2.0)
    raise ValueError(f'unknown distance {distance!r}; one of {DISTANCES}')
