"""PrototypeBank: a ProtoHead's prototypes and everything that changes them."""
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor

from .prototype_statistics import (PrototypeBatch, PrototypeStatistics,
                                   assignment_diagnostics, batch_statistics)

HOOK_HINT = ("add the prototype update hook to the config: "
             "custom_hooks = [dict(type='PrototypeUpdateHook')]")
EMA_HINT = ("If the checkpoint was written by a run with mmengine's "
            'EMAHook(update_buffers=True), which averages the prototypes like weights '
            '(averages of unit vectors are shorter), train with '
            'EMAHook(update_buffers=False): the prototypes are a moving average already. '
            'To use such a checkpoint anyway, re-normalise its prototypes first: '
            "ckpt['state_dict'][key] = torch.nn.functional.normalize("
            "ckpt['state_dict'][key], dim=-1), then torch.save(ckpt, path)")
# The saved statistics (PrototypeStatistics, the re-seeding window): name -> (shape given
# C, K, D, whether its values are counts or weights, never negative).
WINDOW_ENTRIES = dict(nearest=(lambda c, k, d: (c * k, ), True),
                      outlier_sums=(lambda c, k, d: (c, d), False),
                      outlier_weights=(lambda c, k, d: (c, ), True))
PENDING_ENTRIES = dict(sums=(lambda c, k, d: (c * k, d), False),
                       counts=(lambda c, k, d: (c * k, ), True))
# The state dict entry of the bank's training state (torch's name for a module's extra state).
EXTRA_STATE_KEY = '_extra_state'
EXTRA_STATE_VERSION = 1
RESUME_HINT = (
    'Resume with the model and config that wrote the checkpoint, or from another '
    "checkpoint of the run; or delete the entry (ckpt = torch.load(path, weights_only=False); "
    "del ckpt['state_dict'][KEY]; torch.save(ckpt, path)) to resume without it: the "
    're-seeding window restarts and the statistics of an unfinished accumulated optimizer '
    'step are lost.')


class PrototypeBank(nn.Module):
    """The C x K unit prototypes of a ProtoHead, and everything that changes them.

    Owns the (C, K, D) ``prototypes`` buffer (``prototypes[c, k]``: prototype k of class
    c) and its life: initialisation (truncated normal, normalised); :meth:`collect`, one
    batch's statistics from the :class:`~.prototype_statistics.PrototypeBatch` that
    ``ProtoHead.loss`` hands over (per prototype, the sum and count of the embeddings of the
    correctly classified pixels assigned to it, the Sinkhorn diagnostics, and the usage
    re-seeding needs when :meth:`schedule_reseeding` set a window);
    :meth:`accumulate`, their sum over processes and over the iterations of one optimizer
    step; :meth:`apply`, after the optimizer step, the momentum update
    ``p <- normalise(mu * p + (1 - mu) * normalise(sum))`` of every prototype with a count
    (the others stay bit-identical); :meth:`reseed`; :meth:`load`, the load policy of
    checkpoints; :meth:`resume_state` / :meth:`restore`, what exact resume needs.

    :class:`~mmseg_proto.engine.hooks.PrototypeUpdateHook` says when (accumulate every
    iteration, apply after each optimizer step, and at the end of each re-seeding window,
    which the bank counts, re-seed unless training ends within the next window) and logs;
    without it the next :meth:`collect` raises.

    State dict: the prototypes buffer is left out (ProtoHead saves and loads it under
    ``prototypes``, the key of every ProtoSeg checkpoint). The training state exact resume
    needs, the re-seeding window (its steps and usage sums) and the statistics of an
    optimizer step still accumulating, is the module's extra state (``bank._extra_state``,
    :meth:`get_extra_state`), saved only while there is some (a model that never trained,
    or trained without re-seeding and saved at the end of an optimizer step, has none), and
    restored only on ``--resume`` (:meth:`expect_resume`): ``load_from``, ``init_model`` and
    the other tools start without it.

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
        self._extra_state_key = EXTRA_STATE_KEY  # its key in the last state dict loaded
        self.reseed_interval = 0  # optimizer steps per re-seeding window (0: none)
        self.window_steps = 0  # optimizer steps so far in the current window
        self._batch: Optional[PrototypeStatistics] = None  # the last batch's
        self._step: Optional[PrototypeStatistics] = None  # the optimizer step's, summed
        self._window: Optional[Dict[str, Tensor]] = None  # usage over the re-seeding window
        self._resuming = False  # the next load is a --resume (expect_resume): prototypes
        self._resuming_state = False  # ... and the training state (set_extra_state)

    @property
    def batch(self) -> Optional[PrototypeStatistics]:
        """The statistics of the last :meth:`collect`, until :meth:`accumulate`."""
        return self._batch

    def discard(self) -> None:
        """Drop the collected and accumulated statistics (a forward that trained nothing)."""
        self._batch = self._step = None

    def schedule_reseeding(self, interval: int) -> None:
        """Re-seed every ``interval`` optimizer steps (0: never; the default): from now on
        :meth:`collect` adds the usage statistics a window needs, and :meth:`end_step`
        counts the window's steps. Set once per run, before its checkpoint loads."""
        self.reseed_interval = interval
        if not interval:
            self._window, self.window_steps = None, 0

    def collect(self, batch: PrototypeBatch) -> None:
        """Keep one training batch's statistics until :meth:`accumulate`. Raises
        RuntimeError if the previous batch's were never accumulated (no update hook)."""
        if self._batch is not None:
            raise RuntimeError('ProtoHead: the prototype statistics of the previous training '
                               'iteration were never applied, so the prototypes would never '
                               f'be updated; {HOOK_HINT}')
        self._batch = batch_statistics(batch, *self.prototypes.shape[:2],
                                       usage=self.reseed_interval > 0)

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

    def end_step(self) -> bool:
        """Count one optimizer step of the re-seeding window; True when the window is
        complete (then :meth:`reseed` or :meth:`clear_window`)."""
        if not self.reseed_interval:
            return False
        self.window_steps += 1
        return self.window_steps >= self.reseed_interval

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
        window, self._window, self.window_steps = self._window, None, 0
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
        self._window, self.window_steps = None, 0

    def resume_state(self) -> Dict[str, Any]:
        """CPU copies of the re-seeding window (``window``) and of the statistics of an
        optimizer step still accumulating (``pending``); None each where there is none."""
        return dict(window=None if self._window is None else {
            key: value.detach().cpu().clone() for key, value in self._window.items()},
            pending=None if self._step is None else self._step.state_dict())

    def restore(self, window: Optional[Dict[str, Tensor]] = None,
                pending: Optional[Dict[str, Any]] = None, window_steps: int = 0) -> None:
        """Inverse of :meth:`resume_state` (and ``window_steps``, the optimizer steps so far
        in the window), on the prototypes' device (pending usage only if the bank re-seeds,
        :meth:`schedule_reseeding`), after checking what a checkpoint holds:
        float32 tensors of this bank's shapes, counts and weights never negative, and
        finite values, except in the statistics of a pending step whose embeddings were
        non-finite (``sums`` not finite: :meth:`apply` skips that step, as the run that
        saved it did).

        Raises:
            ValueError: ``window`` or ``pending`` does not fit this bank or holds values
                statistics never have (names the entry and what is wrong).
        """
        shape = tuple(self.prototypes.shape)
        if window is not None:
            problem = _statistics_problem(window, WINDOW_ENTRIES, shape)
            if problem is not None:
                raise ValueError(f're-seeding window {problem}')
        if pending is not None:
            stats = PrototypeStatistics.from_state_dict(pending, self.prototypes.device)
            c, k, d = shape
            if stats.sums.shape != (c * k, d) or stats.counts.shape != (c * k, ):
                raise ValueError(f'pending statistics of shape {tuple(stats.sums.shape)}/'
                                 f'{tuple(stats.counts.shape)}, which need {(c * k, d)}/'
                                 f'{(c * k, )}')
            # Counts are finite even where the embeddings were not; the sums and usage
            # are only used where the sums are finite (apply skips the step otherwise).
            problem = _statistics_problem(dict(sums=stats.sums, counts=stats.counts),
                                          PENDING_ENTRIES, shape, finite=False) or \
                _values_problem("'counts'", stats.counts, True)
            if problem is None and stats.usage is not None:
                problem = _statistics_problem(
                    stats.usage, WINDOW_ENTRIES, shape, prefix="usage['",
                    finite=bool(torch.isfinite(stats.sums).all()))
            if problem is not None:
                raise ValueError(f'pending statistics {problem}')
            stats.usage = stats.usage if self.reseed_interval else None
            self._step = stats
        if window is not None:
            self._window = {key: v.to(self.prototypes.device) for key, v in window.items()}
        self.window_steps = window_steps

    def get_extra_state(self) -> Dict[str, Any]:
        """The training state a ``--resume`` needs (see the class doc): ``version``,
        ``window_steps`` and CPU copies of the ``window`` and ``pending`` statistics of
        :meth:`resume_state`; plain dicts, ints and tensors (weights-only loadable)."""
        return dict(version=EXTRA_STATE_VERSION, window_steps=self.window_steps,
                    **self.resume_state())

    def set_extra_state(self, state: Any) -> None:
        """On ``--resume`` (:meth:`expect_resume`), check and restore what
        :meth:`get_extra_state` saved (the window only if this run re-seeds, see
        :meth:`schedule_reseeding`); on any other load, nothing: a new run starts its own
        window.

        Raises:
            ValueError: The entry does not fit this bank (says what and what to do).
        """
        resuming, self._resuming_state = self._resuming_state, False
        if not resuming:
            return
        problem = _extra_state_problem(state)
        if problem is None:
            reseeds = bool(self.reseed_interval)
            try:
                self.restore(state['window'] if reseeds else None, state['pending'],
                             state['window_steps'] if reseeds else 0)
            except ValueError as err:
                problem = str(err)
        if problem is not None:
            raise ValueError(
                "ProtoHead: cannot restore the prototype bank's training state from the "
                f"resumed checkpoint's {self._extra_state_key!r} entry: {problem}. "
                + RESUME_HINT.replace('KEY', repr(self._extra_state_key)))

    def has_training_state(self) -> bool:
        """Whether there is a re-seeding window or an accumulating step to save."""
        return bool(self.window_steps) or self._window is not None or self._step is not None

    def drop_pending(self) -> bool:
        """Drop the statistics of an accumulating optimizer step; True if there were
        some (a resumed run whose iteration ends a step, see PrototypeUpdateHook)."""
        pending, self._step = self._step, None
        return pending is not None

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.has_training_state():  # a model that is not mid-training: no entry
            destination.pop(prefix + EXTRA_STATE_KEY, None)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: List[str],
                              unexpected_keys: List[str], error_msgs: List[str]) -> None:
        """The training state is optional: checkpoints without it (none to save, or
        written before it was saved here) load without a missing key."""
        self._extra_state_key = prefix + EXTRA_STATE_KEY
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict and self._extra_state_key in state_dict,
                                      missing_keys, unexpected_keys, error_msgs)

    def expect_resume(self, resuming: bool = True) -> None:
        """Whether the next :meth:`load` is a ``--resume`` of the run that saved the
        checkpoint: it then takes the prototypes whatever ``load_prototypes`` says
        (:class:`PrototypeUpdateHook` says so before the runner loads the state dict)."""
        self._resuming = self._resuming_state = resuming

    @torch.no_grad()
    def load(self, prototypes: Any, key: str = 'prototypes') -> None:
        """The load policy: take a checkpoint's ``prototypes`` (found under ``key``), keep
        the current ones with ``load_prototypes=False`` (except when resuming, see
        :meth:`expect_resume`), refuse another shape, a tensor that is not floating-point,
        non-finite values or vectors that are not of unit length, with a message saying
        what to change."""
        resuming, self._resuming = self._resuming, False
        shape = tuple(getattr(prototypes, 'shape', ()))
        if not (self.load_prototypes or resuming):
            print_log(f'ProtoHead: load_prototypes=False, keeping the initial '
                      f'prototypes instead of the loaded {key} of shape {shape}',
                      logger='current')
            return
        if not (isinstance(prototypes, Tensor) and shape == tuple(self.prototypes.shape)):
            raise RuntimeError(self._shape_message(key, shape, resuming))
        problem = prototypes_problem(prototypes)
        if problem is not None:
            raise RuntimeError(f'ProtoHead: the checkpoint holds {key} that {problem}. '
                               'ProtoHead compares pixels with unit prototypes by cosine; '
                               'others change its predictions. ' + (
                                   EMA_HINT.replace('[key]', f'[{key!r}]')
                                   if problem.startswith('are not of unit length') else
                                   'The run that wrote it diverged or the file is damaged: '
                                   'use an earlier checkpoint'))
        self.prototypes.copy_(prototypes)

    def _shape_message(self, key: str, shape: Tuple[int, ...], resuming: bool) -> str:
        """Why prototypes of ``shape`` do not load, and what to change."""
        c, k, d = shape if len(shape) == 3 else (None, None, None)
        got = (f'ProtoHead: the checkpoint holds {key} of shape {shape} '
               f'(num_classes={c}, num_prototypes={k}, embed_dims={d}) but this model has '
               f'{tuple(self.prototypes.shape)}. ')
        if resuming:
            return got + ('--resume continues the run that wrote the checkpoint: resume '
                          "with that run's config. To fine-tune the checkpoint on another "
                          'class set or K, start a new run from it: load_from=CKPT without '
                          '--resume, with load_prototypes=False in the head')
        return got + (
            'To continue or evaluate that model, set the '
            "head's num_classes / num_prototypes / embed_dims to match the checkpoint. To "
            'fine-tune it on another class set or K, set load_prototypes=False in the head '
            '(model.decode_head.load_prototypes=False): the prototypes start fresh and '
            'everything else loads')


def _extra_state_problem(state: Any) -> Optional[str]:
    """What is wrong with a saved extra state, apart from its statistics (None: nothing)."""
    keys = {'version', 'window_steps', 'window', 'pending'}
    if not isinstance(state, dict) or set(state) != keys:
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        return f'expected a dict with keys {sorted(keys)}, got {got}'
    if state['version'] != EXTRA_STATE_VERSION:
        return (f"it has version {state['version']!r}; this version of mmseg_proto reads "
                f'version {EXTRA_STATE_VERSION}')
    steps = state['window_steps']
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
        return f'window_steps must be an integer >= 0, got {steps!r}'
    return None


def unit_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 the norm of a normalised vector of ``dtype`` may be."""
    return max(1e-3, 4 * torch.finfo(dtype).eps)


def prototypes_problem(prototypes: Tensor) -> Optional[str]:
    """What is wrong with prototypes to load, as the end of a sentence (None: nothing):
    not floating-point, non-finite values, or rows whose norm is not 1 within
    :func:`unit_tolerance`."""
    if not prototypes.is_floating_point():
        return f'are of dtype {prototypes.dtype}, not floating-point'
    bad = ~torch.isfinite(prototypes)
    if bool(bad.any()):
        return (f'hold {int(bad.sum())} non-finite values (in '
                f'{int(bad.any(dim=-1).sum())} of {bad[..., 0].numel()} prototypes)')
    norms = prototypes.double().norm(dim=-1)
    off = (norms - 1).abs() > unit_tolerance(prototypes.dtype)
    if bool(off.any()):
        return (f'are not of unit length: {int(off.sum())} of {off.numel()} prototypes '
                f'have norms from {float(norms.min()):.4g} to {float(norms.max()):.4g}')
    return None


def _values_problem(name: str, value: Tensor, counts: bool) -> Optional[str]:
    """Non-finite values, or negative ones where ``counts``, in a saved statistic."""
    if not bool(torch.isfinite(value).all()):
        return f'{name} holds non-finite values'
    if counts and bool((value < 0).any()):
        return (f'{name} holds negative values (min {float(value.min()):.4g}); as a count or '
                'weight it never does')
    return None


def _statistics_problem(values: Any, entries: Dict[str, Any], shape: Tuple[int, int, int],
                        finite: bool = True, prefix: str = "'") -> Optional[str]:
    """What is wrong with saved statistics (a dict of the tensors ``entries`` names, for a
    bank of (C, K, D) ``shape``) as the rest of a sentence; None: nothing."""
    need = {key: make(*shape) for key, (make, _) in entries.items()}
    if not (isinstance(values, dict) and set(values) == set(need)):
        got = {key: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
               for key, v in values.items()} if isinstance(values, dict) else values
        return f'{got!r:.200}, which needs {need}'
    for key, value in values.items():
        name = prefix + key + ("']" if prefix.endswith("['") else "'")
        if not isinstance(value, Tensor) or tuple(value.shape) != need[key]:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            return f'{name} of shape {got}, which needs {need[key]}'
        if value.dtype != torch.float32:
            return f'{name} of dtype {value.dtype}, which needs torch.float32'
        problem = _values_problem(name, value, entries[key][1]) if finite else None
        if problem is not None:
            return problem
    return None
