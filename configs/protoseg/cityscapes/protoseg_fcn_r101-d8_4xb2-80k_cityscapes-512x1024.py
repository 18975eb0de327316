# ProtoSeg: FCN (ResNet-101-D8, FCNHead) with nonparametric prototypes (K=10,
# mu=0.999, CE + 0.01 PPC + 0.001 PPD), same data, schedule and optimizer as
# the baseline.
# Baseline: mmseg::fcn/fcn_r101-d8_4xb2-80k_cityscapes-512x1024.py
# Paper (Table 2, Cityscapes val mIoU): 78.1 -> 79.1.
# projection='none': the model is the baseline minus its classifier plus two
# LayerNorms (feat_norm, mask_norm); tools/analysis_tools/count_params.py prints the counts.
_base_ = ['mmseg::fcn/fcn_r101-d8_4xb2-80k_cityscapes-512x1024.py', '../../_base_/protoseg_runtime.py']
model = dict(decode_head=dict(_delete_=True, type='ProtoHead', num_classes=19,
                              decoder={{_base_.model.decode_head}}))
