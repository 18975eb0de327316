"""Add classes to a trained segmentor from a few labelled images, without training.

:func:`add_classes` takes a model built by ``mmseg.apis.init_model``, the names of the new
classes and, for each, a few support images with their masks, and returns a copy of the
model that segments C + n classes (``dataset_meta`` and ``model.cfg`` extended):

- ``ProtoHead``: the new class's K prototypes are placed on the unit sphere by the
  clustering training uses (balanced Sinkhorn-Knopp assignment of the support pixels'
  embeddings to K prototypes, each the normalised mean of its pixels; a few rounds from K
  support pixels as the start). The LayerNorm over classes keeps its statistics over the
  trained classes (``mask_norm_classes``), so their logits are bit-identical.
- Any decode head ending in a 1x1 ``conv_seg`` (every stock MMSeg model): weight imprinting
  (Qi, Brown and Lowe, CVPR 2018): the new row is the normalised mean support feature
  scaled to the mean norm of the existing rows.

The new class's score offset (the bias of its ``conv_seg`` row, or of its ``mask_norm``
entry) is calibrated on the support images alone (:func:`calibrate_offset`): the offset
that maximises the new class's IoU over every pixel of the support images, the pixels
outside the mask counting as not the class. The added row's scale (``mask_norm`` weight)
is the mean of the trained ones'. Only the new class's own parameters are set: nothing a
trained class computes changes, so a trained class's prediction changes only where the
new class wins.
"""
import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ImageLike = Union[str, np.ndarray]
Support = Sequence[Tuple[ImageLike, ImageLike]]


class AddClassError(ValueError):
    """A support image, mask, name or model that cannot add a class; says what to change."""


@dataclass
class AddedClass:
    """What :func:`add_classes` did for one class."""
    name: str
    index: int
    support_images: int
    pixels: int  # support pixels of the class at the decoder's resolution
    prototypes: int = 0  # ProtoHead: distinct prototypes placed (< K: fewer pixels than K)
    offset: float = 0.0  # the calibrated score offset
    support_iou: float = 0.0  # the new class's IoU on its support images at that offset
    notes: List[str] = field(default_factory=list)


@dataclass
class AddClassReport:
    """What :func:`add_classes` did: one :class:`AddedClass` per class, the seconds taken,
    the head kind ('prototypes' or 'imprinting')."""
    classes: List[AddedClass]
    seconds: float
    method: str


# ---------------------------------------------------------------- reading the support
def read_support(image: ImageLike, mask: ImageLike,
                 mask_value: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray,
                                                            np.ndarray]:
    """An image (BGR, as ``LoadImageFromFile`` gives it) and two boolean maps of its size:
    the class's pixels and the pixels that are known not to be the class.

    Args:
        image (str | ndarray): Path or BGR array.
        mask (str | ndarray): A binary mask (0 / nonzero, e.g. 0 / 255) or, with
            ``mask_value``, a label map holding the class as ``mask_value`` (255 there is
            void: neither the class nor known not to be).
        mask_value (int, optional): The class's value in a label map.
    """
    img = _read(image, 'color', 'image')
    m = _read(mask, 'unchanged', 'mask')
    name = mask if isinstance(mask, str) else 'the mask'
    if m.ndim == 3 and m.shape[2] in (2, 4):  # an alpha channel: no label, if constant
        if not (m[..., -1] == m[..., -1].flat[0]).all():
            raise AddClassError(f'{name}: a mask with a varying alpha channel (transparency); '
                                'give a single-channel binary mask or label map (alpha is '
                                'not read as the class)')
        m = m[..., :-1]
    if m.ndim == 3:
        if not all(np.array_equal(m[..., 0], m[..., i]) for i in range(1, m.shape[2])):
            raise AddClassError(f'{name}: a colour mask; give a single-channel binary mask '
                                'or label map')
        m = m[..., 0]
    if m.shape != img.shape[:2]:
        raise AddClassError(f'{name} is {m.shape[1]}x{m.shape[0]} but its image '
                            f'{image if isinstance(image, str) else ""} is '
                            f'{img.shape[1]}x{img.shape[0]}: they must be the same size')
    if mask_value is None:
        values = set(np.unique(m).tolist())
        if len(values - {0}) > 1:
            lossy = isinstance(mask, str) and mask.lower().endswith(('.jpg', '.jpeg'))
            raise AddClassError(f'{name} holds values {sorted(values)[:8]}: a binary mask has '
                                '0 and one other value; for a label map give the class value '
                                '(mask_value / --mask-value)'
                                + ('; JPEG is lossy: save masks as PNG' if lossy else ''))
        positive, known = m > 0, np.ones(m.shape, bool)
    else:
        positive, known = m == mask_value, m != 255
    if not positive.any():
        raise AddClassError(f'{name} holds no pixel of the class'
                            + ('' if mask_value is None else f' (value {mask_value})'))
    return img, positive, known


def _read(source: ImageLike, flag: str, what: str) -> np.ndarray:
    import mmcv
    if isinstance(source, np.ndarray):
        return _check_array(source, flag, what)
    try:
        data = mmcv.imread(source, flag=flag, channel_order='bgr', backend='cv2')
    except Exception as err:  # mmcv raises FileNotFoundError, TypeError, ...
        raise AddClassError(f'cannot read the {what} {source!r}: {err}') from None
    if data is None:
        raise AddClassError(f'cannot read the {what} {source!r}: not an image')
    return data


def _check_array(data: np.ndarray, flag: str, what: str) -> np.ndarray:
    """An image or mask given as an array, as reading a file with ``flag`` gives it: a
    colour image has 3 BGR channels (a grayscale one is repeated, an alpha channel dropped,
    as ``LoadImageFromFile`` does); values must be finite.

    Raises:
        AddClassError: Another shape, or NaN / inf values.
    """
    if data.ndim not in (2, 3) or data.size == 0 or (
            data.ndim == 3 and data.shape[2] not in (1, 2, 3, 4)):
        raise AddClassError(f'the {what} array has shape {data.shape}: give (H, W) or '
                            '(H, W, 1 / 3 / 4 channels)')
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise AddClassError(f'the {what} array holds NaN or inf values: give finite values')
    if flag == 'color':
        if data.ndim == 2:
            data = data[..., None]
        if data.shape[2] in (2, 4):  # grayscale + alpha, BGRA: the alpha is not read
            data = data[..., :-1]
        if data.shape[2] == 1:
            data = np.repeat(data, 3, axis=2)
    return data


# ---------------------------------------------------------------- the model's view
class _HeadAdapter:
    """Features at the decoder's resolution and logits from them, for one head kind."""
    method = ''

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    def features(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """(1, h, w, D) features of one preprocessed image."""
        raise NotImplementedError

    def logits(self, feats: Tensor) -> Tensor:
        """(1, C, h, w) logits of :meth:`features`' output."""
        raise NotImplementedError


class _ProtoAdapter(_HeadAdapter):
    method = 'prototypes'

    def features(self, model, inputs):
        return self.head.embed(model.extract_feat(inputs))

    def logits(self, feats):
        return self.head.logits_from_embeddings(feats)


class _ConvSegAdapter(_HeadAdapter):
    method = 'imprinting'

    def features(self, model, inputs):
        got = []
        handle = self.head.conv_seg.register_forward_hook(
            lambda module, args, out: got.append(args[0]))
        try:
            model.decode_head.forward(model.extract_feat(inputs))
        finally:
            handle.remove()
        return got[0].permute(0, 2, 3, 1)

    def logits(self, feats):
        return self.head.conv_seg(feats.permute(0, 3, 1, 2))


def head_adapter(model: nn.Module) -> _HeadAdapter:
    """The adapter of ``model.decode_head``; AddClassError for a head that cannot take a
    class (says which can)."""
    head = getattr(model, 'decode_head', None)
    from mmseg_proto.models.decode_heads.proto_head import ProtoHead
    if isinstance(head, ProtoHead):
        if not isinstance(head.mask_norm, nn.LayerNorm):
            raise AddClassError('this ProtoHead has no LayerNorm over classes')
        return _ProtoAdapter(head)
    conv = getattr(head, 'conv_seg', None)
    if isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1 \
            and getattr(head, 'out_channels', conv.out_channels) == conv.out_channels \
            and conv.out_channels == getattr(head, 'num_classes', -1):
        return _ConvSegAdapter(head)
    kind = type(head).__name__
    raise AddClassError(
        f'the decode head ({kind}) cannot take a class: add_classes needs a ProtoHead or a '
        'decode head whose classifier is a 1x1 conv_seg with one output per class (not a '
        'cascade of heads, nor a binary head with one sigmoid output)')


@torch.no_grad()
def support_features(model: nn.Module, adapter: _HeadAdapter, image: np.ndarray,
                     masks: Sequence[np.ndarray]) -> Tuple[Tensor, List[Tensor]]:
    """(h*w, D) features of ``image`` through the model's test pipeline and data
    preprocessor, and each boolean mask resized as training resizes labels (to the
    preprocessed image, padded with False, then nearest to the decoder's resolution)."""
    import mmcv
    from mmcv.transforms import Compose
    cfg = model.cfg
    steps = cfg.get('test_pipeline') or cfg.test_dataloader.dataset.pipeline
    pipeline = [dict(t) for t in steps if t['type'] != 'LoadAnnotations']
    pipeline[0] = dict(type='LoadImageFromNDArray')
    data = Compose(pipeline)(dict(img=image))
    batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                         data_samples=[data['data_samples']]), False)
    inputs = batch['inputs']
    feats = adapter.features(model, inputs)[0]  # (h, w, D)
    h_img, w_img = batch['data_samples'][0].img_shape[:2]
    resized = []
    for mask in masks:
        m = mmcv.imresize(mask.astype(np.uint8), (w_img, h_img), interpolation='nearest')
        full = torch.zeros(inputs.shape[-2:], dtype=torch.float32)
        full[:h_img, :w_img] = torch.from_numpy(m).float()
        small = F.interpolate(full[None, None], size=feats.shape[:2], mode='nearest')
        resized.append(small.view(-1).bool().to(feats.device))
    return feats.reshape(-1, feats.shape[-1]), resized


# ---------------------------------------------------------------- the maths
def place_prototypes(emb: Tensor, num_prototypes: int, rounds: int = 10,
                     epsilon: float = 0.05, sinkhorn_iters: int = 3,
                     seed: int = 0) -> Tuple[Tensor, int]:
    """K unit prototypes of one class from its (N, D) unit embeddings, as training places
    them: each round assigns the pixels to the K prototypes by ProtoSeg's balanced
    Sinkhorn-Knopp clustering and moves each prototype to the normalised mean of its
    pixels (the fixed point of the momentum update). Starts from K distinct pixels drawn
    with ``seed``. With fewer than K pixels, each pixel is a prototype and they repeat.

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
    to the mean L2 norm of the (C, D) existing rows."""
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


# ---------------------------------------------------------------- the API
def add_classes(model: nn.Module, names: Sequence[str], supports: Sequence[Support],
                mask_values: Optional[Sequence[Optional[int]]] = None,
                palette: Optional[Sequence[Sequence[int]]] = None,
                calibrate: bool = True, num_prototypes: Optional[int] = None,
                seed: int = 0, refine_steps: int = 0, refine_lr: float = 0.01,
                held_out_calibration: bool = False,
                progress: Optional[Callable[[int], Any]] = None
                ) -> Tuple[nn.Module, AddClassReport]:
    """A copy of ``model`` that also segments the classes ``names``.

    Args:
        model (nn.Module): A segmentor from ``mmseg.apis.init_model`` (it needs ``cfg``,
            ``dataset_meta`` and its data preprocessor). Not changed.
        names (Sequence[str]): New class names, none already a class.
        supports (Sequence[Sequence[tuple]]): For each name, its (image, mask) pairs
            (paths or arrays; the image BGR as ``LoadImageFromFile`` gives it).
        mask_values (Sequence[int | None], optional): For each name, the class's value in
            label-map masks; None (default): binary masks.
        palette (Sequence[Sequence[int]], optional): An RGB colour (3 integers in
            [0, 255]) per new class. Default: colours not used by the model's palette.
        calibrate (bool): Set the new class's offset with :func:`calibrate_offset`
            (default). False: the mean of the trained classes' offsets (plain imprinting).
        held_out_calibration (bool): With several support images, calibrate on the scores
            the class gets on each image when it is placed from the other images only.
            False (default), or one image: on the scores of the class placed from all of
            them (measured better on CamVid at 5 and 10 shots, docs/add_class.md).
        num_prototypes (int, optional): ProtoHead only (refused for other heads):
            distinct prototypes of the new class, at most the head's K (fewer are
            repeated). None (default): 1, the normalised mean of the support embeddings,
            measured better than K clustered prototypes on CamVid at 5 and 10 images
            (docs/add_class.md).
        seed (int): Seed of the clustering's start. Default: 0.
        refine_steps (int): After placing and calibrating, this many Adam steps on the new
            class's own parameters only (ProtoHead: its prototypes and ``mask_norm`` entry;
            otherwise its ``conv_seg`` row and bias), with cross-entropy over the support
            images' known pixels: the class's pixels as the class, the others as the
            model's own prediction before the class was added (:func:`refine_new_class`).
            Default: 0 (none).
        refine_lr (float): Their learning rate, in (0, 1]. Default: 0.01.
        progress (callable, optional): Called with the number of support images after
            each is embedded (a progress bar's ``update``).

    Returns:
        tuple[nn.Module, AddClassReport]: The new model (on ``model``'s device, in eval
        mode) and what was done.

    Raises:
        AddClassError: A bad name, image, mask or model; nothing is changed.
    """
    if not (_is_int(refine_steps) and refine_steps >= 0):
        raise AddClassError(f'refine_steps={refine_steps!r}: give an integer >= 0')
    if not (isinstance(refine_lr, (int, float)) and not isinstance(refine_lr, bool)
            and 0 < refine_lr <= 1):
        raise AddClassError(f'refine_lr={refine_lr!r}: give a number in (0, 1] (Adam moves '
                            'each parameter by about lr per step: above 1 the unit '
                            'prototypes and offsets jump anywhere)')
    if num_prototypes is not None and not (_is_int(num_prototypes) and num_prototypes >= 1):
        raise AddClassError(f'num_prototypes={num_prototypes!r}: give an integer >= 1 (at '
                            "most the head's K)")
    with torch.no_grad():
        return _add_classes(model, names, supports, mask_values, palette, calibrate,
                            num_prototypes, seed, refine_steps, refine_lr, progress,
                            held_out_calibration)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _add_classes(model, names, supports, mask_values, palette, calibrate, num_prototypes,
                 seed, refine_steps, refine_lr, progress, held_out_calibration=False):
    start = time.perf_counter()
    meta = dict(getattr(model, 'dataset_meta', None) or {})
    classes = list(meta.get('classes') or [])
    head = getattr(model, 'decode_head', None)
    num_classes = getattr(head, 'num_classes', None)
    if isinstance(names, str):
        raise AddClassError(f'names={names!r}: give a list of class names, e.g. [{names!r}]')
    names = list(names)
    _check_names(names, classes, num_classes, len(supports))
    mask_values = list(mask_values) if mask_values is not None else [None] * len(names)
    if len(mask_values) != len(names):
        raise AddClassError(f'{len(mask_values)} mask values for {len(names)} classes')
    if getattr(model, 'cfg', None) is None:
        raise AddClassError('the model has no cfg: build it with mmseg.apis.init_model')
    if palette is not None:
        _check_palette(palette, len(names))
    if head_adapter(model).method != 'prototypes' and num_prototypes is not None:
        raise AddClassError(f'num_prototypes={num_prototypes}: only a ProtoHead has '
                            f'prototypes; this {type(head).__name__} gets an imprinted '
                            'conv_seg row (leave num_prototypes out)')
    for name, support in zip(names, supports):
        if isinstance(support, (str, np.ndarray)) or not len(support) or not all(
                isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in support):
            raise AddClassError(f'class {name!r}: its support must be a non-empty list of '
                                '(image, mask) pairs')
    # Read every support file first: a bad one is refused before any work.
    read = [[read_support(img, mask, value) for img, mask in support]
            for support, value in zip(supports, mask_values)]
    new = copy.deepcopy(model).eval()
    adapter = head_adapter(new)
    k_head = getattr(new.decode_head, 'num_prototypes', 1)
    k_new = 1 if num_prototypes is None else num_prototypes
    if adapter.method == 'prototypes' and not (1 <= k_new <= k_head):
        raise AddClassError(f'num_prototypes={k_new}: must be in [1, {k_head}] (the head '
                            'holds K prototypes per class; fewer are repeated)')
    done, added = 0, []
    for name, items in zip(names, read):
        feats, positives, knowns = [], [], []
        for img, positive, known in items:
            f, (p, k) = support_features(new, adapter, img, [positive, known])
            if not bool(torch.isfinite(f).all()):
                raise AddClassError(f'class {name!r}: a support image gives NaN or inf '
                                    'features; give images with finite values in [0, 255]')
            feats.append(f), positives.append(p), knowns.append(k | p)
            done += 1
            if progress is not None:
                progress(done)
        feats_all, pos_all = torch.cat(feats), torch.cat(positives)
        info = AddedClass(name, int(new.decode_head.num_classes), len(items),
                          int(pos_all.sum()))
        if info.pixels == 0:
            raise AddClassError(
                f'class {name!r}: no support pixel is left at the decoder\'s resolution '
                f'({"x".join(map(str, feats_all.shape[:1]))} positions): give masks with '
                'larger regions or more images')
        base_logits = adapter.logits(_as_image(feats_all)).flatten(2)[0].T  # (N, C)
        offset_of = _extend_head(new, adapter, feats_all[pos_all], k_new, seed, info)
        scores = adapter.logits(_as_image(feats_all)).flatten(2)[0, -1]  # offset 0
        if calibrate and held_out_calibration and sum(int(p.any()) for p in positives) > 1:
            # Each support image scored by the class placed from the other images only.
            held = torch.cat([_held_out_scores(new, adapter, feats, positives, i, k_new, seed)
                              for i in range(len(feats))])
            info.offset, _ = calibrate_offset(held, base_logits, pos_all, torch.cat(knowns))
            _place_last_class(new, adapter, feats_all[pos_all], k_new, seed)
            pred_new = scores + info.offset > base_logits.max(dim=1).values
            info.support_iou = float((pred_new & pos_all).sum() / (pred_new | pos_all).sum())
            info.notes.append(f'offset from each of the {len(feats)} support images scored by '
                              'the class placed from the others')
        elif calibrate:
            info.offset, info.support_iou = calibrate_offset(
                scores, base_logits, pos_all, torch.cat(knowns))
        else:
            info.offset = offset_of
            pred_new = scores + info.offset > base_logits.max(dim=1).values
            info.support_iou = float((pred_new & pos_all).sum() / (pred_new | pos_all).sum())
        _set_offset(new, adapter, info.offset)
        if refine_steps:
            refine_new_class(new, adapter, feats_all, pos_all, torch.cat(knowns),
                             base_logits.argmax(dim=1), refine_steps, refine_lr)
            with torch.no_grad():
                logits = adapter.logits(_as_image(feats_all)).flatten(2)[0].T
            pred_new = logits.argmax(dim=1) == logits.shape[1] - 1
            info.support_iou = float((pred_new & pos_all).sum() / (pred_new | pos_all).sum())
            info.notes.append(f'refined: {refine_steps} steps')
        added.append(info)
    _extend_meta(new, meta, classes, names, palette)
    _extend_cfg(new, adapter)
    return new, AddClassReport(added, time.perf_counter() - start, adapter.method)


def refine_new_class(model: nn.Module, adapter: _HeadAdapter, feats: Tensor,
                     positive: Tensor, known: Tensor, base_pred: Tensor, steps: int,
                     lr: float) -> None:
    """A few Adam steps on the last class's own parameters, nothing else.

    Loss: cross-entropy of the head's logits over the ``known`` support pixels, with target
    the new class on ``positive`` pixels and ``base_pred`` (the model's prediction before
    the class was added) elsewhere. The other classes' parameters get no update (their
    gradients are zeroed before each step), so their logits stay bit-identical.
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


@torch.no_grad()
def _place_last_class(model: nn.Module, adapter: _HeadAdapter, pos_feats: Tensor,
                      k_new: int, seed: int) -> None:
    """Set the last class's prototypes (repeated up to the head's K) or imprinted row
    from ``pos_feats``, as :func:`_extend_head` places them."""
    head = model.decode_head
    if adapter.method == 'prototypes':
        placed, _ = place_prototypes(pos_feats, k_new, seed=seed)
        k = head.prototypes.shape[1]
        head.prototypes[-1] = placed[torch.arange(k) % k_new].to(head.prototypes)
    else:
        weight = head.conv_seg.weight
        weight[-1] = imprint_weight(pos_feats, weight[:-1].flatten(1))[:, None, None]


def _held_out_scores(model: nn.Module, adapter: _HeadAdapter, feats: List[Tensor],
                     positives: List[Tensor], i: int, k_new: int, seed: int) -> Tensor:
    """The last class's logits (offset 0) on support image ``i`` when it is placed from
    the other images' pixels only."""
    others = torch.cat([f[p] for j, (f, p) in enumerate(zip(feats, positives)) if j != i])
    _place_last_class(model, adapter, others, k_new, seed)
    return adapter.logits(_as_image(feats[i])).flatten(2)[0, -1]


def _as_image(feats: Tensor) -> Tensor:
    """(N, D) -> (1, 1, N, D): a one-row image for the adapters' logits."""
    return feats[None, None]


def _check_names(names: List[str], classes: List[str], num_classes: Optional[int],
                 num_supports: int) -> None:
    if not names:
        raise AddClassError('give at least one class name')
    if num_supports != len(names):
        raise AddClassError(f'{num_supports} support lists for {len(names)} class names: '
                            'give one list of (image, mask) pairs per name')
    if not classes:
        raise AddClassError("the model's dataset_meta names no classes: load a checkpoint "
                            "that has them, or set model.dataset_meta = dict(classes=..., "
                            'palette=...) first')
    if num_classes is not None and len(classes) != num_classes:
        raise AddClassError(f"the model's dataset_meta names {len(classes)} classes but its "
                            f'head has {num_classes}')
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise AddClassError(f'class name {name!r}: give a non-empty string without '
                                'leading or trailing spaces')
        if name in classes or name in names[:i]:
            raise AddClassError(f'{name!r} is already a class of this model; give another '
                                'name')


@torch.no_grad()
def _extend_head(model: nn.Module, adapter: _HeadAdapter, pos_feats: Tensor, k_new: int,
                 seed: int, info: AddedClass) -> float:
    """Give the head one more class whose offset is 0; return the plain offset (the mean
    of the trained classes')."""
    head = model.decode_head
    c = head.num_classes
    if adapter.method == 'prototypes':
        protos = head.prototypes
        placed, distinct = place_prototypes(pos_feats, k_new, seed=seed)
        if k_new < protos.shape[1]:  # fewer asked for: repeat them
            placed = placed[torch.arange(protos.shape[1]) % k_new]
        info.prototypes = min(distinct, k_new)
        if info.prototypes < protos.shape[1]:
            info.notes.append(f'{info.prototypes} distinct prototypes of {protos.shape[1]} '
                              f'({info.pixels} support pixels)')
        head.bank.prototypes = torch.cat([protos, placed[None].to(protos)], dim=0)
        old = head.mask_norm
        base = head.mask_norm_classes or c
        from mmseg_proto.models.decode_heads.proto_head import BaseClassesLayerNorm
        norm = BaseClassesLayerNorm(c + 1, base).to(old.weight)
        norm.eps = old.eps
        norm.weight[:c] = old.weight
        norm.bias[:c] = old.bias
        norm.weight[c] = old.weight[:base].mean()
        norm.bias[c] = 0.0
        head.mask_norm, head.mask_norm_classes = norm, base
        plain = float(old.bias[:base].mean())
    else:
        old = head.conv_seg
        conv = nn.Conv2d(old.in_channels, c + 1, 1, bias=old.bias is not None).to(old.weight)
        conv.weight[:c] = old.weight
        conv.weight[c] = imprint_weight(pos_feats, old.weight.flatten(1))[:, None, None]
        if old.bias is not None:
            conv.bias[:c] = old.bias
            conv.bias[c] = 0.0
        head.conv_seg = conv
        plain = float(old.bias.mean()) if old.bias is not None else 0.0
    head.num_classes = head.out_channels = c + 1
    model.num_classes = c + 1
    # One more channel than before: C + 1, or C + 2 for a ProtoEncoderDecoder with
    # anomaly_map (its slide inference stitches the anomaly channel too).
    model.out_channels = getattr(model, 'out_channels', c) + 1
    return plain


@torch.no_grad()
def _set_offset(model: nn.Module, adapter: _HeadAdapter, offset: float) -> None:
    head = model.decode_head
    if adapter.method == 'prototypes':
        head.mask_norm.bias[-1] = offset
    elif head.conv_seg.bias is not None:
        head.conv_seg.bias[-1] = offset
    elif offset != 0:
        raise AddClassError('this conv_seg has no bias, so the new class cannot be '
                            'calibrated: pass calibrate=False')


def _extend_meta(model: nn.Module, meta: Dict[str, Any], classes: List[str],
                 names: List[str], palette: Optional[Sequence[Sequence[int]]]) -> None:
    old_palette = [list(map(int, c)) for c in meta.get('palette') or []]
    if palette is None:
        palette = distinct_colours(old_palette, len(names))
    _check_palette(palette, len(names))
    meta['classes'] = tuple(classes) + tuple(names)
    meta['palette'] = old_palette + [list(map(int, c)) for c in palette]
    model.dataset_meta = meta


def _check_palette(palette: Sequence[Sequence[int]], n: int) -> None:
    """AddClassError unless ``palette`` is ``n`` RGB colours of 3 integers in [0, 255]."""
    if isinstance(palette, str) or len(palette) != n:
        raise AddClassError(f'palette {palette!r}: give {n} colour(s), one per new class')
    for colour in palette:
        if isinstance(colour, str) or len(colour) != 3 or not all(
                _is_int(v) and 0 <= v <= 255 for v in colour):
            raise AddClassError(f'palette colour {colour!r}: give 3 integers in [0, 255] '
                                '(R, G, B)')


def distinct_colours(used: Sequence[Sequence[int]], n: int, seed: int = 0) -> List[List[int]]:
    """``n`` RGB colours as far as possible from ``used`` and from each other (greedy over
    a seeded sample)."""
    rng = np.random.default_rng(seed)
    candidates = rng.integers(0, 256, size=(2048, 3))
    taken = [np.array(c) for c in used]
    out = []
    for _ in range(n):
        if taken:
            d = np.min([np.abs(candidates - c).sum(1) for c in taken], axis=0)
            pick = candidates[int(np.argmax(d))]
        else:
            pick = candidates[0]
        taken.append(pick)
        out.append([int(v) for v in pick])
    return out


def _extend_cfg(model: nn.Module, adapter: _HeadAdapter) -> None:
    """``model.cfg``: the decode head's class count (and ``mask_norm_classes``, and
    ``load_prototypes=True``: the checkpoint's prototypes are the model's); no auxiliary
    head (inference never uses it, and its classifier has the old classes)."""
    cfg = model.cfg
    head_cfg = cfg.model.decode_head
    head_cfg.num_classes = model.decode_head.num_classes
    if 'out_channels' in head_cfg:
        head_cfg.out_channels = model.decode_head.num_classes
    if adapter.method == 'prototypes':
        head_cfg.mask_norm_classes = model.decode_head.mask_norm_classes
        if head_cfg.get('load_prototypes') is False:  # a fine-tuning config: the written
            head_cfg.load_prototypes = True  # checkpoint's prototypes are the model's
    if cfg.model.get('auxiliary_head') is not None:
        cfg.model.auxiliary_head = None
    if getattr(model, 'auxiliary_head', None) is not None:
        model.auxiliary_head = None
