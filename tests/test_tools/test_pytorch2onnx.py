"""tools/deployment/pytorch2onnx.py: the exported graph computes what MMSeg computes.

Every parity test's reference is MMSeg's own inference (``mmseg.apis.init_model`` and
``inference_model``) on the documented input, the image as ``LoadImageFromFile`` gives it
(BGR, 0-255), against ONNX Runtime on the exported file: a ProtoSeg checkpoint of a
``bgr_to_rgb=True`` config on a real CamVid street image at its size (360 x 480), both
exporters (TorchScript static, dynamo dynamic from another export size); the authors' HRNet
config (``align_corners=True``, shrunk), static with TorchScript and dynamic (dynamo) at three
sizes; the anomaly map of ``anomaly_map=True``; and a fine-tuning config
(``load_prototypes=False``), which still exports the checkpoint's prototypes. Only the
inference path is in the graph. Every tensor of the model comes from the checkpoint: another
class count (parametric or ProtoSeg), missing tensors or NaN are refused with one message.
What else it refuses: writing over an input (checkpoint, config, image) under any spelling or
link, over a file that is not an ONNX model without --force, an input size too small for the
model (naming the smallest), and a dynamic export with the TorchScript exporter."""
import glob
import importlib.util
import os
import os.path as osp
import re
import shutil

import mmcv
import numpy as np
import pytest
import torch
from conftest import BASELINE_CFG, CAMVID_MINI, PROTO_CFG, REPO

from mmseg_proto.utils.onnx_export import ExportError, export, load

onnx = pytest.importorskip('onnx')  # test extras; CI installs them
VAL_IMAGES = sorted(glob.glob(osp.join(CAMVID_MINI, 'img_dir', 'val', '*.jpg')))[:2]
SHAPE = (96, 128)
AUTHORS_CFG = osp.join(REPO, 'configs', 'protoseg', 'cityscapes',
                       'protoseg_hrnet-w48-authors_4xb2-80k_cityscapes-512x1024.py')
# The authors' network (HRNetRefAlign, resize_concat decoder, mlp projection, width norm,
# align_corners=True everywhere) at widths a CPU test runs in seconds.
TINY_AUTHORS = """
model = dict(
    backbone=dict(extra=dict(
        stage1=dict(num_blocks=(1, ), num_channels=(16, )),
        stage2=dict(num_blocks=(1, 1), num_channels=(8, 16)),
        stage3=dict(num_modules=1, num_blocks=(1, 1, 1), num_channels=(8, 16, 32)),
        stage4=dict(num_modules=1, num_blocks=(1, 1, 1, 1), num_channels=(8, 16, 32, 64)))),
    decode_head=dict(num_prototypes=3,
                     decoder=dict(in_channels=[8, 16, 32, 64], channels=16)))
"""


def tool():
    spec = importlib.util.spec_from_file_location(
        'pytorch2onnx', osp.join(REPO, 'tools', 'deployment', 'pytorch2onnx.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def checkpoint(camvid_protoseg):
    """ProtoSeg after 2 iterations of the shipped CamVid config (K = 10, 11 classes):
    conftest's session-wide checkpoint."""
    return camvid_protoseg[0]


def derived_config(folder, base, body, name='derived.py'):
    """A config file in ``folder`` that inherits ``base`` and adds ``body``."""
    path = osp.join(str(folder), name)
    with open(path, 'w') as f:
        f.write(f'_base_ = [{base!r}]\n{body}')
    return path


def random_checkpoint(config, path):
    """A checkpoint of ``config``'s model at its random initialisation."""
    from mmseg.apis import init_model
    torch.manual_seed(0)
    model = init_model(config, None, device='cpu')
    torch.save(dict(meta=dict(), state_dict=model.state_dict()), path)
    return str(path)


def loaded_image(path):
    """(H, W, 3) BGR uint8: the image as MMSeg's ``LoadImageFromFile`` gives it."""
    from mmcv.transforms import LoadImageFromFile
    return LoadImageFromFile()(dict(img_path=path))['img']


def mmseg_model(config, checkpoint):
    """MMSeg's own model for inference on the image as ``LoadImageFromFile`` gives it: the
    test pipeline is loading and packing only (no resize), as the graph's input is."""
    from mmseg.apis import init_model
    model = init_model(config, checkpoint, device='cpu')
    model.cfg.test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackSegInputs')]
    return model


def mmseg_inference(model, image_path):
    """``mmseg.apis.inference_model``: (C, H, W) logits and the (1, H, W) anomaly map or
    None."""
    from mmseg.apis import inference_model
    result = inference_model(model, image_path)
    anomaly = result.anomaly_map.data.numpy() if 'anomaly_map' in result else None
    return result.seg_logits.data.numpy(), anomaly


def onnx_outputs(path, images):
    """ONNX Runtime on (H, W, 3) images stacked as the documented (B, 3, H, W) float input:
    ``{output name: array}``."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    batch = np.stack([im.transpose(2, 0, 1) for im in images]).astype(np.float32)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {'image': batch})))


def assert_parity(got, expected):
    """Argmax over classes on >= 99.99% of pixels, logits within 1e-4."""
    agreement = float((got.argmax(0) == expected.argmax(0)).mean())
    assert agreement >= 0.9999, f'same argmax on {100 * agreement:.2f}% of pixels'
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def dims_of_graph(path):
    """Every tensor dimension ONNX shape inference finds in the graph."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    values = list(model.graph.value_info) + list(model.graph.output)
    return {d.dim_value for v in values for d in v.type.tensor_type.shape.dim if d.dim_value}


@pytest.mark.parametrize('exporter', ['torchscript', 'dynamo'])
def test_export_matches_mmseg_on_a_street_image(checkpoint, exporter, tmp_path):
    """TorchScript: a static export at the street image's size. Dynamo: a --dynamic export
    at 96 x 128 run at the image's 360 x 480, so that a size the SegFormer's reshapes
    (patch embeddings, spatial-reduction attention) baked into the graph would show."""
    from mmengine.config import Config
    assert Config.fromfile(PROTO_CFG).model.data_preprocessor.bgr_to_rgb is True
    image = loaded_image(VAL_IMAGES[0])
    assert image.shape == (360, 480, 3)  # a CamVid street image at its size
    out = str(tmp_path / 'protoseg.onnx')
    shape = (['--shape', '360', '480', '--exporter', 'torchscript'] if exporter == 'torchscript'
             else ['--shape', *map(str, SHAPE), '--dynamic'])
    verified = tool().main([PROTO_CFG, checkpoint, '--out', out, *shape, '--verify',
                            VAL_IMAGES[0]])
    got = onnx_outputs(out, [image])
    assert list(got) == ['seg_logits']
    expected, _ = mmseg_inference(mmseg_model(PROTO_CFG, checkpoint), VAL_IMAGES[0])
    assert got['seg_logits'].shape == (1, 11, 360, 480)
    assert_parity(got['seg_logits'][0], expected)
    # --verify measures against MMSeg's path too.
    assert verified['max_abs_diff'] <= 1e-4 and verified['argmax_agreement'] >= 0.9999
    # Inference path only: no (pixels x C*K) = (.. x 110) similarity tensor anywhere.
    assert 11 * 10 not in dims_of_graph(out)


@pytest.fixture(scope='module')
def tiny_authors(tmp_path_factory):
    """(config, checkpoint) of the authors' HRNet config shrunk, at random weights."""
    folder = tmp_path_factory.mktemp('authors')
    config = derived_config(folder, AUTHORS_CFG, TINY_AUTHORS)
    return config, random_checkpoint(config, folder / 'tiny_authors.pth')


def resized_copy(source, size, path):
    """``source`` resized to ``size`` (H, W), written lossless to ``path`` (read back as
    written)."""
    mmcv.imwrite(mmcv.imresize(mmcv.imread(source), size[::-1]), str(path))
    return str(path)


def test_align_corners_true_matches_mmseg(tiny_authors, tmp_path):
    """The authors' config resizes with align_corners=True; so must the graph (TorchScript
    exporter here, the dynamo exporter in test_dynamic_export_runs_at_three_sizes)."""
    from mmengine.config import Config
    shipped = Config.fromfile(AUTHORS_CFG).model
    assert shipped.decode_head.align_corners is True
    assert shipped.data_preprocessor.bgr_to_rgb is True
    config, ckpt = tiny_authors
    image_path = resized_copy(VAL_IMAGES[1], (96, 128), tmp_path / 'street.png')
    out = str(tmp_path / 'authors.onnx')
    tool().main([config, ckpt, '--out', out, '--shape', '96', '128', '--exporter',
                 'torchscript'])
    model = mmseg_model(config, ckpt)
    assert model.decode_head.align_corners is True
    expected, _ = mmseg_inference(model, image_path)
    got = onnx_outputs(out, [loaded_image(image_path)])['seg_logits']
    assert got.shape == (1, 19, 96, 128)
    assert_parity(got[0], expected)


def test_dynamic_export_runs_at_three_sizes(tiny_authors, tmp_path, capsys):
    """--dynamic (the dynamo exporter) on the authors' network (align_corners=True): one
    graph, MMSeg's logits at the export size and at two others, one of them another aspect
    ratio (height and width vary independently), two images a batch. The CamVid SegFormer's
    dynamic export is test_export_matches_mmseg_on_a_street_image[dynamo]."""
    config, ckpt = tiny_authors
    out = str(tmp_path / 'dynamic.onnx')
    tool().main([config, ckpt, '--out', out, '--shape', '96', '128', '--dynamic'])
    assert '--dynamic: using the dynamo exporter' in capsys.readouterr().out
    model = mmseg_model(config, ckpt)
    assert model.decode_head.align_corners is True
    for size in ((96, 128), (120, 160), (88, 200)):
        paths = [resized_copy(source, size, tmp_path / f'{size[0]}_{i}.png')
                 for i, source in enumerate(VAL_IMAGES)]
        got = onnx_outputs(out, [loaded_image(p) for p in paths])['seg_logits']
        assert got.shape == (2, 19, *size)
        for logits, path in zip(got, paths):
            assert_parity(logits, mmseg_inference(model, path)[0])


def test_anomaly_map_is_exported(checkpoint, tmp_path, capsys):
    """anomaly_map=True: the graph's second output 'anomaly_map' is MMSeg's anomaly map."""
    config = derived_config(tmp_path, PROTO_CFG,
                            "model = dict(type='ProtoEncoderDecoder', anomaly_map=True)\n")
    out = str(tmp_path / 'anomaly.onnx')
    tool().main([config, checkpoint, '--out', out, '--shape', *map(str, SHAPE)])
    assert 'outputs seg_logits, anomaly_map' in capsys.readouterr().out
    image_path = resized_copy(VAL_IMAGES[0], SHAPE, tmp_path / 'street.png')
    got = onnx_outputs(out, [loaded_image(image_path)])
    assert list(got) == ['seg_logits', 'anomaly_map']
    logits, anomaly = mmseg_inference(mmseg_model(config, checkpoint), image_path)
    assert got['anomaly_map'].shape == (1, 1, *SHAPE)
    assert_parity(got['seg_logits'][0], logits)
    np.testing.assert_allclose(got['anomaly_map'][0], anomaly, rtol=0, atol=1e-5)


def test_fine_tuning_config_exports_the_checkpoints_prototypes(checkpoint, tmp_path):
    """load_prototypes=False (fine-tuning) must not export fresh prototypes."""
    config = derived_config(tmp_path, PROTO_CFG,
                            'model = dict(decode_head=dict(load_prototypes=False))\n')
    out = str(tmp_path / 'finetune.onnx')
    tool().main([config, checkpoint, '--out', out, '--shape', *map(str, SHAPE)])
    image_path = resized_copy(VAL_IMAGES[0], SHAPE, tmp_path / 'street.png')
    got = onnx_outputs(out, [loaded_image(image_path)])['seg_logits']
    # The reference: the model the checkpoint was trained as.
    assert_parity(got[0], mmseg_inference(mmseg_model(PROTO_CFG, checkpoint), image_path)[0])


def test_a_training_checkpoint_with_a_banks_training_state_exports(checkpoint, tmp_path):
    """A checkpoint saved mid re-seeding window holds the bank's training state (a dict, the
    module's extra state): MMSeg's init_model and the export both leave it out."""
    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=False)
    c, k, d = ckpt['state_dict']['decode_head.prototypes'].shape
    ckpt['state_dict']['decode_head.bank._extra_state'] = dict(
        version=1, window_steps=1, pending=None,
        window=dict(nearest=torch.ones(c * k), outlier_sums=torch.ones(c, d),
                    outlier_weights=torch.ones(c)))
    training = str(tmp_path / 'mid_window.pth')
    torch.save(ckpt, training)
    out = str(tmp_path / 'mid_window.onnx')
    tool().main([PROTO_CFG, training, '--out', out, '--shape', *map(str, SHAPE)])
    image_path = resized_copy(VAL_IMAGES[0], SHAPE, tmp_path / 'street.png')
    got = onnx_outputs(out, [loaded_image(image_path)])['seg_logits']
    assert_parity(got[0], mmseg_inference(mmseg_model(PROTO_CFG, training), image_path)[0])


@pytest.mark.parametrize('kind', ['parametric', 'protoseg'])
def test_another_class_count_is_refused(checkpoint, kind, tmp_path, capsys):
    if kind == 'parametric':
        base, ckpt = BASELINE_CFG, random_checkpoint(BASELINE_CFG, tmp_path / 'param.pth')
        tensor = 'decode_head.conv_seg.weight'
    else:
        base, ckpt, tensor = PROTO_CFG, checkpoint, 'decode_head.prototypes'
    config = derived_config(tmp_path, base, 'model = dict(decode_head=dict(num_classes=19))\n')
    out = tmp_path / 'other.onnx'
    err = refused(capsys, [config, ckpt, '--out', str(out), '--shape', '32', '32'])
    assert tensor in err and '(11, ' in err and '(19, ' in err
    assert 'decode_head: 11 in the checkpoint, 19 in the config' in err
    assert "set the head's num_classes" in err
    assert not out.exists()


def test_missing_or_non_finite_tensors_are_refused(checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict']
    out = tmp_path / 'model.onnx'
    dropped = dict(state)
    del dropped['decode_head.prototypes'], dropped['backbone.layers.0.0.projection.weight']
    torch.save(dict(meta=dict(), state_dict=dropped), tmp_path / 'dropped.pth')
    err = refused(capsys, [PROTO_CFG, str(tmp_path / 'dropped.pth'), '--out', str(out)])
    assert 'lacks 2 tensor(s) of the model' in err
    assert 'decode_head.prototypes' in err and 'backbone.layers.0.0.projection.weight' in err
    nan = dict(state)
    nan['decode_head.mask_norm.weight'] = torch.full_like(state['decode_head.mask_norm.weight'],
                                                          float('nan'))
    torch.save(dict(meta=dict(), state_dict=nan), tmp_path / 'nan.pth')
    err = refused(capsys, [PROTO_CFG, str(tmp_path / 'nan.pth'), '--out', str(out)])
    assert 'NaN or inf in decode_head.mask_norm.weight' in err
    assert not out.exists()


def test_what_the_graph_does_not_reproduce_is_said(checkpoint, tmp_path, capsys):
    """Slide inference (whole image in the graph) and tensors left out are named; a
    checkpoint without BatchNorm's step counters exports."""
    config = derived_config(tmp_path, PROTO_CFG, "model = dict(test_cfg=dict(mode='slide', "
                            'crop_size=(64, 64), stride=(48, 48)))\n')
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)
    state['state_dict']['auxiliary_head.conv_seg.weight'] = torch.zeros(11, 8, 1, 1)
    # As in checkpoints written before BatchNorm counted its steps (not used at inference).
    counters = [k for k in state['state_dict'] if k.endswith('num_batches_tracked')]
    assert counters
    for key in counters:
        del state['state_dict'][key]
    torch.save(state, tmp_path / 'with_aux.pth')
    tool().main([config, str(tmp_path / 'with_aux.pth'), '--out', str(tmp_path / 'm.onnx'),
                 '--shape', '64', '64'])
    out = capsys.readouterr().out
    assert "mode='slide'" in out and 'runs the whole image at once' in out
    assert '1 tensor(s) of the checkpoint are not part of' in out
    assert 'auxiliary_head.conv_seg.weight' in out


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
