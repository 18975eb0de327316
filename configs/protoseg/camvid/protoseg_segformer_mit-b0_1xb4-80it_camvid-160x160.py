# ProtoSeg: SegFormer MiT-B0 (from scratch) + SegformerHead features +
# nonparametric prototypes (K=10), on CamVid at low resolution, sized for a
# CPU. Same backbone, decoder, data and schedule as the parametric baseline
# configs/baselines/camvid/segformer_mit-b0_1xb4-80it_camvid-160x160.py;
# projection='none', so the model is exactly the baseline minus its 1x1-conv
# classifier, plus two LayerNorms (feat_norm, mask_norm).
# (The baseline already imports mmseg_proto, for CamVidDataset.)
_base_ = ['../../baselines/camvid/segformer_mit-b0_1xb4-80it_camvid-160x160.py']

norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    decode_head=dict(
        _delete_=True,
        type='ProtoHead',
        num_classes=11,
        decoder=dict(
            type='SegformerHead',
            in_channels=[32, 64, 160, 256],
            in_index=[0, 1, 2, 3],
            channels=256,
            dropout_ratio=0.1,
            norm_cfg=norm_cfg,
            align_corners=False)))
custom_hooks = [dict(type='PrototypeUpdateHook', log_interval=10)]
