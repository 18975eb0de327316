"""Test a segmentor with MMSeg's ``tools/test.py``; configs may inherit ours through
``mmseg_proto::`` (installed package).

``mim test mmseg_proto CONFIG --checkpoint CKPT`` runs this file (installed as
``mmseg_proto/.mim/tools/test.py``); from a clone, ``python tools/test.py CONFIG CKPT``. The
code is :mod:`mmseg_proto.tools.test` (also ``python -m mmseg_proto.tools.test``).
"""
from mmseg_proto.tools.test import main

if __name__ == '__main__':
    main()
