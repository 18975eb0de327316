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



def test_onedl_mmseg_entry_is_scoped(monkeypatch):
    """On the OneDL line the scope points `mmseg` at onedl-mmsegmentation and puts it back."""
    from mmengine.config import utils as config_utils

    from mmseg_proto.utils import stack_check
    from mmseg_proto.utils.config_scope import mmseg_proto_config_scope
    table = getattr(config_utils, 'MODULE2PACKAGE', None) or config_utils.PKG2PROJECT
    monkeypatch.setitem(table, 'mmseg', 'mmsegmentation')
    monkeypatch.setattr(stack_check, 'module_distributions',
                        lambda module: ['onedl-mmsegmentation'])
    with mmseg_proto_config_scope():
        assert table['mmseg'] == 'onedl-mmsegmentation'
    assert table['mmseg'] == 'mmsegmentation'


def test_importing_the_package_changes_nothing_process_wide():
    """Importing mmseg_proto registers modules and the checkpoint loader, nothing else:
    mmengine's scope table, torch's weights-only allow-list and the environment are as
    MMSeg's own imports leave them."""
    import subprocess
    import sys
    code = (
        # What MMSeg itself changes when imported is not ours: import it first.
        'import os, torch, mmengine.config.utils as u, mmengine.runner, mmseg.apis\n'
        'import mmseg.models, mmseg.datasets, mmseg.engine, mmseg.evaluation\n'
        'table = getattr(u, "MODULE2PACKAGE", None) or u.PKG2PROJECT\n'
        'before = (dict(table), list(torch.serialization.get_safe_globals()), dict(os.environ))\n'
        'import mmseg_proto\n'
        'after = (dict(table), list(torch.serialization.get_safe_globals()), dict(os.environ))\n'
        'assert before == after, [b == a for b, a in zip(before, after)]\n'
        'print("unchanged")\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0 and 'unchanged' in out.stdout, out.stderr[-2000:]
