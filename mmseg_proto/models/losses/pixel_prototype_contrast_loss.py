"""Pixel-prototype contrast loss (ProtoSeg, Eq. 11)."""
import torch.nn as nn
import torch.nn.functional as F
from mmseg.registry import MODELS
from torch import Tensor


@MODELS.register_module()
class PixelPrototypeContrastLoss(nn.Module):
    """Pixel-prototype contrast (PPC) loss.

    Cross-entropy over the similarities of a pixel to all ``C * K``
    prototypes, with the prototype the pixel was assigned to by the
    within-class clustering as the target and every other prototype as a
    negative. Used inside a :class:`ProtoHead`'s ``loss_decode`` list; the
    head feeds it prototype similarities and prototype targets instead of
    segmentation logits.

    Targets are the column of the assigned prototype in ``proto_logits``,
    in ``[0, C * K)`` (ProtoHead orders columns ``k * C + c``); a target
    below 0 marks a pixel to ignore. No target value can collide with a
    segmentation ignore label such as 255, whatever ``C * K`` is.

    Args:
        loss_weight (float): Weight (lambda_1). Default: 0.01, as in the
            reference code.
        temperature (float): Similarities are divided by it. The paper writes
            a temperature; the reference code uses raw cosines. Default: 1.0.
        loss_name (str): Name of the loss item in the logs; must start with
            ``loss_`` to be optimised. Default: 'loss_ppc'.
    """

    is_prototype_loss = True

    def __init__(self,
                 loss_weight: float = 0.01,
                 temperature: float = 1.0,
                 loss_name: str = 'loss_ppc') -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError('PixelPrototypeContrastLoss: temperature must be '
                             f'> 0, got {temperature}')
        self.loss_weight = loss_weight
        self.temperature = temperature
        self._loss_name = loss_name

    def forward(self, proto_logits: Tensor, proto_targets: Tensor,
                **kwargs) -> Tensor:
        """Compute the loss.

        Args:
            proto_logits (Tensor): (M, C*K) pixel-prototype cosine
                similarities.
            proto_targets (Tensor): (M,) int64 prototype index per pixel,
                negative to ignore.

        Returns:
            Tensor: Weighted scalar loss (0 with a gradient path when no
            pixel is valid).
        """
        if not bool((proto_targets >= 0).any()):
            return proto_logits.sum() * 0.0
        logits = proto_logits if self.temperature == 1.0 \
            else proto_logits / self.temperature
        # Negative targets are ignored in place: no copy of the (N, C*K)
        # similarity matrix.
        return self.loss_weight * F.cross_entropy(
            logits.float(), proto_targets.clamp(min=-1), ignore_index=-1)

    @property
    def loss_name(self) -> str:
        """Name of the loss item in the logs."""
        return self._loss_name
