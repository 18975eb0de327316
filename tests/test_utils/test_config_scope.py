"""mmseg_proto_config_scope: mmseg_proto:: resolves inside the block only."""
import pytest
from mmengine.config import Config
from mmengine.config import utils as config_utils

from mmseg_proto.utils.config_scope import mmseg_proto_config_scope


def test_entry_exists_only_inside_the_block():
    assert 'mmseg_proto' not in config_utils.MODULE2PACKAGE
    with mmseg_proto_config_scope():
        assert config_utils.MODULE2PACKAGE['mmseg_proto'] == 'mmseg_proto'
    assert 'mmseg_proto' not in config_utils.MODULE2PACKAGE


def test_an_entry_already_there_is_left_alone():
    config_utils.MODULE2PACKAGE['mmseg_proto'] = 'someone-elses'
    try:
        with mmseg_proto_config_scope():
            assert config_utils.MODULE2PACKAGE['mmseg_proto'] == 'someone-elses'
        assert config_utils.MODULE2PACKAGE['mmseg_proto'] == 'someone-elses'
    finally:
        del config_utils.MODULE2PACKAGE['mmseg_proto']


def test_removed_even_when_parsing_fails(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text("_base_ = ['mmseg_proto::protoseg/no_such_config.py']\n")
    with pytest.raises(Exception):
        with mmseg_proto_config_scope():
            Config.fromfile(str(bad))
    assert 'mmseg_proto' not in config_utils.MODULE2PACKAGE


def test_the_scope_registry_finds_mmseg_and_our_classes():
    """What mmengine does with a dict marked _scope_='mmseg_proto' (a base inherited through
    mmseg_proto::): the lookup starts in our child registry and ends in MMSeg's."""
    from mmseg.registry import HOOKS, METRICS, MODELS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmseg_proto'):
        assert MODELS.get('ProtoHead').__name__ == 'ProtoHead'
        assert MODELS.get('EncoderDecoder').__name__ == 'EncoderDecoder'
        assert HOOKS.get('SegVisualizationHook').__name__ == 'SegVisualizationHook'
        assert METRICS.get('IoUMetric').__name__ == 'IoUMetric'
    head = MODELS.build(dict(type='FCNHead', _scope_='mmseg_proto', in_channels=4,
                             channels=4, num_convs=0, concat_input=False, num_classes=3))
    assert type(head).__name__ == 'FCNHead'

