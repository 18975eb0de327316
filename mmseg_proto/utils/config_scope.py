"""Let mmengine resolve ``mmseg_proto::`` config paths, inside our tools only.

mmengine 0.10 resolves ``_base_ = ['pkg::path/to/config.py']`` only for the packages of its
own table (``mmengine.config.utils.MODULE2PACKAGE``: mmseg, mmdet, ...); any other scope fails
with ``AssertionError: mmengine does not support to load pkg config.`` It then reads the
config from ``<installed package>/.mim/configs/path/to/config.py``, where setup.py puts our
``configs/`` (copies in a regular install, links into the clone in an editable one). mmengine
finds ``<installed package>`` as ``<distribution location>/mmseg_proto``, which is
``site-packages/mmseg_proto`` even for an editable install (``pip install -e``, the README's
set-up), whose package stays in the clone: there ``mmseg_proto::`` failed with a raw
``FileNotFoundError .../site-packages/mmseg_proto/.mim/model-index.yml``. Inside the scope
``mmseg_proto`` is therefore the folder of the package ``import mmseg_proto`` gives (as the
import-time stack check describes the modules that run, not the distribution metadata), in
an editable install, a regular one and a source checkout on ``PYTHONPATH`` alike; a copy
without its ``.mim`` folder gets a message that says how to create it.

The entry and that lookup are added only while one of our tools parses and runs a config and
removed afterwards: ``python -m mmseg_proto.tools.train``/``test`` (``mim train
mmseg_proto``/``mim test mmseg_proto`` run them) and every shipped tool that reads a config
(``tools/analysis_tools/count_params.py``, ``prototype_health.py``,
``tools/deployment/pytorch2onnx.py`` through :func:`mmseg_proto.utils.onnx_export.load`,
``tools/visualization/vis_embedding.py``, ``vis_prototype_similarity.py``, ...). On the OneDL
line the block also points mmengine's ``mmseg`` entry at ``onedl-mmsegmentation`` (which has no
distribution called ``mmsegmentation``) and puts it back afterwards. Importing mmseg_proto
does not change mmengine's table, and MMSeg's own tools parse a config before its
``custom_imports`` run, so through them ``mmseg_proto::`` cannot work (docs/deployment.md,
"Configs from an installed package").
"""
import os.path as osp
from contextlib import contextmanager
from typing import Callable, Iterator

#: The scope users write before ``::`` and the distribution that provides it.
SCOPE = 'mmseg_proto'
DISTRIBUTION = 'mmseg_proto'
#: What mmengine reads first when it resolves ``mmseg_proto::NAME``.
MODEL_INDEX = osp.join('.mim', 'model-index.yml')


def package_config_root() -> str:
    """The folder mmengine reads ``mmseg_proto::`` configs under (``<it>/.mim/configs``):
    that of the ``mmseg_proto`` package this process imported.

    Returns:
        str: The package folder.

    Raises:
        FileNotFoundError: The package has no ``.mim`` folder (a source checkout that was
            never installed, or one whose ``.mim`` was deleted); the message says what to run.
    """
    import mmseg_proto
    root = osp.dirname(osp.abspath(mmseg_proto.__file__))
    if not osp.isfile(osp.join(root, MODEL_INDEX)):
        clone = osp.dirname(root)
        raise FileNotFoundError(
            f'mmseg_proto: `mmseg_proto::` configs are read from {osp.join(root, ".mim")}, '
            f'which this copy of mmseg_proto (imported from {root}) does not have: setup.py '
            'creates it when the package is installed. In a clone, run `pip install -e '
            f'{clone}` (it links configs/ there), or inherit the config by its file path '
            f'instead (e.g. _base_ = [\'{osp.join(clone, "configs", "...")}\']).')
    return root


def _scoped_installed_path(original: Callable[[str], str]) -> Callable[[str], str]:
    """mmengine's ``get_installed_path`` with ``mmseg_proto`` resolved to the imported
    package (:func:`package_config_root`); any other package as ``original`` does."""

    def installed_path(package: str) -> str:
        if package == DISTRIBUTION:
            return package_config_root()
        return original(package)

    installed_path.mmseg_proto_original = original  # type: ignore[attr-defined]
    return installed_path


@contextmanager
def _package_paths_resolved() -> Iterator[None]:
    """Inside the block, mmengine's config parser finds ``mmseg_proto`` where it was
    imported from; a block inside another changes nothing more."""
    from mmengine.config import config as config_module
    original = getattr(config_module, 'get_installed_path', None)
    if original is None or hasattr(original, 'mmseg_proto_original'):
        yield
        return
    config_module.get_installed_path = _scoped_installed_path(original)
    try:
        yield
    finally:
        config_module.get_installed_path = original


@contextmanager
def mmseg_proto_config_scope() -> Iterator[None]:
    """Inside the block, mmengine resolves ``mmseg_proto::`` to the imported package.

    Leaves an entry that is already there untouched; removes only what it added, and
    restores the ``mmseg`` entry if it pointed it at a OneDL distribution.
    """
    from mmengine.config import utils as config_utils

    from .stack_check import resolve_mmseg_scope_to_installed_distribution
    # The table's name in mmengine 0.10 (and its older alias); without one, a no-op.
    table = getattr(config_utils, 'MODULE2PACKAGE', None) or getattr(
        config_utils, 'PKG2PROJECT', None)
    if table is None:
        yield
        return
    added = SCOPE not in table
    if added:
        table[SCOPE] = DISTRIBUTION
    mmseg_entry = table.get('mmseg')
    replaced = resolve_mmseg_scope_to_installed_distribution() is not None
    try:
        with _package_paths_resolved():
            yield
    finally:
        if added:
            table.pop(SCOPE, None)
        if replaced:
            table['mmseg'] = mmseg_entry
