"""ProtoSeg's custom autograd functions: the numerics a reviewer checks, in one place.

Each one computes what plain autograd would, with a hand-written backward that saves memory
or passes; each is tested against plain autograd (values and gradients) in
``tests/test_models/test_utils/``:

- :class:`L2Normalize`: unit normalisation with a closed-form backward (the embedding);
- :class:`FusedPrototypeScores`: the class scores, PPC and PPD of the training step from one
  (N, K*C) buffer reused in place (the default training path);
- :class:`ChunkedPrototypeScores`: the class scores and PPC log-sum-exp in blocks of pixels,
  recomputed in backward (``similarity_chunk``, for large C x K).

The similarity matrix's columns are in the prototype-major order of
:func:`~.prototype_similarity.similarity_slabs` (column ``k * C + c``).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .prototype_similarity import similarity_slabs


class L2Normalize(torch.autograd.Function):
    """``x / max(||x||, eps)`` over the last dimension.

    The same values and gradients as ``F.normalize(x, dim=-1)``, but the
    backward is the closed form ``(g - y (g . y)) / ||x||`` (two passes over
    ``x``) instead of autograd's chain through the division, the norm and
    the broadcast (five); about half the time on (pixels x channels)
    embeddings. Rows whose norm is below ``eps`` are divided by ``eps``, as
    F.normalize does, and get the gradient ``g / eps``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float = 1e-12) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        clamped = norm < eps
        norm = norm.clamp_min_(eps)
        y = x / norm
        ctx.save_for_backward(y, norm, clamped)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        y, norm, clamped = ctx.saved_tensors
        dot = (grad * y).sum(dim=-1, keepdim=True).masked_fill_(clamped, 0)
        return torch.addcmul(grad, y, dot, value=-1).div_(norm), None


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Unit-normalise ``x`` over its last dimension (see
    :class:`L2Normalize`)."""
    return L2Normalize.apply(x, eps)


# exp() of fp32 overflows above ~88.7: without a shift, exp(s / T) of all
# K*C columns stays finite while max(s) / T + log(K*C) is below this bound.
_EXP_SAFE = 80.0


def needs_shift(inv_temperature: float, columns: int) -> bool:
    """Whether exp() of unit-vector similarities over ``inv_temperature`` must be
    shifted by the row maximum to stay finite in fp32 (1% margin for rounding)."""
    return 1.01 * inv_temperature + math.log(columns) >= _EXP_SAFE


class FusedPrototypeScores(torch.autograd.Function):
    """Exact fused form of ``max over K``, PPC and PPD, in place.

    ProtoSeg's training step reads the (N, C*K) pixel-prototype similarity
    matrix ``S`` three times (class scores = max over each class's K
    similarities, the pixel-prototype contrast cross-entropy over ``S / T``,
    the pixel-prototype distance) and plain autograd keeps ``S``, allocates
    several more (N, C*K) tensors (the scaled logits, the exponentials of
    ``logsumexp``, three gradients) and adds them up. On CPU every fresh
    (N, C*K) tensor also pays its page faults. This function needs one
    (N, C*K) buffer for its whole life: the caller computes the scaled
    similarities ``Z = S / T = emb @ (protos / T).T`` without autograd (the
    temperature is folded into the prototypes, no scaling pass) and hands
    them over; the forward reads ``Z`` once for the class scores and once
    for their winners and turns it, in place, into the softmax numerators
    ``exp(Z)`` (no max-shift pass when the cosines' bound makes one
    unnecessary, see below); the backward turns those, in place, into the
    gradient ``(softmax - onehot) * g_ppc`` plus the PPD and class-score
    gradients, followed by the one matmul ``grad @ (protos / T)`` for the
    embeddings' gradient (the prototypes are not learned).

    Numerics: ``emb`` and the prototypes are unit vectors, so every
    ``|Z| <= 1 / T``. ``exp(Z)`` is taken without subtracting the row
    maximum when ``1 / T + log(K*C) < 80`` (the default T = 1 and the
    paper's T = 0.1 both): the sum then neither overflows nor underflows in
    fp32 and equals the shifted computation up to rounding. Otherwise (a
    very low temperature) the row maximum, read from the (N, C) class
    scores, is subtracted first, as ``logsumexp`` does. The choice depends
    only on T, K and C, never on the data: no host synchronisation, and
    ``torch.compile`` traces the function without a graph break. Class scores and PPD use
    ``S = Z * T``, equal to the directly computed cosines up to rounding.
    Fp16/bf16 similarities are exponentiated in an fp32 copy.

    Ties: the class-score gradient of a tied max is shared equally between
    the maximal prototypes (a valid subgradient of the max; exact ties happen
    only for identical prototypes or a zero embedding).

    Forward inputs: ``emb`` (N, D) the embeddings (only their gradient is
    computed here), ``scaled`` (N, K*C) ``= emb @ scaled_protos.T``
    computed without autograd, columns ordered ``k * C + c``; it is
    **overwritten** (the caller must not use it afterwards),
    ``scaled_protos`` (K*C, D) the prototypes times ``inv_temperature`` in
    ``emb``'s dtype, ``targets`` (N,) int64 column of the assigned
    prototype or -1 to ignore, ``num_classes``, ``num_prototypes``,
    ``inv_temperature`` (1 / PPC temperature T). Outputs: ``class_scores``
    (N, C) cosines, and the per-pixel PPC and PPD terms (N,) in fp32, zero
    for ignored pixels. The backward may run once (no ``retain_graph``).
    """

    @staticmethod
    def forward(ctx, emb: Tensor, scaled: Tensor, scaled_protos: Tensor,
                targets: Tensor, num_classes: int, num_prototypes: int,
                inv_temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
        c, k = num_classes, num_prototypes
        temperature = 1.0 / inv_temperature
        ctx.params = (c, k, temperature, emb.dtype)
        ctx.consumed = False
        by_slab = similarity_slabs(scaled, c, k)
        best = by_slab.amax(dim=1)  # (N, C)
        winners = by_slab >= best[:, None]  # (N, K, C) bool: == the max
        valid = targets >= 0
        index = targets.clamp(min=0)[:, None]
        target_z = scaled.gather(1, index).squeeze(1).float()
        row_max = best.amax(dim=1).float()
        class_scores = best if temperature == 1.0 else best * temperature
        numer = scaled.float()  # `scaled` itself when it is fp32
        shift: Optional[Tensor] = None
        if needs_shift(inv_temperature, k * c):
            shift = row_max
            numer.sub_(shift[:, None])
        numer.exp_()
        sum_exp = numer.sum(dim=1)
        lse = sum_exp.log() if shift is None else sum_exp.log() + shift
        target_sim = target_z * temperature
        ppc = (lse - target_z) * valid
        ppd = (1.0 - target_sim)**2 * valid
        ctx.save_for_backward(numer, scaled_protos, index, valid, winners,
                              sum_exp, target_sim)
        return class_scores, ppc, ppd

    @staticmethod
    def backward(ctx, g_scores: Optional[Tensor], g_ppc: Optional[Tensor],
                 g_ppd: Optional[Tensor]):
        if ctx.consumed:
            raise RuntimeError(
                'FusedPrototypeScores: backward ran twice (retain_graph=True)'
                '; its buffers are reused in place. Set the ProtoHead option '
                'fused_losses=False to back-propagate through the losses '
                'more than once')
        ctx.consumed = True
        numer, scaled_protos, index, valid, winners, sum_exp, target_sim = \
            ctx.saved_tensors
        c, k, temperature, emb_dtype = ctx.params
        g_ppc = torch.zeros_like(sum_exp) if g_ppc is None else g_ppc.float()
        g_ppd = torch.zeros_like(sum_exp) if g_ppd is None else g_ppd.float()
        w_ppc = g_ppc * valid
        # d PPD / d z_target = -2 (1 - s_target) T.
        at_target = -w_ppc - (2.0 * temperature) * g_ppd * (
            1.0 - target_sim) * valid
        # d PPC / d z = softmax(z) - onehot(target), in place.
        grad = numer.mul_((w_ppc / sum_exp)[:, None])
        grad.scatter_add_(1, index, at_target[:, None])
        if g_scores is not None:  # max over K: the winners share the grads
            g_best = g_scores.float()
            if temperature != 1.0:
                g_best = g_best * temperature
            if k > 1:
                g_best = g_best / winners.view(torch.uint8).sum(
                    dim=1, dtype=torch.uint8 if k < 256 else torch.int32)
            similarity_slabs(grad, c, k).addcmul_(winners, g_best[:, None])
        grad_emb = grad.to(scaled_protos.dtype) @ scaled_protos
        return (grad_emb.to(emb_dtype), None, None, None, None, None, None)


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
