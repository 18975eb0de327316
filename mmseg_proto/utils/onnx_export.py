"""ONNX export of an MMSeg segmentor (ProtoSeg or parametric) and its check in ONNX Runtime.

The command-line tool is ``tools/deployment/pytorch2onnx.py``; docs/deployment.md describes
the graph (MMSeg's preprocessing inside, logits at the input size, the inference path only).
"""
import os
import os.path as osp
import uuid
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The largest square side :func:`smallest_input_side` tries.
MAX_PROBE_SIDE = 1024
#: Names of the graph's outputs: the logits, then (``anomaly_map=True``) the anomaly map.
OUTPUT_NAMES = ('seg_logits', 'anomaly_map')
#: How many tensor names a refusal lists before "and N more".
MAX_LISTED = 8


class ExportError(ValueError):
    """A request :func:`export` (or the tool) refuses, with what to do instead."""


class SegmentorForExport(nn.Module):
    """MMSeg's test-time path of a segmentor, as one module.

    On a (B, 3, H, W) float image as MMSeg's ``LoadImageFromFile`` gives it (BGR, 0-255), it
    computes what ``SegDataPreProcessor`` and ``EncoderDecoder.predict`` compute in whole
    inference: the channel flip (the preprocessor's ``channel_conversion``, set by
    ``bgr_to_rgb=True`` or ``rgb_to_bgr=True``), ``(image - mean) / std``, backbone, neck and
    decode head, and the bilinear resize of the logits to the input size with the decode
    head's ``align_corners``. With ``ProtoEncoderDecoder(anomaly_map=True)`` it also returns
    the anomaly map (B, 1, H, W), resized with the logits as ``predict`` does.

    Args:
        segmentor (nn.Module): An MMSeg ``EncoderDecoder`` (ours included) with a
            ``SegDataPreProcessor``.

    Raises:
        ExportError: for another segmentor or data preprocessor, whose test path this
            module does not reproduce.
    """

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        _check_exportable(segmentor)
        self.segmentor = segmentor
        pre = segmentor.data_preprocessor
        # SegDataPreProcessor flips the channels of a 3-channel image when
        # ``channel_conversion`` (bgr_to_rgb or rgb_to_bgr) is set.
        self.channel_conversion = bool(pre.channel_conversion)
        normalize = bool(getattr(pre, '_enable_normalize', hasattr(pre, 'mean')))
        mean = pre.mean.detach().clone() if normalize else torch.zeros(3)
        std = pre.std.detach().clone() if normalize else torch.ones(3)
        self.register_buffer('mean', mean.view(1, -1, 1, 1))
        self.register_buffer('std', std.view(1, -1, 1, 1))
        self.with_anomaly_map = bool(getattr(segmentor, 'anomaly_map', False))

    @property
    def output_names(self) -> List[str]:
        """The graph's output names: ``seg_logits`` (and ``anomaly_map``)."""
        return list(OUTPUT_NAMES[:2 if self.with_anomaly_map else 1])

    def notes(self) -> List[str]:
        """Where MMSeg's test path of this config differs from the exported graph."""
        notes = []
        test_cfg = self.segmentor.test_cfg or {}
        if test_cfg.get('mode', 'whole') != 'whole':
            notes.append(
                f"the config's test_cfg uses mode={test_cfg.get('mode')!r} "
                f"(crop_size={test_cfg.get('crop_size')}, stride={test_cfg.get('stride')}); "
                'the graph runs the whole image at once, as MMSeg does with '
                "test_cfg=dict(mode='whole'): logits differ from MMSeg's sliding windows, "
                'most near window borders. Export at (or feed images of) the crop size to '
                'get the same result')
        pre_test_cfg = getattr(self.segmentor.data_preprocessor, 'test_cfg', None)
        if pre_test_cfg:
            notes.append(
                f"the data preprocessor pads test images ({dict(pre_test_cfg)}); the graph "
                'does not: feed images of a size that needs no padding for the same result')
        return notes

    def preprocess(self, image: Tensor) -> Tensor:
        """``SegDataPreProcessor`` at test time: channel flip, float, mean and std."""
        if self.channel_conversion:
            image = image.flip(1)
        return (image.float() - self.mean) / self.std

    def forward(self, image: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Logits (B, C, H, W) at the input size; with the anomaly map, also (B, 1, H, W)."""
        feats = self.segmentor.extract_feat(self.preprocess(image))
        head = self.segmentor.decode_head
        if not self.with_anomaly_map:
            return self._resize(head(feats), image)
        # ProtoHead.predict_with_anomaly, without MMSeg's resize (its size check calls
        # int() on the sizes, which would freeze a dynamic export): the C logits and
        # 1 - the nearest prototype's cosine, resized together.
        cosines = head.class_cosines(feats)  # (B, h, w, C)
        stacked = torch.cat([head.mask_norm(head.scorer.similarity(cosines)),
                             1.0 - cosines.amax(dim=-1, keepdim=True)], dim=-1)
        resized = self._resize(stacked.permute(0, 3, 1, 2), image)
        return resized[:, :-1], resized[:, -1:]

    def _resize(self, logits: Tensor, image: Tensor) -> Tensor:
        """The decode head's resize to the input (``BaseDecodeHead.predict_by_feat``)."""
        return F.interpolate(logits, size=image.shape[2:], mode='bilinear',
                             align_corners=self.segmentor.decode_head.align_corners)


def _check_exportable(segmentor: nn.Module) -> None:
    """Refuse a segmentor or preprocessor whose test path :class:`SegmentorForExport`
    does not reproduce."""
    from mmseg.models import SegDataPreProcessor
    from mmseg.models.segmentors import EncoderDecoder
    kind = type(segmentor).__name__
    if not isinstance(segmentor, EncoderDecoder) or isinstance(
            getattr(segmentor, 'decode_head', None), nn.ModuleList):
        raise ExportError(
            f'ONNX export: the model is a {kind}; the export reproduces the test path of '
            'an EncoderDecoder with one decode head (ProtoEncoderDecoder included), not '
            'this one')
    pre = segmentor.data_preprocessor
    if not isinstance(pre, SegDataPreProcessor):
        raise ExportError(
            f'ONNX export: the data preprocessor is a {type(pre).__name__}; the graph '
            "reproduces MMSeg's SegDataPreProcessor (channel flip, mean, std) only: use "
            "data_preprocessor=dict(type='SegDataPreProcessor', ...) in the config")


def load(config: str, checkpoint: str) -> SegmentorForExport:
    """The segmentor of ``config`` with every tensor of its state from ``checkpoint``.

    Unlike MMSeg's ``init_model``, which leaves a tensor it cannot load at its random
    initialisation with a warning, every parameter and buffer must come from the checkpoint:
    a checkpoint of another class count or model is refused (:func:`load_trained_state`).

    Args:
        config (str): Config file; it may inherit ours through ``mmseg_proto::``.
        checkpoint (str): Checkpoint file or URL.

    Returns:
        SegmentorForExport: In eval mode; ``unused_keys`` lists the checkpoint's tensors
        the model has no place for (an auxiliary head the config drops, ...).

    Raises:
        ExportError: naming what does not fit and what to change.
    """
    from mmseg.apis import init_model

    from .config_scope import mmseg_proto_config_scope
    with mmseg_proto_config_scope():
        model = init_model(config, None, device='cpu')
    unused = load_trained_state(model, checkpoint)
    module = SegmentorForExport(model).eval()
    module.unused_keys = unused
    return module


def _state_dict_of(checkpoint: object, name: str) -> Dict[str, Tensor]:
    """The tensors of the state dict a loaded checkpoint holds, ``module.`` prefixes removed
    (as mmengine's ``load_checkpoint`` does). Modules' extra state (a prototype bank's
    training state, ``..._extra_state``) is training state, not part of an export: left out."""
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else None
    metadata = getattr(state, '_metadata', None)
    if isinstance(state, dict):
        state = OrderedDict((k, v) for k, v in state.items()
                            if not (isinstance(k, str) and k.endswith('._extra_state')))
    if not isinstance(state, dict) or not all(
            isinstance(v, Tensor) for v in state.values()):
        raise ExportError(
            f'ONNX export: {name} holds no state dict (a dict of tensor names to tensors, '
            "under 'state_dict' or at the top level); pass a checkpoint of the model")
    revised = OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v) for k, v in state.items())
    if metadata is not None:
        revised._metadata = metadata
    return revised


def listed_names(names: Sequence[str]) -> str:
    """At most ``MAX_LISTED`` names, then how many more."""
    shown = ', '.join(names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return shown + (f' and {more} more' if more > 0 else '')


#: Tensors whose first dimension is the class count of their head.
_CLASS_TENSORS = ('conv_seg.weight', 'conv_seg.bias', 'prototypes', 'mask_norm.weight',
                  'mask_norm.bias')


def _shape_error(name: str, mismatched: List[Tuple[str, tuple, tuple]]) -> ExportError:
    """The refusal of a checkpoint whose tensors have other shapes than the model's."""
    listed = listed_names([f'{key} (checkpoint {tuple(got)}, model {tuple(want)})'
                      for key, got, want in mismatched])
    heads = {}  # head -> (classes in the checkpoint, in the config)
    for key, got, want in mismatched:
        if key.endswith(_CLASS_TENSORS) and len(got) and len(want) and got[0] != want[0]:
            heads.setdefault(key.split('.')[0], (got[0], want[0]))
    hint = ''
    if heads:
        counts = '; '.join(f'{head}: {got} in the checkpoint, {want} in the config'
                           for head, (got, want) in sorted(heads.items()))
        hint = (f' The checkpoint was trained for another number of classes ({counts}): '
                "set the head's num_classes to the checkpoint's.")
    return ExportError(
        f'ONNX export: {name} does not fit the config: {len(mismatched)} tensor(s) have '
        f'another shape in the checkpoint than in the model: {listed}.{hint} Export with '
        'the config the checkpoint was trained with (same num_classes, num_prototypes, '
        'embed_dims, channels); the export would otherwise ship these tensors at their '
        'random initialisation.')


def load_trained_state(model: nn.Module, checkpoint: str) -> List[str]:
    """Load every parameter and buffer of ``model`` from ``checkpoint``, or refuse.

    A ProtoHead's prototypes load whatever its ``load_prototypes`` says (that setting is
    for fine-tuning; an export ships the checkpoint's prototypes). Refused: a tensor of
    the model that the checkpoint lacks, has in another shape, or holds NaN or inf in, and
    any tensor that is not the checkpoint's after loading.

    Args:
        model (nn.Module): The segmentor, built from its config.
        checkpoint (str): Checkpoint file or URL (mmengine's loaders, so ours).

    Returns:
        List[str]: The checkpoint's tensors the model has no place for, sorted.

    Raises:
        ExportError: naming the tensors and what to do.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    from mmseg_proto.models.utils.prototype_bank import PrototypeBank
    state = _state_dict_of(CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu'),
                           checkpoint)
    own = model.state_dict()
    # BatchNorm's step counter is not used at inference, and torch fills it in for
    # checkpoints written before it existed.
    expected = OrderedDict((key, value) for key, value in own.items()
                           if not key.endswith('num_batches_tracked'))
    missing = [key for key in expected if key not in state]
    if missing:
        raise ExportError(
            f'ONNX export: {checkpoint} lacks {len(missing)} tensor(s) of the model: '
            f'{listed_names(missing)}. It is not a checkpoint of this config\'s model (another '
            'backbone, head or neck?); export with the config it was trained with. The '
            'export would otherwise ship these tensors at their random initialisation.')
    mismatched = [(key, tuple(state[key].shape), tuple(value.shape))
                  for key, value in expected.items() if state[key].shape != value.shape]
    if mismatched:
        raise _shape_error(checkpoint, mismatched)
    non_finite = [key for key in expected if state[key].is_floating_point()
                  and not bool(torch.isfinite(state[key]).all())]
    if non_finite:
        raise ExportError(
            f'ONNX export: {checkpoint} holds NaN or inf in {listed_names(non_finite)}: the '
            'training that wrote it diverged; export an earlier checkpoint')
    for bank in model.modules():
        if isinstance(bank, PrototypeBank):
            bank.load_prototypes = True
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a module's own load check (ProtoHead's prototypes)
        raise ExportError(f'ONNX export: {checkpoint} does not load: {err}') from None
    loaded = model.state_dict()
    differ = [key for key, value in expected.items()
              if not torch.equal(loaded[key], state[key].to(value.dtype))]
    if differ:
        raise ExportError(
            f'ONNX export: {listed_names(differ)} did not load from {checkpoint} (a module\'s '
            'load policy kept its own values); the export would ship them as initialised')
    return sorted(set(state) - set(own))


def is_onnx_model(path: str) -> bool:
    """Whether ``path`` holds an ONNX model (a ModelProto with an IR version and nodes).

    False when the ``onnx`` package, which parses it, is not installed.
    """
    try:
        import onnx
    except ImportError:
        return False
    try:
        with open(path, 'rb') as f:
            # Field 1 (ir_version, varint) comes first in every serialised ModelProto:
            # anything else is refused without reading the whole file.
            if f.read(1) != b'\x08':
                return False
        model = onnx.load_model(path, load_external_data=False)
    except Exception:  # not parseable as an ONNX model, whatever the reason
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


def check_output_path(out: str, inputs: Union[Sequence[str], Mapping[str, Any]] = (),
                      force: bool = False) -> None:
    """Refuse an ONNX output path that would destroy a file.

    Args:
        out (str): The .onnx file to write.
        inputs (Sequence[str] | Mapping): Files this run reads (config, checkpoint,
            images), or ``name -> path(s)`` of them: never written over, whatever the
            spelling of either path (symbolic and hard links included). URLs are skipped.
        force (bool): Replace an existing file that is not an ONNX model. An existing ONNX
            model is replaced without it. Default: False.

    Raises:
        ExportError: naming the file and what to do instead.
    """
    if osp.isdir(out):
        raise ExportError(f'ONNX export: --out {out} is a folder; name the .onnx file to '
                          'write in it')
    folder = osp.dirname(osp.abspath(out))
    if not osp.isdir(folder):
        raise ExportError(f'ONNX export: the folder of --out {out} ({folder}) does not '
                          'exist; create it first')
    from .output_files import OutputPathError, check_not_input
    if not isinstance(inputs, Mapping):
        inputs = dict(input=list(inputs))
    try:  # the package's output policy (mmseg_proto.utils.output_files)
        check_not_input(out, inputs, 'ONNX export', run='export')
    except OutputPathError as err:
        raise ExportError(f'{err} (--force does not change this)') from None
    if osp.exists(out) and not force and not is_onnx_model(out):
        raise ExportError(
            f'ONNX export: --out {out} exists and is not an ONNX model; not writing over it. '
            'Choose another file name, or pass --force to replace it')


def _error_at(module: nn.Module, shape: Sequence[int]) -> Optional[RuntimeError]:
    """The error of a forward pass on a (1, 3, *shape) zero image, or None."""
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, *shape))
    except RuntimeError as err:
        return err
    return None


def smallest_input_side(module: nn.Module, limit: int = MAX_PROBE_SIDE) -> Optional[int]:
    """The smallest S such that ``module`` runs on an S x S image, or None up to ``limit``.

    Found by forward passes on zero images (sizes 1, 2, 4, ... then bisection): the output
    size of every convolution and pooling grows with the input size, so the sizes accepted
    are all those from the smallest on.

    Args:
        module (nn.Module): Takes a (1, 3, H, W) image.
        limit (int): The largest side tried. Default: ``MAX_PROBE_SIDE``.
    """
    rejected, side = 0, 1
    while _error_at(module, (side, side)) is not None:
        if side >= limit:
            return None
        rejected, side = side, min(2 * side, limit)
    while side - rejected > 1:
        mid = (rejected + side) // 2
        if _error_at(module, (mid, mid)) is None:
            side = mid
        else:
            rejected = mid
    return side


def check_input_shape(module: nn.Module, shape: Sequence[int]) -> None:
    """Refuse an export size the model cannot run at, naming the smallest it accepts.

    Args:
        module (nn.Module): Takes a (1, 3, H, W) image.
        shape (Sequence[int]): (H, W) of the export.

    Raises:
        ExportError: with the smallest square size the model accepts; the model's own
            error when no size up to ``MAX_PROBE_SIDE`` runs (not a matter of size).
    """
    h, w = shape
    error = None
    if h >= 1 and w >= 1:
        error = _error_at(module, shape)
        if error is None:
            return
    side = smallest_input_side(module)
    if side is None:
        if error is not None:
            raise error
        raise ExportError(f'ONNX export: the model runs at no input size up to '
                          f'{MAX_PROBE_SIDE} x {MAX_PROBE_SIDE}')
    raise ExportError(
        f'ONNX export: the model cannot take a {h} x {w} input (--shape {h} {w}); the '
        f'smallest it accepts is {side} x {side}: use --shape H W with H, W >= {side}'
        + (f' (the model said: {error})' if error is not None else ''))


def export(module: SegmentorForExport, out: str, shape: Sequence[int], dynamic: bool,
           exporter: str, opset: int = 18) -> None:
    """Write ``module`` to ``out`` as ONNX (input 'image'; outputs ``module.output_names``:
    'seg_logits', and 'anomaly_map' for a model with ``anomaly_map=True``).

    The model is written to a temporary file in the folder of ``out`` and renamed to
    ``out`` once complete: a failed export leaves an existing ``out`` as it was. Check
    ``out`` first with :func:`check_output_path`.

    Args:
        module (SegmentorForExport): From :func:`load`.
        out (str): The .onnx file to write.
        shape (Sequence[int]): (H, W) of the example input (the input size of a static
            export); at least the smallest size the model accepts.
        dynamic (bool): Dynamic batch, height and width; needs ``exporter='dynamo'``.
        exporter (str): 'torchscript' or 'dynamo'.
        opset (int): ONNX opset version. Default: 18.

    Raises:
        ExportError: ``dynamic`` with the TorchScript exporter, an unknown exporter, or a
            ``shape`` the model cannot run at (naming the smallest it accepts).
    """
    if exporter not in ('torchscript', 'dynamo'):
        raise ExportError(f"ONNX export: exporter={exporter!r} is not one of 'torchscript', "
                          "'dynamo'")
    if dynamic and exporter == 'torchscript':
        raise ExportError(
            'ONNX export: a dynamic-shape export needs the dynamo exporter (--exporter '
            "dynamo, exporter='dynamo'): the TorchScript exporter freezes the sizes MMSeg's "
            'MixVisionTransformer computes in Python, and its graph fails in ONNX Runtime '
            'at any other input size')
    check_input_shape(module, shape)
    # Batch 2 when dynamic: torch.export specialises dimensions of size 1.
    example = torch.zeros(2 if dynamic else 1, 3, *shape)
    # Hidden, unique, same folder (so the rename is atomic); '.onnx' for the serialiser.
    tmp = osp.join(osp.dirname(osp.abspath(out)),
                   f'.{osp.basename(out)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.onnx')
    try:
        with torch.no_grad():
            if exporter == 'torchscript':
                torch.onnx.export(module, (example, ), tmp, input_names=['image'],
                                  output_names=module.output_names, opset_version=opset,
                                  dynamo=False)
            else:
                shapes = ({'image': {0: torch.export.Dim.AUTO,
                                     2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
                          if dynamic else None)
                program = torch.onnx.export(module, (example, ), input_names=['image'],
                                            output_names=module.output_names,
                                            dynamic_shapes=shapes, opset_version=opset,
                                            dynamo=True)
                program.save(tmp)
        os.replace(tmp, out)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def mmseg_prediction(segmentor: nn.Module,
                     image: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """MMSeg's own test path on one image: its data preprocessor, then ``predict``.

    Args:
        segmentor (nn.Module): The MMSeg segmentor.
        image (np.ndarray): (H, W, 3) as ``LoadImageFromFile`` gives it (BGR, 0-255).

    Returns:
        Tuple[np.ndarray, Optional[np.ndarray]]: The logits (1, C, H, W) and, for
        ``anomaly_map=True``, the anomaly map (1, 1, H, W); else None.
    """
    from mmseg.structures import SegDataSample
    shape = tuple(image.shape[:2])
    sample = SegDataSample(metainfo=dict(ori_shape=shape, img_shape=shape))
    data = dict(inputs=[torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))],
                data_samples=[sample])
    with torch.no_grad():
        (result, ) = segmentor.test_step(data)
    anomaly = result.anomaly_map.data[None].numpy() if 'anomaly_map' in result else None
    return result.seg_logits.data[None].numpy(), anomaly


def compare(module: SegmentorForExport, onnx_file: str,
            images: List[np.ndarray]) -> Dict[str, float]:
    """ONNX Runtime on ``onnx_file`` against MMSeg's own test path (:func:`mmseg_prediction`)
    of ``module``'s segmentor, image by image.

    Args:
        module (SegmentorForExport): The exported module (its segmentor is the reference).
        onnx_file (str): The exported model.
        images (List[np.ndarray]): (H, W, 3) BGR images, 0-255 (``mmcv.imread``).

    Returns:
        Dict[str, float]: ``max_abs_diff`` (largest |logit difference|),
        ``argmax_agreement`` (share of pixels with the same argmax) and, with an
        ``anomaly_map`` output, ``anomaly_max_abs_diff``.
    """
    import onnxruntime as ort
    session = ort.InferenceSession(onnx_file, providers=['CPUExecutionProvider'])
    worst, worst_anomaly, same, total = 0.0, 0.0, 0, 0
    for img in images:
        batch = np.ascontiguousarray(img.transpose(2, 0, 1)[None], dtype=np.float32)
        expected, expected_anomaly = mmseg_prediction(module.segmentor, img)
        got = session.run(module.output_names, {'image': batch})
        worst = max(worst, float(np.abs(got[0] - expected).max()))
        if expected_anomaly is not None:
            worst_anomaly = max(worst_anomaly,
                                float(np.abs(got[1] - expected_anomaly).max()))
        same += int((got[0].argmax(1) == expected.argmax(1)).sum())
        total += got[0].shape[0] * got[0].shape[2] * got[0].shape[3]
    result = dict(max_abs_diff=worst, argmax_agreement=same / total)
    if module.with_anomaly_map:
        result['anomaly_max_abs_diff'] = worst_anomaly
    return result
