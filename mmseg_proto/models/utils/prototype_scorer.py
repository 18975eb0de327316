"""PrototypeScorer: how similar a pixel is to each prototype and to each class, in training
and at inference.

The one place where ProtoSeg compares pixel embeddings with prototypes (the measure and the
prototype orders are in :mod:`.prototype_similarity`):

- the training step (:meth:`PrototypeScorer.training_scores`): one of three implementations
  of the :class:`TrainingScores` contract below, chosen once from the head's options by
  :meth:`PrototypeScorer.from_options`;
- inference (:meth:`PrototypeScorer.class_cosines`): never the whole (pixels x C*K)
  matrix; either a running max over K slabs of C prototypes or pixel blocks against all C*K
  prototypes, chosen once from the shapes by :func:`inference_path`;
- the differentiable class scores of a forward with autograd
  (:meth:`PrototypeScorer.class_scores`) and the cosine of every pixel to every prototype
  (:meth:`PrototypeScorer.cosines`, for the visualisation, health and anomaly tools).

**The training contract.** A :class:`TrainingScores` is built from the flat embeddings
(N, D), the prototype matrix (K*C, D) (rows ``k * C + c``) and the labels (N,); it gives

- ``labels`` (Nv,) and ``own`` (Nv, K): the class of each labelled pixel and its detached
  similarities to that class's K prototypes, what Sinkhorn clusters;
- ``finish(assigned, loss_fns)``: once Sinkhorn has assigned each labelled pixel a
  prototype, the class scores (N, C) (max over each class's K similarities;
  differentiable) and each prototype loss's value;
- ``batch(pred, assigned, transport)``: what the bank learns from the step, one
  :class:`~.prototype_statistics.PrototypeBatch` over all N pixels.

``EagerScores`` is plain autograd on the whole (N, K*C) matrix and calls the loss modules
themselves (the reference; any prototype loss and distance). ``FusedScores`` and
``StreamedScores`` compute the per-pixel PPC and PPD terms with the custom autograd
functions of :mod:`.autograd_functions` (:class:`FusedPrototypeScores`: one buffer reused in
place; :class:`ChunkedPrototypeScores`: blocks of pixels, recomputed in backward) and hand
them to the loss modules' ``reduce``; they are tested against the modules' ``per_pixel``.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..losses import PixelPrototypeContrastLoss, PixelPrototypeDistanceLoss
from .autograd_functions import ChunkedPrototypeScores, FusedPrototypeScores
from .prototype_similarity import (prototype_matrix, similarity_column,
                                   similarity_from_cosine, similarity_slabs)
from .prototype_statistics import PrototypeBatch

PATHS = ('eager', 'fused', 'streamed')
INFERENCE_PATHS = ('slabs', 'blocks')
# The blocked inference path's (pixels x K*C) block: about BLOCK_BYTES (what stays in a
# core's L2 of the measured CPUs, 2 MiB), and at least MIN_BLOCK_PIXELS pixels (a GEMM of
# fewer rows re-reads all C*K prototypes for too little work). See pixel_block.
BLOCK_BYTES = 2 * 2**20
MIN_BLOCK_PIXELS = 256


def pixel_block(columns: int, element_size: int) -> int:
    """Pixels per block of the blocked inference path, for ``columns`` = C*K similarities
    of ``element_size`` bytes: ``BLOCK_BYTES`` of similarities, at least
    ``MIN_BLOCK_PIXELS`` pixels (e.g. fp32, CamVid 11 x 10: 4766 pixels, 2 MiB; ADE20K
    150 x 10: 349, 2 MiB; ADE20K-full 847 x 10: 256, 8.3 MiB)."""
    return max(MIN_BLOCK_PIXELS, BLOCK_BYTES // (columns * element_size))


def inference_path(num_classes: int, num_prototypes: int, dim: int, device: torch.device,
                   threads: Optional[int] = None) -> str:
    """Which path :meth:`PrototypeScorer.class_cosines` takes for C, K, D on ``device`` with
    ``threads`` intra-op threads (default: ``torch.get_num_threads()``).

    The rule is what was measured (benchmarks/bench_inference_similarity.py,
    docs/benchmarks.md, quiet 2-core Intel Xeon): on one and two CPU threads the blocks win
    at every measured shape (C x K x D from 11 x 10 x 256 to 847 x 10 x 256; 1.18-1.86x on
    one thread, 1.20-1.46x on two); more CPU threads and GPUs were not measured: the
    slabs, the earlier path, stay there. C, K and D do not enter the rule: no measured
    shape reversed it.
    """
    if torch.device(device).type != 'cpu':
        return 'slabs'
    threads = torch.get_num_threads() if threads is None else threads
    return 'blocks' if threads <= 2 else 'slabs'


def standard_prototype_losses(loss_proto: Sequence[nn.Module]) -> bool:
    """Whether the prototype losses are at most one PPC and one PPD (what the fused and
    streamed paths compute)."""
    types = [type(m) for m in loss_proto]
    return len(types) == len(set(types)) and set(types) <= {
        PixelPrototypeContrastLoss, PixelPrototypeDistanceLoss}


class TrainingScores:
    """The prototype-scores step of one training batch (see the module doc).

    Args:
        emb (Tensor): (N, D) unit pixel embeddings.
        labels (Tensor): (N,) class of each pixel, ``ignore_index`` where unlabelled.
        ignore_index (int): The label of unlabelled pixels.
        num_classes (int): C.
        num_prototypes (int): K.

    Attributes:
        labels (Tensor): (Nv,) class of each labelled pixel.
        own (Tensor): (Nv, K) detached similarities of each labelled pixel to its class's
            K prototypes, what Sinkhorn clusters.
    """

    own: Tensor

    def __init__(self, emb: Tensor, labels: Tensor, ignore_index: int, num_classes: int,
                 num_prototypes: int) -> None:
        self.emb, self.c, self.k = emb, num_classes, num_prototypes
        self.all_labels = labels
        self.valid = torch.nonzero(labels != ignore_index).squeeze(1)
        self.labels = labels[self.valid]

    def finish(self, assigned: Tensor, loss_fns: Sequence) -> Tuple[Tensor, List[Tensor]]:
        """After Sinkhorn: the class scores and each prototype loss's value.

        Args:
            assigned (Tensor): (Nv,) prototype (0..K-1) of each labelled pixel.
            loss_fns (Sequence): The head's prototype loss modules.

        Returns:
            tuple[Tensor, list[Tensor]]: (N, C) class scores (max over each class's K
            similarities; differentiable) and one loss value per module, in their order.
        """
        targets = torch.full_like(self.all_labels, -1)  # -1: ignored, never a column
        targets[self.valid] = similarity_column(self.labels, assigned, self.c)
        return self._finish(targets, loss_fns)

    def _finish(self, targets: Tensor, loss_fns: Sequence) -> Tuple[Tensor, List[Tensor]]:
        """:meth:`finish` from the (N,) similarity column of each pixel's prototype."""
        raise NotImplementedError

    def batch(self, pred: Tensor, assigned: Tensor,
              transport: Optional[Tensor]) -> PrototypeBatch:
        """What the bank learns from this step, over all N pixels.

        Args:
            pred (Tensor): Predicted class of each of the N pixels.
            assigned (Tensor): (Nv,) Sinkhorn's prototype of each labelled pixel.
            transport (Tensor, optional): (Nv, K) Sinkhorn's soft assignment.
        """
        return PrototypeBatch.from_labelled(self.emb.detach(), self.valid, self.labels,
                                            pred.view(-1), assigned, self.own, transport)


class EagerScores(TrainingScores):
    """Plain autograd over the (N, K*C) similarities; calls the loss modules.

    ``to_similarity`` maps the cosines to the similarity the head's ``distance`` option
    names (:func:`.prototype_similarity.similarity_from_cosine`); None: the cosine."""

    def __init__(self, emb: Tensor, protos: Tensor, labels: Tensor, ignore_index: int,
                 num_classes: int, num_prototypes: int,
                 to_similarity: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        super().__init__(emb, labels, ignore_index, num_classes, num_prototypes)
        self.sims = F.linear(emb, protos)
        if to_similarity is not None:
            self.sims = to_similarity(self.sims)
        self.own = similarity_slabs(self.sims.detach(), self.c, self.k)[self.valid, :,
                                                                        self.labels]

    def _finish(self, targets: Tensor, loss_fns: Sequence) -> Tuple[Tensor, List[Tensor]]:
        class_scores = similarity_slabs(self.sims, self.c, self.k).max(dim=1).values
        return class_scores, [fn(self.sims, targets) for fn in loss_fns]


class ReducedScores(TrainingScores):
    """The fused and streamed paths: per-pixel PPC and PPD terms (:meth:`terms`), reduced
    by the loss modules (``reduce``)."""

    def terms(self, targets: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Class scores (N, C) and the per-pixel PPC and PPD terms (N,)."""
        raise NotImplementedError

    def _finish(self, targets: Tensor, loss_fns: Sequence) -> Tuple[Tensor, List[Tensor]]:
        class_scores, terms = self.terms(targets)
        return class_scores, [fn.reduce(terms[fn.term], self.valid.numel())
                              for fn in loss_fns]


class FusedScores(ReducedScores):
    """:class:`FusedPrototypeScores`: one (N, K*C) buffer, the temperature folded into the
    prototypes."""

    def __init__(self, emb: Tensor, protos: Tensor, labels: Tensor, ignore_index: int,
                 num_classes: int, num_prototypes: int, inv_temperature: float) -> None:
        super().__init__(emb, labels, ignore_index, num_classes, num_prototypes)
        self.inv_t = inv_temperature
        self.scaled_protos = protos * inv_temperature if inv_temperature != 1.0 else protos
        with torch.no_grad():  # FusedPrototypeScores differentiates it itself
            self.scaled = F.linear(emb, self.scaled_protos)
        own = similarity_slabs(self.scaled, self.c, self.k)[self.valid, :, self.labels]
        self.own = own.mul_(1.0 / inv_temperature) if inv_temperature != 1.0 else own

    def terms(self, targets: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        class_scores, ppc, ppd = FusedPrototypeScores.apply(
            self.emb, self.scaled, self.scaled_protos, targets, self.c, self.k, self.inv_t)
        del self.scaled  # overwritten in place by FusedPrototypeScores
        return class_scores, dict(ppc=ppc, ppd=ppd)


class StreamedScores(ReducedScores):
    """:class:`ChunkedPrototypeScores`: the similarities in blocks of ``chunk`` pixels."""

    def __init__(self, emb: Tensor, protos: Tensor, labels: Tensor, ignore_index: int,
                 num_classes: int, num_prototypes: int, inv_temperature: float,
                 chunk: int) -> None:
        super().__init__(emb, labels, ignore_index, num_classes, num_prototypes)
        self.protos, self.inv_t = protos, inv_temperature
        self.class_scores, self.lse, own = ChunkedPrototypeScores.apply(
            emb, protos, labels.clamp(0, num_classes - 1), num_classes, num_prototypes,
            inv_temperature, chunk)
        self.own = own[self.valid]

    def terms(self, targets: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        target_sim = (self.emb * self.protos[targets.clamp(min=0)]).sum(dim=1).float()
        inside = targets >= 0
        return self.class_scores, dict(ppc=(self.lse - target_sim * self.inv_t) * inside,
                                       ppd=(1.0 - target_sim)**2 * inside)


class PrototypeScorer:
    """Pixel-prototype similarity and the max over each class's K prototypes.

    Args:
        distance (str): Pixel-prototype measure (:mod:`.prototype_similarity`): 'cosine',
            'standard' or 'huberized'. Default: 'cosine'.
        huber_delta (float): The huberized distance's delta. Default: 1.0.
        path (str): Training implementation: 'eager' (plain autograd, any prototype loss
            and distance), 'fused' (:class:`FusedScores`) or 'streamed'
            (:class:`StreamedScores`). Default: 'eager'.
        chunk (int, optional): Pixels per block of the streamed path. Default: None.
        inv_temperature (float): 1 / the PPC temperature, which the fused and streamed
            paths fold into the similarities. Default: 1.0.
        inference (str, optional): Force the path of :meth:`class_cosines`, 'slabs' or
            'blocks' (benchmarks, tests); None: chosen from the shapes by
            :func:`inference_path`. Default: None.
    """

    def __init__(self, distance: str = 'cosine', huber_delta: float = 1.0,
                 path: str = 'eager', chunk: Optional[int] = None,
                 inv_temperature: float = 1.0, inference: Optional[str] = None) -> None:
        if path not in PATHS or (path == 'streamed') != (chunk is not None):
            raise ValueError(f'PrototypeScorer: path={path!r}, chunk={chunk!r}: the path '
                             f"is one of {PATHS}, and a chunk goes with 'streamed' only")
        if inference is not None and inference not in INFERENCE_PATHS:
            raise ValueError(f'PrototypeScorer: inference={inference!r}: one of '
                             f'{INFERENCE_PATHS} or None (chosen from the shapes)')
        self.inference = inference
        self.distance = distance
        self.huber_delta = float(huber_delta)
        self.path = path
        self.chunk = chunk
        self.inv_temperature = inv_temperature

    @classmethod
    def from_options(cls, distance: str, huber_delta: float, fused_losses: bool,
                     similarity_chunk: Optional[int],
                     loss_proto: Sequence) -> 'PrototypeScorer':
        """The scorer of a ProtoHead's options (checked by the head).

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
                        ignore_index: int) -> TrainingScores:
        """The prototype-scores step of one training batch (see the module doc).

        Args:
            emb (Tensor): (N, D) unit pixel embeddings.
            prototypes (Tensor): (C, K, D) prototypes.
            labels (Tensor): (N,) class of each pixel, ``ignore_index`` where unlabelled.
            ignore_index (int): The label of unlabelled pixels.
        """
        c, k = prototypes.shape[:2]
        args = (emb, prototype_matrix(prototypes).to(emb.dtype), labels, ignore_index, c, k)
        if self.path == 'streamed':
            return StreamedScores(*args, self.inv_temperature, chunk=self.chunk)
        if self.path == 'fused':
            return FusedScores(*args, self.inv_temperature)
        return EagerScores(*args, to_similarity=None if self.distance == 'cosine'
                           else self.similarity)

    def class_scores(self, emb: Tensor, prototypes: Tensor) -> Tensor:
        """(..., C) differentiable class scores: the similarity of the nearest of each
        class's K prototypes, from the whole (..., K*C) similarity matrix."""
        c, k = prototypes.shape[:2]
        sims = self.similarity(F.linear(emb, prototype_matrix(prototypes).to(emb.dtype)))
        return similarity_slabs(sims, c, k).max(dim=-2).values

    def inference_path(self, num_classes: int, num_prototypes: int, dim: int,
                       device: torch.device) -> str:
        """The path of :meth:`class_cosines` for these shapes: ``self.inference`` when set,
        else :func:`inference_path` (the measured rule)."""
        if self.inference is not None:
            return self.inference
        return inference_path(num_classes, num_prototypes, dim, device)

    @torch.no_grad()
    def class_cosines(self, emb: Tensor, prototypes: Tensor) -> Tensor:
        """(..., C) cosine of the nearest of each class's K prototypes, for inference.

        The (pixels x C*K) matrix is never formed whole. Two paths, chosen from the shapes
        (:meth:`inference_path`), equal up to the GEMM's rounding (the max is exact):

        - ``'slabs'``: the K prototypes of every class one slab (C prototypes) at a time,
          with a running max; memory holds (pixels x C) scores (ADE20K-full: 847 instead
          of 8470 per pixel);
        - ``'blocks'``: blocks of pixels against all C*K prototypes at once (one wider
          GEMM), the max over K taken while the (block x C*K) similarities are in cache;
          memory holds one block (:func:`pixel_block`).

        While exporting (TorchScript, ONNX, torch.export, torch.compile) the slabs are
        used: a loop over pixel blocks would be unrolled for the traced image size.
        """
        flat = emb.reshape(-1, emb.shape[-1])
        c, k = prototypes.shape[:2]
        matrix = prototype_matrix(prototypes).to(emb.dtype)  # (K*C, D), rows k * C + c
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
            or torch.compiler.is_compiling()
        # Buffers reused through out= (no fresh allocation per slab or block); autocast does
        # not take out= arguments, and exporters take neither out= nor in place.
        reuse = not (exporting or torch.is_autocast_enabled(emb.device.type))
        blocks = self.inference_path(c, k, flat.shape[1], emb.device) == 'blocks'
        if blocks and not exporting and flat.shape[0]:
            scores = self._class_cosines_blocks(flat, matrix, c, k, reuse)
        else:
            scores = self._class_cosines_slabs(flat, matrix, c, k, reuse)
        return scores.view(*emb.shape[:-1], c)

    @staticmethod
    def _class_cosines_slabs(flat: Tensor, matrix: Tensor, c: int, k: int,
                             reuse: bool) -> Tensor:
        """(N, C) running max over the K (C, D) slabs of ``matrix``."""
        slabs = similarity_slabs(matrix, c, k, dim=0)  # (K, C, D)
        class_scores = F.linear(flat, slabs[0])
        buf = torch.empty_like(class_scores) if reuse else None
        for slab in slabs[1:]:
            if reuse:
                torch.maximum(class_scores, torch.mm(flat, slab.T, out=buf),
                              out=class_scores)
            else:
                class_scores = torch.maximum(class_scores, F.linear(flat, slab))
        return class_scores

    @staticmethod
    def _class_cosines_blocks(flat: Tensor, matrix: Tensor, c: int, k: int,
                              reuse: bool) -> Tensor:
        """(N, C) max over K of (block x K*C) similarities, one block of pixels at a
        time (never while exporting: the loop runs over the pixel count)."""
        n = flat.shape[0]
        block = min(n, pixel_block(c * k, matrix.element_size()))
        scores: Optional[Tensor] = None
        buf = flat.new_empty(block, k * c) if reuse else None
        for start in range(0, n, block):
            end = min(start + block, n)
            if reuse:
                sims = torch.mm(flat[start:end], matrix.T, out=buf[:end - start])
            else:  # autocast: the GEMM's dtype is autocast's
                sims = F.linear(flat[start:end], matrix)
            if scores is None:
                scores = sims.new_empty(n, c)
            torch.amax(similarity_slabs(sims, c, k), dim=-2, out=scores[start:end])
        return scores

    @staticmethod
    def cosines(emb: Tensor, prototypes: Tensor) -> Tensor:
        """(..., C, K) cosine of every pixel to every prototype, in the buffer's order.

        Args:
            emb (Tensor): (..., D) unit pixel embeddings.
            prototypes (Tensor): (C, K, D) unit prototypes.
        """
        c, k, d = prototypes.shape
        return F.linear(emb, prototypes.reshape(c * k, d).to(emb.dtype)).unflatten(-1, (c, k))
