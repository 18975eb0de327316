# ProtoSeg: SegFormer MiT-B0 (from scratch) + SegformerHead features +
# nonparametric prototypes (K=10), on CamVid at low resolution, sized for a
# CPU. Same backbone, decoder, data and schedule as the parametric baseline
# configs/baselines/camvid/segformer_mit-b0_1xb4-80it_camvid-160x160.py;
# projection='none', so the model is exactly the baseline minus its 1x1-conv
# classifier, plus two LayerNorms (feat_norm, mask_norm).
_base_ = ['../../baselines/camvid/segformer_mit-b0_1xb4-80it_camvid-160x160.py']
custom_imports = dict(imports=['mmseg_proto'], allow_failed_imports=False)

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
            align_corners=False),
        projection='none',
        num_prototypes=10,
        momentum=0.999,
        sinkhorn_epsilon=0.05,
        sinkhorn_iters=3,
        loss_decode=[
            dict(type='CrossEntropyLoss', loss_weight=1.0),
            dict(type='PixelPrototypeContrastLoss', loss_weight=0.01),
            dict(type='PixelPrototypeDistanceLoss', loss_weight=0.001),
        ]))
custom_hooks = [dict(type='PrototypeUpdateHook', log_interval=10)]
