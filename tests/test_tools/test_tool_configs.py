"""Every shipped tool that reads a config reads one that inherits ours through
``mmseg_proto::`` (the README's installed-package example), and gives the same result as
with the repository's config itself.

mmengine looks for ``<installed mmseg_proto>/.mim/configs``; an editable install (the test
environment) has no package directory in site-packages, so the fixture points mmengine at a
stand-in package folder whose ``.mim`` links to the repository's configs, as a wheel holds
them."""
import glob
import importlib.util
import os
import os.path as osp

import numpy as np
import pytest
import torch
from conftest import CAMVID_MINI, PROTO_CFG, REPO
from mmengine.config import utils as config_utils

CAMVID = 'protoseg/camvid/protoseg_segformer_mit-b0_1xb4-80it_camvid-160x160.py'
VAL_IMAGE = sorted(glob.glob(osp.join(CAMVID_MINI, 'img_dir', 'val', '*.jpg')))[0]
BASELINE_HEADER = ('# Baseline: configs/baselines/camvid/'
                   'segformer_mit-b0_1xb4-80it_camvid-160x160.py\n')


def tool(folder, name):
    spec = importlib.util.spec_from_file_location(
        name, osp.join(REPO, 'tools', folder, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """Untrained ProtoSeg weights of the CamVid config (the tools take the classes from the
    config): what the tools compute does not depend on training."""
    from mmseg.apis import init_model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('tool_configs') / 'protoseg.pth'
    torch.save({'state_dict': init_model(PROTO_CFG, None, device='cpu').state_dict(),
                'meta': {}}, path)
    return str(path)


@pytest.fixture
def user_config(tmp_path, monkeypatch):
    """A user config whose only base is ours through ``mmseg_proto::``; mmengine finds the
    package as it would after ``pip install mmseg_proto``."""
    from mmengine.config import config as config_module
    package = tmp_path / 'site-packages' / 'mmseg_proto'
    (package / '.mim').mkdir(parents=True)
    for name in ('configs', 'model-index.yml'):
        os.symlink(osp.join(REPO, name), package / '.mim' / name)
    installed_path = config_module.get_installed_path
    monkeypatch.setattr(config_module, 'get_installed_path',
                        lambda name: str(package) if name == 'mmseg_proto'
                        else installed_path(name))
    monkeypatch.setenv('MMSEG_PROTO_CAMVID', CAMVID_MINI)
    path = tmp_path / 'my_camvid.py'
    path.write_text(f"{BASELINE_HEADER}_base_ = ['mmseg_proto::{CAMVID}']\n")
    yield str(path)
    # The tools add mmengine's table entry while they run, and remove it.
    assert 'mmseg_proto' not in config_utils.MODULE2PACKAGE


def test_mmengine_alone_refuses_the_scope(user_config):
    """What the tools must get round (if this starts to pass, mmengine changed)."""
    from mmengine.config import Config
    with pytest.raises(AssertionError, match='does not support to load mmseg_proto'):
        Config.fromfile(user_config)


def test_prototype_health(user_config, checkpoint):
    health = tool('analysis_tools', 'prototype_health')
    args = ['--num-images', '1']
    assert (health.main([user_config, checkpoint, *args])
            == health.main([PROTO_CFG, checkpoint, *args]))


def test_pytorch2onnx(user_config, checkpoint, tmp_path):
    pytest.importorskip('onnxruntime')
    import mmcv

    from mmseg_proto.utils.onnx_export import compare, load
    out = str(tmp_path / 'user.onnx')
    tool('deployment', 'pytorch2onnx').main(
        [user_config, checkpoint, '--out', out, '--shape', '64', '64'])
    image = mmcv.imresize(mmcv.imread(VAL_IMAGE), (64, 64))
    result = compare(load(PROTO_CFG, checkpoint), out, [image])
    assert result['max_abs_diff'] <= 1e-4 and result['argmax_agreement'] >= 0.9999


def test_count_params(user_config, tmp_path, capsys):
    ours = tmp_path / 'ours.py'
    ours.write_text(f'{BASELINE_HEADER}_base_ = [{PROTO_CFG!r}]\n')
    counter = tool('analysis_tools', 'count_params')

    def row(config):
        counter.main([config])
        return capsys.readouterr().out.splitlines()[-1].split('|')[2:]

    expected = row(str(ours))
    assert row(user_config) == expected
    assert float(expected[2]) > 0  # ProtoSeg (M)
    # The baseline named through our scope, as a user's config inheriting ours would.
    scoped = tmp_path / 'scoped.py'
    scoped.write_text(BASELINE_HEADER.replace('configs/', 'mmseg_proto::', 1)
                      + f'_base_ = [{PROTO_CFG!r}]\n')
    assert row(str(scoped)) == expected
    with pytest.raises(ValueError, match="'mmdet::x.py': only the mmseg:: and mmseg_proto::"):
        counter.resolve_config('mmdet::x.py')


def test_vis_prototype_similarity(user_config, checkpoint, tmp_path):
    from PIL import Image
    vis = tool('visualization', 'vis_prototype_similarity')
    pngs = []
    for name, config in (('user', user_config), ('ours', PROTO_CFG)):
        out_dir = tmp_path / name
        assert vis.main([config, checkpoint, VAL_IMAGE, '--classes', 'road',
                         '--out-dir', str(out_dir), '--panel-size', '0.6']) == 0
        (png, ) = glob.glob(str(out_dir / '*.png'))
        pngs.append(np.asarray(Image.open(png)))
    np.testing.assert_array_equal(pngs[0], pngs[1])


def test_vis_embedding(user_config, checkpoint, tmp_path):
    from PIL import Image
    vis = tool('visualization', 'vis_embedding')
    pngs = []
    for name, config in (('user', user_config), ('ours', PROTO_CFG)):
        out = str(tmp_path / f'{name}.png')
        assert vis.main([config, checkpoint, '--num-images', '1', '--points-per-class', '20',
                         '--classes', 'road', 'sky', '--panel-size', '1', '--out', out]) == 0
        pngs.append(np.asarray(Image.open(out)))
    np.testing.assert_array_equal(pngs[0], pngs[1])
