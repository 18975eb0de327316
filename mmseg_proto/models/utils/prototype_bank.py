"""PrototypeBank: a ProtoHead's prototypes and everything that changes them."""
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor

from .prototype_statistics import (PrototypeStatistics, assignment_diagnostics,
                                   batch_statistics)

HOOK_HINT = ("add the prototype update hook to the config: "
             "custom_hooks = [dict(type='PrototypeUpdateHook')]")


class PrototypeBank(nn.Module):
    """The C x K unit prototypes of a ProtoHead, and everything that changes them.

    Owns the (C, K, D) ``prototypes`` buffer (``prototypes[c, k]``: prototype k of class
    c) and its life: initialisation (truncated normal, normalised); :meth:`collect`, one
    batch's statistics from what ``ProtoHead.loss`` hands over (per prototype, the sum and
    count of the embeddings of the correctly classified pixels assigned to it, plus the
    usage re-seeding needs and the Sinkhorn diagnostics when :meth:`request` asked);
    :meth:`accumulate`, their sum over processes and over the iterations of one optimizer
    step; :meth:`apply`, after the optimizer step, the momentum update
    ``p <- normalise(mu * p + (1 - mu) * normalise(sum))`` of every prototype with a count
    (the others stay bit-identical); :meth:`reseed`; :meth:`load`, the load policy of
    checkpoints; :meth:`resume_state` / :meth:`restore`, what exact resume needs.

    :class:`~mmseg_proto.engine.hooks.PrototypeUpdateHook` says when (accumulate every
    iteration, apply after each optimizer step, re-seed every ``reseed_interval`` steps)
    and logs; without it the next :meth:`collect` raises. The buffer is left out of this
    module's own state dict: ProtoHead saves and loads it under ``prototypes``, the key of
    every ProtoSeg checkpoint.

    Args:
        num_classes (int): C.
        num_prototypes (int): K.
        embed_dims (int): D.
        momentum (float): mu in [0, 1]. Default: 0.999.
        load_prototypes (bool): Whether :meth:`load` takes a checkpoint's prototypes.
            Default: True.
    """

    prototypes: Tensor

    def __init__(self, num_classes: int, num_prototypes: int, embed_dims: int,
                 momentum: float = 0.999, load_prototypes: bool = True) -> None:
        super().__init__()
        prototypes = torch.zeros(num_classes, num_prototypes, embed_dims)
        trunc_normal_(prototypes, std=0.02)
        self.register_buffer('prototypes', F.normalize(prototypes, dim=-1), persistent=False)
        self.momentum = momentum
        self.load_prototypes = load_prototypes
        self._usage = self._assignments = False  # what collect adds (request)
        self._batch: Optional[PrototypeStatistics] = None  # the last batch's
        self._step: Optional[PrototypeStatistics] = None  # the optimizer step's, summed
        self._window: Optional[Dict[str, Tensor]] = None  # usage over the re-seeding window

    @property
    def batch(self) -> Optional[PrototypeStatistics]:
        """The statistics of the last :meth:`collect`, until :meth:`accumulate`."""
        return self._batch

    def discard(self) -> None:
        """Drop the collected and accumulated statistics (a forward that trained nothing)."""
        self._batch = self._step = None

    @property
    def wants_assignments(self) -> bool:
        """Whether :meth:`collect` wants Sinkhorn's soft assignment (``transport``)."""
        return self._assignments

    def request(self, usage: Optional[bool] = None,
                assignments: Optional[bool] = None) -> None:
        """Choose what :meth:`collect` adds to the sums and counts from now on (None:
        unchanged): the ``usage`` re-seeding needs, the Sinkhorn diagnostics."""
        self._usage = self._usage if usage is None else usage
        self._assignments = self._assignments if assignments is None else assignments

    def collect(self, emb: Tensor, labels: Tensor, valid: Tensor, pred: Tensor,
                assign: Tensor, own: Tensor, transport: Optional[Tensor]) -> None:
        """Keep one training batch's statistics until :meth:`accumulate` (arguments: those
        of :func:`~.prototype_statistics.batch_statistics`). Raises RuntimeError if the
        previous batch's were never accumulated (no update hook)."""
        if self._batch is not None:
            raise RuntimeError('ProtoHead: the prototype statistics of the previous training '
                               'iteration were never applied, so the prototypes would never '
                               f'be updated; {HOOK_HINT}')
        self._batch = batch_statistics(emb, labels, valid, pred, assign, own, transport,
                                       *self.prototypes.shape[:2], self._assignments,
                                       self._usage)

    def accumulate(self) -> bool:
        """Sum the last batch's statistics over processes (one all-reduce; every process
        calls this at the same iterations) into the optimizer step's. False: no batch
        since the last call."""
        batch, self._batch = self._batch, None
        if batch is None:
            return False
        batch.sum_over_processes()
        self._step = batch if self._step is None else self._step + batch
        return True

    @torch.no_grad()
    def apply(self, diagnostics: bool = False) -> Optional[Dict[str, Any]]:
        """After the optimizer step: the momentum update from the step's statistics.

        Args:
            diagnostics (bool): Also return the figures the hook logs (host syncs).

        Returns:
            dict | None: None when the statistics are non-finite (an overflowing batch on
            any process: every process skips the update, nothing changes). Otherwise the
            diagnostics, empty unless asked for: ``updated`` (share of prototypes updated),
            ``shift_deg`` (mean angle moved) and, when the step's last batch collected
            them, those of :func:`~.prototype_statistics.assignment_diagnostics`.
        """
        step, self._step = self._step, None
        if step is None:
            return {}
        if not (torch.isfinite(step.sums).all() and torch.isfinite(step.counts).all()):
            return None
        before = self.prototypes.clone() if diagnostics else None
        updated = self.update(step.sums, step.counts)
        if step.usage is not None:
            self._window = step.usage if self._window is None else {
                key: self._window[key] + value for key, value in step.usage.items()}
        if before is None:
            return {}
        cos = (before * self.prototypes).sum(-1).clamp(-1, 1)
        out = dict(updated=updated.float().mean().item(),
                   shift_deg=torch.rad2deg(torch.acos(cos)).flatten().mean().item())
        if step.assignments is not None:
            out.update(assignment_diagnostics(step.assignments, self.prototypes))
        return out

    @torch.no_grad()
    def update(self, sums: Tensor, counts: Tensor) -> Tensor:
        """``p <- normalise(mu * p + (1 - mu) * normalise(sum))`` where ``count > 0``.

        Args:
            sums (Tensor): (C*K, D) sums of the assigned, correctly classified embeddings
                (summed over processes), row ``c * K + k``.
            counts (Tensor): (C*K,) their numbers.

        Returns:
            Tensor: (C*K,) bool mask of the prototypes that were updated.
        """
        c, k, d = self.prototypes.shape
        if sums.shape != (c * k, d) or counts.shape != (c * k, ):
            raise ValueError(f'ProtoHead: statistics of shape '
                             f'{tuple(sums.shape)}/{tuple(counts.shape)} do '
                             f'not fit prototypes of shape {(c, k, d)}')
        protos = self.prototypes.view(c * k, d)
        idx = torch.nonzero(counts > 0).squeeze(1)
        means = F.normalize(sums[idx].to(protos.dtype), dim=1)
        moved = protos[idx].lerp_(means, 1.0 - self.momentum)
        protos.index_copy_(0, idx, F.normalize(moved, dim=1))
        return counts > 0

    @torch.no_grad()
    def reseed(self, min_share: float) -> Optional[List[Tuple[int, int]]]:
        """End of a re-seeding window: move each class's least used prototype onto the
        pixels its prototypes serve worst, and start a new window.

        For every class whose least used prototype is the nearest one for fewer than
        ``min_share`` of its pixels in the window (dead or duplicate at inference), that
        prototype becomes the normalised distance-weighted mean of the class's correctly
        classified embeddings (:func:`~.prototype_statistics.usage_statistics`); one
        prototype per class, the others stay bit-identical; the same on every process.

        Returns:
            list[tuple[int, int]] | None: (class, prototype) of each re-seeded one; None
            when the window is empty.
        """
        window, self._window = self._window, None
        if window is None:
            return None
        c, k, _ = self.prototypes.shape
        usage = window['nearest'].view(c, k)
        pixels = usage.sum(dim=1)
        least, which = (usage / pixels.clamp(min=1)[:, None]).min(dim=1)
        chosen = (pixels > 0) & (window['outlier_weights'] > 0) & (least < min_share)
        classes = torch.nonzero(chosen).flatten()
        self.prototypes[classes, which[classes]] = F.normalize(
            window['outlier_sums'][classes].to(self.prototypes.dtype), dim=1)
        return list(zip(classes.tolist(), which[classes].tolist()))

    def clear_window(self) -> None:
        """Drop the re-seeding window without re-seeding (the last one of training)."""
        self._window = None

    def resume_state(self) -> Dict[str, Any]:
        """CPU copies of the re-seeding window (``window``) and of the statistics of an
        optimizer step still accumulating (``pending``); None each where there is none."""
        return dict(window=None if self._window is None else {
            key: value.detach().cpu().clone() for key, value in self._window.items()},
            pending=None if self._step is None else self._step.state_dict())

    def restore(self, window: Optional[Dict[str, Tensor]] = None,
                pending: Optional[Dict[str, Any]] = None) -> None:
        """Inverse of :meth:`resume_state`, on the prototypes' device (pending usage only
        if :meth:`request` asked for usage).

        Raises:
            ValueError: ``window`` or ``pending`` does not fit this bank (says what).
        """
        c, k, d = self.prototypes.shape
        if window is not None:
            need = dict(nearest=(c * k, ), outlier_sums=(c, d), outlier_weights=(c, ))
            got = {key: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                   for key, v in window.items()} if isinstance(window, dict) else window
            if got != need:
                raise ValueError(f're-seeding window {got!r:.200}, which needs {need}')
            self._window = {key: v.to(self.prototypes.device) for key, v in window.items()}
        if pending is not None:
            stats = PrototypeStatistics.from_state_dict(pending, self.prototypes.device)
            if stats.sums.shape != (c * k, d) or stats.counts.shape != (c * k, ):
                raise ValueError(f'pending statistics of shape {tuple(stats.sums.shape)}/'
                                 f'{tuple(stats.counts.shape)}, which need {(c * k, d)}/'
                                 f'{(c * k, )}')
            stats.usage = stats.usage if self._usage else None
            self._step = stats

    @torch.no_grad()
    def load(self, prototypes: Any, key: str = 'prototypes') -> None:
        """The load policy: take a checkpoint's ``prototypes`` (found under ``key``), keep
        the current ones with ``load_prototypes=False``, refuse another shape with a
        message saying what to change."""
        shape = tuple(getattr(prototypes, 'shape', ()))
        if not self.load_prototypes:
            print_log(f'ProtoHead: load_prototypes=False, keeping the initial '
                      f'prototypes instead of the loaded {key} of shape {shape}',
                      logger='current')
            return
        if isinstance(prototypes, Tensor) and shape == tuple(self.prototypes.shape):
            self.prototypes.copy_(prototypes)
            return
        c, k, d = shape if len(shape) == 3 else (None, None, None)
        raise RuntimeError(
            f'ProtoHead: the checkpoint holds {key} of shape {shape} '
            f'(num_classes={c}, num_prototypes={k}, embed_dims={d}) but this model has '
            f'{tuple(self.prototypes.shape)}. To continue or evaluate that model, set the '
            "head's num_classes / num_prototypes / embed_dims to match the checkpoint. To "
            'fine-tune it on another class set or K, set load_prototypes=False in the head '
            '(model.decode_head.load_prototypes=False): the prototypes start fresh and '
            'everything else loads')
