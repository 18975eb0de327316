"""mmseg_proto: ProtoSeg (CVPR 2022) as an MMSegmentation 1.x plugin.

Importing the package registers, in MMSeg's registries, ``ProtoHead``
(MODELS), ``PixelPrototypeContrastLoss`` and ``PixelPrototypeDistanceLoss``
(MODELS), ``HRNetRefAlign`` (MODELS, the authors' HRNet variant for their
checkpoint), ``PrototypeUpdateHook`` (HOOKS) and ``CamVidDataset`` (DATASETS),
and lets torch >= 2.6 load mmengine checkpoints (see
:mod:`mmseg_proto.utils.torch_load_compat`).
"""
from .utils.stack_check import check_mmseg_stack
from .version import __version__

check_mmseg_stack()

from .utils import allow_mmengine_checkpoint_globals  # noqa: E402

allow_mmengine_checkpoint_globals()

from .datasets import *  # noqa: E402,F401,F403
from .engine import *  # noqa: E402,F401,F403
from .models import *  # noqa: E402,F401,F403

__all__ = ["__version__", "CamVidDataset", "ProtoHead", "HRNetRefAlign",
           "PixelPrototypeContrastLoss", "PixelPrototypeDistanceLoss",
           "PrototypeUpdateHook", "sinkhorn_knopp"]
