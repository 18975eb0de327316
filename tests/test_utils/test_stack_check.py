"""The import-time check of the MMSeg stack and the mmseg:: scope alias for OneDL."""
import importlib
import os
import subprocess
import sys
import types

import pytest
from conftest import REPO

from mmseg_proto.utils import stack_check

SUPPORTED_RANGES = {'mmengine': '0.10.0 <= version < 0.11.0',
                    'mmcv': '2.0.0rc4 <= version < 2.4.0', 'mmseg': '1.2.0 <= version < 1.5.0'}


def test_installed_stack_is_supported():
    stack_check.check_mmseg_stack()  # the environment the suite runs in
    for module in ('mmseg', 'mmcv', 'mmengine'):
        version, origin = stack_check.module_version(module)
        imported = importlib.import_module(module)
        assert version == imported.__version__
        assert origin.startswith(f'imported from {imported.__file__}')


def fake_module(monkeypatch, module, version, file=None):
    """Make ``import module`` give a stand-in with this __version__ (None: no __version__)."""
    fake = types.ModuleType(module)
    fake.__file__ = file or f'/elsewhere/{module}/__init__.py'
    if version is not None:
        fake.__version__ = version
    monkeypatch.setitem(sys.modules, module, fake)
    return fake


def test_the_imported_module_is_checked_not_the_installed_distribution(monkeypatch):
    # Another mmseg first on the path: its version counts, and the message says where it is.
    fake_module(monkeypatch, 'mmseg', '1.6.0')
    with pytest.raises(ImportError) as err:
        stack_check.check_mmseg_stack()
    assert (f"supports mmseg {SUPPORTED_RANGES['mmseg']}; found mmseg 1.6.0 (imported from "
            '/elsewhere/mmseg/__init__.py') in str(err.value)
    for dist in stack_check.module_distributions('mmseg'):  # the one it shadows, named too
        assert f'installed distribution {dist} ' in str(err.value)
    # Conversely, a supported module is admitted whatever the metadata says.
    fake_module(monkeypatch, 'mmseg', '1.2.2')
    monkeypatch.setattr(stack_check.metadata, 'version', lambda dist: '0.0.1')
    stack_check.check_mmseg_stack()


def test_another_mmseg_first_on_pythonpath_stops_the_import(tmp_path):
    """As MMSeg's dist_train.sh prepends a checkout to PYTHONPATH: `import mmseg_proto`
    fails with the usual message naming that module."""
    (tmp_path / 'mmseg').mkdir()
    (tmp_path / 'mmseg' / '__init__.py').write_text("__version__ = '1.6.0'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]),
               OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', 'import mmseg_proto'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert (f"ImportError: mmseg_proto supports mmseg {SUPPORTED_RANGES['mmseg']}; found mmseg "
            f"1.6.0 (imported from {tmp_path / 'mmseg' / '__init__.py'}") in proc.stderr, \
        proc.stderr[-2000:]


@pytest.mark.parametrize('module,version', [('mmengine', '0.10.7-custom'),
                                            ('mmcv', 'unknown'), ('mmseg', '1.2.2 final')])
def test_a_version_that_is_not_pep_440_gets_the_usual_message(module, version, monkeypatch):
    fake_module(monkeypatch, module, version)
    with pytest.raises(ImportError) as err:
        stack_check.check_mmseg_stack()
    assert (f'mmseg_proto supports {module} {SUPPORTED_RANGES[module]}; found {module} '
            f'{version} (imported from /elsewhere/{module}/__init__.py') in str(err.value)
    assert 'not a PEP 440 version' in str(err.value)
    assert stack_check.INSTALL_HINT in str(err.value)


@pytest.mark.parametrize('module,version', [
    ('mmengine', '0.11.0rc1'), ('mmseg', '1.5.0rc0'), ('mmcv', '2.4.0a1'),
    ('mmengine', '0.11.0.dev0'), ('mmseg', '1.5.0.post1'), ('mmcv', '2.0.0rc3'),
    ('mmengine', '0.9.9'), ('mmseg', '1.5.0'),
])
def test_pre_releases_of_the_first_unsupported_version_are_refused(module, version,
                                                                   monkeypatch):
    assert not stack_check.version_supported(version, *stack_check.SUPPORTED[module])
    fake_module(monkeypatch, module, version)
    with pytest.raises(ImportError, match=rf'found {module} {version} \(imported from'):
        stack_check.check_mmseg_stack()


@pytest.mark.parametrize('module,version', [
    ('mmcv', '2.0.0rc4'), ('mmengine', '0.10.99rc1'), ('mmseg', '1.4.2+onedl'),
    ('mmengine', '0.10.7.post1'), ('mmcv', '2.3.6'), ('mmseg', '1.2.0'),
])
def test_supported_versions_pass(module, version, monkeypatch):
    assert stack_check.version_supported(version, *stack_check.SUPPORTED[module])
    fake_module(monkeypatch, module, version)
    stack_check.check_mmseg_stack()


def test_a_module_without_version(monkeypatch):
    fake_module(monkeypatch, 'mmcv', None)
    with pytest.raises(ImportError, match=r'found a module `mmcv` without __version__ '
                                          r'\(imported from /elsewhere/mmcv/__init__.py'):
        stack_check.check_mmseg_stack()


def test_a_module_failing_to_import_is_named(monkeypatch, tmp_path):
    (tmp_path / 'broken_stack_mod_xyz').mkdir()
    (tmp_path / 'broken_stack_mod_xyz' / '__init__.py').write_text(
        "raise AssertionError('needs mmcv<2.2.0')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(stack_check.SUPPORTED, 'broken_stack_mod_xyz', ('1.0', '2.0'))
    with pytest.raises(ImportError, match=r'mmseg_proto: importing `broken_stack_mod_xyz` '
                                          r'\(from .*\) failed: AssertionError: needs '
                                          r'mmcv<2.2.0\. Install a supported stack'):
        stack_check.check_mmseg_stack()


def test_installed_distributions_are_scanned_once(monkeypatch):
    calls = []
    real = stack_check.metadata.packages_distributions

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(stack_check.metadata, 'packages_distributions', counting)
    stack_check._packages_distributions.cache_clear()
    try:
        stack_check.check_mmseg_stack()
        stack_check.resolve_mmseg_scope_to_installed_distribution()
        stack_check.check_mmseg_stack()
    finally:
        stack_check._packages_distributions.cache_clear()
    assert len(calls) == 1


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
