"""The two orders in which a prototype (class c, prototype k of C x K) is addressed.

- The ``prototypes`` buffer is (C, K, D); flattened, prototype (c, k) is row
  ``buffer_index = c * K + k``. :class:`PrototypeStatistics`, the update and the
  visualisations use this order.
- The similarity matrix of the training step has column ``similarity_column = k * C + c``
  (prototype-major), so that the max over a class's K prototypes is an elementwise max of K
  contiguous (.., C) slabs; prototype targets of the PPC/PPD losses are such columns.
  :func:`prototype_matrix` gives the (K*C, D) matrix whose rows are in this order, and
  :func:`similarity_slabs` splits such a K*C dimension into its (K, C) slabs.

Every conversion between the two goes through these functions.
"""
from torch import Tensor


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
