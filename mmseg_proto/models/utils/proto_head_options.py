"""Validation of ProtoHead's options: one message naming every config key at fault."""
import math

from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS

from .prototype_distance import DISTANCES

PROJECTIONS = ('none', 'linear', 'mlp')


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_positive(value) -> bool:
    """A real number in (0, inf): ``inf`` (or an int too large for a float) would make every
    huberized similarity 1, each class score the same constant, so nothing is learned."""
    if not _is_real(value):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:
        return False


# option -> (check, what it must be)
OPTION_RULES = {
    'num_classes': (lambda v: _is_int(v) and v >= 2,
                    'an integer >= 2; the class scores go through a LayerNorm '
                    'over classes, constant for one class: for binary '
                    'segmentation use num_classes=2 (background, foreground)'),
    'embed_dims': (lambda v: v is None or (_is_int(v) and v >= 1),
                   "None (the decoder's channels) or an integer >= 1"),
    'projection': (lambda v: v in PROJECTIONS, f'one of {PROJECTIONS}'),
    'num_prototypes': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'momentum': (lambda v: _is_real(v) and 0.0 <= v <= 1.0,
                 'a number in [0, 1]'),
    'sinkhorn_epsilon': (lambda v: _is_real(v) and v > 0, 'a number > 0'),
    'sinkhorn_iters': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'sync_sinkhorn': (lambda v: isinstance(v, bool), 'True or False'),
    'fused_losses': (lambda v: isinstance(v, bool), 'True or False'),
    'similarity_chunk': (lambda v: v is None or (_is_int(v) and v >= 1),
                         'None or an integer >= 1'),
    'distance': (lambda v: v in DISTANCES, f'one of {DISTANCES}'),
    'huber_delta': (_is_finite_positive, 'a finite number > 0, e.g. 1.0'),
    'reference_width_norm': (lambda v: isinstance(v, bool), 'True or False'),
    'load_prototypes': (lambda v: isinstance(v, bool), 'True or False'),
}


def check_options(**options) -> None:
    """Validate ProtoHead options, naming every config key at fault."""
    problems = [f'{key}={value!r} (must be {OPTION_RULES[key][1]})'
                for key, value in options.items()
                if not OPTION_RULES[key][0](value)]
    if problems:
        raise ValueError('ProtoHead: invalid ' + '; '.join(problems))


def check_decoder(decoder) -> dict:
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
