"""The decode head as adding a class sees it: per head kind, pixel features at the
decoder's resolution and the logits computed from them.

:func:`head_adapter` picks the adapter of a model's head: :class:`ProtoAdapter` for a
``ProtoHead`` (its unit embeddings, scored against its prototypes), :class:`ConvSegAdapter`
for any decode head ending in a 1x1 ``conv_seg`` (the classifier's input, and the
classifier).
"""
import torch.nn as nn
from torch import Tensor

from .add_class_checks import AddClassError


class HeadAdapter:
    """Features at the decoder's resolution and logits from them, for one head kind.

    Args:
        head (nn.Module): The model's ``decode_head``.
    """
    method = ''  # the report's name of how a class is placed in this head

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    def features(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """(1, h, w, D) features of one preprocessed image."""
        raise NotImplementedError

    def logits(self, feats: Tensor) -> Tensor:
        """(1, C, h, w) logits of :meth:`features`' output."""
        raise NotImplementedError

    def pixel_logits(self, feats: Tensor) -> Tensor:
        """(N, C) logits of (N, D) pixel features (scored as a one-row image)."""
        return self.logits(feats[None, None]).flatten(2)[0].T


class ProtoAdapter(HeadAdapter):
    """A ``ProtoHead``: its unit embeddings, and the logits its prototypes give them."""
    method = 'prototypes'

    def features(self, model: nn.Module, inputs: Tensor) -> Tensor:
        return self.head.embed(model.extract_feat(inputs))

    def logits(self, feats: Tensor) -> Tensor:
        return self.head.logits_from_embeddings(feats)


class ConvSegAdapter(HeadAdapter):
    """A decode head ending in a 1x1 ``conv_seg``: the classifier's input, and its
    output."""
    method = 'imprinting'

    def features(self, model: nn.Module, inputs: Tensor) -> Tensor:
        got = []
        handle = self.head.conv_seg.register_forward_hook(
            lambda module, args, out: got.append(args[0]))
        try:
            model.decode_head.forward(model.extract_feat(inputs))
        finally:
            handle.remove()
        return got[0].permute(0, 2, 3, 1)

    def logits(self, feats: Tensor) -> Tensor:
        return self.head.conv_seg(feats.permute(0, 3, 1, 2))


def head_adapter(model: nn.Module) -> HeadAdapter:
    """The adapter of ``model.decode_head``.

    Args:
        model (nn.Module): A segmentor.

    Raises:
        AddClassError: A head that cannot take a class (says which can).
    """
    head = getattr(model, 'decode_head', None)
    from mmseg_proto.models.decode_heads.proto_head import ProtoHead
    if isinstance(head, ProtoHead):
        if not isinstance(head.mask_norm, nn.LayerNorm):
            raise AddClassError('this ProtoHead has no LayerNorm over classes')
        return ProtoAdapter(head)
    conv = getattr(head, 'conv_seg', None)
    if isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1 \
            and getattr(head, 'out_channels', conv.out_channels) == conv.out_channels \
            and conv.out_channels == getattr(head, 'num_classes', -1):
        return ConvSegAdapter(head)
    kind = type(head).__name__
    raise AddClassError(
        f'the decode head ({kind}) cannot take a class: add_classes needs a ProtoHead or a '
        'decode head whose classifier is a 1x1 conv_seg with one output per class (not a '
        'cascade of heads, nor a binary head with one sigmoid output)')
