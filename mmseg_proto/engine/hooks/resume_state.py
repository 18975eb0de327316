"""The exact-resume entry :class:`PrototypeUpdateHook` adds to every checkpoint.

Each prototype bank's training state (its re-seeding window, the statistics of an
accumulated optimizer step that has not happened yet) travels in the model's state dict, as
the bank's extra state (:meth:`~mmseg_proto.models.utils.PrototypeBank.get_extra_state`).
What is not the model's goes here: ``checkpoint['prototype_update_hook']`` is a dict of plain
values and tensors (loadable with ``weights_only=True``):

- ``version``: 2;
- ``iter``: the iteration the checkpoint was saved after;
- ``gradients``: {parameter name: gradient} accumulated so far in such a step, or None
  (with several processes each holds its own and none is saved, with a warning).

Version 1 (written before the banks kept their own state) also held ``window_updates``,
``window`` and ``pending`` per ProtoHead index; it is still read, into the banks.

On ``--resume`` the entry is checked before anything is restored (gradients must be finite
floating-point tensors of the model's parameters unless an AMP loss scaler skips their step;
a version-1 entry's statistics go through the bank's checks of shapes, dtypes, finiteness and
signs); anything else is refused with one message naming the entry and what to do
(:data:`WHAT_TO_DO`). When the resumed run's ``accumulative_counts`` makes the resumed
iteration end an optimizer step, the saved step's statistics and gradients are dropped, with
a warning.
"""
from typing import Any, List, Optional

from ...models.utils.prototype_bank import PrototypeBank
from .optimizer_steps import (accumulated_gradients, accumulative_counts,
                              optimizer_stepped, restore_gradients)

STATE_KEY = 'prototype_update_hook'
STATE_VERSION = 2
OWNER = 'PrototypeUpdateHook'
WHAT_TO_DO = (
    'Resume with the model and config that wrote the checkpoint, or from another '
    "checkpoint of the run; or delete the checkpoint's "
    f"'{STATE_KEY}' entry (ckpt = torch.load(path, weights_only=False); "
    f"del ckpt['{STATE_KEY}']; torch.save(ckpt, path)) to resume without it: the "
    'gradients of an unfinished accumulated optimizer step are lost.')
# Version 1's keys (the banks' state was saved here).
V1_KEYS = {'version', 'iter', 'window_updates', 'window', 'pending', 'gradients'}
V2_KEYS = {'version', 'iter', 'gradients'}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def save_state(runner, checkpoint: dict) -> None:
    """Add the entry to ``checkpoint`` (see the module doc)."""
    checkpoint[STATE_KEY] = dict(
        version=STATE_VERSION,
        iter=int((checkpoint.get('meta') or {}).get('iter', runner.iter + 1)),
        gradients=None if optimizer_stepped(runner) else accumulated_gradients(runner, OWNER))


def load_state(runner, banks: List[PrototypeBank], state: Optional[dict]) -> None:
    """After a resumed checkpoint loaded (the banks' own state included): restore the
    entry's gradients, or drop them and the banks' pending statistics where this run's
    resumed iteration ends an optimizer step; a version-1 entry's bank state goes into the
    banks (the window only where the bank re-seeds).

    Args:
        runner: The runner, at the resumed iteration.
        banks (list[PrototypeBank]): The model's banks.
        state (dict, optional): The entry; None for a checkpoint written without it.

    Raises:
        ValueError: The entry does not fit this model or run (says what to do).
    """
    acc = accumulative_counts(runner)
    mid_step = runner.iter % acc != 0
    if state is None:
        if not any(bank.has_training_state() for bank in banks):
            runner.logger.info(
                f'{OWNER}: the resumed checkpoint holds no re-seeding window or pending '
                'statistics (written by an earlier version, or none to save): the '
                f're-seeding window restarts at iteration {runner.iter}.')
        state = dict(version=STATE_VERSION, iter=runner.iter, gradients=None)
    problem = _state_problem(state, len(banks), runner.iter)
    if problem is not None:
        raise ValueError(
            f"{OWNER}: cannot restore its state from the resumed checkpoint's "
            f"'{STATE_KEY}' entry: {problem}. {WHAT_TO_DO}")
    if state['version'] == 1:
        _restore_version_1(state, banks, mid_step)
    dropped = [bank.drop_pending() for bank in banks] if not mid_step else []
    if (any(dropped) or state['gradients']) and not mid_step:
        runner.logger.warning(
            f'{OWNER}: the checkpoint was saved in the middle of an accumulated optimizer '
            f'step, but with accumulative_counts={acc} iteration {runner.iter} ends a step '
            'in this run: its pending prototype statistics and gradients are dropped.')
    if mid_step and state['gradients']:
        restore_gradients(runner, state['gradients'], OWNER, WHAT_TO_DO)


def _restore_version_1(state: dict, banks: List[PrototypeBank], mid_step: bool) -> None:
    """A version-1 entry's window and pending statistics, into the banks."""
    for i, bank in enumerate(banks):
        try:
            bank.restore(state['window'].get(i) if bank.reseed_interval else None,
                         state['pending'].get(i) if mid_step else None,
                         state['window_updates'] if bank.reseed_interval else 0)
        except ValueError as err:
            raise ValueError(
                f"{OWNER}: cannot restore ProtoHead {i}'s state from the resumed "
                f"checkpoint's '{STATE_KEY}' entry: {err}. {WHAT_TO_DO}") from err


def _state_problem(state: Any, num_banks: int, iteration: int) -> Optional[str]:
    """What is wrong with a saved entry (None: nothing)."""
    version = state.get('version') if isinstance(state, dict) else None
    keys = V1_KEYS if version == 1 else V2_KEYS
    if not isinstance(state, dict) or not keys <= set(state):
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        return f'expected a dict with keys {sorted(keys)}, got {got}'
    if version not in (1, STATE_VERSION):
        return (f'it has version {version!r}; this version of mmseg_proto reads versions '
                f'1 and {STATE_VERSION}')
    if not _is_int(state['iter']):
        return f"iter must be an integer, got {state['iter']!r}"
    if version == 1:
        if not (_is_int(state['window_updates']) and state['window_updates'] >= 0):
            return f"window_updates must be an integer >= 0, got {state['window_updates']!r}"
        for name in ('window', 'pending'):
            heads = state[name]
            if not (isinstance(heads, dict) and all(
                    _is_int(i) and 0 <= i < num_banks for i in heads)):
                return (f'{name} must map ProtoHead indices below {num_banks} '
                        f'(the model has {num_banks} ProtoHead(s)), got '
                        f'{heads!r:.200}')
    if not (state['gradients'] is None or isinstance(state['gradients'], dict)):
        return 'gradients must be a dict or None'
    if state['iter'] != iteration:
        return (f"it was saved at iteration {state['iter']} but the run resumes at "
                f'iteration {iteration}')
    return None
