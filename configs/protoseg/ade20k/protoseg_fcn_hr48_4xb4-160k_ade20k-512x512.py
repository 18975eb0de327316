# ProtoSeg: HRNet-W48 (HRNetV2 + FCNHead) with nonparametric prototypes (K=10,
# mu=0.999, CE + 0.01 PPC + 0.001 PPD), same data, schedule and optimizer as
# the baseline.
# Baseline: mmseg::hrnet/fcn_hr48_4xb4-160k_ade20k-512x512.py
# Paper (Table 1, ADE20K val mIoU): 42.0 -> 43.0. Params (Table 1): 65.9M ->
# 65.8M.
# projection='none': the model is the baseline minus its classifier plus two
# LayerNorms (feat_norm, mask_norm); tools/analysis_tools/count_params.py prints the counts.
_base_ = ['mmseg::hrnet/fcn_hr48_4xb4-160k_ade20k-512x512.py', '../../_base_/protoseg_runtime.py']
model = dict(decode_head=dict(_delete_=True, type='ProtoHead', num_classes=150,
                              decoder={{_base_.model.decode_head}}))
