"""What one training batch tells a PrototypeBank (:class:`PrototypeBatch`), and what the bank
keeps of it (:class:`PrototypeStatistics`: per-prototype sums and counts, the diagnostics of
the Sinkhorn assignments and of prototype use, and their sums over processes);
and :func:`prototype_health`, the per-class figures of prototype use that training logs and
:mod:`mmseg_proto.evaluation` reports on a dataset."""
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from mmengine.dist import all_reduce, get_world_size
from torch import Tensor

from .prototype_similarity import buffer_index


@dataclass
class PrototypeStatistics:
    """Per-prototype statistics of one training iteration of a ProtoHead.

    Owner: :class:`~.prototype_bank.PrototypeBank`, which makes one in ``collect`` (from
    what ``ProtoHead.loss`` hands it, :func:`batch_statistics`), sums it over processes
    and over the iterations of one optimizer step, and applies it when
    :class:`PrototypeUpdateHook` says so. Prototype ``i`` is class ``i // K``, prototype
    ``i % K`` (the ``prototypes`` buffer's (C, K, D) order, flattened).

    Args:
        sums (Tensor): (C*K, D) fp32 sums of the embeddings of the correctly
            classified pixels assigned to each prototype; non-finite when the
            batch had non-finite embeddings (the bank then skips the update).
        counts (Tensor): (C*K,) their numbers.
        assignments (dict[str, Tensor], optional): Sinkhorn diagnostics
            (:func:`assignment_statistics`), only on the iterations
            the hook logs (see :func:`assignment_diagnostics`).
        usage (dict[str, Tensor], optional): What re-seeding needs
            (:func:`usage_statistics`), every iteration while the hook
            re-seeds: ``nearest`` (C*K,), ``outlier_sums`` (C, D),
            ``outlier_weights`` (C,), all fp32 sums.
    """

    sums: Tensor
    counts: Tensor
    assignments: Optional[Dict[str, Tensor]] = None
    usage: Optional[Dict[str, Tensor]] = None

    def __add__(self, other: 'PrototypeStatistics') -> 'PrototypeStatistics':
        """Statistics of two iterations together (gradient accumulation);
        the diagnostics are the later iteration's, the usage sums add up."""
        usage = other.usage or self.usage
        if self.usage and other.usage:
            usage = {key: value + other.usage[key]
                     for key, value in self.usage.items()}
        return PrototypeStatistics(self.sums + other.sums,
                                   self.counts + other.counts,
                                   other.assignments or self.assignments,
                                   usage)

    def sum_over_processes(self) -> None:
        """Sum ``sums``, ``counts`` and ``usage`` over processes, in place, in one
        all-reduce (a non-finite value anywhere makes the sums non-finite everywhere);
        nothing on one process. The ``assignments`` are reduced when logged."""
        if get_world_size() == 1:
            return
        parts = [self.sums, self.counts]
        if self.usage is not None:
            parts += [self.usage[key] for key in sorted(self.usage)]
        flat = torch.cat([p.reshape(-1).to(self.sums.dtype) for p in parts])
        all_reduce(flat, op='sum')
        offset = 0
        for part in parts:
            part.copy_(flat[offset:offset + part.numel()].view_as(part))
            offset += part.numel()

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps of statistics pending for an accumulated
        optimizer step (``PrototypeBank.resume_state``): copies on the CPU of
        ``sums``, ``counts`` and ``usage``. The ``assignments`` diagnostics
        are left out: only the iteration that steps logs them, from its
        own batch."""
        return dict(sums=self.sums.detach().cpu().clone(),
                    counts=self.counts.detach().cpu().clone(),
                    usage=None if self.usage is None else
                    {key: value.detach().cpu().clone()
                     for key, value in self.usage.items()})

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any],
                        device: torch.device) -> 'PrototypeStatistics':
        """Inverse of :meth:`state_dict`, on ``device``.

        Args:
            state (dict): What :meth:`state_dict` returned.
            device (torch.device): Where the head's prototypes are.

        Raises:
            ValueError: ``state`` is not such a dict (names what is wrong).
        """
        usage = state.get('usage') if isinstance(state, dict) else None
        if not (isinstance(state, dict) and
                isinstance(state.get('sums'), Tensor) and
                isinstance(state.get('counts'), Tensor) and
                (usage is None or (isinstance(usage, dict) and all(
                    isinstance(v, Tensor) for v in usage.values())))):
            raise ValueError(
                'PrototypeStatistics: a saved state must be a dict with '
                "tensors 'sums' and 'counts' and a dict of tensors or None "
                f"'usage', got {_describe(state)}")
        return cls(state['sums'].to(device), state['counts'].to(device),
                   None, None if usage is None else
                   {key: value.to(device) for key, value in usage.items()})


def _describe(value: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(value, dict):
        return 'a dict with keys ' + ', '.join(
            f'{k!r}: {type(v).__name__}' for k, v in value.items())
    return type(value).__name__


def nearest_counts(labels: Tensor, nearest_k: Tensor, num_classes: int,
                   num_prototypes: int) -> Tensor:
    """(C*K,) fp32: pixels whose nearest own-class prototype each is."""
    return torch.bincount(buffer_index(labels, nearest_k, num_prototypes),
                          minlength=num_classes * num_prototypes).float()


@dataclass
class PrototypeBatch:
    """What one training step tells a :class:`~.prototype_bank.PrototypeBank`, over the
    Nv labelled pixels of the batch (row i of every field: labelled pixel i).

    Made by the training scores (``TrainingScores.batch``), handed to
    ``PrototypeBank.collect``.

    Args:
        labels (Tensor): (Nv,) class of each labelled pixel.
        correct (Tensor): (Nv,) bool, predicted as its class.
        assigned (Tensor): (Nv,) Sinkhorn's prototype (0..K-1) of each.
        own (Tensor): (Nv, K) similarities to its class's K prototypes.
        correct_embeddings (Tensor): (M, D) fp32 embeddings of the correct ones, in
            order (M = ``correct.sum()``): what the prototypes move towards.
        transport (Tensor, optional): (Nv, K) Sinkhorn's soft assignment (for the
            logged diagnostics).
    """

    labels: Tensor
    correct: Tensor
    assigned: Tensor
    own: Tensor
    correct_embeddings: Tensor
    transport: Optional[Tensor] = None

    @classmethod
    @torch.no_grad()
    def from_labelled(cls, emb: Tensor, valid: Tensor, labels: Tensor, pred: Tensor,
                      assigned: Tensor, own: Tensor,
                      transport: Optional[Tensor]) -> 'PrototypeBatch':
        """From all N pixels' embeddings (N, D) and predictions (N,), the indices of the
        labelled ones (``valid``) and what is known of those (the other arguments)."""
        correct = pred[valid] == labels
        return cls(labels, correct, assigned, own, emb[valid[correct]].float(), transport)


@torch.no_grad()
def batch_statistics(batch: PrototypeBatch, num_classes: int, num_prototypes: int,
                     usage: bool = False) -> PrototypeStatistics:
    """The statistics of one training batch: per prototype, the sum and count of the
    embeddings of the correctly classified pixels assigned to it, the Sinkhorn
    diagnostics (:func:`assignment_statistics`, when the batch has its ``transport``) and,
    with ``usage``, what re-seeding needs (:func:`usage_statistics`).

    Args:
        batch (PrototypeBatch): The step's labelled pixels.
        num_classes (int): C.
        num_prototypes (int): K.
        usage (bool): Add :func:`usage_statistics`. Default: False.
    """
    c, k = num_classes, num_prototypes
    correct_emb = batch.correct_embeddings
    proto_index = buffer_index(batch.labels, batch.assigned, k)
    hit = proto_index[batch.correct]
    sums = correct_emb.new_zeros(c * k, correct_emb.shape[1]).index_add_(0, hit, correct_emb)
    # A non-finite labelled pixel corrupts the Sinkhorn assignment of its whole class even
    # when it is not counted as correct: non-finite sums make every process skip the
    # update (after the all-reduce); no host sync.
    sums = torch.where(torch.isfinite(batch.own).all(), sums, float('nan'))
    counts = torch.bincount(hit, minlength=c * k).to(correct_emb.dtype)
    return PrototypeStatistics(
        sums, counts,
        None if batch.transport is None else assignment_statistics(
            batch.labels, proto_index, batch.transport, batch.own, c, k),
        usage_statistics(batch.labels, batch.own, batch.correct, correct_emb, c, k)
        if usage else None)


@torch.no_grad()
def assignment_statistics(labels: Tensor, targets: Tensor, transport: Tensor, own: Tensor,
                          num_classes: int, num_prototypes: int) -> Dict[str, Tensor]:
    """Detached Sinkhorn diagnostics of one batch (for logging only).

    Args:
        labels (Tensor): (N,) class of each labelled pixel.
        targets (Tensor): (N,) assigned prototype index ``c * K + k``.
        transport (Tensor): (N, K) soft assignment, rows summing to 1.
        own (Tensor): (N, K) similarities to the class's prototypes.
        num_classes (int): C.
        num_prototypes (int): K.

    Returns:
        dict[str, Tensor]: ``entropy_sum`` (C,) per-class sum over pixels
        of the soft-assignment entropy divided by ``log K`` (0: one-hot,
        1: uniform over the K prototypes), ``pixels`` (C,) labelled pixels
        per class, ``assigned`` (C*K,) pixels assigned per prototype and
        ``nearest`` (C*K,) pixels whose nearest own-class prototype it is
        (the inference rule; see :mod:`mmseg_proto.evaluation`).
        All fp32 sums, so they can be all-reduced across processes.
    """
    c, k = num_classes, num_prototypes
    t = transport.float()
    ent = -(t * torch.log(t.clamp(min=1e-12))).sum(dim=1)
    ent = ent / math.log(k) if k > 1 else torch.zeros_like(ent)
    return dict(
        entropy_sum=t.new_zeros(c).index_add_(0, labels, ent),
        pixels=torch.bincount(labels, minlength=c).float(),
        assigned=torch.bincount(targets, minlength=c * k).float(),
        nearest=nearest_counts(labels, own.argmax(dim=1), c, k))


@torch.no_grad()
def assignment_diagnostics(assignments: Dict[str, Tensor],
                           prototypes: Tensor) -> Dict[str, Any]:
    """The figures PrototypeUpdateHook logs from a batch's :func:`assignment_statistics`,
    summed over processes first (in place; every process must call this).

    Args:
        assignments (dict[str, Tensor]): What :func:`assignment_statistics` returned.
        prototypes (Tensor): (C, K, D) the prototypes (after the update).

    Returns:
        dict: Empty when the batch has no labelled pixel; otherwise ``used`` (share of the
        prototypes of the classes present that were assigned >= 1 pixel), ``effective``
        (mean over those classes of the prototypes that are the nearest one for >= 1% of
        the class's pixels), ``entropy`` (mean over them of the assignment entropy / log K)
        and ``entropy_per_class`` ({class index: entropy}).
    """
    if get_world_size() > 1:
        for value in assignments.values():
            all_reduce(value, op='sum')
    pixels = assignments['pixels']
    present = pixels > 0
    if not bool(present.any()):
        return {}
    c, k = prototypes.shape[:2]
    used = assignments['assigned'].view(c, k)[present] > 0
    entropy = assignments['entropy_sum'] / pixels.clamp(min=1)
    health = prototype_health(prototypes.detach().cpu(),
                              assignments['nearest'].view(c, k).cpu())
    per_class = entropy.tolist()
    return dict(used=used.float().mean().item(),
                effective=health['effective'][present.cpu()].mean().item(),
                entropy=entropy[present].mean().item(),
                entropy_per_class={i: per_class[i]
                                   for i in torch.nonzero(present).flatten().tolist()})


def prototype_health(prototypes: Tensor, usage: Tensor,
                     min_share: float = 0.01) -> Dict[str, Tensor]:
    """Per-class health figures.

    Args:
        prototypes (Tensor): (C, K, D) unit prototypes.
        usage (Tensor): (C, K) pixel counts, of the pixels whose nearest own-class
            prototype each is (:func:`~mmseg_proto.evaluation.nearest_prototype_usage`,
            or the ``nearest`` of :func:`assignment_statistics`).
        min_share (float): A prototype counts as used when it is the nearest one for at
            least this share of the class's pixels. Default: 0.01.

    Returns:
        dict[str, Tensor]: (C,) each: ``pixels``; ``effective``, the number of prototypes
        used (share >= ``min_share``); ``exp_entropy``, exp of the entropy of the usage
        shares (1: all pixels on one prototype, K: evenly spread); ``cos_min``,
        ``cos_mean``, ``cos_max`` of the pairwise cosines between the class's prototypes
        (NaN for K = 1). Classes without pixels have NaN usage figures.
    """
    usage = usage.double()
    pixels = usage.sum(dim=1)
    share = usage / pixels.clamp(min=1)[:, None]
    absent = pixels == 0
    nan = torch.tensor(float('nan'), dtype=torch.float64)
    entropy = -(share * torch.log(share.clamp(min=1e-300))).sum(dim=1)
    protos = torch.nn.functional.normalize(prototypes.double(), dim=-1)
    k = protos.shape[1]
    cos = protos @ protos.transpose(1, 2)  # (C, K, K)
    off = ~torch.eye(k, dtype=torch.bool)
    pairs = cos[:, off] if k > 1 else torch.full((cos.shape[0], 1), math.nan,
                                                  dtype=torch.float64)
    return dict(
        pixels=pixels,
        effective=torch.where(absent, nan, (share >= min_share).sum(dim=1).double()),
        exp_entropy=torch.where(absent, nan, entropy.exp()),
        cos_min=pairs.min(dim=1).values, cos_mean=pairs.mean(dim=1),
        cos_max=pairs.max(dim=1).values)


@torch.no_grad()
def usage_statistics(labels: Tensor, own: Tensor, correct: Tensor, correct_emb: Tensor,
                     num_classes: int, num_prototypes: int) -> Dict[str, Tensor]:
    """What re-seeding unused prototypes needs from one batch.

    Args:
        labels (Tensor): (N,) class of each labelled pixel.
        own (Tensor): (N, K) similarities to the class's prototypes.
        correct (Tensor): (N,) bool, correctly classified.
        correct_emb (Tensor): (M, D) fp32 embeddings of the correct ones.
        num_classes (int): C.
        num_prototypes (int): K.

    Returns:
        dict[str, Tensor]: ``nearest`` (C*K,) labelled pixels whose
        nearest own-class prototype it is (the inference rule);
        ``outlier_sums`` (C, D) / ``outlier_weights`` (C,): the sum of the
        correctly classified embeddings of each class, each weighted by
        ``1 - s`` (``s``: its similarity to its nearest own prototype;
        for unit vectors, half the squared distance), and the sum of
        those weights: their ratio is the class's mean weighted towards
        the pixels its prototypes serve worst, as k-means++ seeds. Plain
        sums, so they add up over iterations and processes: the same
        result however the batch is split.
    """
    c = num_classes
    best, nearest_k = own.float().max(dim=1)
    cls = labels[correct]
    weight = (1.0 - best[correct]).clamp(min=0)
    return dict(
        nearest=nearest_counts(labels, nearest_k, c, num_prototypes),
        outlier_sums=correct_emb.new_zeros(c, correct_emb.shape[1])
        .index_add_(0, cls, correct_emb * weight[:, None]),
        outlier_weights=weight.new_zeros(c).index_add_(0, cls, weight))
