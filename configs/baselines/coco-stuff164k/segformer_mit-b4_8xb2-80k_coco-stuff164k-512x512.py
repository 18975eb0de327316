# Parametric baseline: SegFormer MiT-B4 on COCO-Stuff164k, 80k iterations,
# batch 16 (8x2), crop 512x512.
# MMSeg 1.2.2 ships no SegFormer config for COCO-Stuff: composed as
# ./segformer_mit-b2_8xb2-80k_coco-stuff164k-512x512.py (see there), with the
# MiT-B4 backbone of mmseg::segformer/segformer_mit-b4_8xb2-160k_ade20k-512x512.py.
# The ProtoSeg counterpart is
# configs/protoseg/coco-stuff164k/protoseg_segformer_mit-b4_8xb2-80k_coco-stuff164k-512x512.py
_base_ = ['./segformer_mit-b2_8xb2-80k_coco-stuff164k-512x512.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segformer/mit_b4_20220624-d588d980.pth'  # noqa
model = dict(
    backbone=dict(
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint),
        embed_dims=64,
        num_heads=[1, 2, 5, 8],
        num_layers=[3, 8, 27, 3]),
    decode_head=dict(in_channels=[64, 128, 320, 512]))
