"""MMSeg's ``tools/test.py``, with mmseg_proto imported before the config is parsed.

Configs may inherit ours from an installed mmseg_proto through ``mmseg_proto::``
(:mod:`mmseg_proto.utils.config_scope`).

MMSeg's own tool parses a config (and resolves its ``mmseg::`` bases) before the config's
``custom_imports`` run. With OpenMMLab's ``mmsegmentation`` that is fine; with the OneDL line
(``onedl-mmsegmentation``) mmengine cannot resolve ``mmseg::`` outside our config scope
(:func:`mmseg_proto.utils.config_scope.mmseg_proto_config_scope`, which this tool enters).
Same arguments as MMSeg's tool::

    python -m mmseg_proto.tools.test CONFIG CHECKPOINT [--tta] [--work-dir DIR] ...
"""
import os.path as osp
import runpy

import mmseg

import mmseg_proto  # noqa: F401
from mmseg_proto.utils.config_scope import mmseg_proto_config_scope


def main() -> None:
    with mmseg_proto_config_scope():
        runpy.run_path(osp.join(osp.dirname(mmseg.__file__), '.mim', 'tools', 'test.py'),
                       run_name='__main__')


if __name__ == '__main__':
    main()
