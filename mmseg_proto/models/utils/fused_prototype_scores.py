"""Class scores, PPC and PPD from one pass over the prototype similarities."""
from typing import Optional, Tuple

import torch
from torch import Tensor


class FusedPrototypeScores(torch.autograd.Function):
    """Exact fused form of ``max over K``, PPC and PPD.

    ProtoSeg's training step reads the (N, C*K) pixel-prototype similarity
    matrix three times (class scores = max over each class's K similarities,
    the pixel-prototype contrast cross-entropy, the pixel-prototype distance)
    and autograd writes three (N, C*K) gradients and sums them (zero-filled
    buffers for the max and the gather, the softmax gradient, two additions).
    This function computes the same three outputs in one forward and builds
    their summed gradient in one (N, C*K) buffer: ``softmax * g_ppc``, then
    the target's and the max winners' gradients are scattered into it. The results equal
    the unfused computation up to float rounding (tested).

    Forward inputs: ``sims`` (N, K*C) with columns ordered ``k * C + c``,
    ``targets`` (N,) int64 column of the assigned prototype or -1 to ignore, ``num_classes``, ``num_prototypes``, ``inv_temperature``
    (1 / PPC temperature). Outputs: ``class_scores`` (N, C), and the
    per-pixel PPC and PPD terms (N,) in fp32, zero for ignored pixels.
    """

    @staticmethod
    def forward(ctx, sims: Tensor, targets: Tensor, num_classes: int,
                num_prototypes: int,
                inv_temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
        n = sims.shape[0]
        # Columns are prototype-major (k * C + c): max over dim 1 of (N,K,C).
        # With the winners' indices the backward is one small scatter
        # (re-finding them by equality costs several (N, K*C) passes).
        class_scores, winner = sims.view(n, num_prototypes,
                                         num_classes).max(dim=1)
        valid = targets >= 0
        index = targets.clamp(min=0)[:, None]
        target_sim = sims.gather(1, index).squeeze(1).float()
        scaled = sims if inv_temperature == 1.0 else sims * inv_temperature
        lse = torch.logsumexp(scaled.float(), dim=1)
        ppc = (lse - target_sim * inv_temperature) * valid
        ppd = (1.0 - target_sim)**2 * valid
        ctx.save_for_backward(sims, index, valid, winner, lse, target_sim)
        ctx.shape = (num_classes, num_prototypes)
        ctx.mark_non_differentiable(winner)
        ctx.inv_temperature = inv_temperature
        return class_scores, ppc, ppd

    @staticmethod
    def backward(ctx, g_scores: Optional[Tensor], g_ppc: Optional[Tensor],
                 g_ppd: Optional[Tensor]):
        sims, index, valid, winner, lse, target_sim = ctx.saved_tensors
        c, k = ctx.shape
        inv_t = ctx.inv_temperature
        n = sims.shape[0]
        g_ppc = torch.zeros_like(lse) if g_ppc is None else g_ppc.float()
        g_ppd = torch.zeros_like(lse) if g_ppd is None else g_ppd.float()
        w_ppc = g_ppc * valid * inv_t
        # d PPC / d s = (softmax(s / T) - onehot(target)) / T, one buffer.
        grad = sims.float()
        if inv_t != 1.0:
            grad = grad * inv_t
        # A new buffer unless float()/scaling already made one.
        grad = grad - lse[:, None] if grad is sims else grad.sub_(
            lse[:, None])
        grad.exp_().mul_(w_ppc[:, None])
        # d PPD / d s_target = -2 (1 - s_target).
        at_target = -w_ppc - 2.0 * g_ppd * (1.0 - target_sim) * valid
        grad.scatter_add_(1, index, at_target[:, None])
        if g_scores is not None:  # max over K: the winners get the grads
            grad.view(n, k, c).scatter_add_(1, winner[:, None],
                                            g_scores.float()[:, None])
        return grad.to(sims.dtype), None, None, None, None
