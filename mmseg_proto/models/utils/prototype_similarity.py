"""How a pixel embedding is compared with a prototype: the measure, and the two orders in
which a prototype is addressed.

**The measure** (the head's ``distance`` option). The paper's Table 5(d) compares three distance measures (standard 45.7, huberized 45.2, cosine
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

**The two orders** of prototype (class c, prototype k) of C x K:

- The ``prototypes`` buffer is (C, K, D); flattened, prototype (c, k) is row
  ``buffer_index = c * K + k``. :class:`PrototypeStatistics`, the update and the
  visualisations use this order.
- The similarity matrix of the training step has column ``similarity_column = k * C + c``
  (prototype-major), so that the max over a class's K prototypes is an elementwise max of K
  contiguous (.., C) slabs; prototype targets of the PPC/PPD losses are such columns.
  :func:`prototype_matrix` gives the (K*C, D) matrix whose rows are in this order, and
  :func:`similarity_slabs` splits such a K*C dimension into its (K, C) slabs.

Every conversion between the two goes through the functions below.
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



def buffer_index(classes: Tensor, prototype: Tensor, num_prototypes: int) -> Tensor:
    """Row of prototype ``prototype`` of class ``classes`` in the flattened (C*K, D) buffer."""
    return classes * num_prototypes + prototype


def similarity_column(classes: Tensor, prototype: Tensor, num_classes: int) -> Tensor:
    """Column of prototype ``prototype`` of class ``classes`` in the (N, K*C) similarities."""
    return prototype * num_classes + classes


def prototype_matrix(prototypes: Tensor) -> Tensor:
    """The (C, K, D) buffer as a (K*C, D) matrix whose row ``k * C + c`` is prototype
    (c, k): ``emb @ prototype_matrix(p).T`` has :func:`similarity_column` columns."""
    c, k, d = prototypes.shape
    return prototypes.transpose(0, 1).reshape(k * c, d)


def similarity_slabs(sims: Tensor, num_classes: int, num_prototypes: int,
                     dim: int = -1) -> Tensor:
    """Split dimension ``dim`` of ``sims``, of size K*C in :func:`similarity_column`
    order, into (K, C): entry ``[.., k, c]`` is column ``k * C + c``, prototype (c, k).

    A view of a contiguous ``sims`` (in-place changes reach it), e.g. (N, K*C)
    similarities -> (N, K, C) slabs, or with ``dim=0`` the (K*C, D)
    :func:`prototype_matrix` -> (K, C, D).
    """
    return sims.unflatten(dim, (num_prototypes, num_classes))
