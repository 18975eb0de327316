"""Import-time check of the MMSeg stack that mmseg_proto runs on.

``setup.py`` does not require ``mmsegmentation``, ``mmcv`` or ``mmengine`` by distribution
name, so that installing this package never replaces, duplicates or downgrades a stack the
user already has: OpenMMLab's releases (``mmsegmentation``, ``mmcv``, ``mmengine``) or the
OneDL line (``onedl-mmsegmentation``, ``onedl-mmcv``, ``onedl-mmengine``), which install the
same modules under other distribution names. Instead, importing ``mmseg_proto`` checks the
versions of the *modules* it finds and fails with one message naming the module, the version
found, the distribution it came from and the supported range.
"""
import importlib.metadata as metadata
import importlib.util
from typing import Dict, List, Optional, Tuple

from packaging.version import Version

# module -> (lowest supported, first unsupported). Checked: OpenMMLab mmseg 1.2.2 / mmcv 2.1.0 /
# mmengine 0.10.7 and OneDL mmseg 1.4.2 / mmcv 2.3.6 / mmengine 0.10.12, with torch 2.13.0
# (tools/dev/check_onedl_stack.sh).
SUPPORTED: Dict[str, Tuple[str, str]] = {
    'mmengine': ('0.10.0', '0.11.0'),
    'mmcv': ('2.0.0rc4', '2.4.0'),
    'mmseg': ('1.2.0', '1.5.0'),
}
INSTALL_HINT = ('Install a supported stack: `bash tools/setup_env.sh` (OpenMMLab, pinned), '
                '`pip install "mmseg_proto[openmmlab]"`, or the OneDL line '
                '(onedl-mmsegmentation 1.4.x, onedl-mmcv 2.3.x, onedl-mmengine 0.10.x).')


def module_distributions(module: str) -> List[str]:
    """Names of the installed distributions that provide the top-level ``module``."""
    return sorted(set(metadata.packages_distributions().get(module, [])))


def module_version(module: str) -> Tuple[Optional[str], str]:
    """(version, where it came from) of an importable top-level module, without importing it
    when a distribution provides it; (None, '') if it is not installed."""
    dists = module_distributions(module)
    if len(dists) > 1:
        raise ImportError(
            f'mmseg_proto: the module `{module}` is provided by several installed '
            f'distributions ({", ".join(dists)}); they overwrite each other\'s files. '
            f'Uninstall all but one (`pip uninstall {" ".join(dists)}`, then reinstall one).')
    if dists:
        return metadata.version(dists[0]), f'distribution {dists[0]}'
    if importlib.util.find_spec(module) is None:
        return None, ''
    mod = importlib.import_module(module)  # a source checkout on the path
    return getattr(mod, '__version__', None), f'module at {mod.__file__}'


def resolve_mmseg_scope_to_installed_distribution() -> None:
    """Let mmengine's ``mmseg::`` config references find a OneDL install.

    mmengine resolves ``_base_ = ['mmseg::...']`` through the *distribution* name
    ``mmsegmentation`` (``MODULE2PACKAGE``), which OneDL's ``onedl-mmsegmentation`` does not
    have, so such configs fail with "mmsegmentation is not installed". When ``mmseg`` comes
    from a distribution of another name and none called ``mmsegmentation`` is installed, this
    points the ``mmseg`` entry at that distribution. Configs are parsed before their
    ``custom_imports`` run, so this helps what imports mmseg_proto first (our tools, tests,
    Python code); see README "Install into an existing MMSeg stack".
    """
    from mmengine.config import utils as config_utils
    table = getattr(config_utils, 'MODULE2PACKAGE', None) or getattr(
        config_utils, 'PKG2PROJECT', None)
    dists = module_distributions('mmseg')
    if table is None or table.get('mmseg') in dists or len(dists) != 1:
        return
    table['mmseg'] = dists[0]


def check_mmseg_stack() -> None:
    """Raise ImportError with what to change if mmengine, mmcv or mmseg is missing or has
    an unsupported version."""
    for module, (low, high) in SUPPORTED.items():
        version, origin = module_version(module)
        if version is None:
            raise ImportError(f'mmseg_proto needs the module `{module}` ({low} <= version < '
                              f'{high}), which is not installed. {INSTALL_HINT}')
        if not Version(low) <= Version(version) < Version(high):
            raise ImportError(
                f'mmseg_proto supports {module} {low} <= version < {high}; found {module} '
                f'{version} ({origin}). {INSTALL_HINT}')
