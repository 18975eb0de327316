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


def restore_gradients(runner, grads: Dict[str, Any], owner: str, what_to_do: str) -> None:
    """Put back the gradients of :func:`accumulated_gradients`.

    Non-finite gradients are refused unless the optimizer wrapper has a loss scaler
    (``AmpOptimWrapper``), which skips the step they end in, as in the run that saved
    them; otherwise the step would write them into every parameter.

    Args:
        runner: The runner.
        grads (dict): {parameter name: gradient} from the checkpoint.
        owner (str): Who restores them (the messages' first word).
        what_to_do (str): The end of the messages: what the user can do.

    Raises:
        ValueError: A gradient names a parameter the model lacks, is not a floating-point
            tensor of the parameter's shape, or holds non-finite values.
    """
    params = dict(_model(runner).named_parameters())
    problem = _gradients_problem(grads, params,
                                 _has_loss_scaler(getattr(runner, 'optim_wrapper', None)))
    if problem is not None:
        raise ValueError(f"{owner}: the resumed checkpoint's accumulated gradients "
                         f'{problem}. {what_to_do}')
    for name, grad in grads.items():
        param = params[name]
        param.grad = grad.to(device=param.device, dtype=param.dtype).clone()
    runner.logger.info(
        f'{owner}: restored the gradients of {len(grads)} parameters accumulated in the '
        "checkpoint's unfinished optimizer step (mmengine's warning that they are lost "
        'does not apply).')


def _has_loss_scaler(optim_wrapper: Any) -> bool:
    """Whether the wrapper skips steps with non-finite gradients (AMP's loss scaler)."""
    return getattr(optim_wrapper, 'loss_scaler', None) is not None


def _gradients_problem(grads: Dict[str, Any], params: Dict[str, torch.Tensor],
                       non_finite_ok: bool) -> Optional[str]:
    """What is wrong with saved gradients for ``params`` (None: nothing)."""
    misfits = [name for name, grad in grads.items()
               if name not in params or not isinstance(grad, torch.Tensor)
               or grad.shape != params[name].shape]
    if misfits:
        return (f'name {len(misfits)} parameter(s) this model lacks or shapes '
                f'differently (e.g. {misfits[0]!r})')
    for name, grad in grads.items():
        if not grad.is_floating_point():
            return f'hold {name!r} of dtype {grad.dtype}, not floating-point'
        if not (non_finite_ok or bool(torch.isfinite(grad).all())):
            return (f'hold non-finite values in {name!r}; the next optimizer step would '
                    'write them into every parameter it updates')
    return None
