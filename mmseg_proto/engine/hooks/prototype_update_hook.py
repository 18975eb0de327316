"""Hook applying ProtoSeg's momentum prototype update every iteration."""
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS

from ...evaluation.prototype_health import prototype_health
from ...models.decode_heads.proto_head import ProtoHead
from ...models.utils.prototype_statistics import PrototypeStatistics


@HOOKS.register_module()
class PrototypeUpdateHook(Hook):
    """Apply the ProtoSeg prototype update after each training iteration.

    Every :class:`ProtoHead` in the model (decode and auxiliary heads alike)
    collects, during its ``loss``, the per-prototype sums and counts of the
    embeddings of correctly classified pixels. After the optimizer step this
    hook sums them over all processes (one all-reduce), so every rank applies
    the same update, equal to the one a single process would make on the
    whole global batch, then applies the momentum update. With gradient
    accumulation (``optim_wrapper.accumulative_counts > 1``) the statistics
    of the accumulated iterations are summed and applied once, after the
    iteration in which the optimizer steps: one momentum update per
    optimizer step, from all the pixels of that step (the clustering still
    runs per iteration). Non-finite
    statistics (an overflowing batch) skip the update with a warning instead
    of poisoning the prototypes; all ranks skip together.

    Use it through ``custom_hooks = [dict(type='PrototypeUpdateHook')]``.

    Diagnostics (message hub, hence console, JSON log and TensorBoard;
    names free of 'loss' so MMSeg does not add them to the total loss), for
    the decode head (``train/proto_*``; auxiliary ProtoHeads get
    ``train/proto1_*``, ...), from the iteration they are logged at:

    - ``proto_updated``: share of all prototypes updated (had >= 1 correctly
      classified assigned pixel);
    - ``proto_shift_deg``: mean angle a prototype moved by the update;
    - ``proto_used``: share of the prototypes of the classes in the batch
      that the Sinkhorn hard assignment gave >= 1 pixel;
    - ``proto_effective``: per class present, how many of its prototypes are
      the nearest one (the inference rule) for >= 1% of its pixels in the
      batch, averaged over classes (K: all used; 1: collapsed);
    - ``proto_entropy``: per class, the mean over its pixels of the entropy
      of the Sinkhorn soft assignment divided by ``log K`` (0: each pixel on
      one prototype, 1: spread evenly over all K), averaged over the
      classes in the batch. With ``per_class_entropy`` the per-class values
      go, as ``train/proto_entropy/<class>``, to the visualizer backends only
      (``vis_data/scalars.json``, TensorBoard), not to the console.

    Re-seeding (off by default; ``reseed_interval > 0``): the head also
    counts, every iteration, how often each prototype is the nearest one of
    its class (the inference rule) and sums the class's correctly
    classified embeddings weighted by their distance to their nearest
    prototype (``prototype_statistics.usage_statistics``). Every
    ``reseed_interval`` prototype updates the hook sums those over the
    window and over processes and, per class, moves the least used
    prototype onto the normalised mean of the class's correctly classified
    embeddings weighted by their distance to their nearest prototype
    (k-means++ style) if it is the
    nearest one for fewer than ``reseed_min_share`` of the class's pixels
    (``ProtoHead.reseed_prototypes``; one per class per window, identical on
    every process). Each re-seeding is logged (class and prototype) and
    counted in ``train/proto_reseeded``. The window restarts on resume. No
    re-seeding in the last ``reseed_interval`` iterations of training, so
    that every re-seeded prototype is trained for at least one window.

    Args:
        log_interval (int): Every how many iterations to log the prototype
            diagnostics above. 0 disables. Default: 50.
        reseed_interval (int): Prototype updates per re-seeding window; 0
            disables re-seeding. Default: 0.
        reseed_min_share (float): A prototype that is the nearest one for
            fewer than this share of its class's pixels in a window is
            re-seeded. Default: 0.01.
        per_class_entropy (bool): Also write the per-class assignment
            entropies to the visualizer backends. Default: True.
        priority (str | int): Hook priority. It must run before
            ``CheckpointHook`` so that saved prototypes include this
            iteration's update. Default: 'ABOVE_NORMAL'.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, log_interval: int = 50,
                 priority: Optional[str] = None,
                 per_class_entropy: bool = True,
                 reseed_interval: int = 0,
                 reseed_min_share: float = 0.01) -> None:
        if log_interval < 0:
            raise ValueError('PrototypeUpdateHook: log_interval must be >= 0, '
                             f'got {log_interval}')
        if not (isinstance(reseed_interval, int) and reseed_interval >= 0):
            raise ValueError('PrototypeUpdateHook: reseed_interval must be an '
                             'integer >= 0 (0: no re-seeding), got '
                             f'{reseed_interval!r}')
        if not (isinstance(reseed_min_share, (int, float)) and
                0 < reseed_min_share <= 1):
            raise ValueError('PrototypeUpdateHook: reseed_min_share must be '
                             f'in (0, 1], got {reseed_min_share!r}')
        self.log_interval = log_interval
        self.reseed_interval = reseed_interval
        self.reseed_min_share = float(reseed_min_share)
        # Per head: usage summed over the current re-seeding window, and the
        # number of prototype updates in it.
        self._window: Dict[int, Dict[str, torch.Tensor]] = {}
        self._window_updates = 0
        self.per_class_entropy = per_class_entropy
        if priority is not None:
            self.priority = priority
        # The ProtoHeads of the model, found in before_train.
        self.heads: List[ProtoHead] = []
        # Per head: statistics summed over the iterations accumulated into
        # the coming optimizer step.
        self._pending: Dict[int, PrototypeStatistics] = {}

    @staticmethod
    def proto_heads(model: torch.nn.Module) -> List[ProtoHead]:
        """All ProtoHeads of a (possibly wrapped) model."""
        if is_model_wrapper(model):
            model = model.module
        return [m for m in model.modules() if isinstance(m, ProtoHead)]

    def before_train(self, runner) -> None:
        self.heads = self.proto_heads(runner.model)
        if not self.heads:
            runner.logger.warning('PrototypeUpdateHook: the model has no '
                                  'ProtoHead; the hook does nothing.')
        for head in self.heads:
            head.collect_usage = self.reseed_interval > 0

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch=None) -> None:
        # Sinkhorn diagnostics cost a little: only on logging iterations.
        log_now = self._log_now(runner)
        for head in self.heads:
            head.collect_assignments = log_now

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        for i, head in enumerate(self.heads):
            stats = head.take_statistics()
            if stats is None:
                continue
            if i in self._pending:
                stats = self._pending.pop(i) + stats
            if not _optimizer_stepped(runner):
                self._pending[i] = stats
                continue
            sums, counts, assign_stats = (stats.sums, stats.counts,
                                          stats.assignments)
            if get_world_size() > 1:
                all_reduce(sums, op='sum')
                all_reduce(counts, op='sum')
            if not (torch.isfinite(sums).all() and
                    torch.isfinite(counts).all()):
                runner.logger.warning(
                    f'PrototypeUpdateHook: non-finite embeddings at iteration '
                    f'{runner.iter + 1}; prototype update skipped.')
                continue
            before = head.prototypes.clone() if self._log_now(runner) \
                else None
            updated = head.update_prototypes(sums, counts)
            if stats.usage is not None:
                window = self._window.setdefault(i, {})
                for key, value in stats.usage.items():
                    window[key] = window[key] + value if key in window \
                        else value
            if before is not None:
                tag = 'train/proto' if i == 0 else f'train/proto{i}'
                cos = (before * head.prototypes).sum(-1).clamp(-1, 1)
                shift = torch.rad2deg(torch.acos(cos)).flatten()
                hub = runner.message_hub
                hub.update_scalar(f'{tag}_updated',
                                  updated.float().mean().item())
                hub.update_scalar(f'{tag}_shift_deg', shift.mean().item())
                if assign_stats is not None:
                    self._log_assignments(runner, head, tag, assign_stats)
        if self.reseed_interval and _optimizer_stepped(runner):
            self._window_updates += 1
            if self._window_updates == self.reseed_interval:
                max_iters = getattr(runner, 'max_iters', None)
                if max_iters and max_iters - (runner.iter + 1) < \
                        self.reseed_interval:
                    # Last window: a prototype re-seeded now would go into
                    # the final model untrained.
                    self._window.clear()
                    self._window_updates = 0
                else:
                    self._reseed(runner)

    def _reseed(self, runner) -> None:
        """End of a re-seeding window: sum its usage over processes and
        re-seed (see the class doc)."""
        for i, head in enumerate(self.heads):
            window = self._window.pop(i, None)
            if window is None:
                continue
            if get_world_size() > 1:
                for value in window.values():
                    all_reduce(value, op='sum')
            reseeded = head.reseed_prototypes(
                window['nearest'], window['outlier_sums'],
                window['outlier_weights'], self.reseed_min_share)
            tag = 'train/proto' if i == 0 else f'train/proto{i}'
            runner.message_hub.update_scalar(f'{tag}_reseeded',
                                             float(len(reseeded)))
            if reseeded:
                names = _class_names(runner, head.num_classes)
                runner.logger.info(
                    f'PrototypeUpdateHook: iteration {runner.iter + 1}, '
                    f're-seeded {len(reseeded)} prototype(s) used by fewer '
                    f'than {self.reseed_min_share:.0%} of their class\'s '
                    'pixels: ' + ', '.join(f'{names[c]}#{k}'
                                           for c, k in reseeded))
        self._window_updates = 0

    def _log_assignments(self, runner, head: ProtoHead, tag: str,
                         stats: Dict[str, torch.Tensor]) -> None:
        """Log ``{tag}_used`` and ``{tag}_entropy`` (see the class doc)."""
        if get_world_size() > 1:
            for value in stats.values():
                all_reduce(value, op='sum')
        pixels = stats['pixels']
        present = pixels > 0
        if not bool(present.any()):
            return
        c, k = head.num_classes, head.num_prototypes
        used = stats['assigned'].view(c, k)[present] > 0
        entropy = stats['entropy_sum'] / pixels.clamp(min=1)
        hub = runner.message_hub
        hub.update_scalar(f'{tag}_used', used.float().mean().item())
        health = prototype_health(head.prototypes.detach().cpu(),
                                  stats['nearest'].view(c, k).cpu())
        hub.update_scalar(f'{tag}_effective',
                          health['effective'][present.cpu()].mean().item())
        hub.update_scalar(f'{tag}_entropy',
                          entropy[present].mean().item())
        if self.per_class_entropy:
            names = _class_names(runner, c)
            runner.visualizer.add_scalars(
                {f'{tag}_entropy/{names[i]}': entropy[i].item()
                 for i in torch.nonzero(present).flatten().tolist()},
                step=runner.iter + 1)

    def _log_now(self, runner) -> bool:
        return self.log_interval > 0 and self.every_n_train_iters(
            runner, self.log_interval)


def _optimizer_stepped(runner) -> bool:
    """Whether the optimizer stepped in this iteration: False only on the
    accumulating iterations of ``accumulative_counts > 1``."""
    should_update = getattr(getattr(runner, 'optim_wrapper', None),
                            'should_update', None)
    return bool(should_update()) if callable(should_update) else True


def _class_names(runner, num_classes: int) -> Sequence[str]:
    """Class names of the training set, or '0', '1', ... if unavailable."""
    try:
        names = runner.train_dataloader.dataset.metainfo.get('classes')
    except Exception:  # no dataloader or metainfo: fall back to indices
        names = None
    if not names or len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    return names
