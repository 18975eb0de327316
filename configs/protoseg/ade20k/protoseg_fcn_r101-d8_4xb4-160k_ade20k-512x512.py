# ProtoSeg: FCN (ResNet-101-D8, FCNHead) with nonparametric prototypes (K=10,
# mu=0.999, CE + 0.01 PPC + 0.001 PPD), same data, schedule and optimizer as
# the baseline.
# Baseline: mmseg::fcn/fcn_r101-d8_4xb4-160k_ade20k-512x512.py
# Paper (Table 1, ADE20K val mIoU): 39.9 -> 41.1. Params (Table 1): 68.6M ->
# 68.5M.
# projection='none': the model is the baseline minus its classifier plus two
# LayerNorms (feat_norm, mask_norm); tools/analysis_tools/count_params.py prints the counts.
_base_ = ['mmseg::fcn/fcn_r101-d8_4xb4-160k_ade20k-512x512.py', '../../_base_/protoseg_runtime.py']
model = dict(decode_head=dict(_delete_=True, type='ProtoHead', num_classes=150,
                              decoder={{_base_.model.decode_head}}))
