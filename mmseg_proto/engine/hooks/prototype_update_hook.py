"""PrototypeUpdateHook: when ProtoSeg's prototype banks apply their statistics, and logs."""
from typing import Any, Dict, List, Optional, Sequence

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS

from ...models.decode_heads.proto_head_options import check_options, is_int, is_real
from ...models.utils.prototype_bank import PrototypeBank
from .optimizer_steps import optimizer_stepped, optimizer_steps_left
from .resume_state import STATE_KEY, load_state, save_state

NAME = 'PrototypeUpdateHook'
# option -> (check, what it must be), checked as ProtoHead's are (bool is not a number)
HOOK_RULES = {
    'log_interval': (lambda v: is_int(v) and v >= 0,
                     'an integer >= 0; 0 disables logging'),
    'per_class_entropy': (lambda v: isinstance(v, bool), 'True or False'),
    'reseed_interval': (lambda v: is_int(v) and v >= 0,
                        'an integer >= 0; 0: no re-seeding'),
    'reseed_min_share': (lambda v: is_real(v) and 0 < v <= 1,
                         'a number in (0, 1]'),
}


@HOOKS.register_module()
class PrototypeUpdateHook(Hook):
    """Tells the :class:`PrototypeBank` of every ProtoHead when to update, and logs.

    After each training iteration every bank (decode and auxiliary ProtoHeads alike) sums
    the iteration's statistics over processes (one all-reduce per head) into those of the
    coming optimizer step; after the iteration in which the optimizer steps (each one, or
    every ``accumulative_counts``) it applies them: one momentum update per optimizer
    step, from all its pixels, the same on every process as a single process would make
    on the global batch. Non-finite statistics on any process skip the update everywhere,
    with a warning. Use it through ``custom_hooks = [dict(type='PrototypeUpdateHook')]``.

    Logged every ``log_interval`` iterations (message hub: console, JSON log, TensorBoard;
    ``train/proto_*`` for the decode head, ``train/proto1_*``, ... for auxiliary heads):
    ``proto_updated`` (share of prototypes updated), ``proto_shift_deg`` (mean angle
    moved), ``proto_used`` (share of the prototypes of the classes in the batch that the
    Sinkhorn hard assignment gave >= 1 pixel), ``proto_effective`` (per class present, the
    prototypes that are the nearest one for >= 1% of its pixels, averaged; K: all used, 1:
    collapsed), ``proto_entropy`` (Sinkhorn soft-assignment entropy / log K, averaged over
    pixels then classes; per class, as ``train/proto_entropy/<class>``, to the visualizer
    backends only, with ``per_class_entropy``).

    Re-seeding (``reseed_interval > 0``): every ``reseed_interval`` optimizer steps each
    bank moves each class's least used prototype onto the pixels it serves worst, if that
    prototype is the nearest one for fewer than ``reseed_min_share`` of the class's pixels
    in the window (:meth:`PrototypeBank.reseed`; logged by name and as
    ``train/proto_reseeded``). Not in the last window of training (fewer than
    ``reseed_interval`` steps left), so that every re-seeded prototype trains a window.

    Exact resume: each bank's re-seeding window and the statistics of an unfinished
    accumulated step are in the model's state dict (the bank's extra state), the step's
    gradients in this hook's checkpoint entry (:mod:`.resume_state`); on ``--resume`` the
    hook has every bank restore its state and take the checkpoint's prototypes whatever the
    head's ``load_prototypes`` says, and restores the gradients. ``EMAHook(update_buffers=True)``, which would average the
    prototypes like weights, is refused before training.

    Args:
        log_interval (int): Every how many iterations to log. 0 disables. Default: 50.
        priority (str | int): Hook priority; it must run before ``CheckpointHook`` so that
            saved prototypes include this iteration's update. Default: 'ABOVE_NORMAL'.
        per_class_entropy (bool): Also write the per-class entropies. Default: True.
        reseed_interval (int): Optimizer steps per re-seeding window; 0 disables
            re-seeding. Default: 0.
        reseed_min_share (float): Re-seed a prototype that is the nearest one for fewer
            than this share of its class's pixels in a window. Default: 0.01.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, log_interval: int = 50, priority: Optional[str] = None,
                 per_class_entropy: bool = True, reseed_interval: int = 0,
                 reseed_min_share: float = 0.01) -> None:
        check_options(NAME, HOOK_RULES, log_interval=log_interval,
                      per_class_entropy=per_class_entropy, reseed_interval=reseed_interval,
                      reseed_min_share=reseed_min_share)
        self.log_interval, self.per_class_entropy = log_interval, per_class_entropy
        self.reseed_interval, self.reseed_min_share = reseed_interval, float(reseed_min_share)
        if priority is not None:
            self.priority = priority
        self.banks: List[PrototypeBank] = []  # the model's, found in before_run
        self._loaded: Optional[Dict[str, Any]] = None  # the last loaded checkpoint's
        self._checkpoint_loaded = False

    def before_run(self, runner) -> None:
        """Give every bank its re-seeding window, once, before a checkpoint loads."""
        self.banks = _banks(runner)
        for bank in self.banks:
            bank.schedule_reseeding(self.reseed_interval)

    def before_train(self, runner) -> None:
        check_ema_hooks(runner)
        self.banks = _banks(runner)
        for bank in self.banks:  # in case the checkpoint held no prototypes
            bank.expect_resume(False)
            bank.schedule_reseeding(self.reseed_interval)
        if not self.banks:
            runner.logger.warning(f'{NAME}: the model has no ProtoHead; the hook does nothing.')
        if self._checkpoint_loaded and runner.iter > 0:  # resumed, not load_from
            load_state(runner, self.banks, self._loaded)
        self._loaded, self._checkpoint_loaded = None, False

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        """Every bank adds this iteration's statistics to the optimizer step's and, after
        the step, applies them; at the end of a re-seeding window, re-seeding."""
        stepped = optimizer_stepped(runner)
        for i, bank in enumerate(self.banks):
            if bank.accumulate() and stepped:
                diagnostics = bank.apply(diagnostics=self._log_now(runner))
                if diagnostics is None:
                    runner.logger.warning(f'{NAME}: non-finite embeddings at iteration '
                                          f'{runner.iter + 1}; prototype update skipped.')
                else:
                    self._log(runner, i, diagnostics)
            if stepped and bank.end_step():
                self._end_window(runner, i, bank)

    def _end_window(self, runner, i: int, bank: PrototypeBank) -> None:
        """Re-seed, except in the last window of training (see the class doc)."""
        left = optimizer_steps_left(runner)
        if left is not None and left < self.reseed_interval:
            bank.clear_window()
            return
        reseeded = bank.reseed(self.reseed_min_share)
        if reseeded is not None:
            runner.message_hub.update_scalar(f'{_tag(i)}_reseeded', float(len(reseeded)))
            if reseeded:
                names = _class_names(runner, bank.prototypes.shape[0])
                runner.logger.info(
                    f'{NAME}: iteration {runner.iter + 1}, re-seeded {len(reseeded)} '
                    f'prototype(s) used by fewer than {self.reseed_min_share:.0%} of '
                    "their class's pixels: " + ', '.join(f'{names[c]}#{k}'
                                                         for c, k in reseeded))

    def _log(self, runner, i: int, diagnostics: Dict[str, Any]) -> None:
        """Bank ``i``'s diagnostics to the message hub (per class: visualizer)."""
        per_class = diagnostics.pop('entropy_per_class', None)
        for name, value in diagnostics.items():
            runner.message_hub.update_scalar(f'{_tag(i)}_{name}', value)
        if per_class and self.per_class_entropy:
            names = _class_names(runner, self.banks[i].prototypes.shape[0])
            runner.visualizer.add_scalars(
                {f'{_tag(i)}_entropy/{names[c]}': v for c, v in per_class.items()},
                step=runner.iter + 1)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        save_state(runner, checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Keep the saved state; ``before_train`` restores it if the run resumes. mmengine
        calls this before it loads the checkpoint's state dict: on ``--resume`` (the
        runner's ``resume``), every bank is told to take the checkpoint's prototypes
        whatever ``load_prototypes`` says, since they are the run's trained state."""
        self._checkpoint_loaded = True
        self._loaded = checkpoint.get(STATE_KEY) if isinstance(checkpoint, dict) else None
        if getattr(runner, '_resume', False):
            for bank in _banks(runner):
                bank.expect_resume()

    def _log_now(self, runner) -> bool:
        return self.log_interval > 0 and self.every_n_train_iters(runner, self.log_interval)


def _banks(runner) -> List[PrototypeBank]:
    """The prototype banks of the runner's model (decode head first)."""
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    return [m for m in model.modules() if isinstance(m, PrototypeBank)]


def check_ema_hooks(runner) -> None:
    """Refuse mmengine's ``EMAHook(update_buffers=True)``: it would average ProtoHead's
    prototypes like weights into vectors that are not unit vectors, which its validation
    and its checkpoints then use.

    Raises:
        ValueError: Such a hook is registered (says what to change).
    """
    for hook in getattr(runner, 'hooks', ()):
        ema_cfg = getattr(hook, 'ema_cfg', None)
        if isinstance(ema_cfg, dict) and ema_cfg.get('update_buffers', False):
            raise ValueError(
                f'{NAME}: {type(hook).__name__}(update_buffers=True) averages every buffer '
                "of the model, ProtoHead's prototypes included: averages of unit vectors "
                'are shorter than 1, so the averaged model it validates and saves changes '
                'predictions. The prototypes are a moving average already: set '
                f"update_buffers=False in the {type(hook).__name__} entry of custom_hooks.")


def _tag(i: int) -> str:
    """Log prefix of ProtoHead ``i`` (0: the decode head)."""
    return 'train/proto' if i == 0 else f'train/proto{i}'


def _class_names(runner, num_classes: int) -> Sequence[str]:
    """Class names of the training set, or '0', '1', ... if unavailable."""
    try:
        names = runner.train_dataloader.dataset.metainfo.get('classes')
    except Exception:  # no dataloader or metainfo: fall back to indices
        names = None
    if not names or len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    return names
