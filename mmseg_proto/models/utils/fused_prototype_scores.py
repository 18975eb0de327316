"""Class scores, PPC and PPD from one pass over the prototype similarities."""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .prototype_index import similarity_slabs


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
