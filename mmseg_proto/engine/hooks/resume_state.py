"""The exact-resume entry :class:`PrototypeUpdateHook` adds to every checkpoint.

``checkpoint['prototype_update_hook']`` is a dict of plain dicts, ints and tensors (loadable
with ``weights_only=True``):

- ``version``: 1;
- ``iter``: the iteration the checkpoint was saved after;
- ``window_updates``: optimizer steps so far in the current re-seeding window;
- ``window``: {ProtoHead index: the re-seeding usage summed over that window};
- ``pending``: {ProtoHead index: the statistics of the iterations accumulated into an
  optimizer step that has not happened yet};
- ``gradients``: {parameter name: gradient} accumulated so far in such a step, or None
  (with several processes each holds its own and none is saved, with a warning).

On ``--resume`` the entry is checked before anything is restored (entries only for the
ProtoHeads the model has; the bank's :meth:`~mmseg_proto.models.utils.PrototypeBank.restore`
checks shapes, dtypes, finiteness and signs; gradients must be finite floating-point tensors
of the model's parameters unless an AMP loss scaler skips their step); anything else is
refused with one message naming the entry and what to do (:data:`WHAT_TO_DO`).

ProtoHead ``i`` is the ``i``-th :class:`~mmseg_proto.models.utils.PrototypeBank` of the
model (decode head first). Every process holds the same window and pending statistics
(summed over processes every iteration), so process 0's checkpoint holds the global ones.
"""
from typing import Any, List, Optional

from ...models.utils.prototype_bank import PrototypeBank
from .optimizer_steps import (accumulated_gradients, accumulative_counts,
                              optimizer_stepped, restore_gradients)

STATE_KEY = 'prototype_update_hook'
STATE_VERSION = 1
OWNER = 'PrototypeUpdateHook'
WHAT_TO_DO = (
    'Resume with the model and config that wrote the checkpoint, or from another '
    "checkpoint of the run; or delete the checkpoint's "
    f"'{STATE_KEY}' entry (ckpt = torch.load(path, weights_only=False); "
    f"del ckpt['{STATE_KEY}']; torch.save(ckpt, path)) to resume without it: the "
    're-seeding window restarts and the statistics and gradients of an unfinished '
    'accumulated optimizer step are lost.')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def save_state(runner, banks: List[PrototypeBank], checkpoint: dict) -> None:
    """Add the entry for this run's ``banks`` to ``checkpoint`` (see the module doc)."""
    states = [bank.resume_state() for bank in banks]
    checkpoint[STATE_KEY] = dict(
        version=STATE_VERSION,
        iter=int((checkpoint.get('meta') or {}).get('iter', runner.iter + 1)),
        window_updates=banks[0].window_steps if banks else 0,
        window={i: s['window'] for i, s in enumerate(states) if s['window'] is not None},
        pending={i: s['pending'] for i, s in enumerate(states) if s['pending'] is not None},
        gradients=None if optimizer_stepped(runner) else accumulated_gradients(runner, OWNER))


def load_state(runner, banks: List[PrototypeBank], state: Optional[dict]) -> None:
    """Restore a resumed checkpoint's entry into ``banks`` (the window only where the bank
    re-seeds, :meth:`PrototypeBank.schedule_reseeding`) and the model's gradients.

    Args:
        runner: The runner, at the resumed iteration.
        banks (list[PrototypeBank]): The model's banks.
        state (dict, optional): The entry; None for a checkpoint written without it.

    Raises:
        ValueError: The entry does not fit this model or run (says what to do).
    """
    if state is None:
        runner.logger.info(
            f'{OWNER}: the resumed checkpoint holds no re-seeding window or pending '
            'statistics (written by an earlier version): the re-seeding window restarts '
            f'at iteration {runner.iter}.')
        return
    problem = _state_problem(state, len(banks), runner.iter)
    if problem is not None:
        raise ValueError(
            f"{OWNER}: cannot restore its state from the resumed checkpoint's "
            f"'{STATE_KEY}' entry: {problem}. {WHAT_TO_DO}")
    acc = accumulative_counts(runner)
    mid_step = runner.iter % acc != 0
    if (state['pending'] or state['gradients']) and not mid_step:
        runner.logger.warning(
            f'{OWNER}: the checkpoint was saved in the middle of an accumulated optimizer '
            f'step, but with accumulative_counts={acc} iteration {runner.iter} ends a step '
            'in this run: its pending prototype statistics and gradients are dropped.')
    for i, bank in enumerate(banks):
        try:
            bank.restore(state['window'].get(i) if bank.reseed_interval else None,
                         state['pending'].get(i) if mid_step else None,
                         state['window_updates'] if bank.reseed_interval else 0)
        except ValueError as err:
            raise ValueError(
                f"{OWNER}: cannot restore ProtoHead {i}'s state from the resumed "
                f"checkpoint's '{STATE_KEY}' entry: {err}. {WHAT_TO_DO}") from err
    if mid_step and state['gradients']:
        restore_gradients(runner, state['gradients'], OWNER, WHAT_TO_DO)


def _state_problem(state: Any, num_banks: int, iteration: int) -> Optional[str]:
    """What is wrong with a saved entry (None: nothing)."""
    keys = {'version', 'iter', 'window_updates', 'window', 'pending', 'gradients'}
    if not isinstance(state, dict) or not keys <= set(state):
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
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
