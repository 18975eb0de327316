"""ONNX export of an MMSeg segmentor (ProtoSeg or parametric) and its check in ONNX Runtime.

The command-line tool is ``tools/deployment/pytorch2onnx.py``; docs/deployment.md describes
the graph (preprocessing inside, logits at the input size, the inference path only).
"""
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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
    from mmseg.apis import init_model
    model = init_model(config, checkpoint, device='cpu')
    return SegmentorForExport(model).eval()


def export(module: SegmentorForExport, out: str, shape: Sequence[int], dynamic: bool,
           exporter: str, opset: int = 18) -> None:
    """Write ``module`` to ``out`` as ONNX (input 'image', output 'seg_logits')."""
    # Batch 2 when dynamic: torch.export specialises dimensions of size 1.
    example = torch.zeros(2 if dynamic else 1, 3, *shape)
    with torch.no_grad():
        if exporter == 'torchscript':
            axes = {'image': {0: 'batch', 2: 'height', 3: 'width'},
                    'seg_logits': {0: 'batch', 2: 'height', 3: 'width'}} if dynamic else None
            torch.onnx.export(module, (example, ), out, input_names=['image'],
                              output_names=['seg_logits'], dynamic_axes=axes,
                              opset_version=opset, dynamo=False)
        else:
            shapes = ({'image': {0: torch.export.Dim.AUTO,
                                 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
                      if dynamic else None)
            program = torch.onnx.export(module, (example, ), input_names=['image'],
                                        output_names=['seg_logits'], dynamic_shapes=shapes,
                                        opset_version=opset, dynamo=True)
            program.save(out)


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
