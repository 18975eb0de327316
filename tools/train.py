"""Train a segmentor: MMSeg's ``tools/train.py`` arguments, and configs may inherit ours
through ``mmseg_proto::`` (installed package).

``mim train mmseg_proto CONFIG [--launcher pytorch --gpus N]`` runs this file (installed as
``mmseg_proto/.mim/tools/train.py``); from a clone, ``python tools/train.py CONFIG``. The
code is :mod:`mmseg_proto.tools.train` (also ``python -m mmseg_proto.tools.train``).
"""
from mmseg_proto.tools.train import main

if __name__ == '__main__':
    main()
