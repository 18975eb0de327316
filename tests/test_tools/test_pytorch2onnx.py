"""tools/deployment/pytorch2onnx.py: a ProtoSeg checkpoint exported with both exporters, ONNX
Runtime against PyTorch on real CamVid images (logits within 1e-4, argmax on >= 99.99% of
pixels), a dynamic-shape export run at two sizes, and only the inference path in the graph.
What it refuses: writing over an input (checkpoint, config, image) under any spelling or link,
over a file that is not an ONNX model without --force, an input size too small for the model
(naming the smallest), and a dynamic export with the TorchScript exporter."""
import glob
import importlib.util
import os
import os.path as osp
import re
import shutil

import mmcv
import numpy as np
import pytest
from conftest import CAMVID_MINI, PROTO_CFG, REPO, train_camvid_protoseg

from mmseg_proto.utils.onnx_export import ExportError, compare, export, load

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


def test_dynamic_export_runs_at_two_sizes(checkpoint, tmp_path, capsys):
    import onnxruntime as ort
    t = tool()
    out = str(tmp_path / 'dynamic.onnx')
    t.main([PROTO_CFG, checkpoint, '--out', out, '--shape', *map(str, SHAPE), '--dynamic'])
    assert '--dynamic: using the dynamo exporter' in capsys.readouterr().out
    module = load(PROTO_CFG, checkpoint)
    session = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
    for size in ((120, 160), (360, 480)):  # neither is the export size
        images = [mmcv.imresize(mmcv.imread(p), size[::-1]) for p in VAL_IMAGES]
        result = compare(module, out, images)
        assert result['max_abs_diff'] <= 1e-4 and result['argmax_agreement'] >= 0.9999
        batch = np.stack([im.transpose(2, 0, 1) for im in images]).astype(np.float32)
        assert session.run(None, {'image': batch})[0].shape == (2, 11, *size)


def output_shape(path):
    (dims, ) = [[d.dim_value for d in o.type.tensor_type.shape.dim]
                for o in onnx.load(path).graph.output]
    return dims


def refused(capsys, argv):
    """The tool's error message for ``argv`` (it must exit with status 2)."""
    with pytest.raises(SystemExit) as exc:
        tool().main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize('spelling', ['same', 'relative', 'dotted', 'symlink', 'hardlink'])
def test_never_writes_over_the_checkpoint(checkpoint, tmp_path, spelling, capsys,
                                          monkeypatch):
    ckpt = tmp_path / 'model.pth'
    shutil.copy(checkpoint, ckpt)
    before = ckpt.read_bytes()
    (tmp_path / 'sub').mkdir()
    if spelling == 'relative':
        monkeypatch.chdir(tmp_path / 'sub')
    out = {'same': str(ckpt), 'relative': osp.join('..', 'model.pth'),
           'dotted': str(tmp_path / 'sub' / '..' / '.' / 'model.pth'),
           'symlink': str(tmp_path / 'link.onnx'), 'hardlink': str(tmp_path / 'hard.onnx')}
    if spelling == 'symlink':
        os.symlink(ckpt, out['symlink'])
    if spelling == 'hardlink':
        os.link(ckpt, out['hardlink'])
    files = sorted(os.listdir(tmp_path))
    for force in ([], ['--force']):  # --force does not make it writable
        err = refused(capsys, [PROTO_CFG, str(ckpt), '--out', out[spelling],
                               '--shape', '32', '32', *force])
        assert 'an input of this export' in err and str(ckpt) in err
    assert ckpt.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == files


def test_never_writes_over_an_image_to_verify(checkpoint, tmp_path, capsys):
    image = tmp_path / 'image.jpg'
    shutil.copy(VAL_IMAGES[0], image)
    err = refused(capsys, [PROTO_CFG, checkpoint, '--out', str(image), '--shape', '32', '32',
                           '--verify', str(image), '--force'])
    assert 'an input of this export' in err
    assert image.read_bytes() == open(VAL_IMAGES[0], 'rb').read()


def test_replaces_only_an_onnx_model_unless_forced(checkpoint, tmp_path, capsys):
    out = tmp_path / 'notes.onnx'
    out.write_text('my notes, not a model\n')
    err = refused(capsys, [PROTO_CFG, checkpoint, '--out', str(out), '--shape', '32', '32'])
    assert 'exists and is not an ONNX model' in err and '--force' in err
    assert out.read_text() == 'my notes, not a model\n'
    tool().main([PROTO_CFG, checkpoint, '--out', str(out), '--shape', '32', '32', '--force'])
    assert output_shape(str(out)) == [1, 11, 32, 32]
    # An ONNX model there is replaced without --force.
    tool().main([PROTO_CFG, checkpoint, '--out', str(out), '--shape', '64', '32'])
    assert output_shape(str(out)) == [1, 11, 64, 32]
    assert os.listdir(tmp_path) == ['notes.onnx']  # no temporary file left


@pytest.mark.parametrize('size', ['1', '0'])
def test_too_small_a_shape_names_the_smallest(checkpoint, tmp_path, capsys, size):
    import torch
    out = tmp_path / 'small.onnx'
    err = refused(capsys, [PROTO_CFG, checkpoint, '--out', str(out), '--shape', size, size])
    assert f'cannot take a {size} x {size} input' in err
    side = int(re.search(r'the smallest it accepts is (\d+) x \1', err).group(1))
    # Independently: the model runs at side x side and not one pixel less.
    module = load(PROTO_CFG, checkpoint)
    with torch.no_grad():
        assert module(torch.zeros(1, 3, side, side)).shape == (1, 11, side, side)
        with pytest.raises(RuntimeError):
            module(torch.zeros(1, 3, side - 1, side - 1))
    assert not os.listdir(tmp_path)


def test_dynamic_with_torchscript_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / 'dynamic.onnx'
    err = refused(capsys, [PROTO_CFG, checkpoint, '--out', str(out), '--shape', '32', '32',
                           '--dynamic', '--exporter', 'torchscript'])
    assert '--dynamic needs --exporter dynamo' in err
    with pytest.raises(ExportError, match="needs the dynamo exporter"):
        export(load(PROTO_CFG, checkpoint), str(out), (32, 32), True, 'torchscript')
    assert not os.listdir(tmp_path)
