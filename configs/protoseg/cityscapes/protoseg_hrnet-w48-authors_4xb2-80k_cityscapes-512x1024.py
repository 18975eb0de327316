# ProtoSeg with the authors' network exactly (tfzhou/ProtoSeg,
# openseg `hrnet_w48_proto`, Cityscapes, 80k iters, batch 8, lr 0.01, crop
# 1024x512): the config to run their released checkpoint
# `hrnet_w48_proto_lr1x_hrnet_proto_80k_latest.pth` after
# `tools/model_converters/convert_openseg_protoseg.py` (see docs/authors_checkpoint.md).
#
# - Backbone: HRNet-W48 as MMSeg's, but `HRNetRefAlign`, whose fuse layers
#   upsample with bilinear align_corners=True as the authors' HRNet does.
# - Decoder: branches resized (align_corners=True) and concatenated (720
#   channels), then the authors' `cls_head`: 3x3 conv 720->720 + BN + ReLU +
#   Dropout2d(0.1) = FCNHead(num_convs=1, kernel_size=3).
# - ProtoHead: the authors' `proj_head` (1x1 conv, ReLU, 1x1 conv:
#   projection='mlp'), `feat_norm`, K=10 prototypes, `mask_norm`.
#   reference_width_norm=True reproduces their extra L2 normalisation over
#   the image width: keep it for their weights, never for new training.
# The seg logits come out at 1/4 resolution and are upsampled to the image
# with align_corners=True.
_base_ = [
    'mmseg::hrnet/fcn_hr48_4xb2-80k_cityscapes-512x1024.py',
    '../../_base_/protoseg_runtime.py',
]

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(type='HRNetRefAlign'),
    decode_head=dict(
        _delete_=True,
        type='ProtoHead',
        num_classes=19,
        decoder=dict(
            type='FCNHead',
            in_channels=[48, 96, 192, 384],
            in_index=(0, 1, 2, 3),
            channels=720,
            input_transform='resize_concat',
            kernel_size=3,
            num_convs=1,
            concat_input=False,
            dropout_ratio=0.1,
            norm_cfg=norm_cfg,
            align_corners=True),
        projection='mlp',
        reference_width_norm=True,
        align_corners=True))
