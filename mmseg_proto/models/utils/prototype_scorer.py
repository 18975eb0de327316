"""PrototypeScorer: how similar a pixel is to each prototype, and to each class.

The one place where ProtoSeg compares pixel embeddings with prototypes: the training step
(:meth:`PrototypeScorer.training_scores`, the eager, fused or streamed implementation of
:mod:`.prototype_scores`, chosen once from the head's options by
:meth:`PrototypeScorer.from_options`), inference (:meth:`PrototypeScorer.class_cosines`, the
running max over K slabs of C prototypes), the differentiable class scores of a forward
with autograd (:meth:`PrototypeScorer.class_scores`) and the cosine of every pixel to every
prototype (:meth:`PrototypeScorer.cosines`, for the visualisation, health and anomaly tools).
The ``distance`` option lives here (:meth:`PrototypeScorer.similarity`).

Prototypes are always passed in as the (C, K, D) ``prototypes`` buffer of a
:class:`~.prototype_bank.PrototypeBank`; the scorer holds no tensor.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import PixelPrototypeContrastLoss
from .proto_head_options import standard_prototype_losses
from .prototype_distance import similarity_from_cosine
from .prototype_index import prototype_matrix, similarity_slabs
from .prototype_scores import (EagerScores, FusedScores, StreamedScores,
                               TrainingScores)

PATHS = ('eager', 'fused', 'streamed')


class PrototypeScorer:
    """Pixel-prototype similarity and the max over each class's K prototypes.

    Args:
        distance (str): Pixel-prototype measure (:mod:`.prototype_distance`): 'cosine',
            'standard' or 'huberized'. Default: 'cosine'.
        huber_delta (float): The huberized distance's delta. Default: 1.0.
        path (str): Training implementation: 'eager' (plain autograd, any prototype loss
            and distance), 'fused' (:class:`~.prototype_scores.FusedScores`) or 'streamed'
            (:class:`~.prototype_scores.StreamedScores`). Default: 'eager'.
        chunk (int, optional): Pixels per block of the streamed path. Default: None.
        inv_temperature (float): 1 / the PPC temperature, which the fused and streamed
            paths fold into the similarities. Default: 1.0.
    """

    def __init__(self, distance: str = 'cosine', huber_delta: float = 1.0,
                 path: str = 'eager', chunk: Optional[int] = None,
                 inv_temperature: float = 1.0) -> None:
        if path not in PATHS or (path == 'streamed') != (chunk is not None):
            raise ValueError(f'PrototypeScorer: path={path!r}, chunk={chunk!r}: the path '
                             f"is one of {PATHS}, and a chunk goes with 'streamed' only")
        self.distance = distance
        self.huber_delta = float(huber_delta)
        self.path = path
        self.chunk = chunk
        self.inv_temperature = inv_temperature

    @classmethod
    def from_options(cls, distance: str, huber_delta: float, fused_losses: bool,
                     similarity_chunk: Optional[int],
                     loss_proto: Sequence) -> 'PrototypeScorer':
        """The scorer of a ProtoHead's options (checked by :mod:`.proto_head_options`).

        The fused path needs the standard losses (at most one PPC and one PPD) and the
        cosine; ``similarity_chunk`` selects the streamed path, whatever ``fused_losses``.

        Args:
            distance (str): The head's ``distance``.
            huber_delta (float): The head's ``huber_delta``.
            fused_losses (bool): The head's ``fused_losses``.
            similarity_chunk (int, optional): The head's ``similarity_chunk``.
            loss_proto (Sequence): The head's prototype loss modules.
        """
        ppc = next((m for m in loss_proto if isinstance(m, PixelPrototypeContrastLoss)), None)
        fused = fused_losses and distance == 'cosine' and \
            standard_prototype_losses(loss_proto)
        path = 'streamed' if similarity_chunk else ('fused' if fused else 'eager')
        return cls(distance, huber_delta, path, similarity_chunk,
                   1.0 / ppc.temperature if ppc is not None else 1.0)

    def similarity(self, cosines: Tensor) -> Tensor:
        """The ``distance`` option's similarity of unit vectors with these cosines
        (monotone in the cosine, so it commutes with the max over K)."""
        return similarity_from_cosine(cosines, self.distance, self.huber_delta)

    def training_scores(self, emb: Tensor, prototypes: Tensor, labels: Tensor,
                        valid: Tensor) -> TrainingScores:
        """The prototype-scores step of one training batch.

        Args:
            emb (Tensor): (N, D) unit pixel embeddings.
            prototypes (Tensor): (C, K, D) prototypes.
            labels (Tensor): (N,) class of each pixel (anything for ignored ones).
            valid (Tensor): Indices of the labelled pixels.
        """
        c, k = prototypes.shape[:2]
        args = (emb, prototype_matrix(prototypes).to(emb.dtype), labels, valid, c, k,
                self.inv_temperature)
        if self.path == 'streamed':
            return StreamedScores(*args, chunk=self.chunk)
        if self.path == 'fused':
            return FusedScores(*args)
        return EagerScores(*args, to_similarity=None if self.distance == 'cosine'
                           else self.similarity)

    def class_scores(self, emb: Tensor, prototypes: Tensor) -> Tensor:
        """(..., C) differentiable class scores: the similarity of the nearest of each
        class's K prototypes, from the whole (..., K*C) similarity matrix."""
        c, k = prototypes.shape[:2]
        sims = self.similarity(F.linear(emb, prototype_matrix(prototypes).to(emb.dtype)))
        return similarity_slabs(sims, c, k).max(dim=-2).values

    @torch.no_grad()
    def class_cosines(self, emb: Tensor, prototypes: Tensor) -> Tensor:
        """(..., C) cosine of the nearest of each class's K prototypes, for inference.

        The (pixels x C*K) matrix is never formed: the K prototypes of every class are
        taken one slab (C prototypes) at a time with a running max, so memory holds (pixels
        x C) scores (ADE20K-full: 847 instead of 8470 per pixel).
        """
        flat = emb.reshape(-1, emb.shape[-1])
        c, k = prototypes.shape[:2]
        slabs = similarity_slabs(prototype_matrix(prototypes).to(emb.dtype), c, k,
                                 dim=0)  # (K, C, D)
        class_scores = F.linear(flat, slabs[0])
        # One (pixels x C) buffer for every slab (no fresh allocation per slab); autocast
        # does not take out= arguments, and exporters (TorchScript, ONNX, torch.export)
        # take neither out= nor in place.
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
            or torch.compiler.is_compiling()
        reuse = not (exporting or torch.is_autocast_enabled(emb.device.type))
        buf = torch.empty_like(class_scores) if reuse else None
        for slab in slabs[1:]:
            if reuse:
                torch.maximum(class_scores, torch.mm(flat, slab.T, out=buf),
                              out=class_scores)
            else:
                class_scores = torch.maximum(class_scores, F.linear(flat, slab))
        return class_scores.view(*emb.shape[:-1], -1)

    @staticmethod
    def cosines(emb: Tensor, prototypes: Tensor) -> Tensor:
        """(..., C, K) cosine of every pixel to every prototype, in the buffer's order.

        Args:
            emb (Tensor): (..., D) unit pixel embeddings.
            prototypes (Tensor): (C, K, D) unit prototypes.
        """
        c, k, d = prototypes.shape
        return F.linear(emb, prototypes.reshape(c * k, d).to(emb.dtype)).unflatten(-1, (c, k))
