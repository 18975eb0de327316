"""What the prototype losses share: a per-pixel term, reduced to a weighted mean."""
import torch.nn as nn
from torch import Tensor


class PrototypeLoss(nn.Module):
    """Base of the losses ProtoHead applies to pixel-prototype similarities.

    A subclass defines ``per_pixel(proto_logits, proto_targets) -> (N,)`` (the reference
    implementation of its term, 0 for ignored pixels) and ``term``, the name of the
    per-pixel term ProtoHead's fast paths compute for it. ``loss_weight`` and the log name
    are set by the subclass.
    """

    is_prototype_loss = True
    term = ''
    loss_weight: float
    _loss_name: str

    def per_pixel(self, proto_logits: Tensor, proto_targets: Tensor) -> Tensor:
        raise NotImplementedError

    def reduce(self, per_pixel: Tensor, num_valid: int) -> Tensor:
        """Weighted mean of per-pixel terms over the ``num_valid`` labelled pixels."""
        return self.loss_weight * per_pixel.sum() / max(num_valid, 1)

    def forward(self, proto_logits: Tensor, proto_targets: Tensor, **kwargs) -> Tensor:
        """Weighted mean of :meth:`per_pixel` over labelled pixels (targets >= 0); 0 with
        a gradient path when no pixel is labelled."""
        return self.reduce(self.per_pixel(proto_logits, proto_targets),
                           int((proto_targets >= 0).sum()))

    @property
    def loss_name(self) -> str:
        """Name of the loss item in the logs."""
        return self._loss_name
