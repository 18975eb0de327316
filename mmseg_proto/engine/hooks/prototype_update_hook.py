"""Hook applying ProtoSeg's momentum prototype update every iteration."""
from typing import List, Optional

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS

from ...models.decode_heads.proto_head import ProtoHead


@HOOKS.register_module()
class PrototypeUpdateHook(Hook):
    """Apply the ProtoSeg prototype update after each training iteration.

    Every :class:`ProtoHead` in the model (decode and auxiliary heads alike)
    collects, during its ``loss``, the per-prototype sums and counts of the
    embeddings of correctly classified pixels. After the optimizer step this
    hook sums them over all processes (one all-reduce), so every rank applies
    the same update, equal to the one a single process would make on the
    whole global batch, then applies the momentum update. Non-finite
    statistics (an overflowing batch) skip the update with a warning instead
    of poisoning the prototypes; all ranks skip together.

    Use it through ``custom_hooks = [dict(type='PrototypeUpdateHook')]``.

    Args:
        log_interval (int): Every how many iterations to log prototype
            diagnostics (share of prototypes updated, mean prototype
            movement in degrees) to the message hub. 0 disables.
            Default: 50.
        priority (str | int): Hook priority. It must run before
            ``CheckpointHook`` so that saved prototypes include this
            iteration's update. Default: 'ABOVE_NORMAL'.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, log_interval: int = 50,
                 priority: Optional[str] = None) -> None:
        if log_interval < 0:
            raise ValueError('PrototypeUpdateHook: log_interval must be >= 0, '
                             f'got {log_interval}')
        self.log_interval = log_interval
        if priority is not None:
            self.priority = priority

    @staticmethod
    def proto_heads(model: torch.nn.Module) -> List[ProtoHead]:
        """All ProtoHeads of a (possibly wrapped) model."""
        if is_model_wrapper(model):
            model = model.module
        return [m for m in model.modules() if isinstance(m, ProtoHead)]

    def before_train(self, runner) -> None:
        if not self.proto_heads(runner.model):
            runner.logger.warning('PrototypeUpdateHook: the model has no '
                                  'ProtoHead; the hook does nothing.')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        for i, head in enumerate(self.proto_heads(runner.model)):
            stats = head.pop_prototype_statistics()
            if stats is None:
                continue
            sums, counts = stats
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
            if before is not None:
                tag = 'train/proto' if i == 0 else f'train/proto{i}'
                cos = (before * head.prototypes).sum(-1).clamp(-1, 1)
                shift = torch.rad2deg(torch.acos(cos)).flatten()
                hub = runner.message_hub
                hub.update_scalar(f'{tag}_updated',
                                  updated.float().mean().item())
                hub.update_scalar(f'{tag}_shift_deg', shift.mean().item())

    def _log_now(self, runner) -> bool:
        return self.log_interval > 0 and self.every_n_train_iters(
            runner, self.log_interval)
