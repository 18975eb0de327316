"""Train a segmentor, on one or many processes, including CPU-only hosts.

In the package because ``python -m mmseg_proto.tools.train`` and ``mim train mmseg_proto``
run it from an installed package, where no tools/ folder is on the path.

Behaves like MMSeg's ``tools/train.py`` (same arguments: ``--work-dir``,
``--resume``, ``--amp``, ``--cfg-options``, ``--launcher``) and adds what
multi-process training on CPU needs, which mmengine 0.10's ``pytorch``
launcher cannot do on a CPU-only torch (it calls ``torch.cuda.set_device``):

* a ``gloo`` process group is initialised before the Runner is built, so
  mmengine skips its own initialisation;
* ``model_wrapper_cfg = dict(type='MMDistributedDataParallel',
  device_ids=None)`` (mmengine's default passes ``device_ids=[LOCAL_RANK]``,
  which is for GPU modules);
* ``SyncBN`` layers in the config become ``BN`` (SyncBatchNorm refuses CPU
  modules under DDP), with a warning: each process then normalises with its
  own batch statistics.

Launch it with torchrun (or ``tools/dist_train_cpu.sh CONFIG NPROC``)::

    torchrun --standalone --nproc_per_node=2 -m mmseg_proto.tools.train \\
        CONFIG [--work-dir DIR] [--resume] [--cfg-options k=v ...]

Without torchrun it trains in one process. When CUDA is available nothing
above is changed and the run is exactly MMSeg's (``nccl`` process group set
up by mmengine); GPU users can keep ``mim train mmsegmentation CONFIG
--launcher pytorch --gpus N``.
"""
import argparse
import logging
import os
import os.path as osp
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as torch_dist
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log

from mmseg_proto.utils.config_scope import mmseg_proto_config_scope

#: Norm layer types that need a CUDA process group.
SYNC_NORMS = ('SyncBN', 'MMSyncBN')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (MMSeg's ``tools/train.py`` arguments).

    Args:
        argv (Sequence[str], optional): Arguments; ``sys.argv[1:]`` if None.

    Returns:
        argparse.Namespace: The parsed arguments.
    """
    parser = argparse.ArgumentParser(
        description='Train a segmentor (mmseg_proto; multi-process on CPU '
        'when started by torchrun)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        action='store_true',
        default=False,
        help='resume from the latest checkpoint in the work_dir '
        'automatically')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training (CUDA only: '
        "mmengine's AmpOptimWrapper refuses CPU)")
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file.')
    parser.add_argument(
        '--launcher',
        choices=['auto', 'none', 'pytorch', 'slurm', 'mpi'],
        default='auto',
        help="job launcher; 'auto' (default): 'pytorch' when started by "
        "torchrun (WORLD_SIZE set), else 'none'")
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if args.launcher == 'auto':
        args.launcher = 'pytorch' if 'WORLD_SIZE' in os.environ else 'none'
    return args


def revert_sync_norms(cfg: Any) -> List[str]:
    """Replace SyncBN norm configs by BN, in place, anywhere in a config.

    Args:
        cfg (Any): A config (dict / list nest).

    Returns:
        list[str]: Dotted paths of the replaced entries.
    """
    changed: List[str] = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get('type') in SYNC_NORMS:
                node['type'] = 'BN'
                changed.append(path or '<root>')
            for key, value in node.items():
                visit(value, f'{path}.{key}' if path else str(key))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                visit(value, f'{path}[{i}]')

    visit(cfg, '')
    return changed


def setup_cpu_distributed(cfg: Config) -> None:
    """Prepare a config and the process group for multi-process CPU training.

    Initialises a ``gloo`` process group from the torchrun environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) unless one
    exists, wraps the model with ``MMDistributedDataParallel(device_ids=None)``
    and turns SyncBN into BN.

    Args:
        cfg (Config): The training config; modified in place.

    Raises:
        RuntimeError: If the torchrun environment variables are missing.
    """
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
               if k not in os.environ]
    if missing and not torch_dist.is_initialized():
        raise RuntimeError(
            f'--launcher pytorch on CPU needs the torchrun environment '
            f'(missing {missing}); start this module with `torchrun '
            '--nproc_per_node=N -m mmseg_proto.tools.train CONFIG` or '
            'tools/dist_train_cpu.sh CONFIG N')
    if not torch_dist.is_initialized():
        dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}) or {})
        kwargs = {}
        if dist_cfg.get('timeout') is not None:
            import datetime
            kwargs['timeout'] = datetime.timedelta(
                seconds=dist_cfg['timeout'])
        torch_dist.init_process_group(
            backend='gloo',
            rank=int(os.environ['RANK']),
            world_size=int(os.environ['WORLD_SIZE']),
            **kwargs)
    cfg.setdefault('env_cfg', ConfigDict())
    cfg.env_cfg.setdefault('dist_cfg', ConfigDict())
    cfg.env_cfg.dist_cfg.backend = 'gloo'

    wrapper = cfg.get('model_wrapper_cfg', None)
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None)
    elif wrapper.get('type', 'MMDistributedDataParallel') in (
            'MMDistributedDataParallel', 'MMSeparateDistributedDataParallel'):
        wrapper['device_ids'] = None

    changed = revert_sync_norms(cfg.model)
    if cfg.get('sync_bn', None) is not None:
        cfg.sync_bn = None
        changed.append('sync_bn')
    if changed:
        print_log(
            'CPU multi-process training: SyncBN is CUDA only, reverted to BN '
            f'(each process uses its own batch statistics) at: {changed}',
            logger='current',
            level=logging.WARNING)


def build_config(args: argparse.Namespace) -> Config:
    """Load the config and apply the command line, as MMSeg's train.py does.

    Args:
        args (argparse.Namespace): Output of :func:`parse_args`.

    Returns:
        Config: The config to build the Runner from.

    Raises:
        RuntimeError: For ``--amp`` on a host without CUDA.
    """
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])

    cuda = torch.cuda.is_available()
    if args.amp:
        if not cuda:
            raise RuntimeError(
                "--amp needs CUDA: mmengine's AmpOptimWrapper refuses CPU "
                '(it asserts a GPU/NPU/MLU). On CPU train in fp32, or run '
                "the model under torch.autocast('cpu', dtype=torch.bfloat16)"
                ' yourself; see docs/distributed.md')
        optim_wrapper = cfg.optim_wrapper.type
        if optim_wrapper == 'AmpOptimWrapper':
            print_log('AMP training is already enabled in your config.',
                      logger='current', level=logging.WARNING)
        else:
            assert optim_wrapper == 'OptimWrapper', (
                '`--amp` is only supported when the optimizer wrapper type is '
                f'`OptimWrapper` but got {optim_wrapper}.')
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'

    cfg.resume = args.resume
    if args.launcher == 'pytorch' and not cuda:
        setup_cpu_distributed(cfg)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Train from the command line.

    Configs may inherit ours from an installed mmseg_proto through ``mmseg_proto::``
    (:mod:`mmseg_proto.utils.config_scope`).

    Args:
        argv (Sequence[str], optional): Arguments; ``sys.argv[1:]`` if None.
    """
    args = parse_args(argv)
    with mmseg_proto_config_scope():
        cfg = build_config(args)

    from mmengine.runner import Runner
    from mmseg.registry import RUNNERS
    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    try:
        runner.train()
    finally:
        if torch_dist.is_initialized() and cfg.launcher == 'pytorch' and \
                not torch.cuda.is_available():
            torch_dist.destroy_process_group()


if __name__ == '__main__':
    main()
