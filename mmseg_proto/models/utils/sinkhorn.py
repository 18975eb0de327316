"""Batched Sinkhorn-Knopp within-class clustering for ProtoSeg."""
import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


class _ClassRuns:
    """Pixels sorted by class: per-class reductions over runs of rows.

    With ``distributed=True`` every per-class reduction is completed over all
    processes (one all-reduce of a (C, K) tensor), so the clustering is the
    one a single process would compute on the global batch.
    """

    def __init__(self, labels: Tensor, num_classes: int,
                 distributed: bool) -> None:
        self.order = torch.argsort(labels)
        counts = torch.bincount(labels, minlength=num_classes)
        self.present = torch.nonzero(counts).squeeze(1)
        self.lengths = counts[self.present]
        self.num_classes = num_classes
        self.distributed = distributed
        # Pixels of each present class over all processes (B in the
        # reference), the column marginal's denominator.
        if distributed:
            counts = counts.clone()
            dist.all_reduce(counts)
        self.class_pixels = counts[self.present]

    def reduce(self, values: Tensor, op: str) -> Tensor:
        """(N, K) class-sorted rows -> (S, K) per present class; op sum/max."""
        if len(self.lengths):
            rows = torch.segment_reduce(values, op, lengths=self.lengths,
                                        axis=0)
        else:
            rows = values.new_zeros((0, values.shape[1]))
        if not self.distributed:
            return rows
        fill = 0.0 if op == 'sum' else float('-inf')
        dense = values.new_full((self.num_classes, values.shape[1]), fill)
        dense[self.present] = rows
        dist.all_reduce(dense, dist.ReduceOp.SUM if op == 'sum' else
                        dist.ReduceOp.MAX)
        return dense[self.present]

    def expand(self, rows: Tensor) -> Tensor:
        """(S, K) per-class rows -> (N, K), one row per sorted pixel."""
        return rows.repeat_interleave(self.lengths, dim=0)

    def logsumexp(self, values: Tensor) -> Tensor:
        """Per-class, per-column logsumexp over pixels: (S, K)."""
        seg_max = self.reduce(values, 'max')
        seg_max = torch.where(torch.isfinite(seg_max), seg_max,
                              torch.zeros_like(seg_max))
        sums = self.reduce(torch.exp(values - self.expand(seg_max)), 'sum')
        return torch.log(sums) + seg_max

    def extremes(self, values: Tensor) -> Tuple[float, float]:
        """Global max and min of ``values`` (over all processes)."""
        if values.numel():
            ext = torch.stack([values.max(), -values.min()])
        else:
            ext = values.new_full((2, ), float('-inf'))
        if self.distributed:
            dist.all_reduce(ext, dist.ReduceOp.MAX)
        return float(ext[0]), -float(ext[1])


def sinkhorn_knopp(similarities: Tensor,
                   labels: Tensor,
                   num_classes: int,
                   epsilon: float = 0.05,
                   num_iters: int = 3,
                   distributed: bool = False,
                   return_transport: bool = True
                   ) -> Tuple[Tensor, Optional[Tensor]]:
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
        distributed (bool): When a process group with several processes is
            initialised, solve over the pixels of all processes together
            (the per-class prototype marginals are all-reduced each
            iteration: 2 + num_iters small all-reduces), so the
            assignments equal a single process's on the global batch. Every
            process must call it, even with no pixel. Default: False.
        return_transport (bool): Also return the soft assignment (costs an
            (N, K) scatter back to the input order). Default: True.

    Returns:
        tuple[Tensor, Tensor]: ``assignments`` (N,) int64 hard assignment
        ``argmax_k L[k, i]`` in ``[0, K)``, and ``transport`` (N, K) the soft
        assignment ``L`` scaled so that each pixel's row sums to 1 (None
        with ``return_transport=False``).
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
    distributed = distributed and dist.is_available() and \
        dist.is_initialized() and dist.get_world_size() > 1
    dtype = torch.float64 if similarities.dtype == torch.float64 \
        else torch.float32
    if n == 0 and not distributed:
        return (labels.new_zeros(0, dtype=torch.long),
                similarities.new_zeros((0, k), dtype=dtype))
    labels = labels.long()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f'sinkhorn labels must be in [0, {num_classes}), got values in '
            f'[{int(labels.min())}, {int(labels.max())}]')
    with torch.autocast(similarities.device.type, enabled=False):
        # Sort pixels by class once: every per-class reduction becomes a
        # reduction over a contiguous run of rows (no scatter, no loop).
        runs = _ClassRuns(labels, num_classes, distributed)
        logits = similarities.detach()[runs.order].to(dtype) / epsilon
        pixels = runs.expand(runs.class_pixels.to(dtype)[:, None])
        # exp() of logits shifted by their max lies in (0, 1]; it is exact
        # unless the spread of the logits underflows the dtype (cosines with
        # epsilon >= 0.03 never do), else take the log-domain path.
        high, low = runs.extremes(logits)
        if high - low < (80.0 if dtype == torch.float32 else 700.0):
            q = _sinkhorn_exp(logits - high, runs, pixels, num_iters)
        else:
            q = _sinkhorn_log(logits, runs, pixels, num_iters)
        assign = torch.empty_like(labels)
        assign[runs.order] = q.argmax(dim=1)
        if not return_transport:
            return assign, None
        transport = torch.empty_like(q)
        transport[runs.order] = q * pixels
    return assign, transport


def _sinkhorn_exp(logits: Tensor, runs: _ClassRuns, pixels: Tensor,
                  num_iters: int) -> Tensor:
    """Sinkhorn iterations on class-sorted rows, in the exp domain."""
    k = logits.shape[1]
    q = torch.exp(logits)
    for _ in range(num_iters):
        # Rows: every prototype of class c gets mass 1 / K.
        q.div_(runs.expand(runs.reduce(q, 'sum')).mul_(k))
        # Columns: every pixel of class c gets mass 1 / N_c.
        q.div_(q.sum(dim=1, keepdim=True).mul_(pixels))
    return q


def _sinkhorn_log(logits: Tensor, runs: _ClassRuns, pixels: Tensor,
                  num_iters: int) -> Tensor:
    """The same iterations in the log domain (any logit spread)."""
    log_k, log_pixels = math.log(logits.shape[1]), torch.log(pixels)
    log_q = logits
    for _ in range(num_iters):
        log_q = log_q - runs.expand(runs.logsumexp(log_q)) - log_k
        log_q = log_q - torch.logsumexp(
            log_q, dim=1, keepdim=True) - log_pixels
    return torch.exp(log_q)
