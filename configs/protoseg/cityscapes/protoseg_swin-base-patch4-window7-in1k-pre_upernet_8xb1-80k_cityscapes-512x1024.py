# ProtoSeg: UperNet (Swin-B, window 7, ImageNet-1k pre-trained) with
# nonparametric prototypes (K=10, mu=0.999, CE + 0.01 PPC + 0.001 PPD), same
# data, schedule and optimizer as the baseline.
# Baseline: configs/baselines/cityscapes/swin-base-patch4-window7-in1k-pre_upernet_8xb1-80k_cityscapes-512x1024.py
# (MMSeg has no config for this combination; the baseline is composed from
# MMSeg _base_ model/dataset/schedule files, see its header.)
# Paper (Table 2, Cityscapes val mIoU): 79.8 -> 80.6.
# projection='none': the model is the baseline minus its classifier plus two
# LayerNorms (feat_norm, mask_norm); tools/analysis_tools/count_params.py prints the counts.
_base_ = ['../../baselines/cityscapes/swin-base-patch4-window7-in1k-pre_upernet_8xb1-80k_cityscapes-512x1024.py', '../../_base_/protoseg_runtime.py']
model = dict(decode_head=dict(_delete_=True, type='ProtoHead', num_classes=19,
                              decoder={{_base_.model.decode_head}}))
