# Parametric baseline: FCN (ResNet-101-D8) on COCO-Stuff164k, 80k iterations,
# batch 16 (4x4), crop 512x512.
# MMSeg 1.2.2 ships no FCN config for COCO-Stuff: this one is composed from
# MMSeg's _base_ files (models/fcn_r50-d8.py, datasets/coco-stuff164k.py,
# default_runtime.py, schedules/schedule_80k.py) exactly as
# mmseg::pspnet/pspnet_r101-d8_4xb4-80k_coco-stuff164k-512x512.py is for PSPNet,
# with the ResNet-101 of mmseg::fcn/fcn_r101-d8_4xb4-160k_ade20k-512x512.py.
# The ProtoSeg counterpart is
# configs/protoseg/coco-stuff164k/protoseg_fcn_r101-d8_4xb4-80k_coco-stuff164k-512x512.py
_base_ = [
    'mmseg::_base_/models/fcn_r50-d8.py',
    'mmseg::_base_/datasets/coco-stuff164k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained='open-mmlab://resnet101_v1c',
    backbone=dict(depth=101),
    decode_head=dict(num_classes=171),
    auxiliary_head=dict(num_classes=171))
