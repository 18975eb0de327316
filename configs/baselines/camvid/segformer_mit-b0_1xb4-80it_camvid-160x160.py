# Parametric baseline: SegFormer MiT-B0 (from scratch) + MMSeg's SegformerHead
# with its 1x1-conv classifier, on CamVid at low resolution, sized for a CPU.
# The ProtoSeg counterpart is
# configs/protoseg/camvid/protoseg_segformer_mit-b0_1xb4-80it_camvid-160x160.py
_base_ = [
    'mmseg::_base_/models/segformer_mit-b0.py',
    'mmseg::_base_/default_runtime.py',
    '../../_base_/datasets/camvid.py',
]
custom_imports = dict(imports=['mmseg_proto'], allow_failed_imports=False)

norm_cfg = dict(type='BN', requires_grad=True)
crop_size = (160, 160)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(init_cfg=None),
    decode_head=dict(num_classes=11, norm_cfg=norm_cfg))

# AdamW as in MMSeg's SegFormer recipe, with a short warm-up for short runs.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.0006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'pos_block': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
            'head': dict(lr_mult=10.)
        }))
max_iters = 80
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0,
         end=10),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=10, end=max_iters,
         by_epoch=False)
]
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=40, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
randomness = dict(seed=0)
