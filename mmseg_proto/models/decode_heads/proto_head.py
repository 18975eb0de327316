"""ProtoSeg decode head: nonparametric prototypes on top of any decoder."""
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.model.weight_init import trunc_normal_
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS
from mmseg.utils import ConfigType, SampleList
from torch import Tensor

from ..losses import PixelPrototypeContrastLoss, PixelPrototypeDistanceLoss
from ..utils.l2_normalize import l2_normalize
from ..utils.proto_head_options import check_decoder, check_options
from ..utils.prototype_index import (buffer_index, prototype_matrix,
                                     similarity_column)
from ..utils.prototype_distance import similarity_from_cosine
from ..utils.prototype_scores import SCORE_PATHS, EagerScores, StreamedScores
from ..utils.prototype_statistics import (PrototypeStatistics,
                                          assignment_statistics,
                                          usage_statistics)
from ..utils.sinkhorn import sinkhorn_knopp

HOOK_HINT = ("add the prototype update hook to the config: "
             "custom_hooks = [dict(type='PrototypeUpdateHook')]")


@MODELS.register_module()
class ProtoHead(BaseDecodeHead):
    """ProtoSeg head ("Rethinking Semantic Segmentation: A Prototype View").

    Wraps any MMSeg decode head (``decoder``) and replaces its learnable
    classifier with ``num_classes x num_prototypes`` non-learnable prototypes
    on the unit sphere. Per pixel: decoder features -> ``projection`` ->
    LayerNorm (``feat_norm``) -> L2 normalisation over channels; the class
    score is the max over the class's K cosine similarities, followed by a
    LayerNorm over classes (``mask_norm``). During training the pixels of
    each class are clustered onto the class's prototypes by Sinkhorn-Knopp
    (the targets of the prototype losses), and the head collects, per
    prototype, the sum and count of the embeddings of correctly classified
    pixels; :class:`PrototypeUpdateHook` all-reduces them and applies the
    momentum update after the optimizer step.

    Args:
        decoder (dict): Config of the MMSeg decode head whose features (the
            input of its ``conv_seg``) are used, e.g.
            ``dict(type='SegformerHead', in_channels=[...], ...)``. Its
            ``num_classes`` is set from this head; its classifier is dropped.
        num_classes (int): Number of classes C.
        embed_dims (int, optional): Embedding size D. Defaults to the
            decoder's ``channels``; must equal it when ``projection='none'``.
        projection (str): 'none' (decoder features are the embedding; adds no
            parameters, which is the setting that matches the paper's
            parameter counts), 'linear' (one 1x1 conv) or 'mlp' (1x1 conv,
            ReLU, 1x1 conv, as in the authors' HRNet code). Default: 'none'.
        num_prototypes (int): Prototypes per class K. Default: 10.
        momentum (float): Prototype EMA momentum mu in [0, 1]. Default: 0.999.
        sinkhorn_epsilon (float): Sinkhorn entropy weight. Default: 0.05.
        sinkhorn_iters (int): Sinkhorn iterations. Default: 3.
        sync_sinkhorn (bool): In multi-process training, solve the
            clustering over the global batch (all-reduces of (C, K) marginals
            inside Sinkhorn), so the assignments, and hence losses and
            prototype updates, do not depend on how the batch is split over
            processes. False: each process clusters its own pixels, as the
            authors' code does. Default: True.
        fused_losses (bool): When the prototype losses are at most one
            ``PixelPrototypeContrastLoss`` and one
            ``PixelPrototypeDistanceLoss``, compute them and the class scores
            with :class:`FusedPrototypeScores` (the same values and gradients
            up to float rounding, one (N, C*K) buffer reused in place, fewer
            passes over it; back-propagating twice through one step, e.g.
            ``retain_graph=True``, needs False). Default: True.
        similarity_chunk (int, optional): Pixels per block of the (pixels x
            C*K) similarity matrix in training. None (default): the whole
            batch at once (fastest). An int streams it through
            :class:`ChunkedPrototypeScores`: memory holds one (chunk, C*K)
            block, at the cost of one more matmul (for large C*K, e.g.
            ADE20K-full 847 x 10, when memory is tight). Needs the standard
            PPC/PPD losses.
        distance (str): Pixel-prototype measure used by the class scores,
            the clustering and the losses: 'cosine' (the paper's; default),
            'standard' (Euclidean) or 'huberized' (Huber of the Euclidean
            distance), as defined in :mod:`..utils.prototype_distance` (the
            paper's Table 5(d) names them without definitions). Other than
            'cosine' runs the plain-autograd scores path (no fused or
            streamed path).
        huber_delta (float): Where the huberized distance turns from
            quadratic to linear (unit vectors: distances in [0, 2]).
            Default: 1.0.
        reference_width_norm (bool): Reproduce the authors' code, which
            L2-normalises the projection output over the image *width* axis
            before ``feat_norm``. Only for running converted authors'
            checkpoints. Default: False (the paper's definition).
        load_prototypes (bool): Load ``prototypes`` from checkpoints. False
            keeps this head's freshly initialised prototypes whatever a
            loaded state dict holds, to fine-tune a ProtoSeg checkpoint on
            another class set or K (``load_from``: everything else loads,
            and mmengine's non-strict load re-initialises the mismatched
            ``mask_norm`` with a warning). Never for ``--resume``.
            Default: True.
        loss_decode (dict | list[dict]): Losses. Pixel losses (e.g.
            ``CrossEntropyLoss``) act on the segmentation logits; prototype
            losses (``PixelPrototypeContrastLoss``,
            ``PixelPrototypeDistanceLoss``) on prototype similarities and
            Sinkhorn targets. Default: CE + PPC (0.01) + PPD (0.001).
        init_cfg (dict, optional): Initialisation config. Default: None.
        **kwargs: Other :class:`BaseDecodeHead` arguments (``ignore_index``,
            ``align_corners``, ``sampler``, ...). ``align_corners`` defaults
            to the decoder's.
    """

    def __init__(self,
                 decoder: ConfigType,
                 num_classes: int,
                 embed_dims: Optional[int] = None,
                 projection: str = 'none',
                 num_prototypes: int = 10,
                 momentum: float = 0.999,
                 sinkhorn_epsilon: float = 0.05,
                 sinkhorn_iters: int = 3,
                 sync_sinkhorn: bool = True,
                 fused_losses: bool = True,
                 similarity_chunk: Optional[int] = None,
                 distance: str = 'cosine',
                 huber_delta: float = 1.0,
                 reference_width_norm: bool = False,
                 load_prototypes: bool = True,
                 loss_decode: ConfigType = (
                     dict(type='CrossEntropyLoss', loss_weight=1.0),
                     dict(type='PixelPrototypeContrastLoss', loss_weight=0.01),
                     dict(type='PixelPrototypeDistanceLoss',
                          loss_weight=0.001)),
                 init_cfg: Optional[ConfigType] = None,
                 **kwargs) -> None:
        check_options(num_classes=num_classes, embed_dims=embed_dims,
                      projection=projection, num_prototypes=num_prototypes,
                      momentum=momentum, sinkhorn_epsilon=sinkhorn_epsilon,
                      sinkhorn_iters=sinkhorn_iters, sync_sinkhorn=sync_sinkhorn,
                      fused_losses=fused_losses,
                      similarity_chunk=similarity_chunk,
                      distance=distance, huber_delta=huber_delta,
                      reference_width_norm=reference_width_norm,
                      load_prototypes=load_prototypes)
        decoder = copy.deepcopy(dict(check_decoder(decoder)))
        decoder['num_classes'] = num_classes
        decoder.pop('loss_decode', None)
        decoder_module = MODELS.build(decoder)
        feat_dims = decoder_module.channels
        embed_dims = feat_dims if embed_dims is None else embed_dims
        if projection == 'none' and embed_dims != feat_dims:
            raise ValueError(
                f'ProtoHead: embed_dims={embed_dims} does not match the '
                f"decoder's channels={feat_dims}; with projection='none' the "
                'decoder features are the embedding: set embed_dims='
                f"{feat_dims} (or None), or use projection='linear'/'mlp'")
        kwargs.setdefault('align_corners', decoder_module.align_corners)
        super().__init__(
            in_channels=feat_dims,
            channels=embed_dims,
            num_classes=num_classes,
            dropout_ratio=0,
            loss_decode=list(loss_decode) if isinstance(
                loss_decode, tuple) else loss_decode,
            init_cfg=init_cfg,
            **kwargs)
        if self.out_channels != num_classes:
            raise ValueError('ProtoHead does not support out_channels=1 '
                             '(binary sigmoid) heads; use num_classes=2')
        # This head classifies by prototypes: drop the learnable classifiers
        # (ours and the decoder's); the decoder keeps its dropout.
        del self.conv_seg
        decoder_module.conv_seg = nn.Identity()
        self.decoder = decoder_module
        self._split_losses()

        self.num_prototypes = num_prototypes
        self.momentum = momentum
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iters = sinkhorn_iters
        self.sync_sinkhorn = sync_sinkhorn
        types = [type(m) for m in self.loss_proto]
        standard = len(types) == len(set(types)) and set(types) <= {
            PixelPrototypeContrastLoss, PixelPrototypeDistanceLoss}
        self.distance = distance
        self.huber_delta = float(huber_delta)
        self.fused_losses = fused_losses and standard and distance == 'cosine'
        # The implementation of the prototype-scores step (see
        # mmseg_proto/models/utils/prototype_scores.py), chosen once.
        self.scores_path = 'streamed' if similarity_chunk else (
            'fused' if self.fused_losses else 'eager')
        if similarity_chunk is not None and not standard:
            raise ValueError(
                f'ProtoHead: similarity_chunk={similarity_chunk!r} needs the '
                'standard prototype losses (at most one '
                'PixelPrototypeContrastLoss and one PixelPrototypeDistanceLoss)')
        if similarity_chunk is not None and distance != 'cosine':
            raise ValueError(
                f'ProtoHead: similarity_chunk={similarity_chunk!r} needs '
                f"distance='cosine' (got {distance!r}); set "
                'similarity_chunk=None')
        self.similarity_chunk = similarity_chunk
        self.reference_width_norm = reference_width_norm
        self.load_prototypes = load_prototypes
        self.projection_type = projection
        if projection == 'none':
            self.projection = nn.Identity()
        elif projection == 'linear':
            self.projection = nn.Conv2d(feat_dims, embed_dims, 1)
        else:
            self.projection = nn.Sequential(
                nn.Conv2d(feat_dims, feat_dims, 1), nn.ReLU(inplace=True),
                nn.Conv2d(feat_dims, embed_dims, 1))
        self.feat_norm = nn.LayerNorm(embed_dims)
        self.mask_norm = nn.LayerNorm(num_classes)
        prototypes = torch.zeros(num_classes, num_prototypes, embed_dims)
        trunc_normal_(prototypes, std=0.02)
        self.register_buffer('prototypes', F.normalize(prototypes, dim=-1))
        # The statistics of the last `loss` call, until PrototypeUpdateHook
        # takes them (`take_statistics`). The hook sets `collect_assignments`
        # on the iterations it logs, to add the Sinkhorn diagnostics.
        self._statistics: Optional[PrototypeStatistics] = None
        self.collect_assignments = False
        # Set by PrototypeUpdateHook while it re-seeds unused prototypes.
        self.collect_usage = False

    def _split_losses(self) -> None:
        """Separate prototype losses from pixel (segmentation) losses."""
        losses = self.loss_decode if isinstance(
            self.loss_decode, nn.ModuleList) else [self.loss_decode]
        pixel = [m for m in losses if not getattr(m, 'is_prototype_loss', 0)]
        if not pixel:
            raise ValueError('ProtoHead: loss_decode needs a pixel loss on '
                             "the segmentation logits, e.g. dict(type="
                             "'CrossEntropyLoss'), beside the prototype losses")
        self.loss_decode = nn.ModuleList(pixel)
        self.loss_proto = nn.ModuleList(
            m for m in losses if getattr(m, 'is_prototype_loss', False))

    def embed(self, inputs: Sequence[Tensor]) -> Tensor:
        """Unit-norm pixel embeddings, channel-last: (B, H, W, D)."""
        emb = self.projection(self.decoder(inputs))
        if self.reference_width_norm:
            emb = F.normalize(emb, dim=-1)
        emb = self.feat_norm(emb.permute(0, 2, 3, 1))
        return l2_normalize(emb)

    def _prototype_matrix(self, dtype: torch.dtype) -> Tensor:
        """Prototypes as a (K*C, D) matrix, row ``k * C + c``.

        Similarity columns are thus prototype-major, so the max over each
        class's K prototypes is an elementwise max of K contiguous (.., C)
        slices, which vectorises, instead of a reduction over runs of K.
        """
        return prototype_matrix(self.prototypes).to(dtype)

    def _seg_logits(self, class_scores: Tensor,
                    contiguous: bool = True) -> Tensor:
        """(B,H,W,C) class scores -> (B,C,H,W) seg logits.

        ``contiguous=True`` (training) copies them to contiguous NCHW at the
        decoder's resolution: the label-sized upsampling, cross-entropy and
        their backward run faster on NCHW than on channels-last on CPU.
        ``contiguous=False`` (inference) returns the channels-last view
        without a copy, the layout a 1x1 ``conv_seg`` produces, on which the
        upsampling and argmax of prediction are faster.
        """
        logits = self.mask_norm(class_scores).permute(0, 3, 1, 2)
        return logits.contiguous() if contiguous else logits

    def _scores(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """Embeddings (B,H,W,D), prototype similarities (B,H,W,K*C) and
        segmentation logits (B,C,H,W)."""
        emb = self.embed(inputs)
        sims = self._similarity(F.linear(emb, self._prototype_matrix(emb.dtype)))
        c, k = self.num_classes, self.num_prototypes
        class_scores = sims.unflatten(-1, (k, c)).max(dim=-2).values
        return emb, sims, self._seg_logits(class_scores)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """Segmentation logits (B, C, H, W) at the decoder's resolution.

        Without autograd (inference) the (pixels x C*K) similarity matrix
        is never formed: the K prototypes of every class are taken one slab
        (C prototypes) at a time and a running max is kept, so memory holds
        (pixels x C) scores (ADE20K-full: 847 instead of 8470 per pixel) and
        no (pixels x C*K) tensor is written and read back.
        """
        if torch.is_grad_enabled():
            return self._scores(inputs)[2]
        return self._seg_logits(self._similarity(self._class_scores(inputs)),
                                contiguous=False)

    def predict_with_anomaly(self, inputs: Sequence[Tensor],
                             batch_img_metas: List[dict],
                             test_cfg: ConfigType) -> Tensor:
        """Segmentation logits and the anomaly map, resized to the input.

        The anomaly score of a pixel is ``1 - max cosine similarity`` to any
        prototype of any class (before the LayerNorm over classes): 0 on a
        prototype, up to 2 opposite to all of them; higher = farther from
        everything seen in training.

        Returns:
            Tensor: (B, C + 1, H, W): the C segmentation logits of
            :meth:`predict`, then the anomaly map as channel C.
        """
        cosines = self._class_scores(inputs)  # (B, h, w, C)
        anomaly = 1.0 - cosines.amax(dim=-1, keepdim=True)
        stacked = torch.cat(
            [self.mask_norm(self._similarity(cosines)), anomaly], dim=-1)
        return self.predict_by_feat(stacked.permute(0, 3, 1, 2),
                                    batch_img_metas)

    def _similarity(self, cosines: Tensor) -> Tensor:
        """The ``distance`` option's similarity of unit vectors with these
        cosines (monotone in the cosine, so it commutes with max over K)."""
        return similarity_from_cosine(cosines, self.distance, self.huber_delta)

    @torch.no_grad()
    def _class_scores(self, inputs: Sequence[Tensor]) -> Tensor:
        """(B, H, W, C) max over each class's K prototype cosines, without
        forming the (pixels x C*K) matrix (see :meth:`forward`)."""
        emb = self.embed(inputs)
        flat = emb.view(-1, emb.shape[-1])
        slabs = prototype_matrix(self.prototypes).to(emb.dtype).view(
            self.num_prototypes, self.num_classes, -1)  # (K, C, D)
        class_scores = F.linear(flat, slabs[0])
        # One (pixels x C) buffer for every slab (no fresh allocation per
        # slab); autocast does not take out= arguments, and exporters
        # (TorchScript, ONNX, torch.export) take neither out= nor in place.
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

    def loss(self, inputs: Sequence[Tensor], batch_data_samples: SampleList,
             train_cfg: ConfigType) -> Dict[str, Tensor]:
        """Losses for one batch; also collects the prototype statistics."""
        self._check_statistics_taken()
        seg_label = self._stack_batch_gt(batch_data_samples)
        self._check_labels(seg_label)
        emb = self.embed(inputs)  # (B, H, W, D) unit vectors
        flat_emb = emb.reshape(-1, emb.shape[-1])
        labels = F.interpolate(seg_label.float(), size=emb.shape[1:3],
                               mode='nearest').long().view(-1)
        valid = torch.nonzero(labels != self.ignore_index).squeeze(1)
        scores = self._scores_path(flat_emb, labels, valid)
        assign, transport = sinkhorn_knopp(
            scores.own, labels[valid], self.num_classes, self.sinkhorn_epsilon,
            self.sinkhorn_iters, distributed=self.sync_sinkhorn,
            return_transport=self.collect_assignments)
        targets = torch.full_like(labels, -1)  # -1: ignored, never a column
        targets[valid] = similarity_column(labels[valid], assign,
                                           self.num_classes)
        class_scores, proto_losses = scores.finish(targets, self.loss_proto,
                                                   valid.numel())
        pred, losses = self._losses(class_scores.view(*emb.shape[:3], -1),
                                    proto_losses, batch_data_samples)
        self._statistics = self._update_statistics(
            flat_emb, labels[valid], valid, pred, assign, scores.own, transport)
        return losses

    def _check_statistics_taken(self) -> None:
        if self._statistics is not None:
            raise RuntimeError(
                'ProtoHead: the prototype statistics of the previous training '
                'iteration were never applied, so the prototypes would never '
                f'be updated; {HOOK_HINT}')

    def _scores_path(self, flat_emb: Tensor, labels: Tensor, valid: Tensor):
        """The prototype-scores step, as chosen at construction."""
        ppc = next((m for m in self.loss_proto
                    if isinstance(m, PixelPrototypeContrastLoss)), None)
        inv_t = 1.0 / ppc.temperature if ppc is not None else 1.0
        args = (flat_emb, self._prototype_matrix(flat_emb.dtype), labels, valid,
                self.num_classes, self.num_prototypes, inv_t)
        if self.scores_path == 'streamed':
            return StreamedScores(*args, chunk=self.similarity_chunk)
        if self.distance != 'cosine':
            return EagerScores(*args, to_similarity=self._similarity)
        return SCORE_PATHS[self.scores_path](*args)

    def _losses(self, class_scores: Tensor, proto_losses: Sequence[Tensor],
                batch_data_samples: SampleList
                ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Predicted classes (B, H, W) and the loss dict: MMSeg's pixel losses
        on the segmentation logits (``mask_norm`` of the (B, H, W, C) class
        scores), plus the prototype losses under their names."""
        normed = self.mask_norm(class_scores)  # (B, H, W, C)
        # Predictions from the channels-last logits: a contiguous argmax.
        pred = normed.detach().argmax(dim=-1)
        seg_logits = normed.permute(0, 3, 1, 2).contiguous()  # see _seg_logits
        losses = self.loss_by_feat(seg_logits, batch_data_samples)
        for loss_fn, value in zip(self.loss_proto, proto_losses):
            name = loss_fn.loss_name
            losses[name] = losses[name] + value if name in losses else value
        return pred, losses

    @torch.no_grad()
    def _update_statistics(self, flat_emb: Tensor, labels_v: Tensor,
                           valid: Tensor, pred: Tensor, assign: Tensor,
                           own: Tensor, transport: Optional[Tensor]
                           ) -> PrototypeStatistics:
        """Per prototype (buffer order ``c * K + k``), the sum and count of
        the embeddings of the correctly classified pixels assigned to it."""
        c, k = self.num_classes, self.num_prototypes
        correct = pred.view(-1)[valid] == labels_v
        emb = flat_emb[valid[correct]].float()
        proto_index = buffer_index(labels_v, assign, k)
        hit = proto_index[correct]
        sums = emb.new_zeros(c * k, emb.shape[1]).index_add_(0, hit, emb)
        # A non-finite labelled pixel corrupts the Sinkhorn assignment of its
        # whole class even when it is not counted as correct: make the sums
        # non-finite so that PrototypeUpdateHook skips the update (on every
        # rank, after its all-reduce); no host sync.
        sums = torch.where(torch.isfinite(own).all(), sums, float('nan'))
        counts = torch.bincount(hit, minlength=c * k).to(emb.dtype)
        assignments = assignment_statistics(
            labels_v, proto_index, transport, own, c, k) \
            if self.collect_assignments else None
        usage = usage_statistics(labels_v, own, correct, emb, c, k) \
            if self.collect_usage else None
        return PrototypeStatistics(sums, counts, assignments, usage)

    def _check_labels(self, seg_label: Tensor) -> None:
        """Raise on label values that are neither a class nor ignored."""
        bad = (seg_label != self.ignore_index) & (
            (seg_label < 0) | (seg_label >= self.num_classes))
        if bool(bad.any()):
            values = torch.unique(seg_label[bad])[:10].tolist()
            raise ValueError(
                f'ProtoHead: label values {values} are outside [0, '
                f'{self.num_classes}) and are not ignore_index='
                f'{self.ignore_index}; fix the annotations or the dataset '
                "pipeline, or set the head's num_classes/ignore_index")

    @torch.no_grad()
    def reseed_prototypes(self, nearest: Tensor, outlier_sums: Tensor,
                          outlier_weights: Tensor,
                          min_share: float) -> List[Tuple[int, int]]:
        """Move each class's least used prototype onto its worst-served pixels.

        For every class whose least used prototype is the nearest one for
        fewer than ``min_share`` of the class's pixels (a dead or duplicate
        prototype at inference), that prototype becomes the normalised
        distance-weighted mean of the class's correctly classified
        embeddings (:func:`~mmseg_proto.models.utils.prototype_statistics.usage_statistics`); one prototype per
        class per call, the others stay bit-identical. Deterministic: the
        same statistics give the same prototypes on every process.

        Returns:
            list[tuple[int, int]]: (class, prototype) of each re-seeded one.
        """
        c, k, _ = self.prototypes.shape
        usage = nearest.view(c, k)
        pixels = usage.sum(dim=1)
        least, which = (usage / pixels.clamp(min=1)[:, None]).min(dim=1)
        chosen = (pixels > 0) & (outlier_weights > 0) & (least < min_share)
        classes = torch.nonzero(chosen).flatten()
        self.prototypes[classes, which[classes]] = F.normalize(
            outlier_sums[classes].to(self.prototypes.dtype), dim=1)
        return list(zip(classes.tolist(), which[classes].tolist()))

    def take_statistics(self) -> Optional[PrototypeStatistics]:
        """Take the :class:`PrototypeStatistics` of the last ``loss`` call
        (None if there was none since the last take)."""
        stats, self._statistics = self._statistics, None
        return stats

    @torch.no_grad()
    def update_prototypes(self, sums: Tensor, counts: Tensor) -> Tensor:
        """Momentum update from per-prototype embedding sums and counts.

        ``p <- normalise(mu * p + (1 - mu) * normalise(sum))`` for every
        prototype with ``count > 0``; the others stay bit-identical.

        Args:
            sums (Tensor): (C*K, D) sums of assigned, correctly classified
                pixel embeddings (already all-reduced across processes).
            counts (Tensor): (C*K,) their numbers.

        Returns:
            Tensor: (C*K,) bool mask of the prototypes that were updated.
        """
        c, k, d = self.prototypes.shape
        if sums.shape != (c * k, d) or counts.shape != (c * k, ):
            raise ValueError(f'ProtoHead: statistics of shape '
                             f'{tuple(sums.shape)}/{tuple(counts.shape)} do '
                             f'not fit prototypes of shape {(c, k, d)}')
        protos = self.prototypes.view(c * k, d)
        idx = torch.nonzero(counts > 0).squeeze(1)
        means = F.normalize(sums[idx].to(protos.dtype), dim=1)
        moved = protos[idx].lerp_(means, 1.0 - self.momentum)
        protos.index_copy_(0, idx, F.normalize(moved, dim=1))
        return counts > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Keep the prototypes with ``load_prototypes=False``; refuse
        prototypes of another shape with a message saying what to change."""
        key = prefix + 'prototypes'
        if key in state_dict and not self.load_prototypes:
            print_log(f'ProtoHead: load_prototypes=False, keeping the initial '
                      f'prototypes instead of the loaded {key} of shape '
                      f'{tuple(state_dict[key].shape)}', logger='current')
            state_dict = dict(state_dict)
            state_dict[key] = self.prototypes.clone()
        elif key in state_dict and \
                state_dict[key].shape != self.prototypes.shape:
            c, k, d = state_dict[key].shape if state_dict[key].dim() == 3 \
                else (None, None, None)
            raise RuntimeError(
                f'ProtoHead: the checkpoint holds prototypes of shape '
                f'{tuple(state_dict[key].shape)} (num_classes={c}, '
                f'num_prototypes={k}, embed_dims={d}) but this model has '
                f'{tuple(self.prototypes.shape)}. To continue or evaluate '
                "that model, set the head's num_classes / num_prototypes / "
                'embed_dims to match the checkpoint. To fine-tune it on '
                'another class set or K, set load_prototypes=False in the '
                'head (model.decode_head.load_prototypes=False): the '
                'prototypes start fresh and everything else loads')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

