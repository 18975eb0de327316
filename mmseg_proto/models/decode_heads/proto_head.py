"""ProtoSeg decode head: nonparametric prototypes on top of any decoder."""
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS
from mmseg.utils import ConfigType, OptConfigType, SampleList
from torch import Tensor

from ..utils.autograd_functions import l2_normalize
from ..utils.prototype_bank import PrototypeBank
from ..utils.prototype_scorer import PrototypeScorer, TrainingScores
from ..utils.sinkhorn import sinkhorn_knopp
from .proto_head_options import (HEAD_RULES, check_decoder, check_embed_dims,
                                 check_mask_norm_classes, check_options, check_out_channels,
                                 check_similarity_chunk, split_losses)

DEFAULT_LOSSES = (dict(type='CrossEntropyLoss', loss_weight=1.0),
                  dict(type='PixelPrototypeContrastLoss', loss_weight=0.01),
                  dict(type='PixelPrototypeDistanceLoss', loss_weight=0.001))


@MODELS.register_module()
class ProtoHead(BaseDecodeHead):
    """ProtoSeg head ("Rethinking Semantic Segmentation: A Prototype View").

    Wraps any MMSeg decode head (``decoder``) and replaces its learnable classifier with
    ``num_classes x num_prototypes`` non-learnable prototypes on the unit sphere, held by a
    :class:`~..utils.prototype_bank.PrototypeBank` (``bank``). Per pixel: decoder features
    -> ``projection`` -> LayerNorm (``feat_norm``) -> L2 normalisation over channels; the
    class score is the max over the class's K similarities (``scorer``, a
    :class:`~..utils.prototype_scorer.PrototypeScorer`), followed by a LayerNorm over
    classes (``mask_norm``). During training the pixels of each class are clustered onto
    the class's prototypes by Sinkhorn-Knopp (the targets of the prototype losses), and
    the head hands the bank the batch's statistics; :class:`PrototypeUpdateHook` has the
    bank sum them over processes and apply the momentum update after the optimizer step.

    Args:
        decoder (dict): Config of the MMSeg decode head whose features (the input of its
            ``conv_seg``) are used, e.g. ``dict(type='SegformerHead', ...)``. Its
            ``num_classes`` is set from this head; its classifier is dropped.
        num_classes (int): Number of classes C.
        embed_dims (int, optional): Embedding size D. Defaults to the decoder's
            ``channels``; must equal it when ``projection='none'``.
        projection (str): 'none' (decoder features are the embedding; adds no parameters,
            the setting that matches the paper's parameter counts), 'linear' (one 1x1
            conv) or 'mlp' (1x1 conv, ReLU, 1x1 conv, as in the authors' HRNet code).
            Default: 'none'.
        num_prototypes (int): Prototypes per class K. Default: 10.
        momentum (float): Prototype EMA momentum mu in [0, 1]. Default: 0.999.
        sinkhorn_epsilon (float): Sinkhorn entropy weight. Default: 0.05.
        sinkhorn_iters (int): Sinkhorn iterations. Default: 3.
        sync_sinkhorn (bool): In multi-process training, solve the clustering over the
            global batch (all-reduces of (C, K) marginals inside Sinkhorn), so that the
            assignments, losses and prototype updates do not depend on how the batch is
            split over processes. False: each process clusters its own pixels, as the
            authors' code does. Default: True.
        fused_losses (bool): When the prototype losses are at most one
            ``PixelPrototypeContrastLoss`` and one ``PixelPrototypeDistanceLoss``, compute
            them and the class scores with :class:`FusedPrototypeScores` (the same values
            and gradients up to float rounding, one (N, C*K) buffer reused in place;
            back-propagating twice through one step, e.g. ``retain_graph=True``, needs
            False). Default: True.
        similarity_chunk (int, optional): Pixels per block of the (pixels x C*K)
            similarity matrix in training. None (default): the whole batch at once
            (fastest). An int streams it through :class:`ChunkedPrototypeScores`: memory
            holds one (chunk, C*K) block, at the cost of one more matmul (for large C*K,
            e.g. ADE20K-full 847 x 10). Needs the standard PPC/PPD losses and the cosine.
        distance (str): Pixel-prototype measure of the class scores, the clustering and
            the losses: 'cosine' (the paper's; default), 'standard' (Euclidean) or
            'huberized', as defined in :mod:`..utils.prototype_similarity` (the paper's
            Table 5(d) names them without definitions). Other than 'cosine' runs the
            plain-autograd scores path.
        huber_delta (float): Where the huberized distance turns from quadratic to linear,
            in (0, 2]: distances between unit vectors are at most 2, so a larger delta
            leaves only a shrunk quadratic and is refused. Default: 1.0.
        reference_width_norm (bool): Reproduce the authors' code, which L2-normalises the
            projection output over the image *width* axis before ``feat_norm``. Only for
            running converted authors' checkpoints. Default: False.
        mask_norm_classes (int, optional): How many classes (the first ones) set the
            mean and variance of the LayerNorm over classes (``mask_norm``); the scores of
            the others are normalised with the same statistics. Written by
            :func:`mmseg_proto.apis.add_classes`, so that classes added to a trained model
            leave the logits of the classes it was trained with bit-identical. None
            (default): all classes.
        load_prototypes (bool): Load ``prototypes`` from checkpoints. False keeps this
            head's freshly initialised prototypes whatever a loaded state dict holds, to
            fine-tune a ProtoSeg checkpoint on another class set or K (``load_from``:
            everything else loads, and mmengine's non-strict load re-initialises the
            mismatched ``mask_norm`` with a warning). Never for ``--resume``: resuming
            restores the checkpoint's prototypes whatever this says (PrototypeUpdateHook
            tells the bank). Loaded prototypes must be finite unit vectors
            (:meth:`PrototypeBank.load`). Default: True.
        loss_decode (dict | list[dict]): Losses. Pixel losses (e.g. ``CrossEntropyLoss``)
            act on the segmentation logits; prototype losses (``PixelPrototypeContrastLoss``,
            ``PixelPrototypeDistanceLoss``) on prototype similarities and Sinkhorn targets.
            Default: CE + PPC (0.01) + PPD (0.001).
        init_cfg (dict, optional): Initialisation config. Default: None.
        **kwargs: Other :class:`BaseDecodeHead` arguments (``ignore_index``,
            ``align_corners``, ``sampler``, ...). ``align_corners`` defaults to the
            decoder's.
    """

    def __init__(self, decoder: ConfigType, num_classes: int,
                 embed_dims: Optional[int] = None,
                 projection: str = 'none', num_prototypes: int = 10,
                 momentum: float = 0.999, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_iters: int = 3, sync_sinkhorn: bool = True,
                 fused_losses: bool = True, similarity_chunk: Optional[int] = None,
                 distance: str = 'cosine', huber_delta: float = 1.0,
                 reference_width_norm: bool = False, load_prototypes: bool = True,
                 mask_norm_classes: Optional[int] = None,
                 loss_decode: ConfigType = DEFAULT_LOSSES,
                 init_cfg: OptConfigType = None, **kwargs) -> None:
        given = locals()
        check_options('ProtoHead', HEAD_RULES, **{key: given[key] for key in HEAD_RULES})
        check_out_channels(kwargs.get('out_channels'), num_classes)
        check_mask_norm_classes(mask_norm_classes, num_classes)
        decoder = _build_decoder(decoder, num_classes)
        embed_dims = check_embed_dims(embed_dims, decoder.channels, projection)
        kwargs.setdefault('align_corners', decoder.align_corners)
        super().__init__(in_channels=decoder.channels, channels=embed_dims,
                         num_classes=num_classes, dropout_ratio=0, init_cfg=init_cfg,
                         loss_decode=list(loss_decode) if isinstance(loss_decode, tuple)
                         else loss_decode, **kwargs)
        # This head classifies by prototypes: drop the learnable classifiers (ours and
        # the decoder's); the decoder keeps its dropout.
        del self.conv_seg
        decoder.conv_seg = nn.Identity()
        self.decoder = decoder
        self.loss_decode, self.loss_proto = split_losses(self.loss_decode)
        check_similarity_chunk(similarity_chunk, distance, self.loss_proto)
        self.num_prototypes = num_prototypes
        self.sinkhorn_epsilon, self.sinkhorn_iters = sinkhorn_epsilon, sinkhorn_iters
        self.sync_sinkhorn = sync_sinkhorn
        self.scorer = PrototypeScorer.from_options(distance, huber_delta, fused_losses,
                                                   similarity_chunk, self.loss_proto)
        self.reference_width_norm = reference_width_norm
        self.projection_type = projection
        self.projection = _projection(projection, decoder.channels, embed_dims)
        self.feat_norm = nn.LayerNorm(embed_dims)
        self.mask_norm_classes = mask_norm_classes
        self.mask_norm = nn.LayerNorm(num_classes) if mask_norm_classes in (
            None, num_classes) else BaseClassesLayerNorm(num_classes, mask_norm_classes)
        self.bank = PrototypeBank(num_classes, num_prototypes, embed_dims, momentum,
                                  load_prototypes)

    @property
    def prototypes(self) -> Tensor:
        """The (C, K, D) unit prototypes (the bank's buffer)."""
        return self.bank.prototypes

    def embed(self, inputs: Sequence[Tensor]) -> Tensor:
        """Unit-norm pixel embeddings, channel-last: (B, H, W, D)."""
        emb = self.projection(self.decoder(inputs))
        if self.reference_width_norm:
            emb = F.normalize(emb, dim=-1)
        emb = self.feat_norm(emb.permute(0, 2, 3, 1))
        return l2_normalize(emb)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """Segmentation logits (B, C, H, W) at the decoder's resolution.

        Without autograd (inference) the (pixels x C*K) similarity matrix is never formed
        (:meth:`PrototypeScorer.class_cosines`), and the logits are a channels-last view.
        """
        if torch.is_grad_enabled():
            return self._seg_logits(self.scorer.class_scores(self.embed(inputs),
                                                             self.prototypes))
        return self.logits_from_embeddings(self.embed(inputs))

    @torch.no_grad()
    def logits_from_embeddings(self, emb: Tensor) -> Tensor:
        """Inference logits (B, C, H, W) (a channels-last view) from the (B, H, W, D)
        embeddings of :meth:`embed`."""
        return self._seg_logits(self.scorer.similarity(
            self.scorer.class_cosines(emb, self.prototypes)), contiguous=False)

    @torch.no_grad()
    def class_cosines(self, inputs: Sequence[Tensor]) -> Tensor:
        """(B, H, W, C) cosine of the nearest of each class's K prototypes."""
        return self.scorer.class_cosines(self.embed(inputs), self.prototypes)

    def predict_with_anomaly(self, inputs: Sequence[Tensor], batch_img_metas: List[dict],
                             test_cfg: ConfigType) -> Tensor:
        """Segmentation logits and the anomaly map, resized to the input.

        The anomaly score of a pixel is ``1 - max cosine similarity`` to any prototype of
        any class (before the LayerNorm over classes): 0 on a prototype, up to 2 opposite
        to all of them; higher = farther from everything seen in training.

        Returns:
            Tensor: (B, C + 1, H, W): the C segmentation logits of :meth:`predict`, then
            the anomaly map as channel C.
        """
        cosines = self.class_cosines(inputs)  # (B, h, w, C)
        anomaly = 1.0 - cosines.amax(dim=-1, keepdim=True)
        stacked = torch.cat([self.mask_norm(self.scorer.similarity(cosines)), anomaly],
                            dim=-1)
        return self.predict_by_feat(stacked.permute(0, 3, 1, 2), batch_img_metas)

    def _seg_logits(self, class_scores: Tensor, contiguous: bool = True) -> Tensor:
        """(B,H,W,C) class scores -> (B,C,H,W) seg logits.

        ``contiguous=True`` (training) copies them to contiguous NCHW at the decoder's
        resolution: the label-sized upsampling, cross-entropy and their backward run
        faster on NCHW than on channels-last on CPU. ``contiguous=False`` (inference)
        returns the channels-last view without a copy, the layout a 1x1 ``conv_seg``
        produces, on which the upsampling and argmax of prediction are faster.
        """
        logits = self.mask_norm(class_scores).permute(0, 3, 1, 2)
        return logits.contiguous() if contiguous else logits

    def loss(self, inputs: Sequence[Tensor], batch_data_samples: SampleList,
             train_cfg: ConfigType) -> Dict[str, Tensor]:
        """Losses for one batch: score the pixels against the prototypes, cluster each
        class's pixels onto its prototypes, compute the losses, hand the bank its batch."""
        seg_label = self._stack_batch_gt(batch_data_samples)
        self._check_labels(seg_label)
        emb = self.embed(inputs)  # (B, H, W, D) unit vectors
        labels = F.interpolate(seg_label.float(), size=emb.shape[1:3],
                               mode='nearest').long().view(-1)
        scores = self.scorer.training_scores(emb.reshape(-1, emb.shape[-1]), self.prototypes,
                                             labels, self.ignore_index)
        assigned, transport = self._cluster(scores)
        class_scores, proto_losses = scores.finish(assigned, self.loss_proto)
        pred, losses = self._losses(class_scores.view(*emb.shape[:3], -1), proto_losses,
                                    batch_data_samples)
        self.bank.collect(scores.batch(pred, assigned, transport))
        return losses

    def _cluster(self, scores: TrainingScores) -> Tuple[Tensor, Tensor]:
        """Sinkhorn-Knopp: each labelled pixel's prototype (Nv,) and the soft assignment
        (Nv, K), within its class, balanced over the class's K prototypes."""
        return sinkhorn_knopp(scores.own, scores.labels, self.num_classes,
                              self.sinkhorn_epsilon, self.sinkhorn_iters,
                              distributed=self.sync_sinkhorn)

    def _losses(self, class_scores: Tensor, proto_losses: Sequence[Tensor],
                batch_data_samples: SampleList) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Predicted classes (B, H, W) and the loss dict: MMSeg's pixel losses on the
        segmentation logits (``mask_norm`` of the (B, H, W, C) class scores), plus the
        prototype losses under their names."""
        normed = self.mask_norm(class_scores)  # (B, H, W, C)
        # Predictions from the channels-last logits: a contiguous argmax.
        pred = normed.detach().argmax(dim=-1)
        seg_logits = normed.permute(0, 3, 1, 2).contiguous()  # see _seg_logits
        losses = self.loss_by_feat(seg_logits, batch_data_samples)
        for loss_fn, value in zip(self.loss_proto, proto_losses):
            name = loss_fn.loss_name
            losses[name] = losses[name] + value if name in losses else value
        return pred, losses

    def _check_labels(self, seg_label: Tensor) -> None:
        """Raise on label values that are neither a class nor ignored."""
        bad = (seg_label != self.ignore_index) & (
            (seg_label < 0) | (seg_label >= self.num_classes))
        if bool(bad.any()):
            values = torch.unique(seg_label[bad])[:10].tolist()
            raise ValueError(
                f'ProtoHead: label values {values} are outside [0, {self.num_classes}) and '
                f'are not ignore_index={self.ignore_index}; fix the annotations or the '
                "dataset pipeline, or set the head's num_classes/ignore_index")

    def _save_to_state_dict(self, destination: dict, prefix: str,
                            keep_vars: bool) -> None:
        """The bank's prototypes under ``prefix + 'prototypes'``, the key of every
        ProtoSeg checkpoint."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        protos = self.prototypes
        destination[prefix + 'prototypes'] = protos if keep_vars else protos.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: List[str],
                              unexpected_keys: List[str], error_msgs: List[str]) -> None:
        """``prefix + 'prototypes'`` goes to the bank's load policy
        (:meth:`PrototypeBank.load`); the rest loads as usual."""
        key = prefix + 'prototypes'
        if key in state_dict:
            self.bank.load(state_dict[key], key)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


class BaseClassesLayerNorm(nn.LayerNorm):
    """LayerNorm over classes whose mean and variance come from the first
    ``num_base`` classes only; every class keeps its own weight and bias.

    The base classes' outputs are exactly ``F.layer_norm`` of their scores (those of a
    head trained with ``num_base`` classes); the added classes' scores are normalised
    with the same statistics. State dict keys are those of ``nn.LayerNorm``.

    Args:
        num_classes (int): All classes (base and added).
        num_base (int): The first ``num_base`` classes set the statistics.
    """

    def __init__(self, num_classes: int, num_base: int) -> None:
        super().__init__(num_classes)
        self.num_base = num_base

    def forward(self, x: Tensor) -> Tensor:
        b = self.num_base
        base = F.layer_norm(x[..., :b], (b, ), self.weight[:b], self.bias[:b], self.eps)
        var, mean = torch.var_mean(x[..., :b], dim=-1, unbiased=False, keepdim=True)
        added = (x[..., b:] - mean) * torch.rsqrt(var + self.eps) * self.weight[b:] \
            + self.bias[b:]
        return torch.cat([base, added], dim=-1)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, num_base={self.num_base}'


def _build_decoder(decoder: ConfigType, num_classes: int) -> BaseDecodeHead:
    """The decoder head, with this head's ``num_classes`` and without its losses."""
    decoder = copy.deepcopy(dict(check_decoder(decoder)))
    decoder['num_classes'] = num_classes
    decoder.pop('loss_decode', None)
    return MODELS.build(decoder)


def _projection(kind: str, in_dims: int, out_dims: int) -> nn.Module:
    """The ``projection`` option's module from decoder features to embeddings."""
    if kind == 'none':
        return nn.Identity()
    if kind == 'linear':
        return nn.Conv2d(in_dims, out_dims, 1)
    return nn.Sequential(nn.Conv2d(in_dims, in_dims, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(in_dims, out_dims, 1))
