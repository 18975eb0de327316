# ProtoSeg: UperNet (Swin-B, window 7, ImageNet-1k pre-trained) with
# nonparametric prototypes (K=10, mu=0.999, CE + 0.01 PPC + 0.001 PPD), same
# data, schedule and optimizer as the baseline.
# Baseline: mmseg::swin/swin-base-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py
# Paper (Table 1, ADE20K val mIoU): 48.0 -> 48.6. Params (Table 1): 90.6M ->
# 90.5M.
# projection='none': the model is the baseline minus its classifier plus two
# LayerNorms (feat_norm, mask_norm); tools/analysis_tools/count_params.py prints the counts.
_base_ = ['mmseg::swin/swin-base-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py', '../../_base_/protoseg_runtime.py']
model = dict(decode_head=dict(_delete_=True, type='ProtoHead', num_classes=150,
                              decoder={{_base_.model.decode_head}}))
