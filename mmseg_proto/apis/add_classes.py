"""Add classes to a trained segmentor from a few labelled images, without training.

:func:`add_classes` takes a model built by ``mmseg.apis.init_model``, the names of the new
classes and, for each, a few support images with their masks, and returns a copy of the
model that segments C + n classes (``dataset_meta`` and ``model.cfg`` extended):

- ``ProtoHead``: the new class gets one prototype by default, the normalised mean of its
  support pixels' embeddings, in each of its K slots; with ``num_prototypes=N``, N placed
  on the unit sphere by the clustering training uses (balanced Sinkhorn-Knopp assignment
  of the embeddings to N prototypes, each the normalised mean of its pixels; a few rounds
  from N support pixels as the start), repeated to fill the K slots. The LayerNorm over
  classes keeps its statistics over the trained classes (``mask_norm_classes``), so their
  logits are bit-identical.
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

The steps live beside this module, in ``mmseg_proto/apis/``: ``add_class_checks.py``
(:class:`AddClassError` and the option checks), ``support_images.py`` (reading the support
images and masks, their features), ``head_adapters.py`` (features and logits per head
kind), ``class_placement.py`` (the new class's prototypes or imprinted row, its offset and
support IoU, the refinement) and ``model_extension.py`` (the head, ``dataset_meta`` and
``cfg`` given the new class).
"""
import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .add_class_checks import (AddClassError, check_names, check_options, check_palette,
                               check_supports)
from .class_placement import (calibrate_offset, imprint_weight, place_prototypes,
                              refine_new_class, support_iou)
from .head_adapters import HeadAdapter, head_adapter
from .model_extension import (distinct_colours, extend_cfg, extend_head, extend_meta,
                              place_last_class, set_offset)
from .support_images import ImageLike, Support, read_support, support_features

__all__ = [
    'add_classes', 'AddClassError', 'AddedClass', 'AddClassReport', 'ImageLike', 'Support',
    # The steps, importable from here as before they had modules of their own:
    'read_support', 'support_features', 'head_adapter', 'place_prototypes',
    'imprint_weight', 'calibrate_offset', 'refine_new_class', 'distinct_colours'
]


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
    check_options(refine_steps, refine_lr, num_prototypes)
    with torch.no_grad():
        return _add_classes(model, names, supports, mask_values, palette, calibrate,
                            num_prototypes, seed, refine_steps, refine_lr, progress,
                            held_out_calibration)


def _add_classes(model: nn.Module, names: Sequence[str], supports: Sequence[Support],
                 mask_values: Optional[Sequence[Optional[int]]],
                 palette: Optional[Sequence[Sequence[int]]], calibrate: bool,
                 num_prototypes: Optional[int], seed: int, refine_steps: int,
                 refine_lr: float, progress: Optional[Callable[[int], Any]],
                 held_out_calibration: bool) -> Tuple[nn.Module, AddClassReport]:
    """:func:`add_classes` after its option checks: every input checked and every support
    file read first, then, class by class, the support embedded and the class added."""
    start = time.perf_counter()
    meta = dict(getattr(model, 'dataset_meta', None) or {})
    classes = list(meta.get('classes') or [])
    head = getattr(model, 'decode_head', None)
    num_classes = getattr(head, 'num_classes', None)
    if isinstance(names, str):
        raise AddClassError(f'names={names!r}: give a list of class names, e.g. [{names!r}]')
    names = list(names)
    check_names(names, classes, num_classes, len(supports))
    mask_values = list(mask_values) if mask_values is not None else [None] * len(names)
    if len(mask_values) != len(names):
        raise AddClassError(f'{len(mask_values)} mask values for {len(names)} classes')
    if getattr(model, 'cfg', None) is None:
        raise AddClassError('the model has no cfg: build it with mmseg.apis.init_model')
    if palette is not None:
        check_palette(palette, len(names))
    if head_adapter(model).method != 'prototypes' and num_prototypes is not None:
        raise AddClassError(f'num_prototypes={num_prototypes}: only a ProtoHead has '
                            f'prototypes; this {type(head).__name__} gets an imprinted '
                            'conv_seg row (leave num_prototypes out)')
    check_supports(names, supports)
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
        added.append(_add_class(new, adapter, name, feats, positives, knowns, k_new, seed,
                                calibrate, held_out_calibration, refine_steps, refine_lr))
    extend_meta(new, meta, classes, names, palette)
    extend_cfg(new, adapter)
    return new, AddClassReport(added, time.perf_counter() - start, adapter.method)


def _add_class(model: nn.Module, adapter: HeadAdapter, name: str, feats: List[Tensor],
               positives: List[Tensor], knowns: List[Tensor], num_prototypes: int,
               seed: int, calibrate: bool, held_out_calibration: bool, refine_steps: int,
               refine_lr: float) -> AddedClass:
    """Give ``model``'s head the class ``name``, the last: placed from its support pixels,
    its offset calibrated (or the plain one), then refined if asked.

    Args:
        model (nn.Module): The segmentor, changed in place.
        adapter (HeadAdapter): The adapter of its decode head.
        name (str): The class's name.
        feats (list[Tensor]): Per support image, its (h*w, D) features.
        positives (list[Tensor]): Per support image, its (h*w,) class pixels.
        knowns (list[Tensor]): Per support image, its (h*w,) pixels of known label.
        num_prototypes (int): ProtoHead: distinct prototypes to place.
        seed, calibrate, held_out_calibration, refine_steps, refine_lr: As
            :func:`add_classes`.

    Returns:
        AddedClass: What was done.
    """
    feats_all, pos_all, known_all = torch.cat(feats), torch.cat(positives), torch.cat(knowns)
    info = AddedClass(name, int(model.decode_head.num_classes), len(feats), int(pos_all.sum()))
    if info.pixels == 0:
        raise AddClassError(
            f'class {name!r}: no support pixel is left at the decoder\'s resolution '
            f'({"x".join(map(str, feats_all.shape[:1]))} positions): give masks with '
            'larger regions or more images')
    base_logits = adapter.pixel_logits(feats_all)  # (N, C), before the class is added
    plain_offset = extend_head(model, adapter)
    distinct = place_last_class(model, adapter, feats_all[pos_all], num_prototypes, seed)
    if adapter.method == 'prototypes':
        slots = model.decode_head.prototypes.shape[1]
        info.prototypes = min(distinct, num_prototypes)
        if info.prototypes < slots:
            info.notes.append(f'{info.prototypes} distinct prototypes of {slots} '
                              f'({info.pixels} support pixels)')
    scores = adapter.pixel_logits(feats_all)[:, -1]  # the new class's, offset 0
    best_base = base_logits.max(dim=1).values  # the new class wins where it beats this
    if calibrate and held_out_calibration and sum(int(p.any()) for p in positives) > 1:
        # Each support image scored by the class placed from the other images only.
        held = torch.cat([
            _held_out_scores(model, adapter, feats, positives, i, num_prototypes, seed)
            for i in range(len(feats))
        ])
        info.offset, _ = calibrate_offset(held, base_logits, pos_all, known_all)
        # ... and the class placed from every image again, as without held-out calibration
        place_last_class(model, adapter, feats_all[pos_all], num_prototypes, seed)
        info.support_iou = support_iou(scores + info.offset > best_base, pos_all, known_all)
        info.notes.append(f'offset from each of the {len(feats)} support images scored by '
                          'the class placed from the others')
    elif calibrate:
        info.offset, info.support_iou = calibrate_offset(scores, base_logits, pos_all,
                                                         known_all)
    else:
        info.offset = plain_offset
        info.support_iou = support_iou(scores + info.offset > best_base, pos_all, known_all)
    set_offset(model, adapter, info.offset)
    if refine_steps:
        refine_new_class(model, adapter, feats_all, pos_all, known_all,
                         base_logits.argmax(dim=1), refine_steps, refine_lr)
        with torch.no_grad():
            logits = adapter.pixel_logits(feats_all)
        info.support_iou = support_iou(logits.argmax(dim=1) == logits.shape[1] - 1, pos_all,
                                       known_all)
        info.notes.append(f'refined: {refine_steps} steps')
    return info


def _held_out_scores(model: nn.Module, adapter: HeadAdapter, feats: List[Tensor],
                     positives: List[Tensor], i: int, num_prototypes: int,
                     seed: int) -> Tensor:
    """The last class's logits (offset 0) on support image ``i`` when it is placed from
    the other images' pixels only."""
    others = torch.cat([f[p] for j, (f, p) in enumerate(zip(feats, positives)) if j != i])
    place_last_class(model, adapter, others, num_prototypes, seed)
    return adapter.pixel_logits(feats[i])[:, -1]
