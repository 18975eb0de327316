"""Batched Sinkhorn-Knopp within-class clustering for ProtoSeg."""
import math
from typing import Tuple

import torch
from torch import Tensor


def _segment_logsumexp(values: Tensor, lengths: Tensor) -> Tensor:
    """``logsumexp`` over each run of consecutive rows, per column.

    Args:
        values (Tensor): (N, K) rows sorted by segment.
        lengths (Tensor): (S,) positive run lengths summing to N.

    Returns:
        Tensor: (S, K).
    """
    seg_max = torch.segment_reduce(values, 'max', lengths=lengths, axis=0)
    shifted = torch.exp(values - seg_max.repeat_interleave(lengths, dim=0))
    seg_sum = torch.segment_reduce(shifted, 'sum', lengths=lengths, axis=0)
    return torch.log(seg_sum) + seg_max


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
        # Sort pixels by class once: every per-class reduction becomes a
        # reduction over a contiguous run of rows (no scatter, no loop).
        order = torch.argsort(labels)
        lengths = torch.bincount(labels, minlength=num_classes)
        lengths = lengths[lengths > 0]
        logits = similarities.detach()[order].to(dtype) / epsilon
        pixels = lengths.to(dtype).repeat_interleave(lengths)[:, None]
        # exp() of logits shifted by their max lies in (0, 1]; it is exact
        # unless the spread of the logits underflows the dtype (cosines with
        # epsilon >= 0.03 never do), else take the log-domain path.
        limit = 80.0 if dtype == torch.float32 else 700.0
        if float(logits.max() - logits.min()) < limit:
            q = _sinkhorn_exp(logits, lengths, pixels, num_iters)
        else:
            q = _sinkhorn_log(logits, lengths, pixels, num_iters)
        transport = torch.empty_like(q)
        transport[order] = q * pixels
    return transport.argmax(dim=1), transport


def _sinkhorn_exp(logits: Tensor, lengths: Tensor, pixels: Tensor,
                  num_iters: int) -> Tensor:
    """Sinkhorn iterations on class-sorted rows, in the exp domain."""
    k = logits.shape[1]
    q = torch.exp(logits - logits.max())
    for _ in range(num_iters):
        # Rows: every prototype of class c gets mass 1 / K.
        rows = torch.segment_reduce(q, 'sum', lengths=lengths, axis=0)
        q.div_(rows.repeat_interleave(lengths, dim=0).mul_(k))
        # Columns: every pixel of class c gets mass 1 / N_c.
        q.div_(q.sum(dim=1, keepdim=True).mul_(pixels))
    return q


def _sinkhorn_log(logits: Tensor, lengths: Tensor, pixels: Tensor,
                  num_iters: int) -> Tensor:
    """The same iterations in the log domain (any logit spread)."""
    log_k, log_pixels = math.log(logits.shape[1]), torch.log(pixels)
    log_q = logits
    for _ in range(num_iters):
        log_q = log_q - _segment_logsumexp(log_q, lengths).repeat_interleave(
            lengths, dim=0) - log_k
        log_q = log_q - torch.logsumexp(
            log_q, dim=1, keepdim=True) - log_pixels
    return torch.exp(log_q)
