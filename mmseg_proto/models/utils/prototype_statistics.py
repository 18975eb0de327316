"""What a ProtoHead's training step hands to PrototypeUpdateHook."""
from dataclasses import dataclass
from typing import Dict, Optional

from torch import Tensor


@dataclass
class PrototypeStatistics:
    """Per-prototype statistics of one training iteration of a ProtoHead.

    Owner: ``ProtoHead.loss`` creates it (one per iteration);
    :class:`PrototypeUpdateHook` takes it with ``ProtoHead.take_statistics``,
    sums it over processes (and over accumulated iterations) and applies the
    momentum update with ``ProtoHead.update_prototypes``. Prototype ``i``
    is class ``i // K``, prototype ``i % K`` (the ``prototypes`` buffer's
    (C, K, D) order, flattened).

    Args:
        sums (Tensor): (C*K, D) fp32 sums of the embeddings of the correctly
            classified pixels assigned to each prototype; non-finite when the
            batch had non-finite embeddings (the hook then skips the update).
        counts (Tensor): (C*K,) their numbers.
        assignments (dict[str, Tensor], optional): Sinkhorn diagnostics
            (``ProtoHead.assignment_statistics``), only on the iterations
            the hook logs.
        usage (dict[str, Tensor], optional): What re-seeding needs
            (``ProtoHead.usage_statistics``), every iteration while the hook
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
