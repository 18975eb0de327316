"""Class scores and PPC log-sum-exp without holding the similarity matrix."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .prototype_index import similarity_slabs


class ChunkedPrototypeScores(torch.autograd.Function):
    """Streamed form of ProtoSeg's similarity matrix for large C x K.

    For ``chunk`` pixels at a time it forms the (chunk, K*C) similarities
    ``emb @ protos.T`` and keeps only what the losses need: the class
    scores (max over each class's K similarities), the PPC log-sum-exp over
    all K*C prototypes, and the K similarities to the pixel's own class (for
    Sinkhorn). The backward recomputes each chunk's similarities (one more
    matmul) instead of storing them, so memory holds one (chunk, K*C) block
    at a time: for ADE20K-full (847 x 10) that is the difference between
    tens of GB and a few hundred MB per batch. The PPC/PPD target
    similarity is an ordinary differentiable dot product computed by the
    caller from the prototype rows.

    Forward inputs: ``emb`` (N, D), ``protos`` (K*C, D) rows ordered
    ``k * C + c`` (not differentiated: prototypes are a buffer), ``labels``
    (N,) class per pixel clamped to [0, C), ``num_classes``,
    ``num_prototypes``, ``inv_temperature``, ``chunk``. Outputs:
    ``class_scores`` (N, C), ``lse`` (N,) fp32, ``own`` (N, K) detached.
    """

    @staticmethod
    def forward(ctx, emb: Tensor, protos: Tensor, labels: Tensor,
                num_classes: int, num_prototypes: int, inv_temperature: float,
                chunk: int) -> Tuple[Tensor, Tensor, Tensor]:
        n, (c, k) = emb.shape[0], (num_classes, num_prototypes)
        scores = emb.new_empty((n, c))
        winner = torch.empty((n, c), dtype=torch.uint8, device=emb.device)
        lse = emb.new_empty(n, dtype=torch.float32)
        own = emb.new_empty((n, k))
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            flat = F.linear(emb[part], protos)
            sims = similarity_slabs(flat, c, k)  # (chunk, K, C)
            best = sims.max(dim=1)
            scores[part], winner[part] = best.values, best.indices
            flat = flat.float()
            lse[part] = torch.logsumexp(
                flat * inv_temperature if inv_temperature != 1.0 else flat,
                dim=1)
            idx = labels[part].view(-1, 1, 1).expand(-1, k, 1)
            own[part] = sims.gather(2, idx).squeeze(2)
        ctx.save_for_backward(emb, protos, winner, lse)
        ctx.params = (c, k, inv_temperature, chunk)
        ctx.mark_non_differentiable(own)
        return scores, lse, own

    @staticmethod
    def backward(ctx, g_scores, g_lse, g_own):
        emb, protos, winner, lse = ctx.saved_tensors
        c, k, inv_t, chunk = ctx.params
        grad_emb = torch.zeros_like(emb)
        for start in range(0, emb.shape[0], chunk):
            part = slice(start, start + chunk)
            flat = F.linear(emb[part], protos).float()
            if inv_t != 1.0:
                flat.mul_(inv_t)
            grad = flat.sub_(lse[part, None]).exp_()
            if g_lse is not None:  # d lse / d s = softmax(s / T) / T
                grad.mul_(g_lse[part, None].float() * inv_t)
            else:
                grad.zero_()
            if g_scores is not None:
                similarity_slabs(grad, c, k).scatter_add_(
                    1, winner[part, None].long(),
                    g_scores[part, None].float())
            grad_emb[part] = (grad.to(emb.dtype) @ protos)
        return grad_emb, None, None, None, None, None, None
