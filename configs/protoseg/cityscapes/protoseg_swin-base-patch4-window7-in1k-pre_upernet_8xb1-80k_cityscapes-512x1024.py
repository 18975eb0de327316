# ProtoSeg: UperNet (Swin-B, window 7, ImageNet-1k pre-trained) with
# nonparametric prototypes (K=10, mu=0.999, CE + 0.01 PPC + 0.001 PPD), same
# data, schedule and optimizer as the baseline.
# Baseline: configs/baselines/cityscapes/swin-base-patch4-window7-in1k-pre_upernet_8xb1-80k_cityscapes-512x1024.py
# (MMSeg has no config for this combination; the baseline is composed from
# MMSeg _base_ model/dataset/schedule files, see its header.)
# Paper (Table 2, Cityscapes val mIoU): 79.8 -> 80.6.
# projection='none': the model is the baseline minus its classifier plus two
# LayerNorms (feat_norm, mask_norm); tools/count_params.py prints the counts.
_base_ = ['../../baselines/cityscapes/swin-base-patch4-window7-in1k-pre_upernet_8xb1-80k_cityscapes-512x1024.py']
custom_imports = dict(imports=['mmseg_proto'], allow_failed_imports=False)

# The decode head of the baseline becomes the ProtoHead's decoder (its 1x1-conv
# classifier and loss are dropped); the auxiliary head stays parametric.
model = dict(
    decode_head=dict(
        _delete_=True,
        type='ProtoHead',
        num_classes=19,
        decoder={{_base_.model.decode_head}},
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
custom_hooks = [dict(type='PrototypeUpdateHook')]
