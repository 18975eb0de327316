"""Giving a segmentor one more class: its decode head grows by one class
(:func:`extend_head`), placed from the support features (:func:`place_last_class`), with
its score offset (:func:`set_offset`); its ``dataset_meta`` names the classes and gives
them colours (:func:`extend_meta`); its ``cfg`` builds the extended model
(:func:`extend_cfg`).

Only the new class's own parameters are set: nothing a trained class computes changes.
"""
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .add_class_checks import AddClassError, check_palette
from .class_placement import imprint_weight, place_prototypes
from .head_adapters import HeadAdapter


@torch.no_grad()
def extend_head(model: nn.Module, adapter: HeadAdapter) -> float:
    """Give the head one more class, the last, with offset 0; its prototypes or
    ``conv_seg`` row are set by :func:`place_last_class`.

    ProtoHead: one more row of the bank's prototypes, and a ``BaseClassesLayerNorm`` whose
    statistics stay over the trained classes; the new class's ``mask_norm`` weight is the
    mean of the trained ones'. Otherwise: a ``conv_seg`` with one more output.

    Args:
        model (nn.Module): The segmentor, changed in place.
        adapter (HeadAdapter): The adapter of its decode head.

    Returns:
        float: The plain offset, the mean of the trained classes' offsets.
    """
    head = model.decode_head
    c = head.num_classes
    if adapter.method == 'prototypes':
        protos = head.prototypes
        empty = protos.new_zeros((1, ) + protos.shape[1:])  # set by place_last_class
        head.bank.prototypes = torch.cat([protos, empty], dim=0)
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
        conv.weight[c] = 0.0  # set by place_last_class
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
def place_last_class(model: nn.Module, adapter: HeadAdapter, pos_feats: Tensor,
                     num_prototypes: int, seed: int) -> int:
    """Set the last class's prototypes or imprinted ``conv_seg`` row from its support
    pixels' features.

    ProtoHead: ``num_prototypes`` prototypes by :func:`place_prototypes`, repeated to fill
    the head's K slots. Otherwise: the row by :func:`imprint_weight`, scaled to the other
    rows.

    Args:
        model (nn.Module): The segmentor whose head's last class is the new one.
        adapter (HeadAdapter): The adapter of its decode head.
        pos_feats (Tensor): (N, D) features of the class's support pixels.
        num_prototypes (int): ProtoHead: distinct prototypes to place, at most K.
        seed (int): Seed of the clustering's start.

    Returns:
        int: ProtoHead: how many of the placed prototypes are distinct; otherwise 0.
    """
    head = model.decode_head
    if adapter.method == 'prototypes':
        placed, distinct = place_prototypes(pos_feats, num_prototypes, seed=seed)
        k = head.prototypes.shape[1]
        head.prototypes[-1] = placed[torch.arange(k) % num_prototypes].to(head.prototypes)
        return distinct
    weight = head.conv_seg.weight
    weight[-1] = imprint_weight(pos_feats, weight[:-1].flatten(1))[:, None, None]
    return 0


@torch.no_grad()
def set_offset(model: nn.Module, adapter: HeadAdapter, offset: float) -> None:
    """Set the last class's score offset: its ``mask_norm`` bias (ProtoHead) or its
    ``conv_seg`` bias.

    Args:
        model (nn.Module): The segmentor whose head's last class is the new one.
        adapter (HeadAdapter): The adapter of its decode head.
        offset (float): The offset.

    Raises:
        AddClassError: A nonzero offset for a ``conv_seg`` without bias.
    """
    head = model.decode_head
    if adapter.method == 'prototypes':
        head.mask_norm.bias[-1] = offset
    elif head.conv_seg.bias is not None:
        head.conv_seg.bias[-1] = offset
    elif offset != 0:
        raise AddClassError('this conv_seg has no bias, so the new class cannot be '
                            'calibrated: pass calibrate=False')


def extend_meta(model: nn.Module, meta: Dict[str, Any], classes: List[str],
                names: List[str], palette: Optional[Sequence[Sequence[int]]]) -> None:
    """Set ``model.dataset_meta`` to ``meta`` with the new classes and their colours.

    Args:
        model (nn.Module): The segmentor.
        meta (dict): A copy of its ``dataset_meta``, changed in place.
        classes (list[str]): The trained classes.
        names (list[str]): The new classes.
        palette (Sequence[Sequence[int]], optional): Their RGB colours. None: colours far
            from the existing ones (:func:`distinct_colours`).
    """
    old_palette = [list(map(int, c)) for c in meta.get('palette') or []]
    if palette is None:
        palette = distinct_colours(old_palette, len(names))
    check_palette(palette, len(names))
    meta['classes'] = tuple(classes) + tuple(names)
    meta['palette'] = old_palette + [list(map(int, c)) for c in palette]
    model.dataset_meta = meta


def distinct_colours(used: Sequence[Sequence[int]], n: int, seed: int = 0) -> List[List[int]]:
    """``n`` RGB colours as far as possible from ``used`` and from each other (greedy over
    a seeded sample).

    Args:
        used (Sequence[Sequence[int]]): The colours already taken.
        n (int): How many colours to pick.
        seed (int): Seed of the sample. Default: 0.
    """
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


def extend_cfg(model: nn.Module, adapter: HeadAdapter) -> None:
    """``model.cfg``: the decode head's class count (and ``mask_norm_classes``, and
    ``load_prototypes=True``: the checkpoint's prototypes are the model's); no auxiliary
    head (inference never uses it, and its classifier has the old classes).

    Args:
        model (nn.Module): The extended segmentor; its ``cfg`` and auxiliary head change.
        adapter (HeadAdapter): The adapter of its decode head.
    """
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
