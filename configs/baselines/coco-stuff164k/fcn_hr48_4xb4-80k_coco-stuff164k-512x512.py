# Parametric baseline: HRNetV2-W48 + FCNHead on COCO-Stuff164k, 80k
# iterations, batch 16 (4x4), crop 512x512.
# MMSeg 1.2.2 ships no HRNet config for COCO-Stuff: this one is composed from
# MMSeg's _base_ files (models/fcn_hr18.py, datasets/coco-stuff164k.py,
# default_runtime.py, schedules/schedule_80k.py) as
# mmseg::hrnet/fcn_hr48_4xb4-80k_ade20k-512x512.py is for ADE20K, with the
# COCO-Stuff164k data, batch and schedule of
# mmseg::pspnet/pspnet_r101-d8_4xb4-80k_coco-stuff164k-512x512.py.
# The ProtoSeg counterpart is
# configs/protoseg/coco-stuff164k/protoseg_fcn_hr48_4xb4-80k_coco-stuff164k-512x512.py
_base_ = [
    'mmseg::_base_/models/fcn_hr18.py',
    'mmseg::_base_/datasets/coco-stuff164k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained='open-mmlab://msra/hrnetv2_w48',
    backbone=dict(
        extra=dict(
            stage2=dict(num_channels=(48, 96)),
            stage3=dict(num_channels=(48, 96, 192)),
            stage4=dict(num_channels=(48, 96, 192, 384)))),
    decode_head=dict(
        in_channels=[48, 96, 192, 384],
        channels=sum([48, 96, 192, 384]),
        num_classes=171))
