"""Hook applying ProtoSeg's momentum prototype update every iteration."""
from typing import Any, Dict, List, Optional, Sequence

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
    embeddings of correctly classified pixels. After each iteration this
    hook sums them over all processes (one all-reduce per head, with the
    re-seeding usage below), so every rank applies the same update, equal to
    the one a single process would make on the whole global batch, then,
    after the optimizer step, applies the momentum update. With gradient
    accumulation (``optim_wrapper.accumulative_counts > 1``) the statistics
    of the accumulated iterations are summed and applied once, after the
    iteration in which the optimizer steps: one momentum update per
    optimizer step, from all the pixels of that step and none of an earlier
    step (the clustering still runs per iteration). Non-finite statistics
    (an overflowing batch) on any process skip the update with a warning
    instead of poisoning the prototypes; the all-reduce makes them
    non-finite on every process, so all ranks skip together.

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
    counted in ``train/proto_reseeded``. No re-seeding in the last window
    of training (fewer than ``reseed_interval`` optimizer steps left), so
    that every re-seeded prototype is trained for at least one window.
    With gradient accumulation the window counts optimizer steps, not
    iterations.

    Exact resume: every checkpoint holds, under
    ``checkpoint['prototype_update_hook']``, the re-seeding window (its
    usage sums and how many updates it has had) and the statistics of the
    iterations accumulated into an optimizer step that has not happened
    yet; a checkpoint written in the middle of an accumulated step also
    holds the gradients accumulated so far (mmengine itself drops them).
    ``--resume`` restores all of it, so that a resumed run re-seeds and
    updates exactly as an uninterrupted one (bit for bit under the
    conditions of docs/distributed.md). The statistics are all-reduced
    every iteration (one all-reduce per head), so every process holds the
    global sums of the window and of a pending step and process 0's
    checkpoint holds them too. Exception: with several processes the
    gradients of a pending step are each process's own and are not saved
    (a warning says so when such a checkpoint is written; save at
    multiples of ``accumulative_counts``). Checkpoints without this entry
    (written by earlier versions) resume with an empty window and no
    pending statistics, as before; ``load_from`` without ``resume`` never
    restores it.

    Args:
        log_interval (int): Every how many iterations to log the prototype
            diagnostics above. 0 disables. Default: 50.
        reseed_interval (int): Prototype updates (optimizer steps) per
            re-seeding window; 0 disables re-seeding. Default: 0.
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
        _check_options(log_interval=log_interval,
                       per_class_entropy=per_class_entropy,
                       reseed_interval=reseed_interval,
                       reseed_min_share=reseed_min_share)
        self.log_interval = log_interval
        self.reseed_interval = reseed_interval
        self.reseed_min_share = float(reseed_min_share)
        # Per head: usage summed over the current re-seeding window (global:
        # all-reduced), and the number of prototype updates in it.
        self._window: Dict[int, Dict[str, torch.Tensor]] = {}
        self._window_updates = 0
        self.per_class_entropy = per_class_entropy
        if priority is not None:
            self.priority = priority
        # The ProtoHeads of the model, found in before_train.
        self.heads: List[ProtoHead] = []
        # Per head: statistics (all-reduced) summed over the iterations
        # accumulated into the coming optimizer step.
        self._pending: Dict[int, PrototypeStatistics] = {}
        # The hook's state from the checkpoint loaded last (None: none, or one
        # written before this state was saved); restored in before_train.
        self._loaded_state: Optional[Dict[str, Any]] = None
        self._checkpoint_loaded = False

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
        if self._checkpoint_loaded:
            self._restore(runner)

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch=None) -> None:
        # Sinkhorn diagnostics cost a little: only on logging iterations.
        log_now = self._log_now(runner)
        for head in self.heads:
            head.collect_assignments = log_now

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        stepped = _optimizer_stepped(runner)
        for i, head in enumerate(self.heads):
            stats = head.take_statistics()
            if stats is None:
                continue
            if get_world_size() > 1:
                _all_reduce_statistics(stats)
            if i in self._pending:
                stats = self._pending.pop(i) + stats
            if stepped:
                self._apply(runner, i, head, stats)
            else:
                self._pending[i] = stats
        if self.reseed_interval and stepped:
            self._window_updates += 1
            if self._window_updates >= self.reseed_interval:
                left = _optimizer_steps_left(runner)
                if left is not None and left < self.reseed_interval:
                    # Last window: a prototype re-seeded now would go into
                    # the final model trained for less than a window.
                    self._window.clear()
                    self._window_updates = 0
                else:
                    self._reseed(runner)

    def _apply(self, runner, i: int, head: ProtoHead,
               stats: PrototypeStatistics) -> None:
        """Momentum update of head ``i`` from the (all-reduced) statistics of
        one optimizer step; usage into the window; diagnostics."""
        sums, counts, assign_stats = (stats.sums, stats.counts,
                                      stats.assignments)
        # The all-reduce made a non-finite sum on any process non-finite on
        # every process: all skip together.
        if not (torch.isfinite(sums).all() and torch.isfinite(counts).all()):
            runner.logger.warning(
                f'PrototypeUpdateHook: non-finite embeddings at iteration '
                f'{runner.iter + 1}; prototype update skipped.')
            return
        before = head.prototypes.clone() if self._log_now(runner) else None
        updated = head.update_prototypes(sums, counts)
        if stats.usage is not None:
            window = self._window.setdefault(i, {})
            for key, value in stats.usage.items():
                window[key] = window[key] + value if key in window else value
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

    def _reseed(self, runner) -> None:
        """End of a re-seeding window: sum its usage over processes and
        re-seed (see the class doc)."""
        for i, head in enumerate(self.heads):
            window = self._window.pop(i, None)
            if window is None:
                continue
            # The window holds global sums (all-reduced every iteration).
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

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Add the re-seeding window, the statistics pending for an
        accumulated optimizer step and, in the middle of such a step, the
        gradients accumulated so far (see the class doc)."""
        meta = checkpoint.get('meta') or {}
        grads = None
        if not _optimizer_stepped(runner):
            grads = self._accumulated_gradients(runner)
        checkpoint[STATE_KEY] = dict(
            version=STATE_VERSION,
            iter=int(meta.get('iter', runner.iter + 1)),
            window_updates=self._window_updates,
            window={i: {key: value.detach().cpu().clone()
                        for key, value in window.items()}
                    for i, window in self._window.items()},
            pending={i: stats.state_dict()
                     for i, stats in self._pending.items()},
            gradients=grads)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Keep the hook's saved state; ``before_train`` restores it if the
        checkpoint is resumed (the runner's iteration is the saved one)."""
        self._checkpoint_loaded = True
        self._loaded_state = checkpoint.get(STATE_KEY) \
            if isinstance(checkpoint, dict) else None

    def _accumulated_gradients(self, runner) -> Optional[Dict[str, Any]]:
        """CPU copies of the gradients accumulated since the last optimizer
        step (process 0's only: with several processes they are not saved,
        with a warning)."""
        if get_world_size() > 1:
            runner.logger.warning(
                'PrototypeUpdateHook: this checkpoint is written in the middle '
                'of an accumulated optimizer step (accumulative_counts='
                f'{_accumulative_counts(runner)}, iteration '
                f'{runner.iter + 1}); with several processes the gradients '
                'accumulated on each are not saved, so a run resumed from it '
                'loses them. Save checkpoints at multiples of '
                'accumulative_counts (default_hooks.checkpoint.interval).')
            return None
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        return {name: p.grad.detach().cpu().clone()
                for name, p in model.named_parameters() if p.grad is not None}

    def _restore(self, runner) -> None:
        """Restore the state ``after_load_checkpoint`` kept, on resume."""
        state, self._loaded_state = self._loaded_state, None
        self._checkpoint_loaded = False
        if runner.iter == 0:
            return  # load_from without resume: a new training run
        if state is None:
            runner.logger.info(
                'PrototypeUpdateHook: the resumed checkpoint holds no '
                're-seeding window or pending statistics (written by an '
                'earlier version): the re-seeding window restarts at '
                f'iteration {runner.iter}.')
            return
        problem = _state_problem(state, len(self.heads))
        if problem is None and state['iter'] != runner.iter:
            problem = (f"it was saved at iteration {state['iter']} but the "
                       f'run resumes at iteration {runner.iter}')
        if problem is not None:
            raise ValueError(
                f'PrototypeUpdateHook: cannot restore its state from the '
                f'resumed checkpoint: {problem}. Resume from a checkpoint '
                'written by this model and config, or remove its '
                f"'{STATE_KEY}' entry to restart the re-seeding window.")
        acc = _accumulative_counts(runner)
        if self.reseed_interval:
            for i, window in state['window'].items():
                self._window[i] = {
                    key: value.to(self.heads[i].prototypes.device)
                    for key, value in window.items()}
                self._check_window(i)
            self._window_updates = state['window_updates']
        pending = state['pending']
        grads = state['gradients']
        if (pending or grads) and runner.iter % acc == 0:
            runner.logger.warning(
                f'PrototypeUpdateHook: the checkpoint was saved in the middle '
                f'of an accumulated optimizer step, but with '
                f'accumulative_counts={acc} iteration {runner.iter} ends a '
                'step in this run: its pending prototype statistics and '
                'gradients are dropped.')
            return
        for i, saved in pending.items():
            head = self.heads[i]
            stats = PrototypeStatistics.from_state_dict(
                saved, head.prototypes.device)
            c, k, d = head.prototypes.shape
            if stats.sums.shape != (c * k, d) or \
                    stats.counts.shape != (c * k, ):
                raise ValueError(
                    f'PrototypeUpdateHook: the resumed checkpoint holds '
                    f'pending statistics of shape {tuple(stats.sums.shape)}/'
                    f'{tuple(stats.counts.shape)} for ProtoHead {i}, whose '
                    f'prototypes have shape {(c, k, d)}; resume with the '
                    "model that wrote the checkpoint, or remove its "
                    f"'{STATE_KEY}' entry.")
            if stats.usage is not None and not self.reseed_interval:
                stats.usage = None
            self._pending[i] = stats
        if grads:
            self._restore_gradients(runner, grads)

    def _check_window(self, i: int) -> None:
        """Raise if head ``i``'s restored window does not fit the head."""
        c, k, d = self.heads[i].prototypes.shape
        expected = dict(nearest=(c * k, ), outlier_sums=(c, d),
                        outlier_weights=(c, ))
        got = {key: tuple(value.shape)
               for key, value in self._window[i].items()}
        if got != expected:
            raise ValueError(
                f'PrototypeUpdateHook: the resumed checkpoint holds a '
                f're-seeding window {got} for ProtoHead {i}, which needs '
                f'{expected}; resume with the model that wrote the '
                f"checkpoint, or remove its '{STATE_KEY}' entry.")

    def _restore_gradients(self, runner, grads: Dict[str, Any]) -> None:
        """Put back the gradients of a partly accumulated optimizer step."""
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        params = dict(model.named_parameters())
        misfits = [name for name, grad in grads.items()
                   if name not in params or not isinstance(grad, torch.Tensor)
                   or grad.shape != params[name].shape]
        if misfits:
            raise ValueError(
                f'PrototypeUpdateHook: the resumed checkpoint holds '
                f'accumulated gradients for {len(misfits)} parameter(s) this '
                f'model lacks or shapes differently (e.g. {misfits[0]!r}); '
                'resume with the model that wrote the checkpoint.')
        for name, grad in grads.items():
            param = params[name]
            param.grad = grad.to(device=param.device,
                                 dtype=param.dtype).clone()
        runner.logger.info(
            f'PrototypeUpdateHook: restored the gradients of {len(grads)} '
            'parameters accumulated in the checkpoint\'s unfinished optimizer '
            'step (mmengine\'s warning that they are lost does not apply).')

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


STATE_KEY = 'prototype_update_hook'
STATE_VERSION = 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# option -> (check, what it must be); bool is not an int here (as in ProtoHead)
_OPTION_RULES = {
    'log_interval': (lambda v: _is_int(v) and v >= 0,
                     'an integer >= 0; 0 disables logging'),
    'per_class_entropy': (lambda v: isinstance(v, bool), 'True or False'),
    'reseed_interval': (lambda v: _is_int(v) and v >= 0,
                        'an integer >= 0; 0: no re-seeding'),
    'reseed_min_share': (lambda v: _is_real(v) and 0 < v <= 1,
                         'a number in (0, 1]'),
}


def _check_options(**options: Any) -> None:
    """Raise one ValueError naming every option at fault."""
    problems = [f'{key}={value!r} (must be {_OPTION_RULES[key][1]})'
                for key, value in options.items()
                if not _OPTION_RULES[key][0](value)]
    if problems:
        raise ValueError('PrototypeUpdateHook: invalid ' + '; '.join(problems))


def _all_reduce_statistics(stats: PrototypeStatistics) -> None:
    """Sum ``sums``, ``counts`` and ``usage`` over processes, in place, in one
    all-reduce (a non-finite value anywhere makes the sums non-finite
    everywhere). The ``assignments`` diagnostics are reduced when logged."""
    parts = [stats.sums, stats.counts]
    if stats.usage is not None:
        parts += [stats.usage[key] for key in sorted(stats.usage)]
    flat = torch.cat([p.reshape(-1).to(stats.sums.dtype) for p in parts])
    all_reduce(flat, op='sum')
    offset = 0
    for part in parts:
        part.copy_(flat[offset:offset + part.numel()].view_as(part))
        offset += part.numel()


def _state_problem(state: Any, num_heads: int) -> Optional[str]:
    """What is wrong with a saved hook state (None: nothing)."""
    keys = {'version', 'iter', 'window_updates', 'window', 'pending',
            'gradients'}
    if not isinstance(state, dict) or not keys <= set(state):
        got = sorted(map(str, state)) if isinstance(state, dict) \
            else type(state).__name__
        return f'expected a dict with keys {sorted(keys)}, got {got}'
    if state['version'] != STATE_VERSION:
        return (f"it has version {state['version']!r}; this version of "
                f'mmseg_proto reads version {STATE_VERSION}')
    if not (_is_int(state['iter']) and _is_int(state['window_updates'])
            and state['window_updates'] >= 0):
        return ('iter and window_updates must be integers, got '
                f"{state['iter']!r} and {state['window_updates']!r}")
    for name in ('window', 'pending'):
        heads = state[name]
        if not (isinstance(heads, dict) and all(
                _is_int(i) and 0 <= i < num_heads for i in heads)):
            return (f'{name} must map ProtoHead indices below {num_heads} '
                    f'(the model has {num_heads} ProtoHead(s)), got '
                    f'{heads!r:.200}')
    for i, window in state['window'].items():
        if not (isinstance(window, dict) and all(
                isinstance(v, torch.Tensor) for v in window.values())):
            return f'the window of ProtoHead {i} is not a dict of tensors'
    if not (state['gradients'] is None or isinstance(state['gradients'],
                                                     dict)):
        return 'gradients must be a dict or None'
    return None


def _accumulative_counts(runner) -> int:
    """The optimizer wrapper's ``accumulative_counts`` (1 if it has none)."""
    counts = getattr(getattr(runner, 'optim_wrapper', None),
                     '_accumulative_counts', 1)
    return counts if _is_int(counts) and counts >= 1 else 1


def _optimizer_steps_left(runner) -> Optional[int]:
    """Optimizer steps after this iteration's, to the end of training (None
    if the runner has no ``max_iters``). The optimizer steps every
    ``accumulative_counts`` iterations and at the last one."""
    max_iters = getattr(runner, 'max_iters', None)
    if not max_iters:
        return None
    left = max(max_iters - (runner.iter + 1), 0)
    return -(-left // _accumulative_counts(runner))


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
