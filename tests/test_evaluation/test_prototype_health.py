"""Prototype health: the figures by hand on constructed cases, and the tool on a checkpoint
trained here."""
import importlib.util
import math
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from conftest import PROTO_CFG, REPO, without_validation

from mmseg_proto.evaluation import (format_health_table, nearest_prototype_usage,
                                    prototype_health)


def test_usage_and_health_by_hand():
    # 2 classes x 3 prototypes in 2-D; class 0's prototypes 0 and 1 identical.
    protos = torch.tensor([[[1., 0.], [1., 0.], [0., 1.]],
                           [[-1., 0.], [0., -1.], [0.6, -0.8]]])
    emb = F.normalize(torch.tensor([[1., 0.1]] * 95 + [[0.1, 1.]] * 5 + [[-1., 0.]] * 50 +
                                   [[0., 1.]] * 3), dim=1)
    labels = torch.tensor([0] * 100 + [1] * 50 + [255] * 3)
    usage = nearest_prototype_usage(emb, labels, protos, chunk=7)
    # argmax takes the first of tied prototypes 0 and 1
    assert usage.tolist() == [[95, 0, 5], [50, 0, 0]]
    h = prototype_health(protos, usage)
    assert h['pixels'].tolist() == [100, 50]
    assert h['effective'].tolist() == [2, 1]
    p = torch.tensor([0.95, 0.05], dtype=torch.float64)
    assert math.isclose(float(h['exp_entropy'][0]), float(torch.exp(-(p * p.log()).sum())),
                        rel_tol=1e-9)
    assert float(h['exp_entropy'][1]) == 1.0
    assert float(h['cos_max'][0]) == 1.0 and float(h['cos_min'][0]) == 0.0
    assert math.isclose(float(h['cos_mean'][0]), 1 / 3, rel_tol=1e-9)
    assert math.isclose(float(h['cos_min'][1]), -0.6, rel_tol=1e-6)
    table = format_health_table(h, ['road', 'car'])
    assert '| road | 100 | 2 | 1.22 |' in table and 'mean over 2 classes' in table


def test_a_class_without_pixels_is_left_out_of_the_mean():
    protos = F.normalize(torch.randn(3, 2, 4), dim=-1)
    usage = torch.tensor([[10, 0], [0, 0], [5, 5]])
    h = prototype_health(protos, usage)
    assert math.isnan(float(h['effective'][1]))
    assert 'mean over 2 classes** | 10 | 1.5 |' in format_health_table(h)


def test_a_share_equal_to_min_share_counts_as_effective():
    """As documented: used when the share is *at least* min_share."""
    protos = F.normalize(torch.randn(3, 4, 2), dim=-1)
    usage = torch.tensor([[1, 99, 0, 0],  # 1/100: exactly the default 0.01
                          [3, 7, 90, 0],
                          [1, 100, 0, 0]])  # 1/101 < 0.01
    assert prototype_health(protos, usage)['effective'].tolist() == [2, 3, 1]
    assert prototype_health(protos, usage, min_share=0.03)['effective'].tolist() == [1, 3, 1]
    assert prototype_health(protos, usage, min_share=0.07)['effective'].tolist() == [1, 2, 1]
    assert prototype_health(protos, usage, min_share=0.9)['effective'].tolist() == [1, 1, 1]
    assert prototype_health(protos, usage, min_share=0.99)['effective'].tolist() == [1, 0, 1]


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """ProtoSeg after 2 iterations of the shipped CamVid config."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    work_dir = tmp_path_factory.mktemp('health')
    cfg = Config.fromfile(PROTO_CFG)
    cfg.work_dir = str(work_dir)
    cfg.train_cfg.max_iters = 2
    without_validation(cfg)
    cfg.default_hooks.checkpoint.interval = 2
    Runner.from_cfg(cfg).train()
    return str(work_dir / 'iter_2.pth')


def health_tool():
    """tools/analysis_tools/prototype_health.py as a module (its ``main(argv)``)."""
    spec = importlib.util.spec_from_file_location(
        'prototype_health_tool', osp.join(REPO, 'tools', 'analysis_tools', 'prototype_health.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize('num_images', ['0', '-3', 'two'])
def test_tool_refuses_a_number_of_images_below_one(checkpoint, num_images, capsys):
    with pytest.raises(SystemExit) as exc:
        health_tool().main([PROTO_CFG, checkpoint, '--num-images', num_images])
    assert exc.value.code == 2  # argparse's usage error, before any model is built
    err = capsys.readouterr().err
    assert f'argument --num-images: {num_images}' in err.replace("'", '')
    assert ('N must be >= 1' if num_images != 'two' else 'is not an integer') in err


def test_tool_on_a_trained_checkpoint(checkpoint, tmp_path):
    out = tmp_path / 'health.md'
    table = health_tool().main([PROTO_CFG, checkpoint, '--num-images', '3', '--out', str(out)])
    text = out.read_text()
    assert text.endswith(table + '\n')  # the table it returns is the one it writes
    assert '| road |' in text and '| sky |' in text and 'mean over' in text
    rows = [line for line in text.splitlines() if line.startswith('| road |')]
    effective = int(rows[0].split('|')[3])
    assert 1 <= effective <= 10
