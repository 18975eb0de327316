"""A bounded top-N per slot, merged batch by batch (the gallery's kept pixels)."""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor


class TopN:
    """The N highest-scoring items of every slot, in fixed (slots, N) tensors.

    :meth:`push` merges a batch of candidates: each slot's candidates are ranked, the best
    N are merged with the kept N, and the best N of the 2N stay. Memory never exceeds
    (slots, 2N) whatever is offered. Ties keep the earlier candidate (stable sorts).

    Args:
        num_slots (int): Number of slots (here C*K prototypes, row ``c * K + k``).
        n (int): Items kept per slot, >= 1.
        width (int): Integers stored per item. Default: 1.
    """

    def __init__(self, num_slots: int, n: int, width: int = 1) -> None:
        if n < 1:
            raise ValueError(f'TopN keeps n >= 1 items per slot, got n={n}')
        self.n = n
        self.scores = torch.full((num_slots, n), -math.inf, dtype=torch.float32)
        self.items = torch.full((num_slots, n, width), -1, dtype=torch.long)

    def push(self, slots: Tensor, scores: Tensor, items: Tensor,
             limit: Optional[int] = None) -> None:
        """Offer M candidates.

        Args:
            slots (Tensor): (M,) slot of each candidate.
            scores (Tensor): (M,) its score (finite).
            items (Tensor): (M, width) its integers.
            limit (int, optional): Take at most this many of a slot's candidates of this
                push (its best ones), e.g. pixels of one image. Default: N.
        """
        if slots.numel() == 0:
            return
        num_slots, n = self.scores.shape
        if limit is not None:
            if limit < 1:
                raise ValueError(f'limit must be >= 1 or None, got {limit}')
            n_new = min(n, limit)
        else:
            n_new = n
        slots, scores = slots.long().cpu(), scores.float().cpu()
        items = items.long().cpu()
        # Candidates grouped by slot, best first within a slot (stable: input order on ties).
        order = torch.sort(scores, descending=True, stable=True).indices
        order = order[torch.sort(slots[order], stable=True).indices]
        grouped = slots[order]
        counts = torch.bincount(grouped, minlength=num_slots)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order)) - starts[grouped]
        keep = rank < n_new
        new_scores = torch.full_like(self.scores, -math.inf)
        new_items = torch.full_like(self.items, -1)
        new_scores[grouped[keep], rank[keep]] = scores[order][keep]
        new_items[grouped[keep], rank[keep]] = items[order][keep]
        # Kept items first, so that on equal scores the earlier one stays.
        all_scores = torch.cat([self.scores, new_scores], dim=1)
        all_items = torch.cat([self.items, new_items], dim=1)
        best = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, :n]
        self.scores = torch.gather(all_scores, 1, best)
        self.items = torch.gather(all_items, 1, best[..., None].expand(-1, -1,
                                                                        all_items.shape[2]))

    def counts(self) -> Tensor:
        """(slots,) number of items kept per slot (<= N)."""
        return torch.isfinite(self.scores).sum(dim=1)

    def entries(self, slot: int) -> List[Tuple[float, List[int]]]:
        """(score, items) of one slot, best first."""
        return [(float(self.scores[slot, j]), self.items[slot, j].tolist())
                for j in range(int(self.counts()[slot]))]
