"""Import-time check of the MMSeg stack that mmseg_proto runs on.

``setup.py`` does not require ``mmsegmentation``, ``mmcv`` or ``mmengine`` by distribution
name, so that installing this package never replaces, duplicates or downgrades a stack the
user already has: OpenMMLab's releases (``mmsegmentation``, ``mmcv``, ``mmengine``) or the
OneDL line (``onedl-mmsegmentation``, ``onedl-mmcv``, ``onedl-mmengine``), which install the
same modules under other distribution names. Instead, importing ``mmseg_proto`` checks the
*modules* that ``import`` finds, the ones that will run: their ``__version__`` and the file each
was imported from, so that another ``mmseg`` first on ``PYTHONPATH`` (a source checkout, as
MMSeg's ``dist_train.sh`` prepends) is checked, not the installed distribution it shadows. A
module out of range fails with one message naming the module, the version found, where it was
imported from, the installed distribution (if any) and the supported range.
"""
import functools
import importlib
import importlib.metadata as metadata
import importlib.util
import sys
from typing import Dict, List, Optional, Tuple

from packaging.version import InvalidVersion, Version

# module -> (lowest supported, first unsupported). Checked: OpenMMLab mmseg 1.2.2 / mmcv 2.1.0 /
# mmengine 0.10.7 and OneDL mmseg 1.4.2 / mmcv 2.3.6 / mmengine 0.10.12, with torch 2.13.0
# (tools/dev/check_onedl_stack.sh). The first unsupported version excludes its pre-, dev- and
# post-releases too (0.11.0rc1 is refused); the lowest supported is compared as written.
# Checked in this order: mmcv imports mmengine, mmseg imports both.
SUPPORTED: Dict[str, Tuple[str, str]] = {
    'mmengine': ('0.10.0', '0.11.0'),
    'mmcv': ('2.0.0rc4', '2.4.0'),
    'mmseg': ('1.2.0', '1.5.0'),
}
INSTALL_HINT = ('Install a supported stack: `bash tools/setup_env.sh` (OpenMMLab, pinned), '
                '`pip install "mmseg_proto[openmmlab]"`, or the OneDL line '
                '(onedl-mmsegmentation 1.4.x, onedl-mmcv 2.3.x, onedl-mmengine 0.10.x).')


@functools.lru_cache(maxsize=None)
def _packages_distributions() -> Dict[str, Tuple[str, ...]]:
    """``importlib.metadata.packages_distributions()``, read once per process (it scans every
    installed distribution; the import-time check needs it several times)."""
    return {module: tuple(dists)
            for module, dists in metadata.packages_distributions().items()}


def module_distributions(module: str) -> List[str]:
    """Names of the installed distributions that provide the top-level ``module``.

    Args:
        module (str): A top-level module name, e.g. ``'mmseg'``.

    Returns:
        list[str]: Sorted distribution names; empty for a module no distribution provides
        (a source checkout on the path, or a missing module).
    """
    return sorted(set(_packages_distributions().get(module, ())))


def version_supported(version: str, low: str, high: str) -> bool:
    """Whether ``version`` lies in ``[low, high)``, ``high``'s pre-releases excluded.

    Args:
        version (str): A PEP 440 version string.
        low (str): The lowest supported version (its pre-releases are below it).
        high (str): The first unsupported version; its pre-, dev- and post-releases
            (``0.11.0rc1``, ``0.11.0.dev0``) are unsupported too.

    Returns:
        bool: True if supported.

    Raises:
        packaging.version.InvalidVersion: ``version`` is not a PEP 440 version.
    """
    parsed = Version(version)
    return Version(low) <= parsed and Version(parsed.base_version) < Version(high)


def module_version(module: str) -> Tuple[Optional[str], str]:
    """The ``__version__`` of the module that ``import module`` gives, and where it came from.

    The module is imported (or taken from ``sys.modules``) rather than looked up in installed
    distribution metadata, so a module that shadows the installed distribution is the one
    described. The importers of this check import these modules right after it anyway.

    Args:
        module (str): A top-level module name, e.g. ``'mmseg'``.

    Returns:
        tuple[str | None, str]: ``(version, origin)``; ``origin`` names the file the module
        was imported from and the installed distribution providing that name, if any.
        ``version`` is None if the module has no ``__version__``; ``(None, '')`` if the module
        cannot be found.

    Raises:
        ImportError: The module is provided by several installed distributions, or
            importing it fails (the error is named).
    """
    dists = module_distributions(module)
    if len(dists) > 1:
        raise ImportError(
            f'mmseg_proto: the module `{module}` is provided by several installed '
            f'distributions ({", ".join(dists)}); they overwrite each other\'s files. '
            f'Uninstall all but one (`pip uninstall {" ".join(dists)}`, then reinstall one).')
    mod = sys.modules.get(module)
    if mod is None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return None, ''
        try:
            mod = importlib.import_module(module)
        except Exception as err:
            raise ImportError(
                f'mmseg_proto: importing `{module}` (from {spec.origin}) failed: '
                f'{type(err).__name__}: {err}. {INSTALL_HINT}') from err
    where = getattr(mod, '__file__', None) or ', '.join(
        getattr(mod, '__path__', None) or ['an unknown location'])
    origin = f'imported from {where}'
    if dists:
        try:
            origin += f'; installed distribution {dists[0]} {metadata.version(dists[0])}'
        except metadata.PackageNotFoundError:
            origin += f'; installed distribution {dists[0]}'
    version = getattr(mod, '__version__', None)
    return (None if version is None else str(version)), origin


def resolve_mmseg_scope_to_installed_distribution() -> Optional[str]:
    """Let mmengine's ``mmseg::`` config references find a OneDL install.

    mmengine resolves ``_base_ = ['mmseg::...']`` through the *distribution* name
    ``mmsegmentation`` (``MODULE2PACKAGE``), which OneDL's ``onedl-mmsegmentation`` does not
    have, so such configs fail with "mmsegmentation is not installed". When ``mmseg`` comes
    from a distribution of another name and none called ``mmsegmentation`` is installed, this
    points the ``mmseg`` entry at that distribution and returns the entry it replaced (None
    when it changed nothing). Called only inside :func:`mmseg_proto_config_scope`, which puts
    the entry back afterwards (docs/install.md, "Install into an existing MMSeg stack").
    """
    from mmengine.config import utils as config_utils
    table = getattr(config_utils, 'MODULE2PACKAGE', None) or getattr(
        config_utils, 'PKG2PROJECT', None)
    dists = module_distributions('mmseg')
    if table is None or table.get('mmseg') in dists or len(dists) != 1:
        return None
    replaced, table['mmseg'] = table.get('mmseg'), dists[0]
    return replaced


def check_mmseg_stack() -> None:
    """Check the mmengine, mmcv and mmseg modules that ``import`` finds (see the module doc).

    Raises:
        ImportError: One of them is missing, has no ``__version__``, a version that is not
            PEP 440, or one outside :data:`SUPPORTED`; the message names the module, the
            version, where it was imported from, the supported range and what to install.
    """
    for module, (low, high) in SUPPORTED.items():
        version, origin = module_version(module)
        supported = f'{module} {low} <= version < {high}'
        if version is None and not origin:
            raise ImportError(f'mmseg_proto needs the module `{module}` ({low} <= version < '
                              f'{high}), which is not installed. {INSTALL_HINT}')
        if version is None:
            raise ImportError(
                f'mmseg_proto supports {supported}; found a module `{module}` without '
                f'__version__ ({origin}), not an MMSeg-stack release. {INSTALL_HINT}')
        try:
            ok, note = version_supported(version, low, high), ''
            if not ok and Version(Version(version).base_version) == Version(high):
                note = f', a pre- or post-release of the first unsupported version {high}'
        except InvalidVersion:
            ok, note = False, ', not a PEP 440 version'
        if not ok:
            raise ImportError(
                f'mmseg_proto supports {supported}; found {module} {version} '
                f'({origin}){note}. {INSTALL_HINT}')
