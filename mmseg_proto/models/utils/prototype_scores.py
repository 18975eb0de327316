"""The prototype-scores step of ProtoHead's training: three implementations of one contract.

:class:`TrainingScores` declares the contract. Each implementation takes the flat embeddings (N, D), the prototype matrix (K*C, D) (rows ``k * C + c``,
see :mod:`.prototype_index`), the labels (N,) and the indices of the labelled pixels, and
gives

- ``own`` (Nv, K): detached similarities of each labelled pixel to its class's K prototypes,
  what Sinkhorn clusters;
- ``finish(targets)``: after Sinkhorn, the class scores (N, C) (max over each class's K
  similarities; differentiable) and each prototype loss's value.

``EagerScores`` is plain autograd on the whole (N, K*C) matrix and calls the loss modules
themselves (the reference; any prototype loss). ``FusedScores`` and ``StreamedScores``
compute the per-pixel PPC and PPD terms fast (:class:`FusedPrototypeScores`: one buffer reused
in place; :class:`ChunkedPrototypeScores`: blocks of pixels, recomputed in backward) and hand
them to the loss modules' ``reduce``; they are tested against the modules' ``per_pixel``.
:class:`~.prototype_scorer.PrototypeScorer` chooses one from the head's options
(``fused_losses``, ``similarity_chunk``, ``distance``) and builds it every training step.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked_prototype_scores import ChunkedPrototypeScores
from .fused_prototype_scores import FusedPrototypeScores
from .prototype_index import similarity_slabs


class TrainingScores:
    """The contract of a prototype-scores step (see the module doc).

    Attributes:
        own (Tensor): (Nv, K) detached similarities of each labelled pixel to its class's K
            prototypes, what Sinkhorn clusters.
    """

    own: Tensor

    def finish(self, targets: Tensor, loss_fns: Sequence,
               num_valid: int) -> Tuple[Tensor, List[Tensor]]:
        """After Sinkhorn: the class scores and each prototype loss's value.

        Args:
            targets (Tensor): (N,) similarity column of each pixel's assigned prototype
                (``k * C + c``), -1 for ignored pixels.
            loss_fns (Sequence): The head's prototype loss modules.
            num_valid (int): Number of labelled pixels.

        Returns:
            tuple[Tensor, list[Tensor]]: (N, C) class scores (max over each class's K
            similarities; differentiable) and one loss value per module, in their order.
        """
        raise NotImplementedError


class EagerScores(TrainingScores):
    """Plain autograd over the (N, K*C) similarities; calls the loss modules.

    ``to_similarity`` maps the cosines to the similarity the head's ``distance`` option
    names (:func:`.prototype_distance.similarity_from_cosine`); None: the cosine itself."""

    def __init__(self, emb: Tensor, protos: Tensor, labels: Tensor, valid: Tensor,
                 num_classes: int, num_prototypes: int, inv_temperature: float,
                 to_similarity: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        self.c, self.k = num_classes, num_prototypes
        self.sims = F.linear(emb, protos)
        if to_similarity is not None:
            self.sims = to_similarity(self.sims)
        self.own = similarity_slabs(self.sims.detach(), self.c, self.k)[valid, :, labels[valid]]

    def finish(self, targets: Tensor, loss_fns: Sequence,
               num_valid: int) -> Tuple[Tensor, List[Tensor]]:
        class_scores = similarity_slabs(self.sims, self.c, self.k).max(dim=1).values
        return class_scores, [fn(self.sims, targets) for fn in loss_fns]


class FusedScores(TrainingScores):
    """:class:`FusedPrototypeScores`: one (N, K*C) buffer, the temperature folded into the
    prototypes, per-pixel PPC/PPD terms reduced by the loss modules."""

    def __init__(self, emb: Tensor, protos: Tensor, labels: Tensor, valid: Tensor,
                 num_classes: int, num_prototypes: int, inv_temperature: float) -> None:
        self.emb, self.c, self.k, self.inv_t = emb, num_classes, num_prototypes, inv_temperature
        self.scaled_protos = protos * inv_temperature if inv_temperature != 1.0 else protos
        with torch.no_grad():  # FusedPrototypeScores differentiates it itself
            self.scaled = F.linear(emb, self.scaled_protos)
        own = similarity_slabs(self.scaled, self.c, self.k)[valid, :, labels[valid]]
        self.own = own.mul_(1.0 / inv_temperature) if inv_temperature != 1.0 else own

    def terms(self, targets: Tensor):
        """Class scores (N, C) and the per-pixel PPC and PPD terms (N,)."""
        class_scores, ppc, ppd = FusedPrototypeScores.apply(
            self.emb, self.scaled, self.scaled_protos, targets, self.c, self.k, self.inv_t)
        del self.scaled  # overwritten in place by FusedPrototypeScores
        return class_scores, dict(ppc=ppc, ppd=ppd)

    def finish(self, targets: Tensor, loss_fns: Sequence,
               num_valid: int) -> Tuple[Tensor, List[Tensor]]:
        class_scores, terms = self.terms(targets)
        return class_scores, [fn.reduce(terms[fn.term], num_valid) for fn in loss_fns]


class StreamedScores(TrainingScores):
    """:class:`ChunkedPrototypeScores`: the similarities in blocks of ``chunk`` pixels."""

    def __init__(self, emb: Tensor, protos: Tensor, labels: Tensor, valid: Tensor,
                 num_classes: int, num_prototypes: int, inv_temperature: float,
                 chunk: int) -> None:
        self.emb, self.protos, self.inv_t = emb, protos, inv_temperature
        self.class_scores, self.lse, own = ChunkedPrototypeScores.apply(
            emb, protos, labels.clamp(0, num_classes - 1), num_classes, num_prototypes,
            inv_temperature, chunk)
        self.own = own[valid]

    def terms(self, targets: Tensor):
        """Class scores (N, C) and the per-pixel PPC and PPD terms (N,)."""
        target_sim = (self.emb * self.protos[targets.clamp(min=0)]).sum(dim=1).float()
        inside = targets >= 0
        return self.class_scores, dict(ppc=(self.lse - target_sim * self.inv_t) * inside,
                                       ppd=(1.0 - target_sim)**2 * inside)

    finish = FusedScores.finish

