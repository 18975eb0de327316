"""Two real processes (torchrun, gloo, MMDistributedDataParallel) on CPU.

Trains the shipped CamVid ProtoSeg config for a few iterations through
``tools/dist_train_cpu.sh`` (the supported CPU multi-process path,
:mod:`mmseg_proto.tools.train`) with 2 ranks x batch 1, and the same config
in one process with batch 2 over the same samples, then checks that

* both ranks ran wrapped in ``MMDistributedDataParallel`` on a world of 2;
* after training the prototypes (and all weights) are identical on both
  ranks: :class:`PrototypeUpdateHook` all-reduces the per-prototype sums and
  counts, and mmengine never synchronises buffers itself;
* they equal the single-process prototypes (to float tolerance), for a
  ``num_prototypes=1`` decode head and for a second ProtoHead (auxiliary
  head, ``num_prototypes=10``, loss weights 0 so that it does not change the
  gradients; it also exercises the hook on several heads): the all-reduced
  update is the update of the global batch, and with ``sync_sinkhorn``
  (default) the Sinkhorn marginals are all-reduced too, so the K > 1
  clustering is the global-batch one (measured ~7e-6 max difference after 4
  iterations for a prototype movement of ~1.5e-1; with per-process
  Sinkhorn it was ~5e-2).

What makes the two runs comparable (all set in a derived config):

* identical global batches: ``InfiniteSampler(shuffle=False)`` gives rank r
  samples r, r+2, ...; at iteration t the ranks see samples 2t and 2t+1,
  the single process (batch 2) sees [2t, 2t+1];
* no randomness in the data: the random resize/crop/flip/photometric train
  pipeline is replaced by a fixed resize to 160x160;
* no randomness in the model: decoder dropout and the backbone's
  dropout/drop-path set to 0;
* the decoders' BatchNorm replaced by GroupNorm: BN statistics of a
  per-rank batch of 1 differ from those of the global batch of 2 (SyncBN is
  CUDA-only), while GN normalises each sample on its own, so the forward is
  the same whatever the batch split;
* SGD with a constant learning rate instead of AdamW with warm-up: Adam's
  first steps are ~lr * sign(grad) and turn float-level gradient
  differences of near-zero gradients into lr-sized weight differences; and
  ``momentum=0.9`` so that prototypes move visibly within 4 iterations;
  re-seeding every 2 iterations (its statistics are sums: the same on every
  rank and equal to one process's).

Remaining, accepted difference: the cross-entropy is averaged over all
pixels (``avg_non_ignore=False``: equal counts per rank, exact under DDP's
gradient mean), but the PPC/PPD losses are means over the non-void pixels of
each rank's batch; CamVid frames have 1-10 % void pixels, so the DDP
gradient of these two small terms (weights 0.01 and 0.001) differs slightly
from the global-batch gradient (measured: max prototype difference 4e-6 to
5e-5; ~1e-7 with CE alone). Hence the tolerance on the comparison with the
single process; the ranks themselves must agree bit for bit.
"""
import os
import os.path as osp
import socket
import subprocess
import sys
import textwrap

import torch
from conftest import PROTO_CFG, REPO
from mmengine.runner import CheckpointLoader  # mmengine's loader, as the Runner uses

ITERS = 4

DUMP_HOOK = '''
"""Test-only hook: every rank dumps its prototypes and weights."""
import os.path as osp

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS


@HOOKS.register_module()
class DumpPrototypesHook(Hook):
    priority = 'LOWEST'

    def _dump(self, runner, name):
        model = runner.model
        inner = model.module if is_model_wrapper(model) else model
        torch.save(
            dict(wrapper=type(model).__name__,
                 world_size=get_world_size(),
                 iter=runner.iter,
                 prototypes=inner.decode_head.prototypes.clone(),
                 aux_prototypes=inner.auxiliary_head.prototypes.clone(),
                 state_dict={k: v.detach().clone()
                             for k, v in inner.state_dict().items()}),
            osp.join(runner.work_dir, f'{name}_rank{get_rank()}.pt'))

    def before_train(self, runner):
        self._dump(runner, 'start')

    def after_train(self, runner):
        self._dump(runner, 'end')
'''


def write_config(tmp_path) -> str:
    """A config derived from the shipped CamVid ProtoSeg config."""
    (tmp_path / 'dump_protos_hook.py').write_text(DUMP_HOOK)
    cfg = tmp_path / 'dist_cfg.py'
    cfg.write_text(textwrap.dedent(f'''
        _base_ = [{PROTO_CFG!r}]
        custom_imports = dict(imports=['mmseg_proto', 'dump_protos_hook'],
                              allow_failed_imports=False)
        model = dict(
            backbone=dict(drop_rate=0.0, attn_drop_rate=0.0,
                          drop_path_rate=0.0),
            decode_head=dict(
                momentum=0.9, num_prototypes=1,
                decoder=dict(
                    dropout_ratio=0.0,
                    norm_cfg=dict(type='GN', num_groups=32,
                                  requires_grad=True))),
            auxiliary_head=dict(
                type='ProtoHead', num_classes=11, num_prototypes=10,
                momentum=0.9,
                decoder=dict(type='FCNHead', in_channels=256, in_index=3,
                             channels=64, num_convs=1, concat_input=False,
                             dropout_ratio=0.0,
                             norm_cfg=dict(type='GN', num_groups=8,
                                           requires_grad=True)),
                loss_decode=[
                    dict(type='CrossEntropyLoss', loss_weight=0.0),
                    dict(type='PixelPrototypeContrastLoss', loss_weight=0.0),
                    dict(type='PixelPrototypeDistanceLoss', loss_weight=0.0),
                ]))
        train_pipeline = [
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations'),
            dict(type='Resize', scale=(160, 160), keep_ratio=False),
            dict(type='PackSegInputs'),
        ]
        train_dataloader = dict(
            batch_size=1,
            sampler=dict(type='InfiniteSampler', shuffle=False),
            dataset=dict(pipeline=train_pipeline))
        optim_wrapper = dict(
            _delete_=True, type='OptimWrapper',
            optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
        param_scheduler = [
            dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0,
                 end={ITERS})
        ]
        train_cfg = dict(max_iters={ITERS}, val_interval=100000)
        # No validation at all (mmengine validates after the last iteration whatever
        # val_interval says): conftest.without_validation.
        val_dataloader = None
        val_cfg = None
        val_evaluator = None
        default_hooks = dict(
            checkpoint=dict(interval={ITERS}),
            logger=dict(interval=1))
        custom_hooks = [
            dict(type='PrototypeUpdateHook', log_interval=1,
                 reseed_interval=2, reseed_min_share=0.5),
            dict(type='DumpPrototypesHook'),
        ]
        '''))
    return str(cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(cmd, tmp_path, name, **env_extra) -> None:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS='1',
        PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join(
            [str(tmp_path), REPO, env.get('PYTHONPATH', '')]),
        **env_extra)
    with open(tmp_path / f'{name}.log', 'w') as log:
        proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode != 0:
        tail = (tmp_path / f'{name}.log').read_text()[-4000:]
        raise AssertionError(f'{name} failed ({proc.returncode}):\n{tail}')


def test_two_ranks_match_each_other_and_single_process(tmp_path):
    cfg = write_config(tmp_path)
    dist_dir, single_dir = tmp_path / 'dist', tmp_path / 'single'
    run(['bash', osp.join(REPO, 'tools', 'dist_train_cpu.sh'), cfg, '2',
         '--work-dir', str(dist_dir)], tmp_path, 'dist',
        PORT=str(free_port()))
    run([sys.executable, '-m', 'mmseg_proto.tools.train', cfg, '--work-dir',
         str(single_dir), '--cfg-options', 'train_dataloader.batch_size=2'],
        tmp_path, 'single')

    ranks = [torch.load(dist_dir / f'end_rank{r}.pt') for r in (0, 1)]
    single = torch.load(single_dir / 'end_rank0.pt')
    start = torch.load(dist_dir / 'start_rank0.pt')
    for r, d in enumerate(ranks):
        assert d['wrapper'] == 'MMDistributedDataParallel', r
        assert d['world_size'] == 2 and d['iter'] == ITERS
    assert single['world_size'] == 1 and single['iter'] == ITERS
    # Same initial prototypes everywhere (same seed).
    torch.testing.assert_close(
        torch.load(dist_dir / 'start_rank1.pt')['prototypes'],
        start['prototypes'], rtol=0, atol=0)
    torch.testing.assert_close(
        torch.load(single_dir / 'start_rank0.pt')['prototypes'],
        start['prototypes'], rtol=0, atol=0)

    # K = 1 decode head: equal to the single process on the global batch.
    p0, p1, ps = (ranks[0]['prototypes'], ranks[1]['prototypes'],
                  single['prototypes'])
    moved = (p0 - start['prototypes']).abs().max().item()
    rank_diff = (p0 - p1).abs().max().item()
    single_diff = (p0 - ps).abs().max().item()
    # K = 10 auxiliary head: Sinkhorn synchronised across ranks.
    a0, a1, a_s = (ranks[0]['aux_prototypes'], ranks[1]['aux_prototypes'],
                   single['aux_prototypes'])
    aux_moved = (a0 - start['aux_prototypes']).abs().max().item()
    aux_rank_diff = (a0 - a1).abs().max().item()
    aux_single_diff = (a0 - a_s).abs().max().item()
    weight_diff = max((single['state_dict'][k] - v).abs().max().item()
                      for k, v in ranks[0]['state_dict'].items()
                      if v.is_floating_point() and 'prototypes' not in k)
    print(f'\nK=1:  max |prototype change| {moved:.3e}; max |rank0 - rank1| '
          f'{rank_diff:.3e}; max |ranks - single| {single_diff:.3e}\n'
          f'K=10: max |prototype change| {aux_moved:.3e}; max |rank0 - '
          f'rank1| {aux_rank_diff:.3e}; max |ranks - single| '
          f'{aux_single_diff:.3e}\n'
          f'weights: max |ranks - single| {weight_diff:.3e}')

    assert moved > 1e-2 and aux_moved > 1e-2  # the prototypes did train
    # Re-seeding ran (iteration 2) in both runs; the comparisons below include it.
    for name in ('dist', 'single'):
        assert 'PrototypeUpdateHook: iteration 2, re-seeded' in (
            tmp_path / f'{name}.log').read_text(), name
    # Ranks agree exactly: same all-reduced statistics, same update.
    assert rank_diff == 0.0 and aux_rank_diff == 0.0
    for key, value in ranks[0]['state_dict'].items():
        torch.testing.assert_close(ranks[1]['state_dict'][key], value,
                                   rtol=0, atol=0, msg=key)
    # One process on the same global batches: equal up to the per-rank
    # PPC/PPD normalisation (measured ~5e-5 here; ~1e-7 with CE only).
    assert single_diff < 3e-3 * moved
    assert aux_single_diff < 3e-3 * aux_moved
    assert weight_diff < 5e-4
    for p in (p0, a0):
        torch.testing.assert_close(p.norm(dim=-1), torch.ones(p.shape[:2]))

    # The checkpoint saved by rank 0 holds the synchronised prototypes.
    ckpt = CheckpointLoader.load_checkpoint(
        str(dist_dir / f'iter_{ITERS}.pth'), map_location='cpu')
    assert torch.equal(ckpt['state_dict']['decode_head.prototypes'], p0)
    assert torch.equal(ckpt['state_dict']['auxiliary_head.prototypes'], a0)
