"""tools/deployment/pytorch2onnx.py: a ProtoSeg checkpoint exported with both exporters, ONNX
Runtime against PyTorch on real CamVid images (logits within 1e-4, argmax on >= 99.99% of
pixels), a dynamic-shape export run at two sizes, and only the inference path in the graph."""
import glob
import importlib.util
import os.path as osp

import mmcv
import numpy as np
import pytest
from conftest import CAMVID_MINI, PROTO_CFG, REPO, train_camvid_protoseg

from mmseg_proto.utils.onnx_export import compare, load

onnx = pytest.importorskip('onnx')  # test extras; CI installs them
VAL_IMAGES = sorted(glob.glob(osp.join(CAMVID_MINI, 'img_dir', 'val', '*.jpg')))[:2]
SHAPE = (96, 128)


def tool():
    spec = importlib.util.spec_from_file_location(
        'pytorch2onnx', osp.join(REPO, 'tools', 'deployment', 'pytorch2onnx.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """ProtoSeg after 3 iterations of the shipped CamVid config (K = 10, 11 classes)."""
    return train_camvid_protoseg(tmp_path_factory.mktemp('onnx'), iters=3)[0]


def dims_of_graph(path):
    """Every tensor dimension ONNX shape inference finds in the graph."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    values = list(model.graph.value_info) + list(model.graph.output)
    return {d.dim_value for v in values for d in v.type.tensor_type.shape.dim if d.dim_value}


@pytest.mark.parametrize('exporter', ['torchscript', 'dynamo'])
def test_export_matches_pytorch_on_real_images(checkpoint, exporter, tmp_path):
    out = str(tmp_path / 'protoseg.onnx')
    result = tool().main([PROTO_CFG, checkpoint, '--out', out, '--shape', *map(str, SHAPE),
                          '--exporter', exporter, '--verify', *VAL_IMAGES])
    assert result['max_abs_diff'] <= 1e-4
    assert result['argmax_agreement'] >= 0.9999
    model = onnx.load(out)
    (out_shape, ) = [[d.dim_value for d in o.type.tensor_type.shape.dim]
                     for o in model.graph.output]
    assert out_shape == [1, 11, *SHAPE]
    # Inference path only: no (pixels x C*K) = (.. x 110) similarity tensor anywhere.
    assert 11 * 10 not in dims_of_graph(out)


def test_dynamic_export_runs_at_two_sizes(checkpoint, tmp_path):
    import onnxruntime as ort
    t = tool()
    out = str(tmp_path / 'dynamic.onnx')
    t.main([PROTO_CFG, checkpoint, '--out', out, '--shape', *map(str, SHAPE), '--dynamic',
            '--exporter', 'dynamo'])
    module = load(PROTO_CFG, checkpoint)
    session = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
    for size in ((120, 160), (360, 480)):  # neither is the export size
        images = [mmcv.imresize(mmcv.imread(p), size[::-1]) for p in VAL_IMAGES]
        result = compare(module, out, images)
        assert result['max_abs_diff'] <= 1e-4 and result['argmax_agreement'] >= 0.9999
        batch = np.stack([im.transpose(2, 0, 1) for im in images]).astype(np.float32)
        assert session.run(None, {'image': batch})[0].shape == (2, 11, *size)
