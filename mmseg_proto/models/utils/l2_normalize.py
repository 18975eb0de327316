"""Unit L2 normalisation with a closed-form backward."""
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class L2Normalize(torch.autograd.Function):
    """``x / max(||x||, eps)`` over the last dimension.

    The same values and gradients as ``F.normalize(x, dim=-1)``, but the
    backward is the closed form ``(g - y (g . y)) / ||x||`` (two passes over
    ``x``) instead of autograd's chain through the division, the norm and
    the broadcast (five); about half the time on (pixels x channels)
    embeddings. Rows whose norm is below ``eps`` are divided by ``eps``, as
    F.normalize does, and get the gradient ``g / eps``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float = 1e-12) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        clamped = norm < eps
        norm = norm.clamp_min_(eps)
        y = x / norm
        ctx.save_for_backward(y, norm, clamped)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        y, norm, clamped = ctx.saved_tensors
        dot = (grad * y).sum(dim=-1, keepdim=True).masked_fill_(clamped, 0)
        return torch.addcmul(grad, y, dot, value=-1).div_(norm), None


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Unit-normalise ``x`` over its last dimension (see
    :class:`L2Normalize`)."""
    return L2Normalize.apply(x, eps)
