"""The optimizer steps of a run, as a hook sees them.

Whether the optimizer stepped in this iteration (gradient accumulation:
``optim_wrapper.accumulative_counts > 1``), how many steps are left, and the gradients of an
unfinished accumulated step, which mmengine's checkpoints drop: saved and put back so that a
run resumed in the middle of such a step continues bit for bit.
"""
from typing import Any, Dict, Optional

import torch
from mmengine.dist import get_world_size
from mmengine.model import is_model_wrapper


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def accumulative_counts(runner) -> int:
    """The optimizer wrapper's ``accumulative_counts`` (1 if it has none)."""
    counts = getattr(getattr(runner, 'optim_wrapper', None), '_accumulative_counts', 1)
    return counts if _is_int(counts) and counts >= 1 else 1


def optimizer_stepped(runner) -> bool:
    """Whether the optimizer stepped in this iteration: False only on the accumulating
    iterations of ``accumulative_counts > 1``."""
    should_update = getattr(getattr(runner, 'optim_wrapper', None), 'should_update', None)
    return bool(should_update()) if callable(should_update) else True


def optimizer_steps_left(runner) -> Optional[int]:
    """Optimizer steps after this iteration's, to the end of training (None if the runner
    has no ``max_iters``). The optimizer steps every ``accumulative_counts`` iterations
    and at the last one."""
    max_iters = getattr(runner, 'max_iters', None)
    if not max_iters:
        return None
    left = max(max_iters - (runner.iter + 1), 0)
    return -(-left // accumulative_counts(runner))


def _model(runner) -> torch.nn.Module:
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


def accumulated_gradients(runner, owner: str) -> Optional[Dict[str, torch.Tensor]]:
    """CPU copies of the gradients accumulated since the last optimizer step, by parameter
    name. With several processes each holds its own and none is saved: None, with a
    warning from ``owner`` saying so."""
    if get_world_size() > 1:
        runner.logger.warning(
            f'{owner}: this checkpoint is written in the middle of an accumulated optimizer '
            f'step (accumulative_counts={accumulative_counts(runner)}, iteration '
            f'{runner.iter + 1}); with several processes the gradients accumulated on each '
            'are not saved, so a run resumed from it loses them. Save checkpoints at '
            'multiples of accumulative_counts (default_hooks.checkpoint.interval).')
        return None
    return {name: p.grad.detach().cpu().clone()
            for name, p in _model(runner).named_parameters() if p.grad is not None}


def restore_gradients(runner, grads: Dict[str, Any], owner: str) -> None:
    """Put back the gradients of :func:`accumulated_gradients`.

    Raises:
        ValueError: A gradient names a parameter the model lacks or shapes differently.
    """
    params = dict(_model(runner).named_parameters())
    misfits = [name for name, grad in grads.items()
               if name not in params or not isinstance(grad, torch.Tensor)
               or grad.shape != params[name].shape]
    if misfits:
        raise ValueError(
            f'{owner}: the resumed checkpoint holds accumulated gradients for '
            f'{len(misfits)} parameter(s) this model lacks or shapes differently (e.g. '
            f'{misfits[0]!r}); resume with the model that wrote the checkpoint.')
    for name, grad in grads.items():
        param = params[name]
        param.grad = grad.to(device=param.device, dtype=param.dtype).clone()
    runner.logger.info(
        f'{owner}: restored the gradients of {len(grads)} parameters accumulated in the '
        "checkpoint's unfinished optimizer step (mmengine's warning that they are lost "
        'does not apply).')
