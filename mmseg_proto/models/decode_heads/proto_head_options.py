"""Validation of ProtoHead's options, combinations included (next to the head it checks).

Every check raises an error for people: it names the config key at fault, what it must be
and, for a combination, what to change. :func:`check_options` reports every option at fault
in one message, from an owner's table of rules: :data:`HEAD_RULES` here, for
:class:`~mmseg_proto.models.decode_heads.ProtoHead` (checked before and while it builds its
parts); :class:`~mmseg_proto.engine.hooks.PrototypeUpdateHook` keeps its own table next to it.
"""
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch.nn as nn
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS

from ..utils.prototype_scorer import standard_prototype_losses
from ..utils.prototype_similarity import DISTANCES

PROJECTIONS = ('none', 'linear', 'mlp')


def is_int(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Largest useful huber_delta: distances between unit vectors are at most 2, so a larger delta
# leaves only the quadratic branch, (1 - cos) / delta, the cosine measure shrunk by 1 / delta.
# The LayerNorm over classes then loses the class scores' spread, measured on a head of 11
# classes x 10 prototypes in 32 dimensions: at its random start 1% at delta 4, 14% at 16, 97%
# at 1e3; with embeddings near a prototype 0.2%, 3%, 94%; all of it at 1e6.
HUBER_DELTA_MAX = 2.0


def _is_useful_huber_delta(value: Any) -> bool:
    """A real number in (0, HUBER_DELTA_MAX]; NaN, inf and ints too large for a float fail the
    comparison (inf would make every huberized similarity 1, each class score the same)."""
    return is_real(value) and 0 < value <= HUBER_DELTA_MAX


# option -> (check, what it must be); bool is not an int or a number here
HEAD_RULES = {
    'num_classes': (lambda v: is_int(v) and v >= 2,
                    'an integer >= 2; the class scores go through a LayerNorm '
                    'over classes, constant for one class: for binary '
                    'segmentation use num_classes=2 (background, foreground)'),
    'embed_dims': (lambda v: v is None or (is_int(v) and v >= 1),
                   "None (the decoder's channels) or an integer >= 1"),
    'projection': (lambda v: v in PROJECTIONS, f'one of {PROJECTIONS}'),
    'num_prototypes': (lambda v: is_int(v) and v >= 1, 'an integer >= 1'),
    'momentum': (lambda v: is_real(v) and 0.0 <= v <= 1.0,
                 'a number in [0, 1]'),
    'sinkhorn_epsilon': (lambda v: is_real(v) and v > 0, 'a number > 0'),
    'sinkhorn_iters': (lambda v: is_int(v) and v >= 1, 'an integer >= 1'),
    'sync_sinkhorn': (lambda v: isinstance(v, bool), 'True or False'),
    'fused_losses': (lambda v: isinstance(v, bool), 'True or False'),
    'similarity_chunk': (lambda v: v is None or (is_int(v) and v >= 1),
                         'None or an integer >= 1'),
    'distance': (lambda v: v in DISTANCES, f'one of {DISTANCES}'),
    'huber_delta': (_is_useful_huber_delta,
                    f'a finite number in (0, {HUBER_DELTA_MAX:g}], e.g. 1.0: distances '
                    f'between unit vectors are at most {HUBER_DELTA_MAX:g}, a larger delta '
                    'leaves only the quadratic branch, the cosine measure shrunk by 1/delta, '
                    'and the class scores lose their spread (94% of it at 1e3)'),
    'reference_width_norm': (lambda v: isinstance(v, bool), 'True or False'),
    'load_prototypes': (lambda v: isinstance(v, bool), 'True or False'),
}


def check_mask_norm_classes(mask_norm_classes: Any, num_classes: int) -> None:
    """``mask_norm_classes``: None or an int in [2, num_classes]."""
    if mask_norm_classes is None or (is_int(mask_norm_classes)
                                     and 2 <= mask_norm_classes <= num_classes):
        return
    raise ValueError(f'ProtoHead: invalid mask_norm_classes={mask_norm_classes!r} (must be '
                     f'None or an integer in [2, num_classes={num_classes}]: how many of the '
                     'first classes set the statistics of the LayerNorm over classes)')


def check_options(owner: str, rules: Dict[str, Tuple[Callable[[Any], bool], str]],
                  **options: Any) -> None:
    """Raise one ValueError naming every option of ``owner`` at fault.

    Args:
        owner (str): Who the options are for, as the message names it, e.g. 'ProtoHead'.
        rules (dict): Option name -> (check, what it must be), e.g. :data:`HEAD_RULES`.
        **options: The options to check, by name.
    """
    problems = [f'{key}={value!r} (must be {rules[key][1]})'
                for key, value in options.items() if not rules[key][0](value)]
    if problems:
        raise ValueError(f'{owner}: invalid ' + '; '.join(problems))


def check_decoder(decoder: Any) -> dict:
    """The decoder config, if it names a registered MMSeg decode head."""
    if not isinstance(decoder, dict) or 'type' not in decoder:
        raise TypeError('ProtoHead: `decoder` must be the config dict of '
                        "an MMSeg decode head, e.g. dict(type="
                        f"'SegformerHead', ...), got {decoder!r}")
    cls = decoder['type']
    if isinstance(cls, str):
        cls = MODELS.get(cls)
        if cls is None:
            raise KeyError(f"ProtoHead: unknown decoder type "
                           f"'{decoder['type']}': use a decode head "
                           'registered in mmseg.registry.MODELS, e.g. '
                           'FCNHead, SegformerHead, UPerHead')
    if not (isinstance(cls, type) and issubclass(cls, BaseDecodeHead)):
        raise TypeError(
            f"ProtoHead: decoder type {decoder['type']!r} is not an MMSeg "
            'decode head. A decoder must be a BaseDecodeHead subclass (it has '
            '`channels` and ends in the 1x1 classifier `conv_seg`, whose '
            'input features become the embedding), e.g. FCNHead, '
            'SegformerHead, UPerHead, PSPHead, ASPPHead')
    return decoder


def check_embed_dims(embed_dims: Optional[int], feat_dims: int, projection: str) -> int:
    """The embedding size: ``embed_dims``, or the decoder's ``feat_dims`` channels when
    None; without a projection the two must agree."""
    embed_dims = feat_dims if embed_dims is None else embed_dims
    if projection == 'none' and embed_dims != feat_dims:
        raise ValueError(
            f'ProtoHead: embed_dims={embed_dims} does not match the '
            f"decoder's channels={feat_dims}; with projection='none' the "
            'decoder features are the embedding: set embed_dims='
            f"{feat_dims} (or None), or use projection='linear'/'mlp'")
    return embed_dims


def check_out_channels(out_channels: Optional[int], num_classes: int) -> None:
    """ProtoHead scores every class: no single-channel (sigmoid) output."""
    if out_channels is not None and out_channels != num_classes:
        raise ValueError(f'ProtoHead does not support out_channels={out_channels} '
                         f'(num_classes={num_classes}); binary sigmoid heads '
                         '(out_channels=1) are not supported: use num_classes=2')


def split_losses(loss_decode: nn.Module) -> Tuple[nn.ModuleList, nn.ModuleList]:
    """The pixel losses (on the segmentation logits) and the prototype losses of a built
    ``loss_decode``; raises if there is no pixel loss."""
    losses = loss_decode if isinstance(loss_decode, nn.ModuleList) else [loss_decode]
    pixel = [m for m in losses if not getattr(m, 'is_prototype_loss', False)]
    if not pixel:
        raise ValueError('ProtoHead: loss_decode needs a pixel loss on '
                         "the segmentation logits, e.g. dict(type="
                         "'CrossEntropyLoss'), beside the prototype losses")
    return nn.ModuleList(pixel), nn.ModuleList(
        m for m in losses if getattr(m, 'is_prototype_loss', False))


def check_similarity_chunk(similarity_chunk: Optional[int], distance: str,
                           loss_proto: Sequence[nn.Module]) -> None:
    """The streamed scores compute the standard losses of the cosine only."""
    if similarity_chunk is None:
        return
    if not standard_prototype_losses(loss_proto):
        raise ValueError(
            f'ProtoHead: similarity_chunk={similarity_chunk!r} needs the '
            'standard prototype losses (at most one '
            'PixelPrototypeContrastLoss and one PixelPrototypeDistanceLoss)')
    if distance != 'cosine':
        raise ValueError(
            f'ProtoHead: similarity_chunk={similarity_chunk!r} needs '
            f"distance='cosine' (got {distance!r}); set "
            'similarity_chunk=None')
