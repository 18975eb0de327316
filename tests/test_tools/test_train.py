"""mmseg_proto.tools.train, the CPU multi-process training entry: its refusals and its
SyncBN -> BN rewrite (the two-process run itself: tests/test_tools/test_dist_train.py)."""
import pytest
import torch
from conftest import PROTO_CFG


def test_train_tool_errors_clearly_on_cpu(monkeypatch):
    """The CPU training entry refuses what cannot work, before any run."""
    from mmseg_proto.tools import train
    if torch.cuda.is_available():
        pytest.skip('CPU-only behaviour')
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match='--amp needs CUDA'):
        train.build_config(train.parse_args([PROTO_CFG, '--amp']))
    with pytest.raises(RuntimeError, match='torchrun'):
        train.build_config(
            train.parse_args([PROTO_CFG, '--launcher', 'pytorch']))
    cfg = train.build_config(train.parse_args([PROTO_CFG]))
    assert cfg.launcher == 'none' and cfg.get('model_wrapper_cfg') is None


def test_sync_bn_reverted_for_cpu_processes():
    from mmseg_proto.tools.train import revert_sync_norms
    cfg = dict(backbone=dict(norm_cfg=dict(type='SyncBN')),
               heads=[dict(norm_cfg=dict(type='SyncBN', eps=1e-3)),
                      dict(norm_cfg=dict(type='GN'))])
    assert revert_sync_norms(cfg) == ['backbone.norm_cfg',
                                      'heads[0].norm_cfg']
    assert cfg['heads'][0]['norm_cfg'] == dict(type='BN', eps=1e-3)
    assert cfg['heads'][1]['norm_cfg'] == dict(type='GN')
