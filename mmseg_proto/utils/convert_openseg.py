"""Convert the ProtoSeg authors' openseg checkpoints to MMSeg checkpoints.

In the package, not only in tools/, because the converter tool of an installed package
(``mmseg_proto/.mim/tools``) and the tests import it.

The authors (tfzhou/ProtoSeg) released one model, HRNet-W48 on Cityscapes
(``hrnet_w48_proto_lr1x_hrnet_proto_80k_latest.pth``), saved by their
openseg-based code. This module maps its state dict onto the model of
``configs/protoseg/cityscapes/protoseg_hrnet-w48-authors_4xb2-80k_cityscapes-
512x1024.py`` (an :class:`~mmseg.models.EncoderDecoder` with
``HRNetRefAlign`` and a ``ProtoHead`` over an ``FCNHead``):

====================================  ========================================
openseg key                           MMSeg key
====================================  ========================================
``backbone.*``                        ``backbone.*`` (same HRNet naming)
``cls_head.0.weight``                 ``decode_head.decoder.convs.0.conv.weight``
``cls_head.0.bias``                   folded into ``...convs.0.bn.running_mean``
``cls_head.1.0.*`` (BatchNorm)        ``decode_head.decoder.convs.0.bn.*``
``proj_head.proj.{0,2}.*``            ``decode_head.projection.{0,2}.*``
``proj_head.mlp2.*``                  dropped (an alias of ``proj_head.proj``)
``feat_norm.*`` / ``mask_norm.*``     ``decode_head.feat_norm.*`` / ``mask_norm``
``prototypes``                        ``decode_head.prototypes`` (normalised)
====================================  ========================================

The authors' forward L2-normalises ``prototypes`` in place before using
them, so the converter normalises them too (a no-op for a checkpoint saved
after a forward pass); :class:`ProtoHead` expects unit prototypes.

MMSeg's ``ConvModule`` has no conv bias in front of a norm layer, so the
authors' 3x3 conv bias ``b`` is folded into the BatchNorm that follows it:
``BN(conv(x) + b)`` with running mean ``m`` equals ``BN(conv(x))`` with
running mean ``m - b`` (in training mode the batch mean cancels ``b``
anyway), so the converted model computes the same function.

Every other key is refused with a message naming it, and, given the shapes
of the target model (:func:`model_state_shapes`), every shape is checked
and every model key must be filled.
"""
import os.path as osp
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'OpensegConversionError', 'ConversionResult', 'DEFAULT_CONFIG',
    'convert_openseg_protoseg', 'load_openseg_checkpoint',
    'model_state_shapes', 'convert_file'
]

DEFAULT_CONFIG = osp.join(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'configs',
    'protoseg', 'cityscapes',
    'protoseg_hrnet-w48-authors_4xb2-80k_cityscapes-512x1024.py')

ALIAS_PREFIX = 'proj_head.mlp2.'
ALIAS_TARGET = 'proj_head.proj.'
CONV_BIAS = 'cls_head.0.bias'
PROTOTYPES = 'prototypes'
BN_PREFIX = 'decode_head.decoder.convs.0.bn.'

# (pattern on the openseg key, replacement giving the MMSeg key), in order.
RULES: Tuple[Tuple[str, str], ...] = (
    (r'^backbone\.(.+)$', r'backbone.\1'),
    (r'^cls_head\.0\.weight$', r'decode_head.decoder.convs.0.conv.weight'),
    (r'^cls_head\.1\.0\.(weight|bias|running_mean|running_var|'
     r'num_batches_tracked)$', BN_PREFIX + r'\1'),
    (r'^proj_head\.proj\.([02])\.(weight|bias)$',
     r'decode_head.projection.\1.\2'),
    (r'^feat_norm\.(weight|bias)$', r'decode_head.feat_norm.\1'),
    (r'^mask_norm\.(weight|bias)$', r'decode_head.mask_norm.\1'),
    (r'^prototypes$', r'decode_head.prototypes'),
)


class OpensegConversionError(ValueError):
    """A checkpoint that cannot be converted faithfully."""


@dataclass
class ConversionResult:
    """The converted state dict and what the conversion did.

    Attributes:
        state_dict (dict[str, Tensor]): MMSeg state dict.
        mapping (dict[str, str]): openseg key -> MMSeg key of every copied
            tensor.
        folded (list[str]): openseg keys folded into another tensor.
        dropped (list[str]): openseg keys dropped (verified aliases).
        num_source_keys (int): Keys in the source state dict.
        num_params (int): Elements of the source's parameters and
            prototypes (BN statistics and dropped aliases not counted).
    """
    state_dict: Dict[str, Tensor]
    mapping: Dict[str, str] = field(default_factory=dict)
    folded: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    num_source_keys: int = 0
    num_params: int = 0

    def summary(self) -> str:
        """One-paragraph human-readable summary of the conversion."""
        lines = [
            f'read {self.num_source_keys} openseg keys '
            f'({self.num_params / 1e6:.2f}M parameters); wrote '
            f'{len(self.state_dict)} MMSeg keys',
            f'  mapped: {len(self.mapping)}',
        ]
        if self.folded:
            lines.append(f'  folded: {", ".join(self.folded)} -> '
                         f'{BN_PREFIX}running_mean (MMSeg ConvModule has no '
                         'conv bias before BN)')
        if self.dropped:
            lines.append(f'  dropped: {len(self.dropped)} alias keys '
                         f'{ALIAS_PREFIX}* (identical to {ALIAS_TARGET}*)')
        return '\n'.join(lines)


def _unwrap(checkpoint: Mapping[str, Any]) -> Dict[str, Tensor]:
    """The bare state dict of an openseg checkpoint, without ``module.``."""
    if not isinstance(checkpoint, Mapping):
        raise OpensegConversionError(
            f'expected a checkpoint dict, got {type(checkpoint).__name__}')
    state = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state, Mapping):
        raise OpensegConversionError(
            "the checkpoint's 'state_dict' entry is a "
            f'{type(state).__name__}, not a dict of tensors')
    not_tensors = [k for k, v in state.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise OpensegConversionError(
            'not a state dict: these entries are not tensors: '
            f'{not_tensors[:10]} (pass a checkpoint with a `state_dict` '
            'entry, or a bare state dict)')
    out: Dict[str, Tensor] = {}
    for key, value in state.items():
        name = key[len('module.'):] if key.startswith('module.') else key
        if name in out:
            raise OpensegConversionError(
                f"key '{name}' occurs both with and without the 'module.' "
                'prefix')
        out[name] = value
    return out


def _check_alias(state: Mapping[str, Tensor]) -> List[str]:
    """Verify ``proj_head.mlp2.*`` equals ``proj_head.proj.*``; return it."""
    alias = [k for k in state if k.startswith(ALIAS_PREFIX)]
    for key in alias:
        twin = ALIAS_TARGET + key[len(ALIAS_PREFIX):]
        if twin not in state:
            raise OpensegConversionError(
                f"'{key}' is expected to be an alias of '{twin}', which the "
                'checkpoint lacks: not an authors\' ProtoSeg checkpoint?')
        if state[key].shape != state[twin].shape or \
                not torch.equal(state[key], state[twin]):
            raise OpensegConversionError(
                f"'{key}' differs from '{twin}': in the authors' model they "
                'are the same module; refusing to drop one of two different '
                'tensors')
    return alias


def _map_key(key: str) -> Optional[str]:
    """MMSeg name of an openseg key, or None if no rule maps it."""
    for pattern, repl in RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def convert_openseg_protoseg(
        checkpoint: Mapping[str, Any],
        target_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None
) -> ConversionResult:
    """Convert an openseg ProtoSeg checkpoint to an MMSeg state dict.

    Args:
        checkpoint (Mapping): The loaded checkpoint: a dict with the state
            dict under ``'state_dict'`` or a bare state dict; keys with or
            without the ``module.`` prefix.
        target_shapes (Mapping[str, tuple], optional): Key -> shape of the
            target MMSeg model's state dict (see :func:`model_state_shapes`).
            When given, every converted tensor must exist in the model with
            the same shape, and every model key must be filled.
            Default: None (no check against a model).

    Returns:
        ConversionResult: The state dict and a record of the conversion.

    Raises:
        OpensegConversionError: On an mmengine checkpoint (which needs no
            conversion), keys no rule maps, a ``proj_head.mlp2``
            alias that differs from ``proj_head.proj``, or (with
            ``target_shapes``) shapes or keys that do not fit the model.
    """
    _refuse_mmengine_checkpoint(checkpoint, 'the checkpoint')
    state = _unwrap(checkpoint)
    dropped = _check_alias(state)
    result = ConversionResult(
        state_dict={},
        dropped=dropped,
        num_source_keys=len(state),
        num_params=sum(
            v.numel() for k, v in state.items()
            if k not in dropped and not k.endswith(
                ('running_mean', 'running_var', 'num_batches_tracked'))))

    unknown = []
    for key in state:
        if key in dropped or key == CONV_BIAS:
            continue
        new_key = _map_key(key)
        if new_key is None:
            unknown.append(key)
        else:
            result.mapping[key] = new_key
    if unknown:
        raise OpensegConversionError(
            f'{len(unknown)} checkpoint key(s) that the converter does not '
            f'know how to map: {unknown[:20]}'
            f'{" ..." if len(unknown) > 20 else ""}. Only the authors\' '
            'HRNet-W48 ProtoSeg model (openseg `hrnet_w48_proto`) is '
            'supported; see mmseg_proto/utils/convert_openseg.py RULES')
    for key, new_key in result.mapping.items():
        value = state[key]
        if key == PROTOTYPES:
            # Used only after in-place L2 normalisation by the authors' code.
            value = F.normalize(value.double(), dim=-1).to(value.dtype)
        # Shares storage with the source; nothing below modifies in place.
        result.state_dict[new_key] = value

    if CONV_BIAS in state:
        mean_key = BN_PREFIX + 'running_mean'
        if mean_key not in result.state_dict:
            raise OpensegConversionError(
                f"'{CONV_BIAS}' can only be folded into the BatchNorm "
                "'cls_head.1.0' that follows it, which the checkpoint lacks")
        mean = result.state_dict[mean_key]
        bias = state[CONV_BIAS]
        if bias.shape != mean.shape:
            raise OpensegConversionError(
                f"'{CONV_BIAS}' has shape {tuple(bias.shape)} but "
                f"'cls_head.1.0.running_mean' {tuple(mean.shape)}")
        result.state_dict[mean_key] = (mean.double() -
                                       bias.double()).to(mean.dtype)
        result.folded.append(CONV_BIAS)

    if target_shapes is not None:
        _check_against_model(result, target_shapes)
    return result


def _check_against_model(result: ConversionResult,
                         target_shapes: Mapping[str, Tuple[int, ...]]) -> None:
    """Raise unless the converted state dict fills the model exactly."""
    source_of = {v: k for k, v in result.mapping.items()}
    problems = []
    for key, value in result.state_dict.items():
        src = source_of.get(key, key)
        if key not in target_shapes:
            problems.append(f"'{src}' maps to '{key}', which the model does "
                            'not have')
        elif tuple(value.shape) != tuple(target_shapes[key]):
            problems.append(
                f"'{src}' has shape {tuple(value.shape)} but the model's "
                f"'{key}' has shape {tuple(target_shapes[key])}")
    missing = [k for k in target_shapes if k not in result.state_dict]
    if missing:
        problems.append(f'the model has {len(missing)} key(s) that the '
                        f'checkpoint does not provide: {missing[:10]}'
                        f'{" ..." if len(missing) > 10 else ""}')
    if problems:
        raise OpensegConversionError(
            'the checkpoint does not fit the model built from the config '
            '(wrong model, or wrong num_classes / num_prototypes / widths in '
            'the config?):\n  ' + '\n  '.join(problems))


def model_state_shapes(config: str) -> Dict[str, Tuple[int, ...]]:
    """Build the model of an MMSeg config on CPU; return its state shapes.

    Args:
        config (str): Path of the MMSeg config file.

    Returns:
        dict[str, tuple[int, ...]]: State-dict key -> shape.
    """
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    try:  # shapes only: skip allocating and initialising the weights
        with torch.device('meta'):
            model = MODELS.build(cfg.model)
    except Exception:  # a module that cannot be built on 'meta'
        model = MODELS.build(cfg.model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _dataset_meta(config: str) -> Optional[Dict[str, Any]]:
    """``classes``/``palette`` of the config's test dataset, if known."""
    from mmengine.config import Config
    from mmseg.registry import DATASETS
    try:
        cfg = Config.fromfile(config)
        cls = DATASETS.get(cfg.test_dataloader.dataset.type)
        meta = dict(cls.METAINFO)
    except Exception:  # the metadata is a convenience only
        return None
    return {k: list(meta[k]) for k in ('classes', 'palette') if k in meta}


def _mmengine_checkpoint_reason(checkpoint: Any) -> Optional[str]:
    """Why ``checkpoint`` is an mmengine (MMSeg) checkpoint, else None."""
    if not isinstance(checkpoint, Mapping):
        return None
    meta = checkpoint.get('meta')
    if 'message_hub' in checkpoint:
        return 'it holds a message_hub (written by an mmengine Runner)'
    if isinstance(meta, Mapping) and 'mmengine_version' in meta:
        return f"its meta names mmengine {meta['mmengine_version']}"
    if isinstance(meta, Mapping) and meta.get('converter') == \
            'mmseg_proto.utils.convert_openseg':
        return 'this converter wrote it'
    state = checkpoint.get('state_dict', checkpoint)
    prefixes = ('decode_head.', 'module.decode_head.')
    if isinstance(state, Mapping) and any(
            isinstance(key, str) and key.startswith(prefixes)
            for key in state):
        return "its state dict has MMSeg's decode_head.* keys"
    return None


def _refuse_mmengine_checkpoint(checkpoint: Any, name: str) -> None:
    """Raise if ``checkpoint`` is an mmengine checkpoint (nothing to convert).

    Args:
        checkpoint (Any): The loaded checkpoint.
        name (str): How the message names it.
    """
    reason = _mmengine_checkpoint_reason(checkpoint)
    if reason is not None:
        raise OpensegConversionError(
            f"{name} is an mmengine checkpoint, not the authors' release "
            f'({reason}): it needs no conversion; load it directly '
            '(load_from=..., or the checkpoint argument of mim test / '
            'tools/test.py)')


def load_openseg_checkpoint(path: str,
                            trust_pickle: bool = False) -> Mapping[str, Any]:
    """Load a checkpoint file on CPU, through the package's safe loader.

    Args:
        path (str): The ``.pth`` file.
        trust_pickle (bool): If the safe loader refuses objects in the file,
            load it with ``torch.load(weights_only=False)``, which runs
            whatever the file names. Only for files you trust.
            Default: False.

    Returns:
        Mapping: The loaded object.

    Raises:
        FileNotFoundError: No such file.
        OpensegConversionError: Not a readable checkpoint, an mmengine
            checkpoint rather than the authors' release, or (without
            ``trust_pickle``) a file holding objects the loader refuses.
    """
    from .checkpoint_loading import (CheckpointRefusedError,
                                     UnreadableCheckpointError,
                                     load_checkpoint_file)
    if not osp.isfile(path):
        raise FileNotFoundError(f'no checkpoint file at {path}')
    try:
        checkpoint = load_checkpoint_file(path, map_location='cpu')
    except UnreadableCheckpointError as err:
        raise OpensegConversionError(str(err)) from None
    except CheckpointRefusedError as err:
        if not trust_pickle:
            raise OpensegConversionError(
                f'{err} --trust-pickle loads it with torch.load('
                'weights_only=False): use it only for a file you '
                'trust') from None
        checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    _refuse_mmengine_checkpoint(checkpoint, path)
    return checkpoint


def convert_file(src: str,
                 dst: str,
                 config: str = DEFAULT_CONFIG,
                 trust_pickle: bool = False,
                 log: Callable[[str], None] = print) -> ConversionResult:
    """Convert the openseg checkpoint ``src`` into the MMSeg one ``dst``.

    Args:
        src (str): openseg ProtoSeg checkpoint.
        dst (str): Output path; written as ``{'state_dict', 'meta'}``.
        config (str): MMSeg config whose model the checkpoint must fit.
            Default: the shipped authors' HRNet-W48 Cityscapes config.
        trust_pickle (bool): See :func:`load_openseg_checkpoint`.
        log (Callable[[str], None]): Where the summary goes. Default: print.

    Returns:
        ConversionResult: What was converted.
    """
    checkpoint = load_openseg_checkpoint(src, trust_pickle)
    result = convert_openseg_protoseg(checkpoint, model_state_shapes(config))
    meta: Dict[str, Any] = dict(
        converted_from=osp.basename(src),
        converter='mmseg_proto.utils.convert_openseg',
        config=osp.basename(config))
    dataset_meta = _dataset_meta(config)
    if dataset_meta:
        meta['dataset_meta'] = dataset_meta
    dst_dir = osp.dirname(osp.abspath(dst))
    if not osp.isdir(dst_dir):
        raise FileNotFoundError(f'output folder {dst_dir} does not exist')
    torch.save(dict(state_dict=result.state_dict, meta=meta), dst)
    log(result.summary())
    log(f'saved {dst}')
    return result
