"""Where a new class goes, computed from its support features: its K prototypes
(:func:`place_prototypes`) or its imprinted ``conv_seg`` row (:func:`imprint_weight`), its
score offset (:func:`calibrate_offset`), the IoU it reaches on the support
(:func:`support_iou`), and the optional refinement of its own parameters
(:func:`refine_new_class`).

Setting these in the head is ``model_extension.py``'s.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .head_adapters import HeadAdapter


def place_prototypes(emb: Tensor, num_prototypes: int, rounds: int = 10,
                     epsilon: float = 0.05, sinkhorn_iters: int = 3,
                     seed: int = 0) -> Tuple[Tensor, int]:
    """K unit prototypes of one class from its (N, D) unit embeddings, as training places
    them: each round assigns the pixels to the K prototypes by ProtoSeg's balanced
    Sinkhorn-Knopp clustering and moves each prototype to the normalised mean of its
    pixels (the fixed point of the momentum update). Starts from K distinct pixels drawn
    with ``seed``. With fewer than K pixels, each pixel is a prototype and they repeat.

    Args:
        emb (Tensor): (N, D) embeddings of the class's support pixels.
        num_prototypes (int): K. With 1, the normalised mean of the embeddings.
        rounds (int): Assignment and update rounds. Default: 10.
        epsilon (float): Sinkhorn-Knopp's entropic regularisation. Default: 0.05.
        sinkhorn_iters (int): Sinkhorn-Knopp iterations per round. Default: 3.
        seed (int): Seed of the K starting pixels. Default: 0.

    Returns:
        tuple[Tensor, int]: (K, D) prototypes and how many are distinct.
    """
    from mmseg_proto.models.utils.sinkhorn import sinkhorn_knopp
    emb = F.normalize(emb.float(), dim=-1)
    n = emb.shape[0]
    if num_prototypes == 1:
        return F.normalize(emb.mean(0, keepdim=True), dim=-1), 1
    if n <= num_prototypes:
        return emb[torch.arange(num_prototypes) % n], _distinct(emb)
    g = torch.Generator().manual_seed(seed)
    protos = emb[torch.randperm(n, generator=g)[:num_prototypes].to(emb.device)].clone()
    labels = emb.new_zeros(n, dtype=torch.long)
    for _ in range(rounds):
        assign, _ = sinkhorn_knopp(emb @ protos.T, labels, 1, epsilon, sinkhorn_iters,
                                   return_transport=False)
        sums = torch.zeros_like(protos).index_add_(0, assign, emb)
        counts = torch.bincount(assign, minlength=num_prototypes)
        filled = counts > 0
        protos[filled] = F.normalize(sums[filled], dim=-1)
    return protos, _distinct(protos)


def _distinct(rows: Tensor) -> int:
    """How many different rows ``rows`` holds, up to float rounding (identical support
    pixels give one)."""
    close = torch.cdist(rows.double(), rows.double()) < 1e-5
    return sum(1 for i in range(len(rows)) if not bool(close[i, :i].any()))


def imprint_weight(feats: Tensor, weight: Tensor) -> Tensor:
    """The imprinted (D,) row: the normalised mean of the (N, D) support features, scaled
    to the mean L2 norm of the (C, D) existing rows.

    Args:
        feats (Tensor): (N, D) features of the class's support pixels.
        weight (Tensor): (C, D) the trained classes' rows.
    """
    return F.normalize(feats.float().mean(0), dim=0) * weight.float().norm(dim=1).mean()


def calibrate_offset(new_scores: Tensor, base_logits: Tensor, positive: Tensor,
                     known: Tensor) -> Tuple[float, float]:
    """The offset b of the new class's logit (``new_scores + b``) that maximises its IoU
    over the support pixels, and that IoU.

    A pixel is predicted as the new class when ``new_scores + b > max(base_logits)``, i.e.
    when ``b > t = max(base_logits) - new_scores``. Sweeping b over the sorted t of the
    known pixels counts, at each step, the positives and the others it admits; b is the
    midpoint between the optimal t and the next one (the first unknown is the midpoint
    between the optimum and the pixel it would wrongly admit).

    Args:
        new_scores (Tensor): (N,) the new class's logit without offset.
        base_logits (Tensor): (N, C) the logits of the classes already there.
        positive (Tensor): (N,) bool, the class's pixels.
        known (Tensor): (N,) bool, pixels whose label is known (positives and others).
    """
    t = (base_logits.float().max(dim=1).values - new_scores.float())[known]
    pos = positive[known].double()
    order = torch.argsort(t)
    t, pos = t[order], pos[order]
    tp = torch.cumsum(pos, 0)
    fp = torch.cumsum(1 - pos, 0)
    iou = tp / (pos.sum() + fp)  # admitting the first i+1 pixels
    # An offset admits all pixels of equal t or none: only the last of each run of ties
    # is a reachable cut.
    reachable = torch.ones_like(t, dtype=torch.bool)
    reachable[:-1] = t[1:] > t[:-1]
    iou = torch.where(reachable, iou, torch.full_like(iou, -1.0))
    best = int(torch.argmax(iou))
    nxt = float(t[best + 1]) if best + 1 < len(t) else float(t[best]) + 1.0
    return 0.5 * (float(t[best]) + nxt), float(iou[best])


def support_iou(predicted: Tensor, positive: Tensor, known: Tensor) -> float:
    """The new class's IoU on its support: the pixels predicted as the class against its
    pixels, over the pixels whose label is known (void and padding left out), as
    :func:`calibrate_offset` counts it.

    Args:
        predicted (Tensor): (N,) bool, the pixels predicted as the new class.
        positive (Tensor): (N,) bool, the class's pixels.
        known (Tensor): (N,) bool, pixels whose label is known (positives and others).
    """
    predicted, positive = predicted[known], positive[known]
    return float((predicted & positive).sum() / (predicted | positive).sum())


def refine_new_class(model: nn.Module, adapter: HeadAdapter, feats: Tensor,
                     positive: Tensor, known: Tensor, base_pred: Tensor, steps: int,
                     lr: float) -> None:
    """A few Adam steps on the last class's own parameters, nothing else.

    Loss: cross-entropy of the head's logits over the ``known`` support pixels, with target
    the new class on ``positive`` pixels and ``base_pred`` (the model's prediction before
    the class was added) elsewhere. The other classes' parameters get no update (their
    gradients are zeroed before each step), so their logits stay bit-identical.

    Args:
        model (nn.Module): The segmentor whose head's last class is the new one.
        adapter (HeadAdapter): The adapter of its decode head.
        feats (Tensor): (N, D) features of the support pixels.
        positive (Tensor): (N,) bool, the class's pixels.
        known (Tensor): (N,) bool, pixels whose label is known.
        base_pred (Tensor): (N,) the model's class per pixel before the class was added.
        steps (int): Adam steps.
        lr (float): Adam's learning rate.
    """
    head = model.decode_head
    c = head.num_classes - 1
    targets = torch.where(positive, torch.full_like(base_pred, c), base_pred)[known]
    x = feats[known]
    with torch.enable_grad():
        if adapter.method == 'prototypes':
            with torch.no_grad():
                base_scores = head.scorer.similarity(
                    head.scorer.class_cosines(x, head.prototypes[:c]))
            new_protos = head.prototypes[c].clone().requires_grad_()
            rows = [head.mask_norm.weight, head.mask_norm.bias]
            params = [new_protos] + rows

            def logits():
                own = head.scorer.class_scores(x, F.normalize(new_protos, dim=-1)[None])
                return head.mask_norm(torch.cat([base_scores, own], dim=-1))
        else:
            conv = head.conv_seg
            rows = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
            params = list(rows)

            def logits():
                return F.linear(x, conv.weight.flatten(1), conv.bias)
        flags = [p.requires_grad for p in rows]
        for p in rows:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        try:
            for _ in range(steps):
                optimizer.zero_grad()
                F.cross_entropy(logits(), targets).backward()
                for p in rows:  # only the new class's entry moves
                    p.grad[:c] = 0
                optimizer.step()
        finally:
            for p, flag in zip(rows, flags):
                p.requires_grad_(flag)
                p.grad = None
    if adapter.method == 'prototypes':
        with torch.no_grad():
            head.prototypes[c] = F.normalize(new_protos.detach(), dim=-1)
