"""Let mmengine resolve ``mmseg_proto::`` config paths, inside our tools only.

mmengine 0.10 resolves ``_base_ = ['pkg::path/to/config.py']`` only for the packages of its
own table (``mmengine.config.utils.MODULE2PACKAGE``: mmseg, mmdet, ...); any other scope fails
with ``AssertionError: mmengine does not support to load pkg config.`` It then reads the
config from ``<installed package>/.mim/configs/path/to/config.py``, where a non-editable
install of mmseg_proto puts our ``configs/`` (setup.py). The entry is added only while one of
our tools parses and runs a config and removed afterwards: ``python -m
mmseg_proto.tools.train``/``test`` (``mim train mmseg_proto``/``mim test mmseg_proto`` run
them) and every shipped tool that reads a config (``tools/analysis_tools/count_params.py``,
``prototype_health.py``, ``tools/deployment/pytorch2onnx.py`` through
:func:`mmseg_proto.utils.onnx_export.load`, ``tools/visualization/vis_embedding.py``,
``vis_prototype_similarity.py``). On the OneDL line the block also points mmengine's ``mmseg``
entry at ``onedl-mmsegmentation`` (which has no distribution called ``mmsegmentation``) and
puts it back afterwards. Importing mmseg_proto does not change mmengine's table, and
MMSeg's own tools parse a config before its ``custom_imports`` run, so through them
``mmseg_proto::`` cannot work (docs/deployment.md, "Configs from an installed package").
"""
from contextlib import contextmanager
from typing import Iterator

#: The scope users write before ``::`` and the distribution that provides it.
SCOPE = 'mmseg_proto'
DISTRIBUTION = 'mmseg_proto'


@contextmanager
def mmseg_proto_config_scope() -> Iterator[None]:
    """Inside the block, mmengine resolves ``mmseg_proto::`` to the installed package.

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
        yield
    finally:
        if added:
            table.pop(SCOPE, None)
        if replaced:
            table['mmseg'] = mmseg_entry
