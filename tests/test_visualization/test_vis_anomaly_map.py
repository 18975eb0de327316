"""tools/visualization/vis_anomaly_map.py: the figure and the map it shows."""
import os.path as osp
import runpy
import sys

import numpy as np
import pytest

from conftest import CAMVID_MINI, PROTO_CFG

TOOL = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))),
                'tools', 'visualization', 'vis_anomaly_map.py')
IMAGE = osp.join(CAMVID_MINI, 'img_dir', 'val')


def _run(*args):
    argv = sys.argv
    sys.argv = [TOOL, *map(str, args)]
    try:
        runpy.run_path(TOOL, run_name='__main__')
    finally:
        sys.argv = argv


@pytest.fixture(scope='module')
def checkpoint(camvid_protoseg):
    """conftest's session-wide 2-iteration CamVid ProtoSeg checkpoint."""
    return camvid_protoseg[0]


def test_figure_shows_the_segmentors_anomaly_map(checkpoint, tmp_path, capsys):
    import mmcv
    from mmseg.apis import inference_model, init_model
    name = sorted(p for p in __import__('os').listdir(IMAGE))[0]
    image = osp.join(IMAGE, name)
    label = osp.join(CAMVID_MINI, 'ann_dir', 'val', name.replace('.jpg', '.png'))
    out = tmp_path / 'fig.png'
    _run(PROTO_CFG, checkpoint, image, '--label', label, '--out', out)
    fig = mmcv.imread(str(out))
    assert fig.shape[1] > 3 * fig.shape[0] and fig.std() > 10  # four panels, not blank
    # The range printed is the one of ProtoEncoderDecoder(anomaly_map=True)'s map.
    model = init_model(PROTO_CFG, checkpoint, device='cpu', cfg_options={
        'model.type': 'ProtoEncoderDecoder', 'model.anomaly_map': True})
    anomaly = inference_model(model, image).anomaly_map.data.numpy()
    printed = capsys.readouterr().out.split('anomaly map ')[-1].split()
    assert float(printed[0]) == pytest.approx(anomaly.min(), abs=1e-3)
    assert float(printed[2].rstrip(':')) == pytest.approx(anomaly.max(), abs=1e-3)


@pytest.mark.parametrize('bad, message', [
    (['--out', 'fig.jpg'], 'must name a .png'),
    (['--label', 'missing.png', '--out', 'f.png'], "label 'missing.png' is not a file"),
])
def test_bad_arguments(checkpoint, tmp_path, capsys, bad, message):
    image = osp.join(IMAGE, sorted(__import__('os').listdir(IMAGE))[0])
    with pytest.raises(SystemExit):
        _run(PROTO_CFG, checkpoint, image, *bad)
    assert message in capsys.readouterr().err
