"""The ``mmseg_proto`` registry scope: children of MMSeg's registries, with nothing of their own.

A config that inherits ours through ``_base_ = ['mmseg_proto::...']`` gets
``_scope_='mmseg_proto'`` on every dict with a ``type`` (mmengine marks what an external base
defines with its scope). Building such a dict, mmengine imports ``mmseg_proto.registry`` and
looks the type up in the registry of that scope, then in its parents: MMSeg's registry (where
importing mmseg_proto registers ProtoHead, PrototypeUpdateHook, CamVidDataset, ...), then
mmengine's. Without this module those lookups would fall back to mmengine's root registries
and miss every MMSeg class. Each child lists its parent's ``locations`` too: MMSeg fills its
registries lazily, on the first lookup in them, and a lookup that starts here must trigger that
import. Nothing imports this module but mmengine, when it meets that scope.
"""
from mmengine.registry import Registry
from mmseg import registry as mmseg

import mmseg_proto  # noqa: F401  (registers our classes in MMSeg's registries)

SCOPE = 'mmseg_proto'


def _child(parent: Registry, locations=()) -> Registry:
    # 'mmseg_proto' first: with no location at all, mmengine would call a
    # `mmseg_proto.utils.register_all_modules` (its fallback for old packages).
    return Registry(parent.name, parent=parent, scope=SCOPE,
                    locations=['mmseg_proto', *locations])


RUNNERS = _child(mmseg.RUNNERS)
RUNNER_CONSTRUCTORS = _child(mmseg.RUNNER_CONSTRUCTORS)
LOOPS = _child(mmseg.LOOPS)
HOOKS = _child(mmseg.HOOKS, ['mmseg.engine.hooks'])
DATASETS = _child(mmseg.DATASETS, ['mmseg.datasets'])
DATA_SAMPLERS = _child(mmseg.DATA_SAMPLERS)
TRANSFORMS = _child(mmseg.TRANSFORMS, ['mmseg.datasets.transforms'])
MODELS = _child(mmseg.MODELS, ['mmseg.models'])
MODEL_WRAPPERS = _child(mmseg.MODEL_WRAPPERS, ['mmseg.models'])
WEIGHT_INITIALIZERS = _child(mmseg.WEIGHT_INITIALIZERS, ['mmseg.models'])
OPTIMIZERS = _child(mmseg.OPTIMIZERS, ['mmseg.engine.optimizers'])
OPTIM_WRAPPERS = _child(mmseg.OPTIM_WRAPPERS, ['mmseg.engine.optimizers'])
OPTIM_WRAPPER_CONSTRUCTORS = _child(mmseg.OPTIM_WRAPPER_CONSTRUCTORS,
                                    ['mmseg.engine.optimizers'])
PARAM_SCHEDULERS = _child(mmseg.PARAM_SCHEDULERS, ['mmseg.engine.schedulers'])
METRICS = _child(mmseg.METRICS, ['mmseg.evaluation'])
EVALUATOR = _child(mmseg.EVALUATOR, ['mmseg.evaluation'])
TASK_UTILS = _child(mmseg.TASK_UTILS, ['mmseg.models'])
VISUALIZERS = _child(mmseg.VISUALIZERS, ['mmseg.visualization'])
VISBACKENDS = _child(mmseg.VISBACKENDS, ['mmseg.visualization'])
LOG_PROCESSORS = _child(mmseg.LOG_PROCESSORS, ['mmseg.visualization'])
INFERENCERS = _child(mmseg.INFERENCERS)
