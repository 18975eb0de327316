"""mmseg_proto: ProtoSeg (CVPR 2022) as an MMSegmentation 1.x plugin.

Importing the package registers, in MMSeg's registries, ``ProtoHead``,
``ProtoEncoderDecoder`` and ``ProtoSegTTAModel`` (MODELS), ``PixelPrototypeContrastLoss`` and ``PixelPrototypeDistanceLoss``
(MODELS), ``HRNetRefAlign`` (MODELS, the authors' HRNet variant for their
checkpoint), ``PrototypeUpdateHook`` (HOOKS), ``CamVidDataset`` (DATASETS) and
``IgnoreClasses`` (TRANSFORMS),
and makes mmengine's checkpoint loader admit, during each load only, the numeric numpy
and HistoryBuffer data mmengine checkpoints hold, so that torch >= 2.6 loads them (see
:mod:`mmseg_proto.utils.checkpoint_loading`; plain ``torch.load`` is left as torch has it).
"""
from .utils.stack_check import check_mmseg_stack
from .version import __version__

check_mmseg_stack()

from .utils.checkpoint_loading import register_checkpoint_loader  # noqa: E402

register_checkpoint_loader()

from .datasets import *  # noqa: E402,F401,F403
from .engine import *  # noqa: E402,F401,F403
from .models import *  # noqa: E402,F401,F403

__all__ = ["__version__", "CamVidDataset", "IgnoreClasses", "ProtoHead",
           "ProtoEncoderDecoder", "ProtoSegTTAModel", "HRNetRefAlign",
           "PixelPrototypeContrastLoss", "PixelPrototypeDistanceLoss",
           "PrototypeUpdateHook", "sinkhorn_knopp"]
