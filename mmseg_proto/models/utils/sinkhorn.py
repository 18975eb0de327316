"""Batched Sinkhorn-Knopp within-class clustering for ProtoSeg."""
import math
from typing import Tuple

import torch
from torch import Tensor


def _segment_logsumexp(values: Tensor, segments: Tensor,
                       num_segments: int) -> Tensor:
    """``logsumexp`` over rows of ``values`` that share a segment id.

    Args:
        values (Tensor): (N, K) values.
        segments (Tensor): (N,) int64 segment id of each row.
        num_segments (int): Number of segments S.

    Returns:
        Tensor: (S, K); ``-inf`` for segments with no rows.
    """
    k = values.shape[1]
    index = segments[:, None].expand(-1, k)
    seg_max = values.new_full((num_segments, k), float('-inf'))
    seg_max = seg_max.scatter_reduce(0, index, values, 'amax',
                                     include_self=True)
    # Empty segments keep -inf; use 0 as their shift so no NaN appears.
    shift = torch.where(torch.isfinite(seg_max), seg_max,
                        torch.zeros_like(seg_max))
    seg_sum = values.new_zeros((num_segments, k)).index_add_(
        0, segments, torch.exp(values - shift[segments]))
    return torch.log(seg_sum) + shift


def sinkhorn_knopp(similarities: Tensor,
                   labels: Tensor,
                   num_classes: int,
                   epsilon: float = 0.05,
                   num_iters: int = 3) -> Tuple[Tensor, Tensor]:
    """Balanced within-class assignment of pixels to their class prototypes.

    Solves, for every class ``c`` at once, the entropic optimal-transport
    problem of ProtoSeg (Eq. 9-10): pixels of class ``c`` are assigned to the
    ``K`` prototypes of ``c`` so that every pixel is fully assigned and every
    prototype receives ``N_c / K`` pixels, maximising the total similarity.
    The solution ``L = diag(u) exp(S / epsilon) diag(v)`` is found by
    ``num_iters`` rounds of alternating prototype (row) and pixel (column)
    normalisation, as in the reference code, but in the log domain, in fp32
    and for all classes in one batched computation (no loop over classes), so
    it neither overflows under AMP nor costs one kernel launch per class.

    Args:
        similarities (Tensor): (N, K) cosine similarity of each pixel to the
            K prototypes of its own class. Any float dtype; computed in fp32
            (fp64 inputs stay fp64).
        labels (Tensor): (N,) class index of each pixel, in
            ``[0, num_classes)``.
        num_classes (int): Number of classes C.
        epsilon (float): Entropy weight (kappa). Default: 0.05.
        num_iters (int): Sinkhorn iterations. Default: 3.

    Returns:
        tuple[Tensor, Tensor]: ``assignments`` (N,) int64 hard assignment
        ``argmax_k L[k, i]`` in ``[0, K)``, and ``transport`` (N, K) the soft
        assignment ``L`` scaled so that each pixel's row sums to 1.
    """
    if epsilon <= 0:
        raise ValueError(f'sinkhorn epsilon must be > 0, got {epsilon}')
    if num_iters < 1:
        raise ValueError(f'sinkhorn num_iters must be >= 1, got {num_iters}')
    if similarities.dim() != 2 or labels.shape != similarities.shape[:1]:
        raise ValueError('expected similarities (N, K) and labels (N,), got '
                         f'{tuple(similarities.shape)} and '
                         f'{tuple(labels.shape)}')
    n, k = similarities.shape
    dtype = torch.float64 if similarities.dtype == torch.float64 \
        else torch.float32
    if n == 0:
        return (labels.new_zeros(0, dtype=torch.long),
                similarities.new_zeros((0, k), dtype=dtype))
    labels = labels.long()
    with torch.autocast(similarities.device.type, enabled=False):
        log_q = similarities.detach().to(dtype) / epsilon
        # Pixels per class (B in the reference), for the column marginal.
        counts = torch.bincount(labels, minlength=num_classes).to(dtype)
        log_pixels = torch.log(counts.clamp(min=1))[labels, None]
        log_k = math.log(k)
        for _ in range(num_iters):
            # Rows: every prototype of class c gets mass 1 / K.
            log_q = log_q - _segment_logsumexp(log_q, labels,
                                               num_classes)[labels] - log_k
            # Columns: every pixel of class c gets mass 1 / N_c.
            log_q = log_q - torch.logsumexp(log_q, dim=1,
                                            keepdim=True) - log_pixels
        transport = torch.exp(log_q + log_pixels)
    return transport.argmax(dim=1), transport
