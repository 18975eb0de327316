"""Visualisation tools and training diagnostics, on a 10-iteration run."""
import glob
import importlib.util
import json
import os.path as osp
import uuid

import numpy as np
import pytest
import torch
from conftest import BASELINE_CFG, CAMVID_MINI, PROTO_CFG, REPO, without_validation
from mmengine.config import Config
from mmengine.runner import Runner

DIAG_KEYS = ('train/proto_updated', 'train/proto_shift_deg',
             'train/proto_used', 'train/proto_entropy', 'train/proto_effective')
VAL_IMGS = sorted(glob.glob(osp.join(CAMVID_MINI, 'img_dir', 'val',
                                     '*.jpg')))[:2]


def _cfg(path, work_dir, iters):
    cfg = Config.fromfile(path)
    cfg.work_dir = str(work_dir)
    cfg.train_cfg.max_iters = iters
    without_validation(cfg)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint.interval = iters
    cfg.default_hooks.logger.interval = 5
    cfg.train_dataloader.batch_size = 2
    return cfg


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A ProtoSeg run of 10 iterations (hook logs every 5) and an untrained
    parametric baseline saved without dataset meta (the tools then take the
    classes from the config); returns (runner, proto ckpt, baseline ckpt)."""
    root = tmp_path_factory.mktemp('vis')
    cfg = _cfg(PROTO_CFG, root / 'proto', 10)
    cfg.custom_hooks = [dict(type='PrototypeUpdateHook', log_interval=5)]
    # Unique names: in one process, runners built in the same second from
    # the same config share a MessageHub, and all configs name their
    # visualizer 'visualizer', so a later runner would reuse an earlier
    # one's (writing its logs to the earlier work_dir).
    cfg.experiment_name = f'test_visualization_{uuid.uuid4().hex[:8]}'
    cfg.visualizer.name = cfg.experiment_name
    runner = Runner.from_cfg(cfg)
    runner.train()
    from mmseg.apis import init_model
    base = init_model(BASELINE_CFG, None, device='cpu')
    torch.save({'state_dict': base.state_dict()}, root / 'base.pth')
    return (runner, str(root / 'proto' / 'iter_10.pth'),
            str(root / 'base.pth'))


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(
        name, osp.join(REPO, 'tools', 'visualization', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png(path):
    import matplotlib.image as mpimg
    assert osp.isfile(path), f'{path} was not written'
    img = mpimg.imread(path)  # float in [0, 1], (H, W, 3|4)
    assert img.ndim == 3
    assert float(np.std(img[..., :3])) > 0.05, f'{path} looks blank'
    return img


def _assert_size(img, width_in, height_in, dpi):
    assert abs(img.shape[1] - width_in * dpi) <= 1
    assert abs(img.shape[0] - height_in * dpi) <= 1


def test_diagnostics_in_message_hub_and_logs(trained):
    runner = trained[0]
    scalars = runner.message_hub.log_scalars
    for key in DIAG_KEYS:
        assert key in scalars, f'{key} not logged'
        assert 'loss' not in key  # mmseg would add it to the total loss
        assert len(scalars[key]._log_history) == 2  # iterations 5 and 10
    # Some prototypes were updated and moved; Sinkhorn spread pixels over
    # several prototypes (neither one-hot, entropy 0, nor uniform, 1).
    assert 0.0 < scalars['train/proto_updated'].current() <= 1.0
    assert scalars['train/proto_shift_deg'].current() > 0.0
    assert 0.0 < scalars['train/proto_entropy'].current() < 1.0
    assert 1.0 <= scalars['train/proto_effective'].current() <= 10.0  # K = 10
    assert 0.0 < scalars['train/proto_used'].current()
    assert 'train/decode.loss_ppc' in scalars
    # Console/text log and JSON log (LoggerHook), per-class entropies in
    # the visualizer's scalars.json.
    log_dir = runner.log_dir
    text = open(glob.glob(osp.join(log_dir, '*.log'))[0]).read()
    assert 'proto_used:' in text and 'proto_entropy:' in text
    json_log = [f for f in glob.glob(osp.join(log_dir, 'vis_data', '*.json'))
                if not f.endswith('scalars.json')][0]
    records = [json.loads(line) for line in open(json_log)]
    assert any('proto_entropy' in r and 'proto_used' in r for r in records)
    per_class = [json.loads(line) for line in open(
        osp.join(log_dir, 'vis_data', 'scalars.json'))]
    keys = {k for r in per_class for k in r if 'proto_entropy/' in k}
    classes = runner.train_dataloader.dataset.metainfo['classes']
    assert keys and all(k.split('/')[-1] in classes for k in keys)


def test_prototype_similarity_tool(trained, tmp_path, capsys):
    _, ckpt, _ = trained
    out = tmp_path / 'sim'
    tool = _load_tool('vis_prototype_similarity')
    assert tool.main([PROTO_CFG, ckpt, *VAL_IMGS, '--classes', 'road', 'car', '--out-dir',
                      str(out), '--dpi', '50']) == 0
    assert 'road, car' in capsys.readouterr().out
    for path in VAL_IMGS:
        stem = osp.splitext(osp.basename(path))[0]
        img = _png(out / f'{stem}_proto_sim.png')
        w, h, _ = tool.figure_size(2, 10, 1.6, 360 / 480)
        _assert_size(img, w, h, 50)


def test_embedding_tool_pca_with_parametric(trained, tmp_path, capsys):
    _, ckpt, base_ckpt = trained
    out = tmp_path / 'emb.png'
    tool = _load_tool('vis_embedding')
    assert tool.main([PROTO_CFG, ckpt, '--parametric-config', BASELINE_CFG,
                      '--parametric-checkpoint', base_ckpt, '--method', 'pca', '--classes',
                      'road', 'car', 'sky', '--num-images', '2', '--points-per-class', '100',
                      '--out', str(out), '--dpi', '50']) == 0
    assert 'pca' in capsys.readouterr().out
    _assert_size(_png(out), *tool.figure_size(2, 4.0), 50)


def test_embedding_tool_tsne(trained, tmp_path):
    pytest.importorskip('sklearn')
    _, ckpt, base_ckpt = trained
    tool = _load_tool('vis_embedding')
    out = tmp_path / 'tsne.png'
    assert tool.main([PROTO_CFG, ckpt, '--method', 'tsne', '--classes',
                      'road', 'sky', '--num-images', '1',
                      '--points-per-class', '40', '--out', str(out),
                      '--dpi', '40', '--png-colors', '64']) == 0
    _assert_size(_png(out), *tool.figure_size(1, 4.0), 40)


def test_embedding_tool_errors(trained, tmp_path):
    _, ckpt, base_ckpt = trained
    tool = _load_tool('vis_embedding')
    out = tmp_path / 'never.png'
    with pytest.raises(ValueError, match='Unknown class'):
        tool.main([PROTO_CFG, ckpt, '--classes', 'unicorn', '--out',
                   str(out)])
    # A parametric model has no prototypes: a clear error, not a crash.
    with pytest.raises(TypeError, match='not a ProtoHead'):
        tool.main([BASELINE_CFG, base_ckpt, '--out', str(out)])
    # A checkpoint of another model is refused.
    with pytest.raises(RuntimeError, match='does not fit'):
        tool.main([PROTO_CFG, base_ckpt, '--out', str(out)])
    assert not out.exists()
