"""Write the checkpoints of ``tests/data`` with an older version of mmseg_proto.

``tests/test_models/test_heads/test_old_checkpoints.py`` loads them with the current code:
a checkpoint written by an earlier version must load unchanged (same prototypes, same
outputs) and resume bit for bit. Run this script with the old package first on the path,
e.g. from an export of the commit (``git archive <commit> | tar -x -C /tmp/old``)::

    python tests/data/make_old_checkpoints.py --code /tmp/old --what head --out tests/data
    python tests/data/make_old_checkpoints.py --code /tmp/old --what segmentor --out tests/data

- ``head``: ``protohead_<commit>.pth``, the state dict of a small ProtoHead (the settings of
  ``tests/conftest.py``'s ``make_head``) after one training step and its momentum update,
  a batch of decoder features and the head's logits on them (eval, no autograd, and with
  autograd);
- ``segmentor``: ``protoseg_tiny_<commit>_iter_3.pth``, the runner checkpoint after 3 of
  :data:`MAX_ITERS` iterations of a tiny ProtoSeg segmentor (:func:`tiny_config`) trained
  on the bundled CamVid images with gradient accumulation (2) and re-seeding every 2
  optimizer steps, so that it holds an unfinished accumulated step and a re-seeding
  window; ``expected`` adds the logits of the checkpointed model on fixed images and the
  state dict (prototypes included) at the end of the same, uninterrupted run (re-seeded
  after iteration 4).
"""
import argparse
import os.path as osp
import sys
import tempfile

HERE = osp.dirname(osp.abspath(__file__))
CAMVID_MINI = osp.join(osp.dirname(osp.dirname(HERE)), 'data', 'camvid_mini')
MAX_ITERS = 8


def tiny_config(work_dir: str, max_iters: int) -> dict:
    """A ProtoSeg segmentor of a few thousand parameters on the bundled CamVid images, fully
    deterministic (no dropout, no random augmentation, seed 0)."""
    norm_cfg = dict(type='GN', num_groups=4, requires_grad=True)
    pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                dict(type='Resize', scale=(48, 32), keep_ratio=False),
                dict(type='PackSegInputs')]
    return dict(
        default_scope='mmseg', custom_imports=dict(imports=['mmseg_proto']),
        work_dir=work_dir, randomness=dict(seed=0, deterministic=True),
        model=dict(
            type='EncoderDecoder',
            data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                                   std=[58.395, 57.12, 57.375], bgr_to_rgb=True,
                                   pad_val=0, seg_pad_val=255, size=(32, 48)),
            backbone=dict(type='MixVisionTransformer', in_channels=3, embed_dims=8,
                          num_stages=2, num_layers=[1, 1], num_heads=[1, 2],
                          patch_sizes=[7, 3], strides=[4, 2], sr_ratios=[2, 1],
                          out_indices=(0, 1),
                          mlp_ratio=2, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                          drop_path_rate=0.0),
            decode_head=dict(
                type='ProtoHead', num_classes=11, num_prototypes=2, momentum=0.9,
                decoder=dict(type='SegformerHead', in_channels=[8, 16], in_index=[0, 1],
                             channels=8, dropout_ratio=0.0, norm_cfg=norm_cfg,
                             align_corners=False)),
            train_cfg=dict(), test_cfg=dict(mode='whole')),
        train_dataloader=dict(
            batch_size=2, num_workers=0, persistent_workers=False,
            sampler=dict(type='InfiniteSampler', shuffle=True),
            dataset=dict(type='CamVidDataset', data_root=CAMVID_MINI, pipeline=pipeline,
                         data_prefix=dict(img_path='img_dir/train',
                                          seg_map_path='ann_dir/train'))),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=10**6),
        optim_wrapper=dict(type='OptimWrapper', accumulative_counts=2,
                           optimizer=dict(type='SGD', lr=0.05)),
        param_scheduler=[dict(type='ConstantLR', factor=1.0, by_epoch=False)],
        default_hooks=dict(
            timer=dict(type='IterTimerHook'),
            logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
            param_scheduler=dict(type='ParamSchedulerHook'),
            checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=3)),
        custom_hooks=[dict(type='PrototypeUpdateHook', log_interval=1, reseed_interval=2,
                           reseed_min_share=1.0)],
        log_processor=dict(by_epoch=False), log_level='WARNING')


def cpu_name() -> str:
    """This machine's CPU model (matmul rounding differs between CPUs)."""
    import platform
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def images(batch: int = 2):
    """Fixed inputs (B, 3, 32, 48), as the data preprocessor hands them to the model."""
    import torch
    return torch.randn(batch, 3, 32, 48, generator=torch.Generator().manual_seed(3))


def make_head_asset(out: str, commit: str) -> None:
    import torch
    sys.path.insert(0, osp.dirname(HERE))
    from conftest import make_head, make_samples
    torch.manual_seed(0)
    head = make_head(num_classes=4, channels=8, num_prototypes=3)
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 8, 6, 5, generator=g)]
    head.loss(feats, make_samples(torch.randint(0, 4, (2, 6, 5), generator=g)), None)
    stats = head.take_statistics()
    head.update_prototypes(stats.sums, stats.counts)
    head.eval()
    with torch.no_grad():
        logits = head(feats)
    path = osp.join(out, f'protohead_{commit}.pth')
    torch.save(dict(state_dict=head.state_dict(), inputs=feats[0], logits=logits,
                    logits_autograd=head(feats).detach(), commit=commit), path)
    print(path)


def make_segmentor_asset(out: str, commit: str) -> None:
    import shutil

    import torch
    from mmengine.config import Config
    from mmengine.runner import Runner
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner.from_cfg(Config(tiny_config(tmp, MAX_ITERS)))
        runner.train()
        final = {k: v.clone() for k, v in runner.model.state_dict().items()}
        path = osp.join(out, f'protoseg_tiny_{commit}_iter_3.pth')
        shutil.copy(osp.join(tmp, 'iter_3.pth'), path)
    checkpoint = torch.load(path, weights_only=False)
    model = Runner.from_cfg(Config(tiny_config(tempfile.mkdtemp(), MAX_ITERS))).model
    model.load_state_dict(checkpoint['state_dict'])
    model.eval()
    with torch.no_grad():
        logits = model(images(), mode='tensor')
    checkpoint['expected'] = dict(commit=commit, inputs=images(), logits=logits,
                                  final_state_dict=final, cpu=cpu_name())
    torch.save(checkpoint, path)
    print(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--code', required=True, help='checkout of the old version')
    p.add_argument('--what', choices=('head', 'segmentor'), required=True)
    p.add_argument('--commit', required=True, help='its commit, for the file name')
    p.add_argument('--out', default=HERE)
    args = p.parse_args()
    sys.path.insert(0, osp.abspath(args.code))
    import mmseg_proto
    assert osp.abspath(mmseg_proto.__file__).startswith(osp.abspath(args.code)), \
        mmseg_proto.__file__
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')
    if args.what == 'head':
        make_head_asset(args.out, args.commit)
    else:
        make_segmentor_asset(args.out, args.commit)


if __name__ == '__main__':
    main()
