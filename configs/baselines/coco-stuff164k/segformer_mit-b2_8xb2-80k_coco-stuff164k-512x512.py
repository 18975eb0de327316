# Parametric baseline: SegFormer MiT-B2 on COCO-Stuff164k, 80k iterations,
# batch 16 (8x2), crop 512x512.
# MMSeg 1.2.2 ships no SegFormer config for COCO-Stuff: this one is composed
# from MMSeg's _base_ files (models/segformer_mit-b0.py,
# datasets/coco-stuff164k.py, default_runtime.py, schedules/schedule_80k.py)
# with the model and AdamW recipe of
# mmseg::segformer/segformer_mit-b2_8xb2-160k_ade20k-512x512.py and the
# COCO-Stuff164k data and 80k schedule of
# mmseg::pspnet/pspnet_r101-d8_4xb4-80k_coco-stuff164k-512x512.py.
# Decoder channels=256 as in MMSeg (the original SegFormer uses 768).
# The ProtoSeg counterpart is
# configs/protoseg/coco-stuff164k/protoseg_segformer_mit-b2_8xb2-80k_coco-stuff164k-512x512.py
_base_ = [
    'mmseg::_base_/models/segformer_mit-b0.py',
    'mmseg::_base_/datasets/coco-stuff164k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segformer/mit_b2_20220624-66e8bf70.pth'  # noqa
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint),
        embed_dims=64,
        num_heads=[1, 2, 5, 8],
        num_layers=[3, 4, 6, 3]),
    decode_head=dict(in_channels=[64, 128, 320, 512], num_classes=171))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'pos_block': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
            'head': dict(lr_mult=10.)
        }))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=80000,
        by_epoch=False,
    )
]
train_dataloader = dict(batch_size=2, num_workers=2)
val_dataloader = dict(batch_size=1, num_workers=4)
test_dataloader = val_dataloader
