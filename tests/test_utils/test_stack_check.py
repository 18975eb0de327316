"""The import-time check of the MMSeg stack and the mmseg:: scope alias for OneDL."""
import pytest

from mmseg_proto.utils import stack_check


def test_installed_stack_is_supported():
    stack_check.check_mmseg_stack()  # the environment the suite runs in
    for module in ('mmseg', 'mmcv', 'mmengine'):
        version, origin = stack_check.module_version(module)
        assert version and origin


def test_unsupported_version_names_module_version_origin_and_range(monkeypatch):
    monkeypatch.setitem(stack_check.SUPPORTED, 'mmseg', ('9.0.0', '9.1.0'))
    with pytest.raises(ImportError) as err:
        stack_check.check_mmseg_stack()
    message = str(err.value)
    version, origin = stack_check.module_version('mmseg')
    assert 'mmseg 9.0.0 <= version < 9.1.0' in message
    assert f'found mmseg {version} ({origin})' in message


def test_missing_module_and_duplicated_distributions(monkeypatch):
    monkeypatch.setitem(stack_check.SUPPORTED, 'no_such_module_xyz', ('1.0', '2.0'))
    with pytest.raises(ImportError, match='no_such_module_xyz.*not installed'):
        stack_check.check_mmseg_stack()
    monkeypatch.delitem(stack_check.SUPPORTED, 'no_such_module_xyz')
    monkeypatch.setattr(stack_check, 'module_distributions',
                        lambda module: ['mmsegmentation', 'onedl-mmsegmentation'])
    with pytest.raises(ImportError, match='several installed distributions'):
        stack_check.module_version('mmseg')


def test_mmseg_scope_points_at_the_installed_distribution(monkeypatch):
    from mmengine.config import utils as config_utils
    table = getattr(config_utils, 'MODULE2PACKAGE', None) or config_utils.PKG2PROJECT
    monkeypatch.setitem(table, 'mmseg', 'mmsegmentation')
    monkeypatch.setattr(stack_check, 'module_distributions',
                        lambda module: ['onedl-mmsegmentation'])
    stack_check.resolve_mmseg_scope_to_installed_distribution()
    assert table['mmseg'] == 'onedl-mmsegmentation'
