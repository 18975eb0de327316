"""Pixel-prototype distance loss (ProtoSeg, Eq. 12)."""
import torch.nn as nn
from mmseg.registry import MODELS
from torch import Tensor


@MODELS.register_module()
class PixelPrototypeDistanceLoss(nn.Module):
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

    is_prototype_loss = True

    def __init__(self,
                 loss_weight: float = 0.001,
                 loss_name: str = 'loss_ppd') -> None:
        super().__init__()
        self.loss_weight = loss_weight
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
        valid = proto_targets >= 0
        if not bool(valid.any()):
            return proto_logits.sum() * 0.0
        target_sim = proto_logits.gather(
            1, proto_targets.clamp(min=0)[:, None]).squeeze(1).float()
        dist = (1.0 - target_sim)**2 * valid
        return self.loss_weight * dist.sum() / valid.sum()

    @property
    def loss_name(self) -> str:
        """Name of the loss item in the logs."""
        return self._loss_name
