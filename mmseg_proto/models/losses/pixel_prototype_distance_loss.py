"""Pixel-prototype distance loss (ProtoSeg, Eq. 12)."""
from mmseg.registry import MODELS
from torch import Tensor

from .prototype_loss import PrototypeLoss


@MODELS.register_module()
class PixelPrototypeDistanceLoss(PrototypeLoss):
    """Pixel-prototype distance (PPD) loss.

    Mean over valid pixels of ``(1 - <i, p_{c_i, k_i}>) ** 2``: pulls each
    pixel embedding toward the prototype it was assigned to. Used inside a
    :class:`ProtoHead`'s ``loss_decode`` list; the head feeds it prototype
    similarities and prototype targets.

    Args:
        loss_weight (float): Weight (lambda_2). Default: 0.001, as in the
            reference code.
        loss_name (str): Name of the loss item in the logs; must start with
            ``loss_`` to be optimised. Default: 'loss_ppd'.
    """

    term = 'ppd'

    def __init__(self,
                 loss_weight: float = 0.001,
                 loss_name: str = 'loss_ppd') -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self._loss_name = loss_name

    def per_pixel(self, proto_logits: Tensor, proto_targets: Tensor) -> Tensor:
        """The PPD term of every pixel: the reference implementation.

        Args:
            proto_logits (Tensor): (N, C*K) pixel-prototype cosine similarities.
            proto_targets (Tensor): (N,) int64 column of the assigned prototype,
                negative to ignore.

        Returns:
            Tensor: (N,) fp32 ``(1 - s_target)^2``, 0 for ignored pixels.
        """
        target_sim = proto_logits.gather(
            1, proto_targets.clamp(min=0)[:, None]).squeeze(1).float()
        return (1.0 - target_sim)**2 * (proto_targets >= 0)
