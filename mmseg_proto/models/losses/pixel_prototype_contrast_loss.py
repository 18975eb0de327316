"""Pixel-prototype contrast loss (ProtoSeg, Eq. 11)."""
import torch
import torch.nn as nn
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
    in ``[0, C * K)`` (ProtoHead orders columns ``k * C + c``, see
    :mod:`mmseg_proto.models.utils.prototype_index`); a target
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
    term = 'ppc'  # the per-pixel term ProtoHead's fast paths compute for it

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

    def reduce(self, per_pixel: Tensor, num_valid: int) -> Tensor:
        """Weighted mean of per-pixel terms over the ``num_valid`` labelled pixels."""
        return self.loss_weight * per_pixel.sum() / max(num_valid, 1)

    def forward(self, proto_logits: Tensor, proto_targets: Tensor,
                **kwargs) -> Tensor:
        """Weighted mean PPC over labelled pixels (see :meth:`per_pixel`); 0 with a
        gradient path when no pixel is labelled."""
        return self.reduce(self.per_pixel(proto_logits, proto_targets),
                           int((proto_targets >= 0).sum()))

    @property
    def loss_name(self) -> str:
        """Name of the loss item in the logs."""
        return self._loss_name
