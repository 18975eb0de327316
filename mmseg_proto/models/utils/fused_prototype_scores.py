"""Class scores, PPC and PPD from one pass over the prototype similarities."""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import cpu_kernels

# exp() of fp32 overflows above ~88.7: without a shift, exp(s / T) of all
# K*C columns stays finite while max(s) / T + log(K*C) is below this bound.
_EXP_SAFE = 80.0


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

    Numerics: ``exp(Z)`` is taken without subtracting the row maximum when
    ``max(Z) + log(K*C) < 80`` (always for unit vectors with the default
    T = 1, where max(Z) <= 1, and with the paper's T = 0.1, where
    max(Z) <= 10): the sum then neither overflows nor underflows in fp32 and
    equals the shifted computation up to rounding. Otherwise (a very low
    temperature) the row maximum, read from the (N, C) class scores, is
    subtracted first, as ``logsumexp`` does. Class scores and PPD use
    ``S = Z * T``, equal to the directly computed cosines up to rounding.
    Fp16/bf16 similarities are exponentiated in an fp32 copy.

    On CPU with fp32 inputs and K < 256 the forward and backward passes
    over the matrix run in the one-pass C kernels of :mod:`.cpu_kernels`
    (compiled on first use; a warning and this PyTorch path when no
    compiler works; ``MMSEG_PROTO_CPU_KERNELS=0`` turns them off): one read
    and one write of the matrix each way instead of about six, the max's
    winner kept as a uint8 index, the log-sum-exp shifted by each row's
    maximum. Both paths give the same values and gradients up to rounding
    (tested).

    Ties: the kernels give the class-score gradient to the first maximal
    prototype, as torch's ``max`` does; the PyTorch path shares it equally
    between the maximal prototypes (also a valid subgradient of the max;
    exact ties happen only for identical prototypes or a zero embedding).

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
        n, (c, k) = scaled.shape[0], (num_classes, num_prototypes)
        temperature = 1.0 / inv_temperature
        ctx.params = (c, k, temperature, emb.dtype)
        ctx.consumed = False
        lib = _cpu_kernels(scaled, k)
        ctx.kernel = lib is not None
        if lib is not None:
            return _forward_kernel(ctx, lib, scaled, scaled_protos, targets,
                                   c, k, temperature)
        by_slab = scaled.view(n, k, c)
        best = by_slab.amax(dim=1)  # (N, C)
        winners = by_slab >= best[:, None]  # (N, K, C) bool: == the max
        valid = targets >= 0
        index = targets.clamp(min=0)[:, None]
        target_z = scaled.gather(1, index).squeeze(1).float()
        row_max = best.amax(dim=1).float()
        class_scores = best if temperature == 1.0 else best * temperature
        numer = scaled.float()  # `scaled` itself when it is fp32
        shift: Optional[Tensor] = None
        if n:
            high, low = torch.stack([row_max.max(), row_max.min()]).tolist()
            if high + math.log(k * c) >= _EXP_SAFE or low <= -_EXP_SAFE:
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
        n = numer.shape[0]
        g_ppc = torch.zeros_like(sum_exp) if g_ppc is None else g_ppc.float()
        g_ppd = torch.zeros_like(sum_exp) if g_ppd is None else g_ppd.float()
        w_ppc = g_ppc * valid
        # d PPD / d z_target = -2 (1 - s_target) T.
        at_target = -w_ppc - (2.0 * temperature) * g_ppd * (
            1.0 - target_sim) * valid
        if ctx.kernel:
            return (_backward_kernel(numer, scaled_protos, index, winners,
                                     w_ppc / sum_exp, at_target, g_scores,
                                     temperature, c, k).to(emb_dtype),
                    None, None, None, None, None, None)
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
            grad.view(n, k, c).addcmul_(winners, g_best[:, None])
        grad_emb = grad.to(scaled_protos.dtype) @ scaled_protos
        return (grad_emb.to(emb_dtype), None, None, None, None, None, None)


def _cpu_kernels(scaled: Tensor, k: int):
    """The C kernels when they apply: fp32 contiguous CPU input, K < 256."""
    if scaled.device.type != 'cpu' or scaled.dtype != torch.float32 or \
            not scaled.is_contiguous() or k >= 256 or not scaled.shape[0]:
        return None
    return cpu_kernels.load()


def _forward_kernel(ctx, lib, scaled: Tensor, scaled_protos: Tensor,
                    targets: Tensor, c: int, k: int, temperature: float
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward in one pass of the C kernel (see cpu_kernels).

    The winners are the first maximal prototype (as torch.max) and the
    log-sum-exp is shifted by each row's maximum (as torch.logsumexp).
    """
    n = scaled.shape[0]
    valid = targets >= 0
    # Targets of ignored pixels point at column -1 in the kernel: skipped.
    index = torch.where(valid, targets, -1).contiguous()
    target_z = scaled.gather(1, index.clamp(min=0)[:, None]).squeeze(1)
    best = scaled.new_empty((n, c))
    winners = torch.empty((n, c), dtype=torch.uint8)
    row_max, sum_exp = scaled.new_empty(n), scaled.new_empty(n)
    lib.proto_scores_forward(scaled.data_ptr(), n, k, c, best.data_ptr(),
                             winners.data_ptr(), row_max.data_ptr(),
                             sum_exp.data_ptr(), torch.get_num_threads())
    lse = sum_exp.log() + row_max
    target_sim = target_z * temperature
    ppc = (lse - target_z) * valid
    ppd = (1.0 - target_sim)**2 * valid
    class_scores = best if temperature == 1.0 else best * temperature
    ctx.save_for_backward(scaled, scaled_protos, index, valid, winners,
                          sum_exp, target_sim)
    return class_scores, ppc, ppd


def _backward_kernel(numer: Tensor, scaled_protos: Tensor, index: Tensor,
                     winners: Tensor, scale: Tensor, at_target: Tensor,
                     g_scores: Optional[Tensor], temperature: float, c: int,
                     k: int) -> Tensor:
    """Embedding gradient; ``numer`` becomes d loss / d z in one pass."""
    scale, at_target = scale.contiguous(), at_target.contiguous()
    g_best = None if g_scores is None else (g_scores.float() *
                                            temperature).contiguous()
    cpu_kernels.load().proto_scores_backward(
        numer.data_ptr(), numer.shape[0], k, c, scale.data_ptr(),
        index.data_ptr(), at_target.data_ptr(), winners.data_ptr(),
        None if g_best is None else g_best.data_ptr(),
        torch.get_num_threads())
    return numer @ scaled_protos
