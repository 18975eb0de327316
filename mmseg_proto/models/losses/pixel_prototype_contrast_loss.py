"""Pixel-prototype contrast loss (ProtoSeg, Eq. 11)."""
import torch
from mmseg.registry import MODELS
from torch import Tensor

from .prototype_loss import PrototypeLoss


@MODELS.register_module()
class PixelPrototypeContrastLoss(PrototypeLoss):
    """Pixel-prototype contrast (PPC) loss.

    Cross-entropy over the similarities of a pixel to all ``C * K``
    prototypes, with the prototype the pixel was assigned to by the
    within-class clustering as the target and every other prototype as a
    negative. Used inside a :class:`ProtoHead`'s ``loss_decode`` list; the
    head feeds it prototype similarities and prototype targets instead of
    segmentation logits.

    Targets are the column of the assigned prototype in ``proto_logits``,
    in ``[0, C * K)`` (ProtoHead orders columns ``k * C + c``, see
    :mod:`mmseg_proto.models.utils.prototype_similarity`); a target
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

    term = 'ppc'

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

    def per_pixel(self, proto_logits: Tensor, proto_targets: Tensor) -> Tensor:
        """The PPC term of every pixel: the reference implementation.

        Args:
            proto_logits (Tensor): (N, C*K) pixel-prototype cosine similarities.
            proto_targets (Tensor): (N,) int64 column of the assigned prototype,
                negative to ignore.

        Returns:
            Tensor: (N,) fp32 ``logsumexp(s / T) - s_target / T``, 0 for ignored pixels.
        """
        logits = proto_logits.float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        target = logits.gather(1, proto_targets.clamp(min=0)[:, None]).squeeze(1)
        return (torch.logsumexp(logits, dim=1) - target) * (proto_targets >= 0)
