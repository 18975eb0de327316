"""ONNX export of an MMSeg segmentor (ProtoSeg or parametric) and its check in ONNX Runtime.

The command-line tool is ``tools/deployment/pytorch2onnx.py``; docs/deployment.md describes
the graph (preprocessing inside, logits at the input size, the inference path only).
"""
import os
import os.path as osp
import uuid
from typing import Any, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: The largest square side :func:`smallest_input_side` tries.
MAX_PROBE_SIDE = 1024


class ExportError(ValueError):
    """A request :func:`export` (or the tool) refuses, with what to do instead."""


class SegmentorForExport(nn.Module):
    """Preprocessing, backbone, decode head and the resize to the input, as one module."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor
        pre = segmentor.data_preprocessor
        self.bgr_to_rgb = bool(getattr(pre, '_channel_conversion', False))
        self.register_buffer('mean', pre.mean.detach().clone().view(1, -1, 1, 1))
        self.register_buffer('std', pre.std.detach().clone().view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.bgr_to_rgb:
            image = image.flip(1)
        x = (image - self.mean) / self.std
        head = self.segmentor.decode_head
        logits = head(self.segmentor.extract_feat(x))
        return F.interpolate(logits, size=image.shape[2:], mode='bilinear',
                             align_corners=head.align_corners)


def load(config: str, checkpoint: str) -> SegmentorForExport:
    """The segmentor of ``config`` with ``checkpoint``'s weights, ready to export.

    Args:
        config (str): Config file; it may inherit ours through ``mmseg_proto::``.
        checkpoint (str): Checkpoint file or URL.
    """
    from mmseg.apis import init_model

    from .config_scope import mmseg_proto_config_scope
    with mmseg_proto_config_scope():
        model = init_model(config, checkpoint, device='cpu')
    return SegmentorForExport(model).eval()


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
    """Write ``module`` to ``out`` as ONNX (input 'image', output 'seg_logits').

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
                                  output_names=['seg_logits'], opset_version=opset,
                                  dynamo=False)
            else:
                shapes = ({'image': {0: torch.export.Dim.AUTO,
                                     2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
                          if dynamic else None)
                program = torch.onnx.export(module, (example, ), input_names=['image'],
                                            output_names=['seg_logits'],
                                            dynamic_shapes=shapes, opset_version=opset,
                                            dynamo=True)
                program.save(tmp)
        os.replace(tmp, out)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def compare(module: SegmentorForExport, onnx_file: str,
            images: List[np.ndarray]) -> dict:
    """Largest |logit difference| and share of equal argmax, ONNX Runtime vs PyTorch."""
    import onnxruntime as ort
    session = ort.InferenceSession(onnx_file, providers=['CPUExecutionProvider'])
    worst, same, total = 0.0, 0, 0
    for img in images:
        batch = np.ascontiguousarray(img.transpose(2, 0, 1)[None], dtype=np.float32)
        with torch.no_grad():
            expected = module(torch.from_numpy(batch)).numpy()
        got = session.run(['seg_logits'], {'image': batch})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
        same += int((got.argmax(1) == expected.argmax(1)).sum())
        total += got.shape[0] * got.shape[2] * got.shape[3]
    return dict(max_abs_diff=worst, argmax_agreement=same / total)
