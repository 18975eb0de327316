"""HRNet whose fuse layers upsample like the authors' ProtoSeg code."""
from typing import List

import torch.nn as nn
import torch.nn.functional as F
from mmseg.models.backbones.hrnet import HRModule, HRNet
from mmseg.models.utils import Upsample
from mmseg.registry import MODELS
from torch import Tensor


class HRModuleRefAlign(HRModule):
    """:class:`HRModule` that fuses lower-resolution branches with bilinear
    ``align_corners=True`` interpolation straight to the target size.

    MMSeg's HRModule upsamples a lower branch in its fuse layer with
    ``Upsample(scale_factor=2**(j-i), align_corners=False)`` (then resizes to
    the target size, a no-op when the sizes agree). The official HRNet code,
    on which the ProtoSeg authors' openseg code builds, interpolates the
    1x1-conv + BN output to the target size with ``align_corners=True``.
    Parameters and state-dict keys are identical; only the interpolation
    differs.
    """

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        """Forward as :meth:`HRModule.forward`, upsampling with
        ``align_corners=True``.

        Args:
            x (list[Tensor]): One feature map per branch.

        Returns:
            list[Tensor]: The fused feature maps, one per output branch.
        """
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        for i in range(self.num_branches):
            x[i] = self.branches[i](x[i])
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = 0
            for j in range(self.num_branches):
                if i == j:
                    y = y + x[j]
                elif j > i:
                    y = y + F.interpolate(
                        self.fuse_layers[i][j](x[j]),
                        size=x[i].shape[2:],
                        mode='bilinear',
                        align_corners=True)
                else:
                    y = y + self.fuse_layers[i][j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


@MODELS.register_module()
class HRNetRefAlign(HRNet):
    """HRNet with the authors' fuse-layer upsampling (``align_corners=True``).

    Only for running weights trained by the ProtoSeg authors' openseg code
    (e.g. converted with ``tools/model_converters/convert_openseg_protoseg.py``): their HRNet
    upsamples the lower-resolution branches in every fuse layer with bilinear
    ``align_corners=True``, MMSeg's :class:`HRNet` with
    ``align_corners=False``, which changes the features of a converted model
    noticeably. Architecture, parameters, state-dict keys and all other
    behaviour are those of :class:`HRNet`; train new models with ``HRNet``.

    Args:
        extra (dict): Stage configuration, as for :class:`HRNet`.
        **kwargs: Other :class:`HRNet` arguments (``norm_cfg``,
            ``norm_eval``, ``pretrained``, ...).
    """

    def __init__(self, extra: dict, **kwargs) -> None:
        super().__init__(extra, **kwargs)

    def _make_stage(self,
                    layer_config: dict,
                    in_channels: List[int],
                    multiscale_output: bool = True):
        """Build a stage as :meth:`HRNet._make_stage`, with modules that
        upsample with ``align_corners=True``.

        Args:
            layer_config (dict): The stage's configuration.
            in_channels (list[int]): Input channels of the branches.
            multiscale_output (bool): Whether the last module outputs all
                branches. Default: True.

        Returns:
            tuple[Sequential, list[int]]: The stage and its output channels.
        """
        stage, in_channels = super()._make_stage(layer_config, in_channels,
                                                 multiscale_output)
        for module in stage:
            if type(module) is not HRModule:
                raise TypeError('HRNetRefAlign: expected MMSeg HRModule '
                                f'stages, got {type(module).__name__}')
            # Same state (no new attributes): only `forward` differs.
            module.__class__ = HRModuleRefAlign
            if module.fuse_layers is None:
                continue
            for fuse_layer in module.fuse_layers:
                for branch in fuse_layer:
                    if isinstance(branch, nn.Sequential) and isinstance(
                            branch[-1], Upsample):
                        # Interpolation happens in forward, to the target
                        # size, as in the official HRNet code.
                        branch[-1] = nn.Identity()
        return stage, in_channels
